"""Hypothesis: hostile server bytes never escape as anything but a Pop3Error, and bodies round-trip.

Properties:
* any bytes, fed after any command sequence, give events, ``ServerError`` or
  ``RemoteProtocolError`` and nothing else, with bounded work (no endless loop);
* the outcome does not depend on how the bytes are split (except around STLS, where
  what sits in the buffer at the reply is the injection check itself);
* a message body dot-stuffed as a server does it comes back byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popsync.pop3 import (
    DEFAULT_MAX_LINE,
    ClientConnection,
    Command,
    ConnectionClosed,
    MessageChunk,
    MessageEnd,
    NeedData,
    Ok,
    RemoteProtocolError,
    ServerError,
    UidlListing,
)
from popsync.pop3 import commands as cmd

from .pop3_fixtures import (
    LOGIN,
    LOGIN_BYTES,
    Broken,
    Outcome,
    Raised,
    events_for,
    feed_chunks,
    merge_chunks,
)

__all__: list[str] = []

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PREFIXES: dict[str, tuple[Command, ...]] = {
    "nothing": (),
    "login": LOGIN,
    "busy": (
        *LOGIN,
        cmd.stat(),
        cmd.list_(),
        cmd.uidl(),
        cmd.retr(1),
        cmd.top(1, 0),
        cmd.capa(),
        cmd.list_(1),
        cmd.dele(1),
        cmd.quit(),
    ),
    "auth": (cmd.auth("LOGIN"),),
    "capa-then-quit": (cmd.capa(), cmd.quit()),
    "stls": (cmd.stls(),),
}
SPLIT_INVARIANT = sorted(name for name in PREFIXES if name != "stls")

TOKENS = [
    b"+OK",
    b"+OK ready <1.2@host>",
    b"+ok",
    b"-ERR",
    b"-ERR [IN-USE] locked",
    b"-ERR [SYS/TEMP/X] later",
    b"-ERR [",
    b"+ ",
    b"+",
    b"+ dGVzdA==",
    b".",
    b"..",
    b"...x",
    b".\r",
    b"1 2",
    b"1 abc",
    b"2 " + b"9" * 30,
    b"3 " + b"9" * 5000,  # past int()'s 4300-digit limit
    b"0 0",
    b"TOP",
    b"SASL PLAIN",
    b"\xff\xfe\x00",
    b"x" * 40,
    b"",
    b" ",
]
LINE_ENDS = [b"\r\n", b"\n", b"\r", b"", b"\r\r\n"]

near_valid = st.lists(
    st.tuples(st.sampled_from(TOKENS), st.sampled_from(LINE_ENDS)), max_size=30
).map(lambda pairs: b"".join(token + end for token, end in pairs))
server_bytes = st.one_of(
    st.binary(max_size=300),
    near_valid,
    near_valid.map(lambda data: b"+OK hi\r\n" + data),
    near_valid.map(lambda data: LOGIN_BYTES + data),
)
cut_points = st.lists(st.integers(min_value=1, max_value=2000), max_size=12)
max_lines = st.sampled_from([8, 40, DEFAULT_MAX_LINE])


def run_bounded(
    commands: Sequence[Command], pieces: Sequence[bytes], max_line: int
) -> list[Outcome]:
    """Feed pieces then EOF, pulling every event, with a hard cap on the number of steps.

    Any exception that is not ServerError or RemoteProtocolError propagates and fails
    the test; running out of steps means the core looped without consuming input.
    """
    conn = ClientConnection(max_line=max_line)
    for command in commands:
        conn.send(command)
    out: list[Outcome] = []
    budget = 2 * sum(map(len, pieces)) + 2 * len(pieces) + 20
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while True:
            budget -= 1
            assert budget > 0, "next_event made no progress"
            try:
                event = conn.next_event()
            except ServerError as exc:
                out.append(Raised(type(exc), exc.command, exc.text, exc.code))
                continue
            except RemoteProtocolError as exc:
                out.append(Broken(str(exc)))
                return merge_chunks(out)
            if isinstance(event, NeedData):
                break
            out.append(event)
            if isinstance(event, ConnectionClosed):
                return merge_chunks(out)
    raise AssertionError("EOF must end the session with ConnectionClosed or an error")


@FUZZ
@given(
    prefix=st.sampled_from(sorted(PREFIXES)),
    data=server_bytes,
    cuts=cut_points,
    max_line=max_lines,
)
def test_any_server_bytes_give_events_or_pop3_errors(
    prefix: str, data: bytes, cuts: list[int], max_line: int
) -> None:
    """Arbitrary bytes after any commands end in events, ServerError or RemoteProtocolError."""
    outcomes = run_bounded(PREFIXES[prefix], list(feed_chunks(data, cuts)), max_line)
    assert isinstance(outcomes[-1], ConnectionClosed | Broken)


@FUZZ
@given(
    prefix=st.sampled_from(SPLIT_INVARIANT),
    data=server_bytes,
    cuts=cut_points,
    max_line=max_lines,
)
def test_outcome_does_not_depend_on_the_split(
    prefix: str, data: bytes, cuts: list[int], max_line: int
) -> None:
    """The same bytes fed whole or in random pieces give the same outcomes."""
    whole = run_bounded(PREFIXES[prefix], [data], max_line)
    split = run_bounded(PREFIXES[prefix], list(feed_chunks(data, cuts)), max_line)
    assert split == whole


def server_stuff(body: bytes) -> bytes:
    """Dot-stuff a body as a server does: end it with CRLF if needed, double leading dots."""
    if body and not body.endswith(b"\n"):
        body += b"\r\n"
    lines = body.split(b"\n")  # the last element is b"": the body ends with LF or is empty
    return b"\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def received_body(body: bytes) -> bytes:
    """What the client must deliver: the body, plus the CRLF a server adds if no LF ends it."""
    return body if not body or body.endswith(b"\n") else body + b"\r\n"


SEGMENTS = [
    b".",
    b"..",
    b"\r",
    b"\n",
    b"\r\n",
    b"abc",
    b"x" * 3000,
    b".\r\n",
    b"\n.",
    b"\r\n.\r\n",
    b"\r\n..\r\n",
    b"\n.\n",
    b"\xff",
]
bodies = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(SEGMENTS), max_size=25).map(b"".join),
)


def test_server_stuff_matches_rfc1939_by_example() -> None:
    """The test's own stuffer behaves as RFC 1939 describes on a hand-checked example."""
    assert server_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert server_stuff(b"abc") == b"abc\r\n.\r\n"
    assert server_stuff(b"") == b".\r\n"
    assert server_stuff(b"a\n.b") == b"a\n..b\r\n.\r\n"


@settings(max_examples=400, deadline=None)
@given(body=bodies, cuts=cut_points)
def test_dot_stuffed_body_round_trips(body: bytes, cuts: list[int]) -> None:
    """Any body, stuffed by a server and fed in random pieces, comes back byte for byte."""
    commands = (*LOGIN, cmd.retr(1), cmd.noop())
    wire = LOGIN_BYTES + b"+OK\r\n" + server_stuff(body) + b"+OK after\r\n"
    got = events_for(commands, wire, feed=lambda data: feed_chunks(data, cuts))
    chunks = [e.data for e in got if isinstance(e, MessageChunk)]
    assert b"".join(chunks) == received_body(body)
    assert isinstance(got[-2], MessageEnd)
    assert isinstance(got[-1], Ok)
    assert got[-1].command == cmd.noop()


uids = st.binary(min_size=1, max_size=80).filter(lambda u: all(0x20 < o != 0x7F for o in u))


@settings(max_examples=100, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(1, 10**9), uids), max_size=20), cuts=cut_points)
def test_uidl_listing_round_trips(entries: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """UIDL lines with any legal opaque ids (dots, slashes, 8-bit) parse back to the same pairs."""
    lines = b"".join(b"%d %s\r\n" % (n, uid) for n, uid in entries)
    wire = LOGIN_BYTES + b"+OK\r\n" + lines + b".\r\n"
    got = events_for((*LOGIN, cmd.uidl()), wire, feed=lambda data: feed_chunks(data, cuts))
    assert isinstance(got[-1], UidlListing)
    assert got[-1].entries == tuple(entries)
