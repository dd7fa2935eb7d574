"""The receive buffer: status lines with a length limit, message bodies streamed.

Two rules from real servers shape it. Status and listing lines are short, so a line
longer than ``max_line`` is an error (a hostile server could otherwise grow memory
without bound). Message lines have no limit at all (poplib's 2048-byte cap is wrong
for real mail), so bodies are never split into lines: :meth:`ReceiveBuffer.read_body`
hands out whole runs of bytes up to the next ``\\n.`` and only looks closer at lines
that start with a dot. Searching is done with ``bytearray.find`` and consumed bytes
are dropped lazily, so no byte is scanned twice (the h11 approach).
"""

from __future__ import annotations

from .errors import RemoteProtocolError

__all__ = ["DEFAULT_MAX_LINE", "MAX_CAPA", "MAX_LISTING", "MAX_LISTING_ENTRIES", "ReceiveBuffer"]

#: The longest status or listing line accepted. RFC 2449 allows 512 octets for a
#: response line; real CAPA and greeting lines stay far below this.
DEFAULT_MAX_LINE = 16 * 1024

#: The largest LIST or UIDL listing accepted, in octets on the wire: a UIDL listing of a
#: million messages is 30-45 MB.
MAX_LISTING = 256 * 1024 * 1024

#: The most entries a LIST or UIDL listing may have. Each costs ~100 octets in memory
#: however short its line, so the octet limit alone would allow gigabytes.
MAX_LISTING_ENTRIES = 4_000_000

#: The largest CAPA reply, and the most a server may send before authentication (its
#: greeting, or any reply while unauthenticated): real ones are well under 1 KiB, and
#: anyone on the path can inject bytes before STLS.
MAX_CAPA = 64 * 1024

_LF = 0x0A
_CR = 0x0D
_DOT = 0x2E
# Compact the backing store once this much consumed data sits in front.
_COMPACT_AFTER = 256 * 1024


class ReceiveBuffer:
    """Bytes received and not yet consumed, with the body reader's line-start state."""

    __slots__ = ("_at_line_start", "_data", "_scanned", "_start", "max_line")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._data = bytearray()
        self._start = 0
        self._scanned = 0  # everything before this offset is known to hold no LF
        self._at_line_start = True
        self.max_line = max_line

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._data += data

    def _consume_to(self, offset: int) -> None:
        self._start = offset
        self._scanned = max(self._scanned, offset)
        if self._start >= _COMPACT_AFTER and self._start * 2 >= len(self._data):
            del self._data[: self._start]
            self._scanned -= self._start
            self._start = 0

    def take_line(self, limit: int | None = None) -> bytes | None:
        """Return the next line without its CRLF or LF, or None until one is complete.

        ``limit`` lowers ``max_line`` for this line (e.g. before authentication).
        """
        max_line = self.max_line if limit is None else min(limit, self.max_line)
        data = self._data
        newline = data.find(b"\n", max(self._start, self._scanned))
        if newline == -1:
            self._scanned = len(data)
            # One octet of slack: it may be the CR of a line exactly max_line long.
            if len(data) - self._start > max_line + 1:
                raise RemoteProtocolError(
                    f"server sent a line longer than {max_line} octets without a line end"
                )
            return None
        end = newline - 1 if newline > self._start and data[newline - 1] == _CR else newline
        if end - self._start > max_line:
            raise RemoteProtocolError(f"server sent a line longer than {max_line} octets")
        line = bytes(data[self._start : end])
        self._consume_to(newline + 1)
        return line

    def take_listing_block(self) -> tuple[bytes, bool] | None:
        """Return ``(whole lines, ended)`` of a dot-terminated listing, or None for more data.

        Called at a line start inside a CAPA, LIST or UIDL listing, as often as needed: the
        caller parses each block as it comes, so a listing never sits in memory twice. A
        block holds complete lines with their line ends, still dot-stuffed, and spans at most
        ``max_line + 2`` octets, so no line in it is over the limit; it stops before the
        terminating ``.`` line, and ``ended`` says that line was consumed too.
        """
        data = self._data
        start = self._start
        if data.startswith(b".\r\n", start) or data.startswith(b".\n", start):
            self._consume_to(start + (3 if data[start + 1] == _CR else 2))
            return b"", True
        window = self.max_line + 2  # a line of max_line octets and its CRLF
        last = data.rfind(b"\n", start, start + window)
        if last == -1:
            if len(data) - start >= window:
                raise RemoteProtocolError(
                    f"server sent a line longer than {self.max_line} octets without a line end"
                )
            return None
        if last + 1 - start == window and data[last - 1] != _CR:
            # A single line with a bare LF filled the window: max_line + 1 octets.
            raise RemoteProtocolError(f"server sent a line longer than {self.max_line} octets")
        hits = [data.find(b"\n.\r\n", start, last + 1), data.find(b"\n.\n", start, last + 1)]
        hit = min((h for h in hits if h >= 0), default=-1)
        if hit >= 0:
            block = bytes(data[start : hit + 1])
            self._consume_to(hit + (4 if data[hit + 2] == _CR else 3))
            return block, True
        block = bytes(data[start : last + 1])
        self._consume_to(last + 1)
        return block, False

    def start_body(self) -> None:
        """Begin a dot-terminated body: the next byte starts a line."""
        self._at_line_start = True

    def read_body(self) -> tuple[bytes, bool] | None:
        """Return ``(unstuffed bytes, ended)``, or None when more data is needed.

        The bytes may be empty (a stuffing dot was dropped and nothing followed yet).
        Line ends are passed through exactly as received: CRLF, bare LF, bare CR.
        """
        data = self._data
        pos = self._start
        end = len(data)
        if pos == end:
            return None
        if self._at_line_start and data[pos] == _DOT:
            if end - pos < 2:
                return None
            after = data[pos + 1]
            if after == _LF:
                self._consume_to(pos + 2)
                return b"", True
            if after == _CR:
                if end - pos < 3:
                    return None
                if data[pos + 2] == _LF:
                    self._consume_to(pos + 3)
                    return b"", True
            # RFC 1939: a line that starts with the termination octet had it prepended.
            pos += 1
            self._at_line_start = False
            if pos == end:
                self._consume_to(pos)
                return b"", False
        hit = data.find(b"\n.", pos)
        if hit == -1:
            chunk = bytes(data[pos:end])
            self._at_line_start = data[end - 1] == _LF
            self._consume_to(end)
        else:
            chunk = bytes(data[pos : hit + 1])
            self._at_line_start = True
            self._consume_to(hit + 1)
        return chunk, False
