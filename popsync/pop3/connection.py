"""The sans-I/O POP3 client connection: commands in, bytes out; bytes in, events out.

It owns no socket and no clock (the h11 pattern). A driver calls :meth:`send` and
writes the bytes it returns, feeds whatever it reads to :meth:`receive_data`, and
pulls :meth:`next_event` until it returns :data:`NEED_DATA`. Sent commands wait in a
FIFO, so pipelining (RFC 2449) is just sending several before reading: replies come
back in order and are matched to the head of the FIFO.
"""

from __future__ import annotations

import re
from collections import deque
from operator import itemgetter
from typing import Final

from .buffer import DEFAULT_MAX_LINE, MAX_CAPA, MAX_LISTING, MAX_LISTING_ENTRIES, ReceiveBuffer
from .commands import Command
from .errors import LocalProtocolError, RemoteProtocolError, server_error
from .events import (
    Capabilities,
    ConnectionClosed,
    Continuation,
    Event,
    Greeting,
    MessageChunk,
    MessageEnd,
    MessageStart,
    Ok,
    ScanEntries,
    ScanListing,
    UidlEntries,
    UidlListing,
)
from .state import ALLOWED, State, next_state, next_state_after_err

__all__ = ["NEED_DATA", "ClientConnection", "NeedData", "parse_scan_line", "parse_uidl_line"]


class NeedData:
    """Sentinel type: feed more bytes before asking for the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

_TIMESTAMP_RE = re.compile(rb"<[^<>\s]*>")
_BODY_VERBS = frozenset({b"RETR", b"TOP"})


def _decode(raw: bytes) -> str:
    # Status text is meant to be ASCII, but servers put UTF-8 and Latin-1 there.
    return raw.decode("utf-8", "replace")


def _status_text(line: bytes, prefix_len: int) -> str:
    return _decode(line[prefix_len:].lstrip(b" "))


#: More digits than any message number or size; also keeps int() below its digit limit.
_MAX_DIGITS = 20


def _positive_int(token: bytes, what: str) -> int:
    if not token.isdigit() or len(token) > _MAX_DIGITS:
        raise RemoteProtocolError(f"bad {what} in server reply: {token[:40]!r}")
    return int(token)


def parse_scan_line(line: bytes) -> tuple[int, int]:
    """Parse ``msgnum size`` from LIST (extra tokens after the size are allowed, RFC 1939)."""
    parts = line.split()
    if len(parts) < 2:
        raise RemoteProtocolError(f"bad LIST line from server: {line[:80]!r}")
    return _positive_int(parts[0], "message number"), _positive_int(parts[1], "size")


def parse_uidl_line(line: bytes) -> tuple[int, bytes]:
    """Parse ``msgnum unique-id`` from UIDL; the id is opaque bytes without controls or spaces.

    RFC 1939 allows 0x21-0x7E and at most 70 octets; longer ids and 8-bit octets are
    accepted (real servers send them), control characters and inner spaces are not.
    """
    parts = line.split(None, 1)
    if len(parts) != 2:
        raise RemoteProtocolError(f"bad UIDL line from server: {line[:80]!r}")
    number = _positive_int(parts[0], "message number")
    uid = parts[1].strip(b" \t")
    if not uid or any(octet <= 0x20 or octet == 0x7F for octet in uid):
        raise RemoteProtocolError(f"bad unique id in UIDL line: {line[:80]!r}")
    return number, uid


# The common case of each listing line, matched in C; anything else goes through the
# careful per-line parser, which accepts the same lines and explains what is wrong.
_SCAN_RE = re.compile(rb"[ \t]*([0-9]{1,20})[ \t]+([0-9]{1,20})(?:[ \t][^\n]*)?")
_UIDL_RE = re.compile(rb"[ \t]*([0-9]{1,20})[ \t]+([\x21-\x7e\x80-\xff]+)[ \t]*")
# The same, for every line of a block at once (each match is one whole line with its end).
_SCAN_LINES = re.compile(
    rb"^[ \t]*([0-9]{1,20})[ \t]+([0-9]{1,20})(?:[ \t][^\n]*)?\r?\n", re.MULTILINE
)
_UIDL_LINES = re.compile(
    rb"^[ \t]*([0-9]{1,20})[ \t]+([\x21-\x7e\x80-\xff]+)[ \t]*\r?\n", re.MULTILINE
)
_first = itemgetter(0)
_second = itemgetter(1)


def _split_block(block: bytes) -> list[bytes]:
    """The lines of a listing block without line ends, dot-unstuffed (RFC 1939)."""
    lines = block.replace(b"\r\n", b"\n").split(b"\n")
    lines.pop()  # the empty piece after the last line end
    if block.startswith(b".") or b"\n." in block:
        lines = [line[1:] if line[:1] == b"." else line for line in lines]
    return lines


def _parse_capabilities(lines: list[bytes]) -> dict[str, tuple[str, ...]]:
    caps: dict[str, tuple[str, ...]] = {}
    for line in lines:
        words = _decode(line).split()
        if words:
            caps[words[0].upper()] = tuple(words[1:])
    return caps


class _Listing:
    """A CAPA, LIST or UIDL reply being parsed block by block as its bytes arrive."""

    __slots__ = ("command", "keep_lines", "lines", "octets", "ok", "scan", "uidl")

    def __init__(self, command: Command, ok: bytes, keep_lines: bool) -> None:
        self.command = command
        self.ok = ok
        self.octets = 0
        self.keep_lines = keep_lines or command.verb == b"CAPA"
        self.lines: list[bytes] = []
        self.scan = ScanEntries()
        self.uidl = UidlEntries()

    def add(self, block: bytes) -> None:
        """Parse one block of whole lines (see ReceiveBuffer.take_listing_block)."""
        verb = self.command.verb
        self.octets += len(block)
        limit = MAX_CAPA if verb == b"CAPA" else MAX_LISTING
        if self.octets > limit:
            # Lines are limited one by one; the reply as a whole must be too, or a
            # hostile server could grow memory without end.
            raise RemoteProtocolError(f"server {verb.decode()} reply is larger than {limit} octets")
        if self.keep_lines:
            self.lines += _split_block(block)
        if verb == b"CAPA":
            return
        try:
            if verb == b"LIST":
                self._add_scan(block)
            else:
                self._add_uidl(block)
        except OverflowError:
            raise RemoteProtocolError(
                f"message number or size out of range in {verb.decode()} listing"
            ) from None
        if len(self.scan.numbers) + len(self.uidl.numbers) > MAX_LISTING_ENTRIES:
            raise RemoteProtocolError(
                f"server {verb.decode()} listing has more than {MAX_LISTING_ENTRIES} entries"
            )

    def _add_scan(self, block: bytes) -> None:
        found = _SCAN_LINES.findall(block)
        numbers, sizes = self.scan.numbers, self.scan.sizes
        if len(found) == block.count(b"\n"):  # every line matched the common form
            numbers.extend(map(int, map(_first, found)))
            sizes.extend(map(int, map(_second, found)))
            return
        for line in _split_block(block):
            hit = _SCAN_RE.fullmatch(line)
            number, size = parse_scan_line(line) if hit is None else map(int, hit.groups())
            numbers.append(number)
            sizes.append(size)

    def _add_uidl(self, block: bytes) -> None:
        found = _UIDL_LINES.findall(block)
        numbers, uids = self.uidl.numbers, self.uidl.uids
        if len(found) == block.count(b"\n"):
            numbers.extend(map(int, map(_first, found)))
            uids += map(_second, found)
            return
        for line in _split_block(block):
            hit = _UIDL_RE.fullmatch(line)
            if hit is None:
                number, uid = parse_uidl_line(line)
            else:
                number, uid = int(hit.group(1)), hit.group(2)
            numbers.append(number)
            uids.append(uid)

    def event(self) -> Capabilities | ScanListing | UidlListing:
        """The finished reply as an event."""
        command, ok, lines = self.command, self.ok, tuple(self.lines)
        if command.verb == b"CAPA":
            return Capabilities(command, _parse_capabilities(self.lines), ok, lines)
        if command.verb == b"LIST":
            return ScanListing(command, self.scan, ok, lines)
        return UidlListing(command, self.uidl, ok, lines)


class ClientConnection:
    """The POP3 client side of one session, without I/O."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, keep_lines: bool = False) -> None:
        """``keep_lines`` also keeps the raw lines of LIST and UIDL (for poplib's API)."""
        self._buffer = ReceiveBuffer(max_line)
        self._keep_lines = keep_lines
        self._outstanding: deque[Command] = deque()
        self._stls_pending = False  # an STLS is outstanding: nothing may follow it
        self._state = State.AUTHORIZATION
        self._predicted = State.AUTHORIZATION
        self._greeted = False
        self._eof = False
        self._broken: RemoteProtocolError | None = None
        self._in_body = False
        self._listing: _Listing | None = None

    # ----------------------------------------------------------------- inspection
    @property
    def state(self) -> State:
        """The session state as confirmed by the server's replies so far."""
        return self._state

    @property
    def outstanding(self) -> tuple[Command, ...]:
        """Commands sent whose replies have not been read completely."""
        return tuple(self._outstanding)

    @property
    def pending_bytes(self) -> int:
        """Received bytes not yet turned into events (must be 0 when TLS starts)."""
        return len(self._buffer)

    # ------------------------------------------------------------------- sending
    def send(self, command: Command) -> bytes:
        """Queue ``command`` and return its bytes; refuse it if the state forbids it.

        The check uses the state the session will be in if every outstanding command
        succeeds, so ``USER``/``PASS``/``STAT`` may be pipelined.
        """
        if self._broken is not None:
            raise LocalProtocolError("connection is broken after a protocol error")
        verb = command.verb
        if self._stls_pending:
            # Anything sent before the handshake would travel (and be answered) in clear.
            raise LocalProtocolError(
                f"{verb.decode('ascii', 'replace')} sent while STLS is pending"
            )
        if verb not in ALLOWED[self._predicted]:
            raise LocalProtocolError(
                f"{verb.decode('ascii', 'replace')} is not allowed in the "
                f"{self._predicted.value} state"
            )
        data = command.encode()
        self._outstanding.append(command)
        if verb == b"STLS":
            self._stls_pending = True
        self._predicted = next_state(self._predicted, verb)
        return data

    def send_sasl(self, response: bytes) -> bytes:
        """Return the line answering a SASL challenge (base64, or ``*`` to cancel)."""
        if not self._outstanding or self._outstanding[-1].verb != b"AUTH":
            raise LocalProtocolError("a SASL response needs an AUTH command in progress")
        if any(bad in response for bad in (b"\r", b"\n", b"\0")):
            raise LocalProtocolError("SASL response contains CR, LF or NUL")
        return response + b"\r\n"

    # ----------------------------------------------------------------- receiving
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the server; ``b""`` means the server closed the connection."""
        if data:
            if self._eof:
                raise LocalProtocolError("data received after end of file")
            self._buffer.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """Return the next complete event, or :data:`NEED_DATA`.

        A ``-ERR`` reply is raised as a :class:`ServerError` subclass, after which the
        connection is still usable. Bad bytes raise :class:`RemoteProtocolError`, after
        which it is not.
        """
        if self._broken is not None:
            raise self._broken
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._broken = exc
            self._state = State.CLOSED
            raise

    def _next_event(self) -> Event | NeedData:
        if not self._greeted:
            return self._read_greeting()
        if self._in_body:
            return self._read_body()
        if self._listing is not None:
            return self._read_listing()
        return self._read_status()

    # --------------------------------------------------------------- the readers
    def _need(self, what: str) -> NeedData:
        if self._eof:
            raise RemoteProtocolError(f"connection closed by server during {what}")
        return NEED_DATA

    def _read_greeting(self) -> Greeting | NeedData:
        line = self._buffer.take_line(MAX_CAPA)
        if line is None:
            return self._need("greeting")
        self._greeted = True
        if line[:3].upper() == b"+OK":
            stamp = _TIMESTAMP_RE.search(line)
            return Greeting(_status_text(line, 3), stamp.group(0) if stamp else None, line)
        if line[:4].upper() == b"-ERR":
            self._state = self._predicted = State.CLOSED
            raise server_error(b"", _status_text(line, 4))
        raise RemoteProtocolError(f"server greeting is not POP3: {line[:80]!r}")

    def _read_status(self) -> Event | NeedData:
        if not self._outstanding:
            if len(self._buffer):
                raise RemoteProtocolError("server sent data that answers no command")
            if self._eof:
                self._state = self._predicted = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        command = self._outstanding[0]
        # Before authentication anyone on the path may be talking: keep it small.
        line = self._buffer.take_line(MAX_CAPA if self._state is State.AUTHORIZATION else None)
        if line is None:
            return self._need(f"reply to {command.verb.decode()}")
        head = line[:4].upper()
        if head[:3] == b"+OK":
            return self._on_ok(command, line)
        if head == b"-ERR":
            self._on_err()
            raise server_error(command.verb, _status_text(line, 4))
        if command.verb == b"AUTH" and (line == b"+" or line[:2] == b"+ "):
            return Continuation(command, line[2:])
        raise RemoteProtocolError(
            f"reply to {command.verb.decode()} is neither +OK nor -ERR: {line[:80]!r}"
        )

    def _on_ok(self, command: Command, line: bytes) -> Event | NeedData:
        if command.multiline:
            if command.verb in _BODY_VERBS:
                self._in_body = True
                self._buffer.start_body()
                return MessageStart(command, line)
            self._listing = _Listing(command, line, self._keep_lines)
            return self._next_event()
        self._outstanding.popleft()
        self._state = next_state(self._state, command.verb)
        if command.verb == b"STLS":
            self._stls_pending = False
        if command.verb == b"STLS" and len(self._buffer):
            # Bytes that came with the STLS reply were sent in clear text before the
            # handshake and would be read as if protected: a STARTTLS injection.
            raise RemoteProtocolError("server sent data after its STLS reply (possible injection)")
        return Ok(command, _status_text(line, 3), line)

    def _on_err(self) -> None:
        command = self._outstanding.popleft()
        if command.verb == b"STLS":
            self._stls_pending = False
        self._state = next_state_after_err(self._state, command.verb)
        # The optimistic state assumed success; recompute it from what is confirmed.
        predicted = self._state
        for pending in self._outstanding:
            predicted = next_state(predicted, pending.verb)
        self._predicted = predicted

    def _read_listing(self) -> Event | NeedData:
        listing = self._listing
        assert listing is not None
        while True:
            taken = self._buffer.take_listing_block()
            if taken is None:
                return self._need(f"{listing.command.verb.decode()} listing")
            block, ended = taken
            if block:
                listing.add(block)
            if ended:
                break
        self._listing = None
        self._outstanding.popleft()
        return listing.event()

    def _read_body(self) -> Event | NeedData:
        while True:
            result = self._buffer.read_body()
            if result is None:
                return self._need(f"{self._outstanding[0].verb.decode()} body")
            data, ended = result
            if ended:
                self._in_body = False
                return MessageEnd(self._outstanding.popleft())
            if data:
                return MessageChunk(data)
