"""Framing of server bytes: the fixture table fed three ways, and the receive buffer itself."""

from __future__ import annotations

import pytest

from popsync.pop3 import NEED_DATA, ClientConnection, ConnectionClosed, RemoteProtocolError
from popsync.pop3 import commands as cmd
from popsync.pop3.buffer import ReceiveBuffer
from popsync.pop3.state import ALLOWED

from .pop3_fixtures import (
    LOGIN,
    LOGIN_BYTES,
    LOGIN_SEEN,
    TRAILING_CAPA,
    TRAILING_CAPA_SEEN,
    TRANSCRIPTS,
    Broken,
    Transcript,
    events_for,
    feed_bytewise,
    feed_edges,
    summarize,
)

__all__: list[str] = []

_IDS = [t.name for t in TRANSCRIPTS]


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_IDS)
def test_fed_whole(transcript: Transcript) -> None:
    """Each transcript fed in one piece gives the expected outcomes."""
    got = events_for(transcript.commands, transcript.data, eof=transcript.eof)
    assert summarize(got) == list(transcript.expected)


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_IDS)
def test_fed_byte_by_byte(transcript: Transcript) -> None:
    """Feeding one byte at a time gives exactly the events of the whole feed."""
    feed = feed_edges if transcript.huge else feed_bytewise
    got = events_for(transcript.commands, transcript.data, feed=feed, eof=transcript.eof)
    assert got == events_for(transcript.commands, transcript.data, eof=transcript.eof)
    assert summarize(got) == list(transcript.expected)


_OPEN_ENDED = [t for t in TRANSCRIPTS if t.expected[-1] != ("broken",)]


@pytest.mark.parametrize("transcript", _OPEN_ENDED, ids=[t.name for t in _OPEN_ENDED])
def test_fed_with_trailing_bytes(transcript: Transcript) -> None:
    """Bytes of the next reply after a transcript leave its events alone and parse as that reply."""
    alone = events_for(transcript.commands, transcript.data, eof=transcript.eof)
    probe = ClientConnection()
    for command in transcript.commands:
        probe.send(command)
    can_capa = b"CAPA" in ALLOWED[probe._predicted]  # where the session ends up
    commands = (*transcript.commands, cmd.capa()) if can_capa else transcript.commands
    got = events_for(commands, transcript.data + TRAILING_CAPA, eof=transcript.eof)
    if alone and isinstance(alone[-1], ConnectionClosed):
        alone = alone[:-1]
    assert got[: len(alone)] == alone
    tail = summarize(got[len(alone) :])
    # With no command to answer (after QUIT, after an -ERR greeting) the bytes are an error.
    assert tail == ([TRAILING_CAPA_SEEN] if can_capa else [("broken",)])


def test_transcript_fixtures_cover_both_greetings() -> None:
    """The table has greetings with and without an APOP timestamp (guards the fixture list)."""
    stamps = {t.expected[0][2] is None for t in TRANSCRIPTS if t.expected[0][0] == "greeting"}
    assert stamps == {True, False}


def test_status_line_limit_does_not_apply_to_bodies() -> None:
    """A body line 100 times the status-line limit streams through untouched."""
    line = b"z" * 6400
    data = LOGIN_BYTES + b"+OK\r\n" + line + b"\r\n.\r\n"
    got = summarize(events_for((*LOGIN, cmd.retr(1)), data, max_line=64))
    assert got[-2:] == [("body", line + b"\r\n"), ("end", b"RETR")]


@pytest.mark.parametrize("reply", [b"+OK " + b"s" * 100, b"1 " + b"9" * 100])
def test_status_and_listing_lines_over_the_limit_break_the_connection(reply: bytes) -> None:
    """A status or listing line over max_line is a RemoteProtocolError, fed whole or bytewise."""
    if reply.startswith(b"1 "):
        reply = b"+OK\r\n" + reply
    data = LOGIN_BYTES + reply + b"\r\n.\r\n"
    for feed in (None, feed_bytewise):
        got = (
            events_for((*LOGIN, cmd.list_()), data, max_line=64)
            if feed is None
            else events_for((*LOGIN, cmd.list_()), data, feed=feed, max_line=64)
        )
        assert summarize(got) == [*LOGIN_SEEN, ("broken",)]
        assert isinstance(got[-1], Broken)
        assert "longer than 64" in got[-1].message


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"])
def test_line_of_exactly_max_line_octets_is_accepted_in_any_split(line_end: bytes) -> None:
    """A status line of exactly max_line octets passes even when its CR and LF come apart."""
    line = b"+OK " + b"t" * 60
    for feed in (None, feed_bytewise):
        conn = ClientConnection(max_line=64)
        pieces = [line + line_end] if feed is None else list(feed(line + line_end))
        event = None
        for piece in pieces:
            conn.receive_data(piece)
            event = conn.next_event()
        assert getattr(event, "text", None) == "t" * 60


def test_take_line_keeps_scan_position_and_strips_one_cr() -> None:
    """take_line strips exactly one CR before LF and returns None until a line is complete."""
    buf = ReceiveBuffer(max_line=100)
    buf.feed(b"abc")
    assert buf.take_line() is None
    buf.feed(b"\r\r\nnext\n")
    assert buf.take_line() == b"abc\r"
    assert buf.take_line() == b"next"
    assert buf.take_line() is None
    assert len(buf) == 0


def test_take_line_over_limit_without_line_end_raises_early() -> None:
    """A line that cannot fit is refused before its line end arrives (bounded memory)."""
    buf = ReceiveBuffer(max_line=8)
    buf.feed(b"123456789")
    assert buf.take_line() is None  # may still be 8 octets and a CR
    buf.feed(b"0")
    with pytest.raises(RemoteProtocolError):
        buf.take_line()


def test_read_body_needs_more_data_to_decide_on_a_leading_dot() -> None:
    """A dot at a line start waits for the next octets: terminator, CRLF terminator or stuffing."""
    buf = ReceiveBuffer()
    buf.start_body()
    buf.feed(b".")
    assert buf.read_body() is None
    buf.feed(b"\r")
    assert buf.read_body() is None
    buf.feed(b"\n+OK")
    assert buf.read_body() == (b"", True)
    assert len(buf) == 3


def test_read_body_hands_out_runs_up_to_the_next_line_start_dot() -> None:
    """Body bytes come out in runs that end just before a line starting with a dot."""
    buf = ReceiveBuffer()
    buf.start_body()
    buf.feed(b"ab\r\ncd\r\n..e\r\n.\r\n")
    assert buf.read_body() == (b"ab\r\ncd\r\n", False)
    assert buf.read_body() == (b".e\r\n", False)
    assert buf.read_body() == (b"", True)
    assert buf.read_body() is None


def test_buffer_compacts_consumed_bytes() -> None:
    """After much data is consumed the backing store is trimmed, and reading still works."""
    buf = ReceiveBuffer()
    buf.start_body()
    buf.feed(b"a" * 300_000 + b"\r\n")
    assert buf.read_body() == (b"a" * 300_000 + b"\r\n", False)
    buf.feed(b".\r\n+OK\r\n")
    assert buf.read_body() == (b"", True)
    assert buf.take_line() == b"+OK"
    assert len(buf._data) < 1000  # memory is what is checked


@pytest.mark.parametrize(
    ("limit", "value", "message"),
    [
        ("MAX_LISTING", 1000, "reply is larger than 1000 octets"),
        ("MAX_LISTING_ENTRIES", 150, "more than 150 entries"),
    ],
)
def test_listing_without_terminator_is_limited_as_a_whole(
    monkeypatch: pytest.MonkeyPatch, limit: str, value: int, message: str
) -> None:
    """Short lines without a terminating dot cannot grow a listing past its octet or entry cap."""
    from popsync.pop3 import connection as connection_module

    monkeypatch.setattr(connection_module, limit, value)
    conn = ClientConnection()
    for command in (*LOGIN, cmd.uidl()):
        conn.send(command)
    conn.receive_data(LOGIN_BYTES + b"+OK\r\n" + b"1 uid\r\n" * 100)
    events = [conn.next_event() for _ in range(4)]
    assert events[-1] is NEED_DATA
    conn.receive_data(b"1 uid\r\n" * 100)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()


def test_listing_blocks_hold_whole_lines_and_stop_at_the_terminator() -> None:
    """Blocks end at a line end, span at most max_line + 2 octets and never pass the dot."""
    buf = ReceiveBuffer(max_line=10)
    buf.feed(b"1 aaaa\r\n2 bbbb\r\n..x\r\n")
    assert buf.take_listing_block() == (b"1 aaaa\r\n", False)  # 16 octets do not fit in 12
    assert buf.take_listing_block() == (b"2 bbbb\r\n", False)
    buf.feed(b".\r")
    assert buf.take_listing_block() == (b"..x\r\n", False)
    assert buf.take_listing_block() is None  # ".\r" may still become the terminator
    buf.feed(b"\n+OK")
    assert buf.take_listing_block() == (b"", True)
    assert len(buf) == 3


@pytest.mark.parametrize(
    ("line", "ok"),
    [(b"9" * 10 + b"\r\n", True), (b"9" * 10 + b"\n", True), (b"9" * 11 + b"\n", False)],
)
def test_listing_line_of_max_line_octets_is_the_longest_accepted(line: bytes, ok: bool) -> None:
    """A listing line of exactly max_line octets passes with CRLF or LF; one more does not."""
    buf = ReceiveBuffer(max_line=10)
    buf.feed(line + b".\r\n")
    if ok:
        assert buf.take_listing_block() == (line, False)  # the window holds the line only
        assert buf.take_listing_block() == (b"", True)
    else:
        with pytest.raises(RemoteProtocolError, match="longer than 10"):
            buf.take_listing_block()


def test_greeting_is_capped_at_64_kib_whatever_max_line_says() -> None:
    """Before login nothing over 64 KiB is buffered as a line, even with a huge max_line."""
    conn = ClientConnection(max_line=1 << 20)
    conn.receive_data(b"+OK " + b"g" * 70_000)
    with pytest.raises(RemoteProtocolError, match="longer than 65536"):
        conn.next_event()


def test_status_lines_before_login_are_capped_but_not_after() -> None:
    """A 70,000-octet reply line is refused before login and accepted in TRANSACTION."""
    long_text = b"t" * 70_000
    before = ClientConnection(max_line=1 << 20)
    before.send(cmd.user("u"))
    before.receive_data(b"+OK hi\r\n+OK " + long_text + b"\r\n")
    before.next_event()
    with pytest.raises(RemoteProtocolError, match="longer than 65536"):
        before.next_event()
    after = ClientConnection(max_line=1 << 20)
    for command in (*LOGIN, cmd.noop()):
        after.send(command)
    after.receive_data(LOGIN_BYTES + b"+OK " + long_text + b"\r\n")
    events = [after.next_event() for _ in range(4)]
    assert getattr(events[-1], "text", None) == long_text.decode()


def test_capa_after_login_is_capped_too() -> None:
    """CAPA is small by nature: over 64 KiB it is refused after login as well."""
    conn = ClientConnection()
    for command in (*LOGIN, cmd.capa()):
        conn.send(command)
    conn.receive_data(LOGIN_BYTES + b"+OK\r\n" + b"X-CAP " + b"z" * 1000 + b"\r\n")
    for _ in range(3):
        conn.next_event()
    for _ in range(64):  # 65 lines of 1,008 octets: 65,520
        conn.receive_data(b"X-CAP " + b"z" * 1000 + b"\r\n")
        assert conn.next_event() is NEED_DATA
    conn.receive_data(b"X-CAP " + b"z" * 1000 + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="CAPA reply is larger than 65536"):
        conn.next_event()


@pytest.mark.parametrize("value", [b"9223372036854775808", b"99999999999999999999"])
def test_numbers_past_64_bits_are_a_protocol_error(value: bytes) -> None:
    """A message number or size that cannot be stored compactly is refused, not truncated."""
    for listing in (b"1 " + value, value + b" uid"):
        command = cmd.list_() if listing.startswith(b"1 ") else cmd.uidl()
        got = events_for((*LOGIN, command), LOGIN_BYTES + b"+OK\r\n" + listing + b"\r\n.\r\n")
        assert isinstance(got[-1], Broken)
        assert "out of range" in got[-1].message
