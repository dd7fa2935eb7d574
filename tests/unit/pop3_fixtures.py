"""Byte fixtures and helpers for the POP3 core tests (after h11's ``tests/test_io.py``).

A :class:`Transcript` is a list of commands the client sends (all at once, pipelined),
the bytes the server answers with, and the expected outcomes in a compact form
(see :func:`summarize`). :func:`events_for` feeds the bytes in any chunking and
collects every event, ``-ERR`` and protocol error, so one table can be checked fed
whole, one byte at a time, and with the next reply's bytes glued on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from popsync.pop3 import (
    DEFAULT_MAX_LINE,
    AuthFailed,
    Capabilities,
    ClientConnection,
    Command,
    ConnectionClosed,
    Continuation,
    Event,
    Greeting,
    LoginDelay,
    MailboxInUse,
    MessageChunk,
    MessageEnd,
    MessageStart,
    NeedData,
    Ok,
    PermFailure,
    RemoteProtocolError,
    ScanListing,
    ServerError,
    TempFailure,
    UidlListing,
    Utf8Required,
)
from popsync.pop3 import commands as cmd

__all__ = [
    "APOP_STAMP",
    "LOGIN",
    "LOGIN_BYTES",
    "LOGIN_SEEN",
    "TRAILING_CAPA",
    "TRAILING_CAPA_SEEN",
    "TRANSCRIPTS",
    "Broken",
    "Feed",
    "Outcome",
    "Raised",
    "Transcript",
    "drain",
    "events_for",
    "feed_bytewise",
    "feed_chunks",
    "feed_edges",
    "feed_whole",
    "merge_chunks",
    "summarize",
]

Feed = Callable[[bytes], Iterator[bytes]]


def feed_whole(data: bytes) -> Iterator[bytes]:
    """All bytes in one piece."""
    yield data


def feed_bytewise(data: bytes) -> Iterator[bytes]:
    """One byte at a time."""
    for index in range(len(data)):
        yield data[index : index + 1]


def feed_edges(data: bytes, edge: int = 4096, piece: int = 1 << 20) -> Iterator[bytes]:
    """One byte at a time near both ends, large pieces in between (for huge transcripts)."""
    middle_end = max(edge, len(data) - edge)
    yield from feed_bytewise(data[:edge])
    for start in range(edge, middle_end, piece):
        yield data[start : min(start + piece, middle_end)]
    yield from feed_bytewise(data[middle_end:])


def feed_chunks(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """Split at the given offsets (any order, out-of-range ones ignored)."""
    start = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        yield data[start:cut]
        start = cut
    yield data[start:]


@dataclass(frozen=True)
class Raised:
    """A ``ServerError`` raised by ``next_event``, as a comparable value."""

    kind: type[ServerError]
    verb: bytes
    text: str
    code: str | None


@dataclass(frozen=True)
class Broken:
    """A ``RemoteProtocolError``: the connection is dead. The message is not compared."""

    message: str = field(default="", compare=False)


Outcome = Event | Raised | Broken


def drain(conn: ClientConnection, out: list[Outcome]) -> bool:
    """Pull events into ``out`` until more data is needed; True once the session ended."""
    while True:
        try:
            event = conn.next_event()
        except ServerError as exc:
            out.append(Raised(type(exc), exc.command, exc.text, exc.code))
            continue
        except RemoteProtocolError as exc:
            out.append(Broken(str(exc)))
            return True
        if isinstance(event, NeedData):
            return False
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return True


def merge_chunks(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Join adjacent ``MessageChunk`` events: their boundaries depend on the feeding."""
    merged: list[Outcome] = []
    run: list[bytes] = []  # joined once per run: appending to bytes would be quadratic
    for item in outcomes:
        if isinstance(item, MessageChunk):
            run.append(item.data)
            continue
        if run:
            merged.append(MessageChunk(b"".join(run)))
            run = []
        merged.append(item)
    if run:
        merged.append(MessageChunk(b"".join(run)))
    return merged


def events_for(
    transcript_commands: Sequence[Command],
    data: bytes,
    *,
    feed: Feed = feed_whole,
    eof: bool = False,
    max_line: int = DEFAULT_MAX_LINE,
) -> list[Outcome]:
    """Send every command, feed ``data`` as ``feed`` splits it (then EOF if asked).

    Returns the outcomes with message chunks merged; stops at the first protocol
    error or ``ConnectionClosed``.
    """
    conn = ClientConnection(max_line=max_line)
    for command in transcript_commands:
        conn.send(command)
    out: list[Outcome] = []
    for piece in feed(data):
        conn.receive_data(piece)
        if drain(conn, out):
            return merge_chunks(out)
    if eof:
        conn.receive_data(b"")
        drain(conn, out)
    return merge_chunks(out)


def summarize(outcomes: Sequence[Outcome]) -> list[tuple[object, ...]]:
    """A compact view of outcomes for the fixture table (message chunks already merged)."""
    view: list[tuple[object, ...]] = []
    for item in outcomes:
        match item:
            case Greeting(text=text, timestamp=stamp):
                view.append(("greeting", text, stamp))
            case Ok(command=command, text=text):
                view.append(("ok", command.verb, text))
            case Continuation(data=data):
                view.append(("+", data))
            case Capabilities(caps=caps):
                view.append(("capa", caps))
            case ScanListing(entries=scan):
                view.append(("list", scan))
            case UidlListing(entries=uids):
                view.append(("uidl", uids))
            case MessageStart(command=command):
                view.append(("start", command.verb))
            case MessageChunk(data=data):
                view.append(("body", data))
            case MessageEnd(command=command):
                view.append(("end", command.verb))
            case ConnectionClosed():
                view.append(("closed",))
            case Raised(kind=kind, verb=verb, code=code):
                view.append(("err", kind, verb, code))
            case Broken():
                view.append(("broken",))
    return view


@dataclass(frozen=True)
class Transcript:
    """Commands sent up front, the server's bytes, and the expected summary."""

    name: str
    commands: tuple[Command, ...]
    data: bytes
    expected: tuple[tuple[object, ...], ...]
    eof: bool = False
    huge: bool = False  # too big to feed byte by byte from end to end


APOP_STAMP = b"<1896.697170952@dbc.mtview.ca.us>"
LOGIN = (cmd.user("alice"), cmd.pass_("secret"))
LOGIN_BYTES = b"+OK ready\r\n+OK\r\n+OK logged in\r\n"
LOGIN_SEEN: tuple[tuple[object, ...], ...] = (
    ("greeting", "ready", None),
    ("ok", b"USER", ""),
    ("ok", b"PASS", "logged in"),
)

#: Appended in the "trailing bytes" test: a reply that belongs to one more command.
TRAILING_CAPA = b"+OK next\r\nUIDL\r\n.\r\n"
TRAILING_CAPA_SEEN = ("capa", {"UIDL": ()})


def _retr(name: str, wire_body: bytes, body: bytes, **kw: bool) -> Transcript:
    """A logged-in RETR 1 whose dot-stuffed ``wire_body`` must unstuff to ``body``."""
    seen = (("start", b"RETR"), *((("body", body),) if body else ()), ("end", b"RETR"))
    return Transcript(
        name,
        (*LOGIN, cmd.retr(1)),
        LOGIN_BYTES + b"+OK message follows\r\n" + wire_body,
        (*LOGIN_SEEN, *seen),
        **kw,
    )


def _pass_err(name: str, text: bytes, kind: type[ServerError], code: str | None) -> Transcript:
    return Transcript(
        name,
        LOGIN,
        b"+OK ready\r\n+OK\r\n-ERR " + text + b"\r\n",
        (("greeting", "ready", None), ("ok", b"USER", ""), ("err", kind, b"PASS", code)),
    )


_BIG = b"x" * 100_000
_HUGE = b"y" * 10_000_000
_CRAM_CHALLENGE = b"PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"

TRANSCRIPTS: tuple[Transcript, ...] = (
    Transcript(
        "greeting-apop",
        (),
        b"+OK POP3 server ready " + APOP_STAMP + b"\r\n",
        (("greeting", "POP3 server ready " + APOP_STAMP.decode(), APOP_STAMP),),
    ),
    Transcript(
        "greeting-plain",
        (),
        b"+OK Dovecot ready.\r\n",
        (("greeting", "Dovecot ready.", None),),
    ),
    Transcript(
        "greeting-err",
        (),
        b"-ERR [SYS/TEMP] too busy, try later\r\n",
        (("err", TempFailure, b"", "SYS/TEMP"),),
    ),
    Transcript("user-pass", LOGIN, LOGIN_BYTES, LOGIN_SEEN),
    Transcript(
        "capa",
        (cmd.capa(),),
        b"+OK ready\r\n+OK Capability list follows\r\nTOP\r\nUIDL\r\nSASL PLAIN LOGIN\r\n"
        b"RESP-CODES\r\npipelining\r\nIMPLEMENTATION Dovecot 2.3\r\n.\r\n",
        (
            ("greeting", "ready", None),
            (
                "capa",
                {
                    "TOP": (),
                    "UIDL": (),
                    "SASL": ("PLAIN", "LOGIN"),
                    "RESP-CODES": (),
                    "PIPELINING": (),
                    "IMPLEMENTATION": ("Dovecot", "2.3"),
                },
            ),
        ),
    ),
    Transcript(
        "list-multi",
        (*LOGIN, cmd.list_()),
        LOGIN_BYTES + b"+OK 2 messages (320 octets)\r\n1 120\r\n2 200\r\n.\r\n",
        (*LOGIN_SEEN, ("list", ((1, 120), (2, 200)))),
    ),
    Transcript(
        "list-empty",
        (*LOGIN, cmd.list_()),
        LOGIN_BYTES + b"+OK 0 messages\r\n.\r\n",
        (*LOGIN_SEEN, ("list", ())),
    ),
    Transcript(
        "list-single",
        (*LOGIN, cmd.list_(2)),
        LOGIN_BYTES + b"+OK 2 200\r\n",
        (*LOGIN_SEEN, ("ok", b"LIST", "2 200")),
    ),
    Transcript(
        "uidl-multi",
        (*LOGIN, cmd.uidl()),
        LOGIN_BYTES + b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7/a\r\n.\r\n",
        (*LOGIN_SEEN, ("uidl", ((1, b"whqtswO00WBw418f9t5JxYwZ"), (2, b"QhdPYR:00WBw1Ph7x7/a")))),
    ),
    Transcript(
        "uidl-single",
        (*LOGIN, cmd.uidl(2)),
        LOGIN_BYTES + b"+OK 2 QhdPYR:00WBw1Ph7x7\r\n",
        (*LOGIN_SEEN, ("ok", b"UIDL", "2 QhdPYR:00WBw1Ph7x7")),
    ),
    _retr(
        "retr-dot-stuffing",
        b"Subject: dots\r\n\r\n..leading\r\n...two\r\n..\r\nend.\r\n.\r\n",
        b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nend.\r\n",
    ),
    Transcript(
        "top",
        (*LOGIN, cmd.top(1, 0)),
        LOGIN_BYTES + b"+OK\r\nSubject: hi\r\nFrom: a@b\r\n\r\n.\r\n",
        (
            *LOGIN_SEEN,
            ("start", b"TOP"),
            ("body", b"Subject: hi\r\nFrom: a@b\r\n\r\n"),
            ("end", b"TOP"),
        ),
    ),
    Transcript(
        "bare-lf",
        (*LOGIN, cmd.list_(), cmd.retr(1)),
        b"+OK ready\n+OK\n+OK logged in\n+OK\n1 5\n.\n+OK\na\n..b\n\n.\n",
        (
            *LOGIN_SEEN,
            ("list", ((1, 5),)),
            ("start", b"RETR"),
            ("body", b"a\n.b\n\n"),
            ("end", b"RETR"),
        ),
    ),
    _retr("mixed-crlf-lf", b"a\r\nb\n..c\r\nd\n.\r\n", b"a\r\nb\n.c\r\nd\n"),
    _retr("mixed-lf-terminator", b"a\r\n.\n", b"a\r\n"),
    _retr("bare-cr-in-line", b"a\rb\r\n\r.x\r\n.\r\n", b"a\rb\r\n\r.x\r\n"),
    _retr("line-100kb", b"H: v\r\n\r\n" + _BIG + b"\r\n.\r\n", b"H: v\r\n\r\n" + _BIG + b"\r\n"),
    _retr(
        "line-10mb-starting-with-dot",
        b"H: v\r\n\r\n.." + _HUGE + b"\r\n.\r\n",
        b"H: v\r\n\r\n." + _HUGE + b"\r\n",
        huge=True,
    ),
    _retr("empty-body", b".\r\n", b""),
    # A body "abc" without a final line end: the server adds CRLF before the dot, so
    # the client receives (and keeps) "abc\r\n"; it cannot tell the two apart.
    _retr("no-final-newline", b"abc\r\n.\r\n", b"abc\r\n"),
    _pass_err("err-in-use", b"[IN-USE] Mailbox locked", MailboxInUse, "IN-USE"),
    _pass_err("err-login-delay", b"[LOGIN-DELAY] wait 300s", LoginDelay, "LOGIN-DELAY"),
    _pass_err("err-sys-temp", b"[SYS/TEMP] disk busy", TempFailure, "SYS/TEMP"),
    _pass_err("err-sys-perm", b"[SYS/PERM] account disabled", PermFailure, "SYS/PERM"),
    _pass_err("err-auth", b"[AUTH] Authentication failed.", AuthFailed, "AUTH"),
    _pass_err("err-utf8", b"[UTF8] need UTF8 mode", Utf8Required, "UTF8"),
    _pass_err("err-hierarchical", b"[SYS/TEMP/FOO] quota", TempFailure, "SYS/TEMP/FOO"),
    _pass_err("err-unknown-code", b"[XYZZY] odd", ServerError, "XYZZY"),
    _pass_err("err-no-code", b"no such user", ServerError, None),
    Transcript(
        "pipelined",
        (
            *LOGIN,
            cmd.stat(),
            cmd.list_(),
            cmd.uidl(),
            cmd.retr(1),
            cmd.top(2, 1),
            cmd.dele(1),
            cmd.dele(9),
            cmd.noop(),
            cmd.rset(),
            cmd.quit(),
        ),
        LOGIN_BYTES
        + b"+OK 2 320\r\n"
        + b"+OK\r\n1 120\r\n2 200\r\n.\r\n"
        + b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n"
        + b"+OK\r\nhello\r\n.\r\n"
        + b"+OK\r\nS: x\r\n\r\nfirst\r\n.\r\n"
        + b"+OK deleted\r\n"
        + b"-ERR no such message\r\n"
        + b"+OK\r\n+OK\r\n+OK bye\r\n",
        (
            *LOGIN_SEEN,
            ("ok", b"STAT", "2 320"),
            ("list", ((1, 120), (2, 200))),
            ("uidl", ((1, b"aaa"), (2, b"bbb"))),
            ("start", b"RETR"),
            ("body", b"hello\r\n"),
            ("end", b"RETR"),
            ("start", b"TOP"),
            ("body", b"S: x\r\n\r\nfirst\r\n"),
            ("end", b"TOP"),
            ("ok", b"DELE", "deleted"),
            ("err", ServerError, b"DELE", None),
            ("ok", b"NOOP", ""),
            ("ok", b"RSET", ""),
            ("ok", b"QUIT", "bye"),
            ("closed",),
        ),
        eof=True,
    ),
    Transcript(
        "sasl-cram-md5",
        (cmd.auth("CRAM-MD5"),),
        b"+OK ready\r\n+ " + _CRAM_CHALLENGE + b"\r\n+OK welcome\r\n",
        (("greeting", "ready", None), ("+", _CRAM_CHALLENGE), ("ok", b"AUTH", "welcome")),
    ),
    Transcript(
        "sasl-login-two-steps",
        (cmd.auth("LOGIN"),),
        b"+OK ready\r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK\r\n",
        (
            ("greeting", "ready", None),
            ("+", b"VXNlcm5hbWU6"),
            ("+", b"UGFzc3dvcmQ6"),
            ("ok", b"AUTH", ""),
        ),
    ),
    Transcript(
        "sasl-empty-challenge-then-err",
        (cmd.auth("XOAUTH2"),),
        b"+OK ready\r\n+ \r\n+\r\n-ERR [AUTH] invalid token\r\n",
        (
            ("greeting", "ready", None),
            ("+", b""),
            ("+", b""),
            ("err", AuthFailed, b"AUTH", "AUTH"),
        ),
    ),
    Transcript(
        "quit-in-authorization",
        (cmd.quit(),),
        b"+OK ready\r\n+OK bye\r\n",
        (("greeting", "ready", None), ("ok", b"QUIT", "bye"), ("closed",)),
        eof=True,
    ),
    Transcript(
        "eof-mid-body",
        (*LOGIN, cmd.retr(1)),
        LOGIN_BYTES + b"+OK\r\npartial line\r\nno termin",
        (*LOGIN_SEEN, ("start", b"RETR"), ("body", b"partial line\r\nno termin"), ("broken",)),
        eof=True,
    ),
)
