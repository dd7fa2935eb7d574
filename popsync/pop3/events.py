"""What the server says, as values.

:meth:`ClientConnection.next_event` returns these. Single-line replies become
:class:`Ok`; bodies of RETR and TOP are streamed as :class:`MessageStart`, any number of
:class:`MessageChunk` and one :class:`MessageEnd`, so a message of any size never sits in
memory; CAPA, LIST and UIDL are parsed line by line as they arrive into
:class:`Capabilities`, :class:`ScanListing` and :class:`UidlListing`. A ``-ERR`` is
raised (as a :class:`~popsync.pop3.errors.ServerError`) rather than returned.

Listings are stored compactly (:class:`ScanEntries`, :class:`UidlEntries`): message
numbers and sizes in machine-word arrays, not one tuple and two ints per message, so a
mailbox of a million messages costs tens of megabytes, not hundreds.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from .commands import Command

__all__ = [
    "Capabilities",
    "ConnectionClosed",
    "Continuation",
    "Event",
    "Greeting",
    "MessageChunk",
    "MessageEnd",
    "MessageStart",
    "Ok",
    "ScanEntries",
    "ScanListing",
    "UidlEntries",
    "UidlListing",
]


def _same_items(mine: Sequence[object], other: object) -> bool:
    """Equality with another listing of this kind or a plain tuple/list of the same pairs."""
    if not isinstance(other, tuple | list | type(mine)):
        return False
    return len(mine) == len(other) and all(a == b for a, b in zip(mine, other, strict=True))


class ScanEntries(Sequence[tuple[int, int]]):
    """LIST as ``(message number, size)`` pairs, kept in two ``array('q')`` columns."""

    __slots__ = ("numbers", "sizes")
    __hash__ = None  # type: ignore[assignment]  # mutable while the listing is parsed

    def __init__(self) -> None:
        self.numbers: array[int] = array("q")
        self.sizes: array[int] = array("q")

    def __len__(self) -> int:
        return len(self.numbers)

    @overload
    def __getitem__(self, index: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[int, int], ...]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, int] | tuple[tuple[int, int], ...]:
        if isinstance(index, slice):
            return tuple(zip(self.numbers[index], self.sizes[index], strict=True))
        return self.numbers[index], self.sizes[index]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.numbers, self.sizes, strict=True)

    def __eq__(self, other: object) -> bool:
        return _same_items(self, other)

    def __repr__(self) -> str:
        return f"ScanEntries({tuple(self[:5])!r}{'...' if len(self) > 5 else ''}, n={len(self)})"


class UidlEntries(Sequence[tuple[int, bytes]]):
    """UIDL as ``(message number, unique id)`` pairs: an ``array('q')`` and a list of ids."""

    __slots__ = ("numbers", "uids")
    __hash__ = None  # type: ignore[assignment]  # mutable while the listing is parsed

    def __init__(self) -> None:
        self.numbers: array[int] = array("q")
        self.uids: list[bytes] = []

    def __len__(self) -> int:
        return len(self.numbers)

    @overload
    def __getitem__(self, index: int) -> tuple[int, bytes]: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[int, bytes], ...]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, bytes] | tuple[tuple[int, bytes], ...]:
        if isinstance(index, slice):
            return tuple(zip(self.numbers[index], self.uids[index], strict=True))
        return self.numbers[index], self.uids[index]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return zip(self.numbers, self.uids, strict=True)

    def __eq__(self, other: object) -> bool:
        return _same_items(self, other)

    def __repr__(self) -> str:
        return f"UidlEntries({tuple(self[:5])!r}{'...' if len(self) > 5 else ''}, n={len(self)})"


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's ``+OK`` banner; ``timestamp`` is the APOP ``<...>`` part, if any."""

    text: str
    timestamp: bytes | None
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Ok:
    """A single-line ``+OK`` reply to ``command``; ``raw`` is the line without CRLF."""

    command: Command
    text: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Continuation:
    """A SASL server challenge (``+ base64``, RFC 5034); ``data`` is the base64 text."""

    command: Command
    data: bytes


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The CAPA list: upper-cased names mapped to their arguments (RFC 2449).

    ``lines`` are the raw lines, dot-unstuffed (the whole reply is capped at
    :data:`~popsync.pop3.buffer.MAX_CAPA` octets).
    """

    command: Command
    caps: dict[str, tuple[str, ...]]
    raw: bytes = field(repr=False)
    lines: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ScanListing:
    """A multi-line LIST: ``(message number, size in octets)`` pairs.

    ``lines`` holds the raw lines only for a connection made with ``keep_lines=True``
    (poplib compatibility); otherwise it is empty.
    """

    command: Command
    entries: ScanEntries
    raw: bytes = field(repr=False)
    lines: tuple[bytes, ...] = field(repr=False, default=())


@dataclass(frozen=True, slots=True)
class UidlListing:
    """A multi-line UIDL: ``(message number, unique id)`` pairs; ids are opaque bytes.

    ``lines`` as for :class:`ScanListing`.
    """

    command: Command
    entries: UidlEntries
    raw: bytes = field(repr=False)
    lines: tuple[bytes, ...] = field(repr=False, default=())


@dataclass(frozen=True, slots=True)
class MessageStart:
    """The ``+OK`` that opens the body of a RETR or TOP."""

    command: Command
    raw: bytes


@dataclass(frozen=True, slots=True)
class MessageChunk:
    """A piece of a message body, dot-unstuffed, line ends exactly as the server sent them."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The terminating ``.`` of a RETR or TOP body was received."""

    command: Command


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The server closed the connection with no reply outstanding."""


Event = (
    Greeting
    | Ok
    | Continuation
    | Capabilities
    | ScanListing
    | UidlListing
    | MessageStart
    | MessageChunk
    | MessageEnd
    | ConnectionClosed
)
