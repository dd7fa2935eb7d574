"""popsync.poplib next to stdlib poplib against a permissive scripted server.

Each test serves the same script to both modules (one server each), runs the same
calls, and compares return values, exceptions and the bytes each client sent. The
deliberate differences (line limit, certificate checks, CR/LF/NUL refused, masked
debug output) are tested at the end, each next to what stdlib poplib does instead.
"""

from __future__ import annotations

import base64
import inspect
import poplib as std_poplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import pytest

import popsync.poplib as our_poplib
from popsync import net, pop3
from tests.fake_pop3 import Close, Expect, FakePop3Server, Send, StartTLS, Step
from tests.poplib_side_by_side import Call, Outcome, run_calls

MODULES = (our_poplib, std_poplib)
HOLA = Send(b"+ Hola mundo\r\n")
OK = b"+OK\r\n"
AUTH_PLAIN = base64.b64encode(b"\0bob\0pw")

# name, call on the connection, what the server expects and answers for it
Row = tuple[str, Callable[[Any], object], list[Step]]

# Everything poplib sends without asking: commands before login, odd arguments, every
# public method and each internal that programs use for vendor commands and AUTH.
PERMISSIVE: list[Row] = [
    ("welcome", lambda c: (c.welcome, c.getwelcome()), []),
    ("attributes", lambda c: (type(c.sock), type(c.file), c._debugging, c.host), []),
    ("stat before login", lambda c: c.stat(), [Expect(b"STAT", b"+OK 2 320\r\n")]),
    ("list", lambda c: c.list(), [Expect(b"LIST", b"+OK 2\r\n1 120\r\n2 200\r\n.\r\n")]),
    ("list 1", lambda c: c.list(1), [Expect(b"LIST 1", b"+OK 1 120\r\n")]),
    ("uidl", lambda c: c.uidl(), [Expect(b"UIDL", b"+OK\r\n1 abc\r\n2 d/f\r\n.\r\n")]),
    ("uidl '2'", lambda c: c.uidl("2"), [Expect(b"UIDL 2", b"+OK 2 d/f\r\n")]),
    ("top", lambda c: c.top(1, 0), [Expect(b"TOP 1 0", b"+OK\r\nSubject: x\r\n\r\n.\r\n")]),
    ("noop", lambda c: c.noop(), [Expect(b"NOOP", b"+OK fine\r\n")]),
    ("dele 'foo'", lambda c: c.dele("foo"), [Expect(b"DELE foo", b"-ERR no such message\r\n")]),
    ("retr 'foo'", lambda c: c.retr("foo"), [Expect(b"RETR foo", b"-ERR [SYS/PERM] no\r\n")]),
    (
        "retr",
        lambda c: c.retr(1),
        [
            Expect(
                b"RETR 1",
                b"+OK 60 octets\r\nSubject: a\r\n\r\n..dot\r\n...two\r\nbare\n"
                b"\rcr first\nmid\rcr\r\n\r\n.\r\n",
            )
        ],
    ),
    ("user", lambda c: c.user("bob"), [Expect(b"USER bob", OK)]),
    ("pass_ refused", lambda c: c.pass_("pw"), [Expect(b"PASS pw", b"-ERR [AUTH] no\r\n")]),
    ("apop without timestamp", lambda c: c.apop("bob", "pw"), []),
    ("rpop", lambda c: c.rpop("bob"), [Expect(b"RPOP bob", b"+OK rpop\r\n")]),
    ("utf8", lambda c: c.utf8(), [Expect(b"UTF8", b"-ERR Unknown command.\r\n")]),
    (
        "capa",
        lambda c: c.capa(),
        [Expect(b"CAPA", b"+OK\r\nIMPLEMENTATION Fake POP\r\nXTND\r\nTOP\r\n.\r\n")],
    ),
    ("rset", lambda c: c.rset(), [Expect(b"RSET", OK)]),
    ("_shortcmd", lambda c: c._shortcmd("XTND XMIT"), [Expect(b"XTND XMIT", b"+OK go\r\n")]),
    (
        "_longcmd",
        lambda c: c._longcmd("XTND XLIST Subject"),
        [Expect(b"XTND XLIST Subject", b"+OK\r\n1 Subject: hi\r\n..2 x\r\n.\r\n")],
    ),
    ("_putcmd", lambda c: c._putcmd("NOOP"), [Expect(b"NOOP", b"+OK again\r\n")]),
    ("_getresp", lambda c: c._getresp(), []),
    ("_putline AUTH", lambda c: c._putline(b"AUTH PLAIN"), [Expect(b"AUTH PLAIN", b"+ \r\n")]),
    ("_getresp +", lambda c: c._getresp(), []),
    ("_putline", lambda c: c._putline(AUTH_PLAIN), [Expect(AUTH_PLAIN, b"+OK in\r\n")]),
    ("_getresp after auth", lambda c: c._getresp(), []),
    ("_putcmd LIST", lambda c: c._putcmd("LIST"), [Expect(b"LIST", b"+OK\r\n1 9\r\n.\r\n")]),
    ("_getlongresp", lambda c: c._getlongresp(), []),
    ("_getline", lambda c: (c._putcmd("NOOP"), c._getline()), [Expect(b"NOOP", b"+OK x\n")]),
    ("stat garbage", lambda c: c.stat(), [Expect(b"STAT", OK)]),
    ("not POP3", lambda c: c.noop(), [Expect(b"NOOP", b"HELLO there\r\n")]),
    ("list -ERR", lambda c: c.list(), [Expect(b"LIST", b"-ERR [IN-USE] busy\r\n")]),
    ("set_debuglevel", lambda c: (c.set_debuglevel(0), c._debugging), []),
    ("quit", lambda c: c.quit(), [Expect(b"QUIT", b"+OK bye\r\n")]),
    ("after quit", lambda c: (c.sock, c.file), []),
    ("close again", lambda c: c.close(), []),
]


@pytest.fixture
def serve() -> Iterator[list[FakePop3Server]]:
    """Collects servers and closes them after the test."""
    servers: list[FakePop3Server] = []
    yield servers
    for server in servers:
        server.close()


def side_by_side(
    serve: list[FakePop3Server],
    script: Sequence[Step],
    calls: Sequence[Call],
    connect: Callable[[ModuleType, FakePop3Server], Any] | None = None,
) -> tuple[list[Outcome], list[Outcome], list[bytes], list[bytes]]:
    """Run ``calls`` through both modules on fresh servers; outcomes and bytes sent."""
    outcomes, sent = [], []
    for module in MODULES:
        server = FakePop3Server(list(script), linger=0.5)
        serve.append(server)
        if connect is None:
            conn = module.POP3(server.host, server.port, timeout=5)
        else:
            conn = connect(module, server)
        outcomes.append(run_calls(module, conn, calls))
        if conn.sock is not None:
            conn.close()
        server.check()
        sent.append(server.received)
    return outcomes[0], outcomes[1], sent[0], sent[1]


def test_every_method_and_internal_matches_stdlib(serve: list[FakePop3Server]) -> None:
    """Same results, exceptions and wire bytes for each call of the permissive script."""
    script: list[Step] = [HOLA, *(step for _name, _call, steps in PERMISSIVE for step in steps)]
    calls = [(name, call) for name, call, _steps in PERMISSIVE]
    ours, theirs, ours_sent, theirs_sent = side_by_side(serve, script, calls)
    assert ours == theirs
    assert ours_sent == theirs_sent
    results: dict[str, tuple[str, Any]] = {name: (kind, value) for name, kind, value in ours}
    # Spot checks that the script did what its names say.
    assert results["welcome"] == ("ok", (b"+ Hola mundo", b"+ Hola mundo"))
    assert results["stat before login"] == ("ok", (2, 320))
    assert results["dele 'foo'"] == ("error_proto", (b"-ERR no such message",))
    assert results["apop without timestamp"] == (
        "error_proto",
        ("-ERR APOP not supported by server",),
    )
    assert results["retr"][1][1][2:] == [b".dot", b"..two", b"bare", b"cr first", b"mid\rcr", b""]
    assert results["_getresp +"] == ("ok", b"+ ")
    assert results["stat garbage"][0] == "IndexError"
    assert results["not POP3"] == ("error_proto", (b"HELLO there",))
    assert results["after quit"] == ("ok", (None, None))


def test_server_errors_are_typed_with_poplib_args(serve: list[FakePop3Server]) -> None:
    """A -ERR is error_proto with the reply line as args and also the pop3 class of its code."""
    server = FakePop3Server(
        [HOLA, Expect(b"USER bob", OK), Expect(b"PASS pw", b"-ERR [IN-USE] locked\r\n")],
        linger=0.5,
    )
    serve.append(server)
    conn = our_poplib.POP3(server.host, server.port)
    conn.user("bob")
    with pytest.raises(our_poplib.error_proto) as info:
        conn.pass_("pw")
    assert info.value.args == (b"-ERR [IN-USE] locked",)
    assert isinstance(info.value, our_poplib.MailboxInUse)
    assert isinstance(info.value, pop3.MailboxInUse)
    assert (info.value.command, info.value.code) == (b"PASS", "IN-USE")
    conn.close()
    server.check()


def test_eof_matches_stdlib(serve: list[FakePop3Server]) -> None:
    """A connection closed mid-session raises error_proto('-ERR EOF') in both."""
    script: list[Step] = [Send(b"+OK hi\r\n"), Expect(b"NOOP"), Close()]
    ours, theirs, _, _ = side_by_side(serve, script, [("noop", lambda c: c.noop())])
    assert ours == theirs == [("noop", "error_proto", ("-ERR EOF",))]


def test_quit_refused_keeps_the_connection_like_stdlib(serve: list[FakePop3Server]) -> None:
    """A -ERR to QUIT raises and leaves sock/file open, as poplib does."""
    script: list[Step] = [Send(b"+OK hi\r\n"), Expect(b"QUIT", b"-ERR not now\r\n")]
    calls: list[Call] = [
        ("quit", lambda c: c.quit()),
        ("open", lambda c: (c.sock is not None, c.file is not None)),
    ]
    ours, theirs, _, _ = side_by_side(serve, script, calls)
    assert ours == theirs
    assert ours[1] == ("open", "ok", (True, True))


def test_non_ascii_capa_matches_stdlib(serve: list[FakePop3Server]) -> None:
    """A non-ASCII CAPA line fails the same way in both (poplib decodes ASCII)."""
    script: list[Step] = [HOLA, Expect(b"CAPA", b"+OK\r\nIMPLEMENTATION Caf\xe9\r\n.\r\n")]
    ours, theirs, _, _ = side_by_side(serve, script, [("capa", lambda c: c.capa())])
    assert ours == theirs
    assert ours[0][1] == "UnicodeDecodeError"


def test_apop_sends_the_same_digest(serve: list[FakePop3Server]) -> None:
    """APOP with a greeting timestamp sends poplib's digest and returns its reply."""
    script: list[Step] = [
        Send(b"+OK ready <1896.697170952@dbc.mtview.ca.us>\r\n"),
        Expect(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb", b"+OK maildrop\r\n"),
    ]
    calls: list[Call] = [("apop", lambda c: c.apop("mrose", "tanstaaf"))]
    ours, theirs, ours_sent, theirs_sent = side_by_side(serve, script, calls)
    assert ours == theirs == [("apop", "ok", b"+OK maildrop")]
    assert ours_sent == theirs_sent


def test_apop_on_a_hostile_greeting_is_fast(serve: list[FakePop3Server]) -> None:
    """A greeting of a million '<' without '>' makes apop() raise error_proto at once."""
    server = FakePop3Server([Send(b"+OK " + b"<" * 1_000_000 + b"\r\n")], linger=0.5)
    serve.append(server)
    conn = our_poplib.POP3(server.host, server.port, timeout=5)
    started = time.monotonic()
    with pytest.raises(our_poplib.error_proto) as info:
        conn.apop("bob", "pw")
    assert time.monotonic() - started < 0.5
    assert info.value.args == ("-ERR APOP not supported by server",)
    conn.close()
    server.check()
    assert server.received == []


def test_stls_matches_stdlib(serve: list[FakePop3Server]) -> None:
    """stls() sends CAPA then STLS, upgrades, and the session goes on encrypted."""
    script: list[Step] = [
        HOLA,
        Expect(b"CAPA", b"+OK\r\nSTLS\r\nUSER\r\n.\r\n"),
        Expect(b"STLS", b"+OK Begin TLS\r\n"),
        StartTLS(),
        Expect(b"CAPA", b"+OK\r\nUSER\r\n.\r\n"),
        Expect(b"QUIT", b"+OK bye\r\n"),
    ]
    calls: list[Call] = [
        ("stls", lambda c: c.stls(c.test_context)),
        ("tls", lambda c: (type(c.sock).__name__, c.sock.version() is not None)),
        ("capa", lambda c: c.capa()),
        ("stls again", lambda c: c.stls(c.test_context)),
        ("quit", lambda c: c.quit()),
    ]

    def connect(module: ModuleType, server: FakePop3Server) -> Any:
        conn = module.POP3(server.host, server.port, timeout=5)
        # stdlib poplib is given no CA, so it gets a context that checks nothing.
        trusting = module is our_poplib
        conn.test_context = (
            server.client_context() if trusting else net.default_context(verify=False)
        )
        return conn

    ours, theirs, ours_sent, theirs_sent = side_by_side(serve, script, calls, connect)
    assert ours == theirs
    assert ours[1] == ("tls", "ok", ("SSLSocket", True))
    assert ours_sent == theirs_sent == [b"CAPA\r\n", b"STLS\r\n", b"CAPA\r\n", b"QUIT\r\n"]


def test_clear_text_after_stls_ok_is_dropped(serve: list[FakePop3Server]) -> None:
    """Bytes injected with the STLS +OK are never read as part of the TLS session."""
    server = FakePop3Server(
        [
            HOLA,
            Expect(b"CAPA", b"+OK\r\nSTLS\r\n.\r\n"),
            Expect(b"STLS", b"+OK go\r\n+OK injected\r\n"),
            StartTLS(),
            Expect(b"NOOP", b"+OK encrypted\r\n"),
        ],
        linger=0.5,
    )
    serve.append(server)
    conn = our_poplib.POP3(server.host, server.port, timeout=5)
    assert conn.stls(server.client_context()) == b"+OK go"
    assert conn.noop() == b"+OK encrypted"
    conn.close()
    server.check()


def test_signatures_match_stdlib() -> None:
    """Every public and internal method of poplib.POP3 exists with the same parameters."""
    names = [n for n in vars(std_poplib.POP3) if callable(getattr(std_poplib.POP3, n))]
    assert {"_shortcmd", "_getlongresp", "_putline", "apop", "stls"} <= set(names)
    for name in names:
        if name == "__init__":
            continue
        theirs = inspect.signature(getattr(std_poplib.POP3, name))
        ours = inspect.signature(getattr(our_poplib.POP3, name))
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default) for p in theirs.parameters.values()
        ], name
    init = inspect.signature(our_poplib.POP3.__init__).parameters
    assert init["timeout"].default is socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]
    theirs_pattern: object = std_poplib.POP3.timestamp.pattern
    assert our_poplib.POP3.timestamp.pattern == theirs_pattern


# --------------------------------------------------------- deliberate differences
def test_long_lines_are_returned_where_stdlib_fails(serve: list[FakePop3Server]) -> None:
    """A 5,000-octet line comes back whole; stdlib poplib raises 'line too long'."""
    long_line = b"x" * 5000
    script: list[Step] = [HOLA, Expect(b"RETR 1", b"+OK\r\n" + long_line + b"\r\n.\r\n")]
    ours, theirs, _, _ = side_by_side(serve, script, [("retr", lambda c: c.retr(1))])
    assert ours == [("retr", "ok", (b"+OK", [long_line], 5002))]
    assert theirs == [("retr", "error_proto", ("line too long",))]


def test_max_message_size_caps_a_reply(serve: list[FakePop3Server]) -> None:
    """max_message_size bounds a multi-line reply and closes the lost session."""
    server = FakePop3Server([HOLA, Expect(b"RETR 1", b"+OK\r\n" + b"y" * 100 + b"\r\n.\r\n")])
    serve.append(server)
    conn = our_poplib.POP3(server.host, server.port, timeout=5)
    conn.max_message_size = 50
    with pytest.raises(our_poplib.MessageTooLarge):
        conn.retr(1)
    closed: Any = conn.sock  # typed as a socket: poplib's contract sets it to None on close
    assert closed is None
    server.check()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.user("bob\r\nDELE 1"),
        lambda c: c.pass_("pw\0"),
        lambda c: c._shortcmd("NOOP\nDELE 1"),
        lambda c: c._putline(b"XTND\rDELE 1"),
    ],
)
def test_cr_lf_nul_are_refused(serve: list[FakePop3Server], call: Callable[[Any], object]) -> None:
    """CR, LF or NUL in a command line raise error_proto and send nothing (poplib sends)."""
    server = FakePop3Server([HOLA], linger=0.3)
    serve.append(server)
    conn = our_poplib.POP3(server.host, server.port, timeout=5)
    with pytest.raises(our_poplib.error_proto) as info:
        call(conn)
    assert isinstance(info.value, pop3.LocalProtocolError)
    conn.close()
    server.check()
    assert server.received == []


def test_certificate_is_verified_by_default(serve: list[FakePop3Server]) -> None:
    """POP3_SSL refuses an untrusted certificate; stdlib's default context accepts it."""
    script: list[Step] = [StartTLS(), HOLA]
    server = FakePop3Server(script, linger=0.3)
    serve.append(server)
    with pytest.raises(ssl.SSLCertVerificationError):
        our_poplib.POP3_SSL(server.host, server.port, timeout=5)
    server.close()
    assert server.received == []
    server = FakePop3Server(script, linger=0.3)
    serve.append(server)
    theirs = std_poplib.POP3_SSL(server.host, server.port, timeout=5)
    assert theirs.welcome == b"+ Hola mundo"
    theirs.close()


def test_debug_output_matches_stdlib_but_masks_secrets(
    serve: list[FakePop3Server], capsys: pytest.CaptureFixture[str]
) -> None:
    """Level 2 prints poplib's lines, except that PASS and AUTH arguments show ***."""
    script: list[Step] = [
        HOLA,
        Expect(b"USER bob", OK),
        Expect(b"PASS s3cret", OK),
        Expect(b"AUTH PLAIN " + AUTH_PLAIN, OK),
        Expect(b"STAT", b"+OK 1 2\r\n"),
    ]
    calls: list[Call] = [
        ("debug", lambda c: c.set_debuglevel(2)),
        ("user", lambda c: c.user("bob")),
        ("pass_", lambda c: c.pass_("s3cret")),
        ("auth", lambda c: c._shortcmd("AUTH PLAIN " + AUTH_PLAIN.decode())),
        ("stat", lambda c: c.stat()),
    ]
    outputs = []
    for module in MODULES:
        server = FakePop3Server(script, linger=0.3)
        serve.append(server)
        conn = module.POP3(server.host, server.port, timeout=5)
        run_calls(module, conn, calls)
        conn.close()
        server.check()
        outputs.append(capsys.readouterr().out)
    ours, theirs = outputs
    assert "s3cret" not in ours
    assert AUTH_PLAIN.decode() not in ours
    assert "*put* b'PASS s3cret'" in theirs
    masked = theirs.replace("s3cret", "***").replace(AUTH_PLAIN.decode(), "***")
    assert ours == masked
