"""ClientConnection as a state machine: what may be sent when, and how replies move it."""

from __future__ import annotations

import pytest

from popsync.pop3 import (
    NEED_DATA,
    AuthFailed,
    ClientConnection,
    Command,
    ConnectionClosed,
    Continuation,
    Greeting,
    LocalProtocolError,
    MessageChunk,
    MessageEnd,
    MessageStart,
    Ok,
    RemoteProtocolError,
    ServerError,
    State,
    parse_scan_line,
    parse_uidl_line,
)
from popsync.pop3 import commands as cmd
from popsync.pop3.state import ALLOWED, next_state, next_state_after_err

from .pop3_fixtures import LOGIN

__all__: list[str] = []


def state_of(conn: ClientConnection) -> State:
    """The connection's state, read afresh (keeps mypy from narrowing across sends)."""
    return conn.state


def greeted(greeting: bytes = b"+OK ready\r\n") -> ClientConnection:
    """A connection that has read the greeting."""
    conn = ClientConnection()
    conn.receive_data(greeting)
    assert isinstance(conn.next_event(), Greeting)
    return conn


def logged_in() -> ClientConnection:
    """A connection in TRANSACTION state after USER/PASS."""
    conn = greeted()
    for command in LOGIN:
        conn.send(command)
    conn.receive_data(b"+OK\r\n+OK\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert isinstance(conn.next_event(), Ok)
    assert state_of(conn) is State.TRANSACTION
    return conn


TRANSACTION_ONLY = [
    cmd.stat(),
    cmd.list_(),
    cmd.list_(1),
    cmd.retr(1),
    cmd.dele(1),
    cmd.noop(),
    cmd.rset(),
    cmd.top(1, 0),
    cmd.uidl(),
]
AUTHORIZATION_ONLY = [
    cmd.user("u"),
    cmd.pass_("p"),
    cmd.apop("u", "d" * 32),
    cmd.rpop("u"),
    cmd.auth("PLAIN"),
    cmd.stls(),
    cmd.utf8(),
]


@pytest.mark.parametrize("command", TRANSACTION_ONLY, ids=repr)
def test_transaction_commands_refused_before_login(command: Command) -> None:
    """A TRANSACTION command in AUTHORIZATION is a LocalProtocolError and nothing is queued."""
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="not allowed in the AUTHORIZATION state"):
        conn.send(command)
    assert conn.outstanding == ()
    conn.receive_data(b"+OK stray\r\n")
    with pytest.raises(RemoteProtocolError, match="answers no command"):
        conn.next_event()


@pytest.mark.parametrize("command", AUTHORIZATION_ONLY, ids=repr)
def test_authorization_commands_refused_after_login(command: Command) -> None:
    """USER, PASS, APOP, AUTH, STLS, UTF8 ... are refused in TRANSACTION."""
    conn = logged_in()
    with pytest.raises(LocalProtocolError, match="TRANSACTION"):
        conn.send(command)
    assert conn.outstanding == ()


def test_state_table_is_what_rfc1939_says() -> None:
    """The table: CAPA and QUIT in both live states, nothing in UPDATE or CLOSED."""
    assert {b"CAPA", b"QUIT"} <= ALLOWED[State.AUTHORIZATION] & ALLOWED[State.TRANSACTION]
    assert ALLOWED[State.UPDATE] == ALLOWED[State.CLOSED] == frozenset()
    assert next_state(State.AUTHORIZATION, b"USER") is State.AUTHORIZATION
    assert next_state(State.AUTHORIZATION, b"APOP") is State.TRANSACTION
    assert next_state(State.TRANSACTION, b"QUIT") is State.UPDATE
    assert next_state_after_err(State.AUTHORIZATION, b"PASS") is State.AUTHORIZATION
    assert next_state_after_err(State.TRANSACTION, b"QUIT") is State.UPDATE


def test_pipelined_user_pass_stat_are_allowed_and_answered_in_order() -> None:
    """USER, PASS and STAT may be sent before any reply; replies match the FIFO."""
    conn = greeted()
    wire = b"".join(conn.send(c) for c in (*LOGIN, cmd.stat()))
    assert wire == b"USER alice\r\nPASS secret\r\nSTAT\r\n"
    assert [c.verb for c in conn.outstanding] == [b"USER", b"PASS", b"STAT"]
    assert state_of(conn) is State.AUTHORIZATION
    conn.receive_data(b"+OK\r\n+OK in\r\n+OK 3 999\r\n")
    verbs = []
    for _ in range(3):
        event = conn.next_event()
        assert isinstance(event, Ok)
        verbs.append(event.command.verb)
    assert verbs == [b"USER", b"PASS", b"STAT"]
    assert state_of(conn) is State.TRANSACTION
    assert conn.next_event() is NEED_DATA


def test_err_to_pass_recomputes_the_prediction() -> None:
    """After -ERR to a pipelined PASS, TRANSACTION commands are refused again."""
    conn = greeted()
    for command in (*LOGIN, cmd.stat()):
        conn.send(command)
    conn.send(cmd.list_())  # allowed: PASS is predicted to succeed
    conn.receive_data(b"+OK\r\n-ERR [AUTH] bad password\r\n")
    assert isinstance(conn.next_event(), Ok)
    with pytest.raises(AuthFailed):
        conn.next_event()
    assert state_of(conn) is State.AUTHORIZATION
    with pytest.raises(LocalProtocolError):
        conn.send(cmd.stat())
    conn.send(cmd.user("alice"))  # a new attempt is fine


def test_quit_in_transaction_enters_update_then_closed() -> None:
    """+OK to QUIT moves to UPDATE; the server's close then gives ConnectionClosed."""
    conn = logged_in()
    conn.send(cmd.quit())
    with pytest.raises(LocalProtocolError, match="UPDATE"):
        conn.send(cmd.noop())
    conn.receive_data(b"+OK bye\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert state_of(conn) is State.UPDATE
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert state_of(conn) is State.CLOSED
    assert conn.next_event() == ConnectionClosed()


def test_err_to_quit_still_ends_the_session() -> None:
    """-ERR to QUIT ("some deleted messages not removed") still means the server closes."""
    conn = logged_in()
    conn.send(cmd.quit())
    conn.receive_data(b"-ERR some deleted messages not removed\r\n")
    with pytest.raises(ServerError):
        conn.next_event()
    assert state_of(conn) is State.UPDATE
    with pytest.raises(LocalProtocolError):
        conn.send(cmd.noop())


def test_quit_in_authorization_closes() -> None:
    """+OK to QUIT before login goes straight to CLOSED."""
    conn = greeted()
    conn.send(cmd.quit())
    conn.receive_data(b"+OK\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert state_of(conn) is State.CLOSED


def test_nothing_may_be_sent_after_the_server_closed() -> None:
    """After ConnectionClosed every command is a LocalProtocolError."""
    conn = greeted()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        conn.send(cmd.user("u"))


def test_nothing_may_be_sent_after_an_err_greeting() -> None:
    """An -ERR greeting closes the session: USER is refused, not written."""
    conn = ClientConnection()
    conn.receive_data(b"-ERR [IN-USE] locked\r\n")
    with pytest.raises(ServerError) as info:
        conn.next_event()
    assert info.value.command == b""
    assert state_of(conn) is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(cmd.user("u"))


@pytest.mark.parametrize(
    "data",
    [b"", b"+OK rea", b"+OK ready\r\n+OK\r\n+OK\r\n+OK\r\n1 2\r\n"],
    ids=["no-greeting", "half-greeting", "mid-listing"],
)
def test_eof_mid_response_is_a_remote_protocol_error(data: bytes) -> None:
    """EOF before a reply is complete is RemoteProtocolError, not ConnectionClosed."""
    conn = ClientConnection()
    for command in (*LOGIN, cmd.list_()):
        conn.send(command)
    conn.receive_data(data)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed by server"):  # noqa: PT012
        for _ in range(10):
            assert not isinstance(conn.next_event(), ConnectionClosed)


def test_eof_with_command_outstanding_is_a_remote_protocol_error() -> None:
    """EOF while a command waits for its reply is an error even at a line boundary."""
    conn = logged_in()
    conn.send(cmd.stat())
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="STAT"):
        conn.next_event()


def test_data_answering_no_command_is_a_remote_protocol_error() -> None:
    """A reply when nothing is outstanding breaks the connection."""
    conn = logged_in()
    conn.receive_data(b"+OK surprise\r\n")
    with pytest.raises(RemoteProtocolError, match="answers no command"):
        conn.next_event()


def test_broken_connection_stays_broken() -> None:
    """After a RemoteProtocolError the same error is raised again and send() refuses."""
    conn = greeted()
    conn.send(cmd.capa())
    conn.receive_data(b"garbage\r\n")
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    conn.receive_data(b"+OK\r\n.\r\n")
    with pytest.raises(RemoteProtocolError) as second:
        conn.next_event()
    assert second.value is first.value
    assert state_of(conn) is State.CLOSED
    with pytest.raises(LocalProtocolError, match="broken"):
        conn.send(cmd.quit())


def test_greeting_that_is_not_pop3_breaks_the_connection() -> None:
    """A greeting that is neither +OK nor -ERR (say, an SMTP banner) is a protocol error."""
    conn = ClientConnection()
    conn.receive_data(b"220 smtp.example.com ESMTP\r\n")
    with pytest.raises(RemoteProtocolError, match="greeting"):
        conn.next_event()


def test_stls_reply_followed_by_extra_bytes_is_refused() -> None:
    """Bytes glued to the +OK for STLS are a possible injection: RemoteProtocolError."""
    conn = greeted()
    conn.send(cmd.stls())
    conn.receive_data(b"+OK Begin TLS\r\n+OK injected\r\n")
    with pytest.raises(RemoteProtocolError, match="injection"):
        conn.next_event()


def test_stls_reply_alone_leaves_nothing_pending() -> None:
    """A clean STLS reply gives Ok with no pending bytes, ready for the handshake."""
    conn = greeted()
    conn.send(cmd.stls())
    conn.receive_data(b"+OK Begin TLS\r\n")
    event = conn.next_event()
    assert isinstance(event, Ok)
    assert event.text == "Begin TLS"
    assert conn.pending_bytes == 0
    assert state_of(conn) is State.AUTHORIZATION


def test_nothing_may_be_pipelined_behind_stls() -> None:
    """A command sent while STLS is outstanding would go out in clear text: refused."""
    conn = greeted()
    conn.send(cmd.stls())
    with pytest.raises(LocalProtocolError, match="STLS"):
        conn.send(cmd.capa())
    assert [c.verb for c in conn.outstanding] == [b"STLS"]


def test_pending_bytes_counts_unparsed_input() -> None:
    """pending_bytes reports bytes received and not yet turned into events."""
    conn = ClientConnection()
    conn.receive_data(b"+OK hi\r\n+OK")
    assert conn.pending_bytes == len(b"+OK hi\r\n+OK")
    conn.next_event()
    assert conn.pending_bytes == 3


def test_data_after_eof_is_a_local_error() -> None:
    """Feeding bytes after b"" is a driver bug."""
    conn = ClientConnection()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"+OK\r\n")


def test_continuation_only_answers_auth() -> None:
    """A '+ ' line is a SASL continuation for AUTH and a protocol error for anything else."""
    conn = greeted()
    conn.send(cmd.auth("LOGIN"))
    conn.receive_data(b"+ VXNlcm5hbWU6\r\n")
    event = conn.next_event()
    assert event == Continuation(cmd.auth("LOGIN"), b"VXNlcm5hbWU6")
    assert conn.send_sasl(b"YWxpY2U=") == b"YWxpY2U=\r\n"
    other = greeted()
    other.send(cmd.user("u"))
    other.receive_data(b"+ hello\r\n")
    with pytest.raises(RemoteProtocolError, match="neither"):
        other.next_event()


def test_send_sasl_guards() -> None:
    """A SASL response needs AUTH in flight and may not carry CR, LF or NUL."""
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="AUTH"):
        conn.send_sasl(b"x")
    conn.send(cmd.auth("PLAIN"))
    for bad in (b"a\rb", b"a\nb", b"a\0b"):
        with pytest.raises(LocalProtocolError):
            conn.send_sasl(bad)
    assert conn.send_sasl(b"*") == b"*\r\n"


def test_auth_success_enters_transaction() -> None:
    """+OK after SASL continuations moves the session to TRANSACTION."""
    conn = greeted()
    conn.send(cmd.auth("PLAIN", b"AGFsaWNlAHNlY3JldA=="))
    conn.receive_data(b"+OK Logged in.\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert state_of(conn) is State.TRANSACTION


def test_retr_events_and_err_to_retr() -> None:
    """RETR streams start/chunk/end; -ERR to RETR is raised and the session continues."""
    conn = logged_in()
    conn.send(cmd.retr(9))
    conn.send(cmd.retr(1))
    conn.receive_data(b"-ERR no such message\r\n+OK\r\nhi\r\n.\r\n")
    with pytest.raises(ServerError, match="RETR: -ERR no such message"):
        conn.next_event()
    assert isinstance(conn.next_event(), MessageStart)
    assert conn.next_event() == MessageChunk(b"hi\r\n")
    assert conn.next_event() == MessageEnd(cmd.retr(1))
    assert conn.outstanding == ()


@pytest.mark.parametrize(
    ("line", "expected"),
    [(b"1 120", (1, 120)), (b"2  300 extra", (2, 300)), (b"10\t5", (10, 5))],
)
def test_parse_scan_line(line: bytes, expected: tuple[int, int]) -> None:
    """LIST lines give (number, size); extra tokens are allowed."""
    assert parse_scan_line(line) == expected


@pytest.mark.parametrize(
    "line", [b"", b"1", b"x 12", b"1 -5", b"1 1e3", b"1 " + b"9" * 5000, b"\xd9\xa1 5"]
)
def test_parse_scan_line_rejects_junk(line: bytes) -> None:
    """Malformed LIST lines, even a 5000-digit size, raise RemoteProtocolError only."""
    with pytest.raises(RemoteProtocolError):
        parse_scan_line(line)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"1 abc", (1, b"abc")),
        (b"2 a/b:c", (2, b"a/b:c")),
        (b"3 " + b"u" * 100, (3, b"u" * 100)),
        (b"4 \xc3\xa9t\xc3\xa9", (4, b"\xc3\xa9t\xc3\xa9")),
        (b"5 id  ", (5, b"id")),
    ],
)
def test_parse_uidl_line(line: bytes, expected: tuple[int, bytes]) -> None:
    """UIDs are opaque bytes: slashes, 8-bit octets and long ids are kept."""
    assert parse_uidl_line(line) == expected


@pytest.mark.parametrize("line", [b"1", b"1 a b", b"1 a\x01b", b"x abc", b"1 a\x7f"])
def test_parse_uidl_line_rejects_junk(line: bytes) -> None:
    """Missing ids, inner spaces and control characters are protocol errors."""
    with pytest.raises(RemoteProtocolError):
        parse_uidl_line(line)


def test_listing_with_bad_line_breaks_the_connection() -> None:
    """A bad LIST line surfaces as RemoteProtocolError from next_event."""
    conn = logged_in()
    conn.send(cmd.list_())
    conn.receive_data(b"+OK\r\n1 big\r\n.\r\n")
    with pytest.raises(RemoteProtocolError, match="size"):
        conn.next_event()
