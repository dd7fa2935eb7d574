"""popsync.pop3: a sans-I/O POP3 client core (RFC 1939, 2449, 3206, 5034, 6856).

Standard library only, no sockets, no clock, no logging: bytes in, events out.
"""

from . import commands, sasl
from .buffer import DEFAULT_MAX_LINE
from .commands import Command
from .connection import NEED_DATA, ClientConnection, NeedData, parse_scan_line, parse_uidl_line
from .errors import (
    AuthFailed,
    LocalProtocolError,
    LoginDelay,
    MailboxInUse,
    PermFailure,
    Pop3Error,
    RemoteProtocolError,
    SaslAuthError,
    ServerError,
    TempFailure,
    Utf8Required,
    server_error,
)
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
from .state import State

__all__ = [
    "DEFAULT_MAX_LINE",
    "NEED_DATA",
    "AuthFailed",
    "Capabilities",
    "ClientConnection",
    "Command",
    "ConnectionClosed",
    "Continuation",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "LoginDelay",
    "MailboxInUse",
    "MessageChunk",
    "MessageEnd",
    "MessageStart",
    "NeedData",
    "Ok",
    "PermFailure",
    "Pop3Error",
    "RemoteProtocolError",
    "SaslAuthError",
    "ScanEntries",
    "ScanListing",
    "ServerError",
    "State",
    "TempFailure",
    "UidlEntries",
    "UidlListing",
    "Utf8Required",
    "commands",
    "parse_scan_line",
    "parse_uidl_line",
    "sasl",
    "server_error",
]
