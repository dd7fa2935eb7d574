"""What the server says, as values.

:meth:`ClientConnection.next_event` returns these. Single-line replies become
:class:`Ok`; bodies of RETR and TOP are streamed as :class:`MessageStart`, any number of
:class:`MessageChunk` and one :class:`MessageEnd`, so a message of any size never sits in
memory; the short bodies of CAPA, LIST and UIDL are collected and parsed into
:class:`Capabilities`, :class:`ScanListing` and :class:`UidlListing`. A ``-ERR`` is
raised (as a :class:`~popsync.pop3.errors.ServerError`) rather than returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    "ScanListing",
    "UidlListing",
]


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
    """The CAPA list: upper-cased names mapped to their arguments (RFC 2449)."""

    command: Command
    caps: dict[str, tuple[str, ...]]
    raw: bytes = field(repr=False)
    lines: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ScanListing:
    """A multi-line LIST: ``(message number, size in octets)`` pairs."""

    command: Command
    entries: tuple[tuple[int, int], ...]
    raw: bytes = field(repr=False)
    lines: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class UidlListing:
    """A multi-line UIDL: ``(message number, unique id)`` pairs; ids are opaque bytes."""

    command: Command
    entries: tuple[tuple[int, bytes], ...]
    raw: bytes = field(repr=False)
    lines: tuple[bytes, ...] = field(repr=False)


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
