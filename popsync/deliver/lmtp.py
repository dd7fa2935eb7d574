"""The LMTP target (RFC 2033): hand each message to an LMTP server such as Dovecot's.

Guarantee: **at-least-once, with one named window.** A batch's messages are appended to
one spool file (``state_dir/spool/<account>/tmp/``, see `popsync.deliver.spool`), which
is fsynced once; the batch is recorded pending, handed over, and its outcomes committed;
the file is removed once no message in it is pending. A crash after the server took
a message and before the batch's delivered commit is the only way to deliver it twice
(at most one batch is ever in that state, see ``sync._Batcher``):
the next run finds it pending with its spool file and hands it over again. A crash at any
other step loses nothing and duplicates nothing. A 4xx leaves the message pending (the run
ends 75 and the next run hands it over again from the spool without re-downloading); a 5xx
records it *rejected*: never handed over again, never DELEd, listed by ``popsync status``.

The dialogue: ``sync`` hands a batch over in a background thread while the next batch
downloads (``overlap``); the batch goes out on ``lmtp_sessions`` parallel connections, each
taking the next message as it finishes one (the LMTP server is the bottleneck, so parallel
sessions are the lever). Beyond its first, a session opens only while the process-wide
`popsync.deliver.budget.SessionBudget` for the server has room (``lmtp_max_sessions``), so
many accounts at once do not multiply the server's processes. The connections stay open
from batch to batch until the run ends (`LmtpTarget.close`); one the server closed or
spoke on while idle (a 421 timeout) is replaced. Per connection ``LHLO``, then per
message ``MAIL FROM:<>`` (or the message's Return-Path) with ``BODY=8BITMIME``/``SMTPUTF8``
when offered, one ``RCPT TO``, ``DATA``. With PIPELINING the three envelope commands go in
one write, together with the end of the previous message's body, so a message costs one
round trip. The body is read from the spool file in chunks and dot-stuffed on the fly; it
is never held whole in memory.

Library choice: stdlib ``smtplib.LMTP`` reads the whole message into memory
(``sendmail(msg)`` takes bytes) and cannot pipeline; ``aiosmtplib`` is asyncio-only and
has no LMTP per-recipient replies. The dialogue we need is ~100 lines over
`popsync.net.Stream`, which also maps every socket error once. Replies are bounded
(line length, line count, the socket timeout) and only ever logged sanitized.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from popsync import net
from popsync.deliver.base import (
    Delivered,
    Outcome,
    Rejected,
    Spooled,
    SpoolTarget,
    Temporary,
    sanitize,
    sender_in,
)
from popsync.deliver.budget import SessionBudget
from popsync.deliver.spool import BatchSpool, locate
from popsync.errors import LocalIOError, NetworkError, PopsyncError
from popsync.maildir import TmpMessage

__all__ = ["LmtpError", "LmtpSession", "LmtpTarget", "Reply", "dot_stuffed", "parse_address"]

#: A reply line longer than this is a broken or hostile server (RFC 5321 says 512).
MAX_REPLY_LINE = 2048
#: Lines in one multi-line reply (an LHLO answer lists a dozen extensions).
MAX_REPLY_LINES = 100
_CHUNK = 256 * 1024
_LINE_START_DOT = re.compile(rb"\n\.")


class LmtpError(NetworkError):
    """The LMTP server could not be reached or spoke nonsense (temporary: retried)."""


class Reply:
    """One (possibly multi-line) reply: its code and its sanitized text."""

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        """The reply for a log line: code and text, sanitized and bounded."""
        return sanitize(f"{self.code} {' '.join(self.lines)}")

    def outcome(self, delivered_name: str | None = None) -> Outcome:
        """2xx (with a name) -> Delivered, 4xx -> Temporary, anything else -> Rejected."""
        if 200 <= self.code < 300 and delivered_name is not None:
            return Delivered(delivered_name)
        if 400 <= self.code < 500:
            return Temporary(f"LMTP {self.text}")
        return Rejected(f"LMTP {self.text}")


def parse_address(address: str) -> tuple[str, int] | str:
    """``unix:/path`` -> the path; ``HOST:PORT`` or ``[v6]:PORT`` -> (host, port)."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute (got {address!r})")
        return path
    found = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s/]+):(\d{1,5})", address)
    if found is None:
        raise ValueError(f'expected "unix:/path" or "HOST:PORT" (got {address!r})')
    host = found.group(1) or found.group(3)
    port = int(found.group(2) or found.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range (got {port})")
    return host, port


def dot_stuffed(path: Path, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The DATA body for a spool file: dot-stuffed, ending in CRLF, then ``.`` CRLF."""
    with path.open("rb", buffering=0) as file:
        yield from _stuffed(iter(functools.partial(file.read, chunk), b""))


def _stuffed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Dot-stuff a message's chunks; the terminator is joined to the last one (one write)."""
    at_line_start = True
    last = b"\n"
    held = b""
    for data in chunks:
        stuffed = _LINE_START_DOT.sub(b"\n..", data)
        if at_line_start and stuffed[:1] == b".":
            stuffed = b"." + stuffed
        at_line_start = data[-1:] == b"\n"
        last = data[-1:]
        if held:
            yield held
        held = stuffed
    yield held + (b".\r\n" if last == b"\n" else b"\r\n.\r\n")


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message's bytes are: a stretch of an open spool file."""

    fd: int
    offset: int
    length: int


class _Message:
    """A message read for one transaction: each byte read once, the sender from the start."""

    __slots__ = ("_first", "_source", "sender")

    def __init__(self, source: Source) -> None:
        self._source = source
        self._first = self._read(source.offset, min(source.length, _CHUNK))
        self.sender = sender_in(self._first)

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._source.fd, size, offset)
        if len(data) < size:
            raise LocalIOError(f"spool file ended early ({size - len(data)} octets missing)")
        return data

    def body(self) -> Iterator[bytes]:
        """The dot-stuffed DATA body, read on from the first chunk."""
        return _stuffed(self._chunks())

    def _chunks(self) -> Iterator[bytes]:
        first, self._first = self._first, b""
        if first:
            yield first
        source = self._source
        offset, end = source.offset + len(first), source.offset + source.length
        while offset < end:
            data = self._read(offset, min(end - offset, _CHUNK))
            offset += len(data)
            yield data


class LmtpSession:
    """One LMTP connection: greeting and LHLO done by `open`, then `send` per message."""

    def __init__(self, stream: net.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.extensions: set[str] = set()

    @classmethod
    def open(cls, address: str, *, timeout: float, hostname: str | None = None) -> LmtpSession:
        """Connect, read the greeting and say LHLO."""
        target = parse_address(address)
        if isinstance(target, str):
            stream = net.connect_unix(target, timeout=timeout)
        else:
            stream = net.connect(target[0], target[1], timeout=timeout, context=None)
        session = cls(stream)
        try:
            greeting = session.reply()
            if greeting.code != 220:
                raise LmtpError(f"LMTP server {address} refused the session: {greeting.text}")
            session.send(b"LHLO %s\r\n" % (hostname or os.uname().nodename).encode("idna"))
            hello = session.reply()
            if hello.code != 250:
                raise LmtpError(f"LMTP server {address} refused LHLO: {hello.text}")
            session.extensions = {line.split(" ", 1)[0].upper() for line in hello.lines[1:]}
        except BaseException:
            stream.close()
            raise
        return session

    def send(self, data: bytes) -> None:
        self._stream.sendall(data)

    def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_REPLY_LINE:
                raise LmtpError("LMTP server sent an overlong reply line")
            data = self._stream.recv(65536)
            if not data:
                raise LmtpError("LMTP server closed the connection")
            self._buffer += data

    def reply(self) -> Reply:
        """Read one reply; bounded in line length and line count."""
        lines: list[str] = []
        for _ in range(MAX_REPLY_LINES):
            line = self._line().rstrip(b"\r\n")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise LmtpError(f"LMTP server sent a malformed reply: {sanitize(line, 80)}")
            lines.append(sanitize(line[4:], 200))
            if line[3:4] != b"-":
                return Reply(int(line[:3]), lines)
        raise LmtpError("LMTP server sent an endless reply")

    def _envelope(self, sender: str, recipient: str) -> bytes:
        """MAIL, RCPT and DATA for one message, as one pipelined group."""
        params = ""
        if "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if "SMTPUTF8" in self.extensions:
            params += " SMTPUTF8"
        return f"MAIL FROM:<{sender}>{params}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()

    def deliver(self, source: Source, recipient: str) -> Outcome:
        """One transaction for the message at ``source``, a command at a time; the verdict."""
        message = _Message(source)
        replies = []
        for command in self._envelope(message.sender, recipient).splitlines(keepends=True):
            self.send(command)
            replies.append(self.reply())
            if replies[-1].code >= 400:
                break
        failed = next((r for r in replies[:2] if r.code >= 300), None)
        if replies[-1].code == 354 and len(replies) == 3:
            if failed is None:
                self._send_body(message, b"")
                final = self.reply()
                return final.outcome(f"lmtp:{final.text}")
            self.send(b".\r\n")  # DATA accepted without a recipient: end it empty
            self.reply()
        self.send(b"RSET\r\n")
        self.reply()
        return (failed or replies[-1]).outcome()

    def transfer(
        self,
        take: Callable[[], int | None],
        sources: Sequence[Source],
        recipient: str,
        outcomes: list[Outcome | None],
    ) -> None:
        """Deliver the messages ``take`` hands out (indexes into ``sources``) until it has none.

        With PIPELINING the next message's envelope goes out in the same write as the end
        of the previous body, so a message costs one round trip instead of two (RFC 2920
        allows commands after the end of the data). A message whose transaction was cut
        off by an error keeps no outcome.
        """
        if "PIPELINING" not in self.extensions:
            while (index := take()) is not None:
                outcomes[index] = self.deliver(sources[index], recipient)
            return
        index = take()
        if index is None:
            return
        message = _Message(sources[index])
        self.send(self._envelope(message.sender, recipient))
        while True:
            mail, rcpt, data = self.reply(), self.reply(), self.reply()
            refused = mail if mail.code >= 300 else rcpt if rcpt.code >= 300 else None
            following = take()
            upcoming = None if following is None else _Message(sources[following])
            envelope = b"" if upcoming is None else self._envelope(upcoming.sender, recipient)
            if data.code == 354 and refused is None:
                self._send_body(message, envelope)
                final = self.reply()
                outcomes[index] = final.outcome(f"lmtp:{final.text}")
            else:
                # No body for a refused envelope: end an accepted DATA empty, then RSET.
                end = b".\r\n" if data.code == 354 else b""
                self.send(end + b"RSET\r\n" + envelope)
                if end:
                    self.reply()
                self.reply()
                outcomes[index] = (refused or data).outcome()
            if following is None or upcoming is None:
                return
            index, message = following, upcoming

    def _send_body(self, message: _Message, tail: bytes) -> None:
        """Stream the dot-stuffed body; ``tail`` goes out in the same write as its end."""
        held = b""
        for chunk in message.body():
            if held:
                self.send(held)
            held = chunk
        self.send(held + tail)

    def reusable(self) -> bool:
        """True when a kept-open session can take more: the server has neither said
        anything since (a 421 before it drops an idle client) nor closed the connection."""
        return not self._buffer and not self._stream.readable_within(0)

    def abort(self) -> None:
        """Drop the connection without QUIT (after an error: the dialogue is out of step)."""
        self._stream.close()

    def close(self) -> None:
        """QUIT politely; never raises."""
        try:
            self.send(b"QUIT\r\n")
            self.reply()
        except PopsyncError:
            pass
        finally:
            self._stream.close()


class LmtpTarget(SpoolTarget):
    """Deliver through an LMTP server; see the module docstring."""

    kind = "lmtp"
    shared_spool = True

    def __init__(
        self,
        spool_path: Path,
        *,
        address: str,
        recipient: str,
        sessions: int = 1,
        timeout: float = 60.0,
        budget: SessionBudget | None = None,
    ) -> None:
        super().__init__(spool_path)
        self.address = address
        self.recipient = recipient
        self.sessions = max(1, sessions)
        self.timeout = timeout
        self._budget = budget
        self._batches = BatchSpool(self.spool)
        # Sessions stay open from batch to batch (and across recovery) until `close`.
        self._idle: list[LmtpSession] = []
        self._live = 0  # sessions open or being opened, idle or busy (the budget's count)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def open(self) -> TmpMessage:
        return self._batches.open()

    def seal(self) -> None:
        self._batches.seal()

    def path(self, name: str) -> Path:
        found = locate(name)
        return self.spool.tmp / (name if found is None else found[0])

    def recover(self, items: Sequence[Spooled]) -> list[Outcome | None]:
        present = [item for item in items if self._batches.holds(item.name, item.size)]
        self._batches.adopt([item.name for item in present])
        done = dict(zip((i.name for i in present), self.hand_over(present), strict=True))
        return [done.get(item.name) for item in items]

    def release(self, names: Sequence[str]) -> None:
        self._batches.release(list(names))

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        if not items:
            return []
        with _opened(self.spool.tmp, items) as sources:
            return self._hand_over(sources)

    def _hand_over(self, sources: list[Source]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(sources)
        queue = _Queue(len(sources))
        count = min(self.sessions, len(sources))
        if count == 1:
            failures = [self._work(sources, outcomes, queue)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.sessions, thread_name_prefix="popsync-lmtp")
            # The sessions take the next message as each finishes one (a slow message does
            # not hold back a share), each in a copy of the caller's context (its secrets
            # are scrubbed from replies).
            work = functools.partial(self._work, sources, outcomes, queue)
            futures = [
                self._pool.submit(contextvars.copy_context().run, work) for _ in range(count)
            ]
            wait(futures)
            failures = [future.result() for future in futures]
        reason = next((f for f in failures if f is not None), "LMTP hand-over did not finish")
        return [o if o is not None else Temporary(reason) for o in outcomes]

    def _work(
        self, sources: list[Source], outcomes: list[Outcome | None], queue: _Queue
    ) -> str | None:
        """Deliver queued messages on one connection; the error that stopped it, if any.

        A message in flight when the session broke keeps no outcome: it is Temporary. A
        session that finished cleanly stays open for the next batch.
        """
        try:
            session = self._session()
        except (PopsyncError, ValueError) as exc:
            return f"LMTP {sanitize(str(exc))}"
        if session is None:
            return None  # the server's budget is spent: the other sessions take the batch
        try:
            session.transfer(queue.take, sources, self.recipient, outcomes)
        except PopsyncError as exc:
            self._drop(session)
            return f"LMTP {sanitize(str(exc))}"
        except BaseException:
            self._drop(session)
            raise
        with self._lock:
            self._idle.append(session)
        return None

    def _session(self) -> LmtpSession | None:
        """A kept-open session that is still usable, else a new one if the budget allows
        (always, for the account's only one); None when it does not."""
        while True:
            with self._lock:
                session = self._idle.pop() if self._idle else None
                if session is None and not self._claim():
                    return None
            if session is None:
                try:
                    return LmtpSession.open(self.address, timeout=self.timeout)
                except BaseException:
                    self._unclaim()
                    raise
            if session.reusable():
                return session
            self._drop(session)

    def _claim(self) -> bool:
        """Count a session about to open (caller holds ``_lock``)."""
        first = self._live == 0
        if self._budget is not None and not self._budget.take(self.address, first=first):
            return False
        self._live += 1
        return True

    def _unclaim(self) -> None:
        with self._lock:
            self._live -= 1
        if self._budget is not None:
            self._budget.give_back(self.address)

    def _drop(self, session: LmtpSession, *, polite: bool = False) -> None:
        """Close a session (QUIT if ``polite``, else just the socket) and uncount it."""
        try:
            if polite:
                session.close()
            else:
                session.abort()
        finally:
            self._unclaim()

    def close(self) -> None:
        """QUIT the kept-open sessions; drop a batch file the run never sealed."""
        self._batches.abandon()
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            self._drop(session, polite=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@contextlib.contextmanager
def _opened(tmp: Path, items: Sequence[Spooled]) -> Iterator[list[Source]]:
    """Each item's bytes in its batch file, every file opened (read-only) once."""
    fds: dict[str, int] = {}
    try:
        sources = []
        for item in items:
            found = locate(item.name)
            if found is None:
                raise LocalIOError(f"not a message of a batch spool file: {item.name!r}")
            file, offset = found
            if file not in fds:
                try:
                    fds[file] = os.open(tmp / file, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise LocalIOError(f"cannot read {tmp / file}: {exc.strerror}") from exc
            sources.append(Source(fds[file], offset, item.size))
        yield sources
    finally:
        for fd in fds.values():
            os.close(fd)


class _Queue:
    """The next message index for whichever session is free; thread-safe."""

    def __init__(self, count: int) -> None:
        self._next = 0
        self._count = count
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self._count:
                return None
            self._next += 1
            return self._next - 1
