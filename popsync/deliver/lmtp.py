"""The LMTP target (RFC 2033): hand each message to an LMTP server such as Dovecot's.

Guarantee: **at-least-once, with one named window.** A message is streamed into the spool
(``state_dir/spool/<account>/tmp/``) and fsynced, recorded pending, handed over, and marked
delivered; its spool file is removed after that commit. A crash after the server took
a message and before the batch's delivered commit is the only way to deliver it twice
(at most one batch is ever in that state, see ``sync._Batcher``):
the next run finds it pending with its spool file and hands it over again. A crash at any
other step loses nothing and duplicates nothing. A 4xx leaves the message pending (the run
ends 75 and the next run hands the spool file over again without re-downloading); a 5xx
records it *rejected*: never handed over again, never DELEd, listed by ``popsync status``.

The dialogue: ``sync`` hands a batch over in a background thread while the next batch
downloads (``overlap``); the batch goes out on ``lmtp_sessions`` parallel connections, each
taking the next message as it finishes one (the LMTP server is the bottleneck, so parallel
sessions are the lever). Per connection ``LHLO``, then per message ``MAIL FROM:<>`` (or
the message's Return-Path) with ``BODY=8BITMIME``/``SMTPUTF8`` when offered, one ``RCPT
TO``, ``DATA``; with PIPELINING the three envelope commands go in one write. The body is
streamed from the spool file in chunks and dot-stuffed on the fly; it is never held whole
in memory.

Library choice: stdlib ``smtplib.LMTP`` reads the whole message into memory
(``sendmail(msg)`` takes bytes) and cannot pipeline; ``aiosmtplib`` is asyncio-only and
has no LMTP per-recipient replies. The dialogue we need is ~100 lines over
`popsync.net.Stream`, which also maps every socket error once. Replies are bounded
(line length, line count, the socket timeout) and only ever logged sanitized.
"""

from __future__ import annotations

import contextvars
import os
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from popsync import net
from popsync.deliver.base import (
    Delivered,
    Outcome,
    Rejected,
    Spooled,
    SpoolTarget,
    Temporary,
    envelope_sender,
    sanitize,
)
from popsync.errors import NetworkError, PopsyncError

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
    at_line_start = True
    last = b"\n"
    with path.open("rb") as file:
        while data := file.read(chunk):
            stuffed = _LINE_START_DOT.sub(b"\n..", data)
            if at_line_start and stuffed[:1] == b".":
                stuffed = b"." + stuffed
            at_line_start = data[-1:] == b"\n"
            last = data[-1:]
            yield stuffed
    yield b".\r\n" if last == b"\n" else b"\r\n.\r\n"


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

    def deliver(self, path: Path, recipient: str) -> Outcome:
        """One transaction for the spool file at ``path``; the server's verdict."""
        sender = envelope_sender(path)
        params = ""
        if "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if "SMTPUTF8" in self.extensions:
            params += " SMTPUTF8"
        mail = f"MAIL FROM:<{sender}>{params}\r\n".encode()
        rcpt = f"RCPT TO:<{recipient}>\r\n".encode()
        if "PIPELINING" in self.extensions:
            self.send(mail + rcpt + b"DATA\r\n")
            replies = [self.reply(), self.reply(), self.reply()]
        else:
            replies = []
            for command in (mail, rcpt, b"DATA\r\n"):
                self.send(command)
                replies.append(self.reply())
                if replies[-1].code >= 400:
                    break
        failed = next((r for r in replies[:2] if r.code >= 300), None)
        if replies[-1].code == 354 and len(replies) == 3:
            for chunk in dot_stuffed(path) if failed is None else [b".\r\n"]:
                self.send(chunk)
            final = self.reply()
            if failed is None:
                return final.outcome(f"lmtp:{final.text}")
        if failed is None:
            failed = replies[-1]
        self.send(b"RSET\r\n")
        self.reply()
        return failed.outcome()

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

    def __init__(
        self,
        spool_path: Path,
        *,
        address: str,
        recipient: str,
        sessions: int = 1,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(spool_path)
        self.address = address
        self.recipient = recipient
        self.sessions = max(1, sessions)
        self.timeout = timeout

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        if not items:
            return []
        paths = [self.path(i.name) for i in items]
        outcomes: list[Outcome | None] = [None] * len(paths)
        queue = _Queue(len(paths))
        count = min(self.sessions, len(paths))
        if count == 1:
            failures = [self._work(paths, outcomes, queue)]
        else:
            # The sessions take the next message as each finishes one (a slow message does
            # not hold back a share), each in a copy of the caller's context (its secrets
            # are scrubbed from replies).
            runs = [contextvars.copy_context().run for _ in range(count)]
            with ThreadPoolExecutor(count, thread_name_prefix="popsync-lmtp") as pool:
                failures = list(pool.map(lambda run: run(self._work, paths, outcomes, queue), runs))
        reason = next((f for f in failures if f is not None), "LMTP hand-over did not finish")
        return [o if o is not None else Temporary(reason) for o in outcomes]

    def _work(self, paths: list[Path], outcomes: list[Outcome | None], queue: _Queue) -> str | None:
        """Deliver queued messages on one connection; the error that stopped it, if any.

        A message in flight when the session broke keeps no outcome: it is Temporary.
        """
        try:
            session = LmtpSession.open(self.address, timeout=self.timeout)
        except (PopsyncError, ValueError) as exc:
            return f"LMTP {sanitize(str(exc))}"
        try:
            while (index := queue.take()) is not None:
                outcomes[index] = session.deliver(paths[index], self.recipient)
        except PopsyncError as exc:
            return f"LMTP {sanitize(str(exc))}"
        finally:
            session.close()
        return None


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
