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
from collections.abc import Callable
from typing import Final, TypeVar

from .buffer import DEFAULT_MAX_LINE, ReceiveBuffer
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
    ScanListing,
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

_T = TypeVar("_T", int, bytes)


def _parse_all(
    lines: list[bytes], pattern: re.Pattern[bytes], slow: Callable[[bytes], tuple[int, _T]]
) -> tuple[tuple[int, _T], ...]:
    out: list[tuple[int, _T]] = []
    match = pattern.fullmatch
    second_is_int = pattern is _SCAN_RE
    for line in lines:
        found = match(line)
        if found is None:
            out.append(slow(line))
        else:
            first, second = found.groups()
            out.append((int(first), int(second) if second_is_int else second))  # type: ignore[arg-type]
    return tuple(out)


def _parse_capabilities(lines: list[bytes]) -> dict[str, tuple[str, ...]]:
    caps: dict[str, tuple[str, ...]] = {}
    for line in lines:
        words = _decode(line).split()
        if words:
            caps[words[0].upper()] = tuple(words[1:])
    return caps


class ClientConnection:
    """The POP3 client side of one session, without I/O."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._buffer = ReceiveBuffer(max_line)
        self._outstanding: deque[Command] = deque()
        self._stls_pending = False  # an STLS is outstanding: nothing may follow it
        self._state = State.AUTHORIZATION
        self._predicted = State.AUTHORIZATION
        self._greeted = False
        self._eof = False
        self._broken: RemoteProtocolError | None = None
        self._in_body = False
        self._listing: list[bytes] | None = None
        self._listing_ok = b""

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
        while True:
            if self._listing is not None:
                event = self._read_listing_line()
                if event is None:
                    continue
                return event
            return self._read_status()

    # --------------------------------------------------------------- the readers
    def _need(self, what: str) -> NeedData:
        if self._eof:
            raise RemoteProtocolError(f"connection closed by server during {what}")
        return NEED_DATA

    def _read_greeting(self) -> Greeting | NeedData:
        line = self._buffer.take_line()
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
        line = self._buffer.take_line()
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
            self._listing = []
            self._listing_ok = line
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

    def _read_listing_line(self) -> Event | NeedData | None:
        assert self._listing is not None
        command = self._outstanding[0]
        lines = self._buffer.take_listing()
        if lines is None:
            return self._need(f"{command.verb.decode()} listing")
        self._listing = lines
        return self._finish_listing(command)

    def _finish_listing(self, command: Command) -> Event:
        assert self._listing is not None
        lines, ok = self._listing, self._listing_ok
        self._listing = None
        self._outstanding.popleft()
        if command.verb == b"CAPA":
            return Capabilities(command, _parse_capabilities(lines), ok, tuple(lines))
        if command.verb == b"LIST":
            return ScanListing(
                command, _parse_all(lines, _SCAN_RE, parse_scan_line), ok, tuple(lines)
            )
        uid_entries = _parse_all(lines, _UIDL_RE, parse_uidl_line)
        return UidlListing(command, uid_entries, ok, tuple(lines))

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
