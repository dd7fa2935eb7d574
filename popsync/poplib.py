"""A drop-in replacement for the standard library's :mod:`poplib`.

``import popsync.poplib as poplib`` and the rest of a program stays the same. This is
a thin path of its own, not the sync engine's :class:`popsync.client.Pop3Client`: like
poplib it passes every command through and lets the server judge it, and it keeps
poplib's attributes and internals (``sock``, ``file``, ``welcome``, ``_debugging``,
``_shortcmd``, ``_longcmd``, ``_getresp``, ``_getlongresp``, ``_putcmd``,
``_putline``, ``_getline``, ``_create_socket``, the ``timestamp`` pattern) that
programs use for vendor commands and custom AUTH.

The deliberate differences, listed with their reasons in ``docs/library.md``: no
2048-octet line limit, certificates verified by default, CR/LF/NUL refused in a
command line, and passwords masked in debug output. Every ``-ERR`` is an
:class:`error_proto` with poplib's ``args`` (the reply line as bytes) that is also
typed by its response code (``AuthFailed``, ``MailboxInUse``, ...).
"""

from __future__ import annotations

import hashlib
import re
import sys
from io import BufferedReader
from types import TracebackType
from typing import Self

from . import net, pop3

__all__ = [
    "CR",
    "CRLF",
    "HAVE_SSL",
    "LF",
    "POP3",
    "POP3_PORT",
    "POP3_SSL",
    "POP3_SSL_PORT",
    "AuthFailed",
    "ConnectionLost",
    "LocalProtocolError",
    "LoginDelay",
    "MailboxInUse",
    "MessageTooLarge",
    "PermFailure",
    "RemoteProtocolError",
    "ServerError",
    "TempFailure",
    "Utf8Required",
    "error_proto",
]

POP3_PORT = 110
POP3_SSL_PORT = 995
CR = b"\r"
LF = b"\n"
CRLF = CR + LF
HAVE_SSL = True


# --------------------------------------------------------------------- errors
class error_proto(Exception):
    """Every POP3-level error of this module (as in :mod:`poplib`)."""


class LocalProtocolError(error_proto, pop3.LocalProtocolError):
    """A command line holds CR, LF or NUL (a command injection); nothing was sent."""


class RemoteProtocolError(error_proto, pop3.RemoteProtocolError):
    """A reply that is neither ``+...`` nor ``-ERR``; ``args[0]`` is the line, as in poplib."""


class ConnectionLost(error_proto):
    """The server closed the connection: poplib's ``error_proto('-ERR EOF')``."""


class MessageTooLarge(error_proto):
    """A reply exceeded :attr:`POP3.max_message_size`; the connection was closed."""


class ServerError(error_proto, pop3.ServerError):
    """A ``-ERR`` reply; ``args[0]`` is the reply line as bytes, as in poplib."""

    def __init__(
        self, command: bytes, text: str, code: str | None = None, line: bytes | None = None
    ) -> None:
        super().__init__(command, text, code)
        self.args = (line if line is not None else (b"-ERR " + text.encode()).rstrip(),)


class AuthFailed(ServerError, pop3.AuthFailed):
    """``[AUTH]``: credentials refused."""


class MailboxInUse(ServerError, pop3.MailboxInUse):
    """``[IN-USE]``: the maildrop is locked by another session."""


class LoginDelay(ServerError, pop3.LoginDelay):
    """``[LOGIN-DELAY]``: logged in too recently."""


class TempFailure(ServerError, pop3.TempFailure):
    """``[SYS/TEMP]``: temporary server failure."""


class PermFailure(ServerError, pop3.PermFailure):
    """``[SYS/PERM]``: permanent server failure."""


class Utf8Required(ServerError, pop3.Utf8Required):
    """``[UTF8]``: the command needs UTF-8 mode."""


_SERVER_ERRORS: dict[type[pop3.ServerError], type[ServerError]] = {
    pop3.AuthFailed: AuthFailed,
    pop3.MailboxInUse: MailboxInUse,
    pop3.LoginDelay: LoginDelay,
    pop3.TempFailure: TempFailure,
    pop3.PermFailure: PermFailure,
    pop3.Utf8Required: Utf8Required,
}


def _reply_error(verb: bytes, line: bytes) -> error_proto:
    """The error for a reply line that does not start with ``+``; args are poplib's."""
    if not line.startswith(b"-ERR"):
        return RemoteProtocolError(line)
    text = line[4:].strip().decode("utf-8", "replace")
    core = pop3.server_error(verb, text)
    cls = _SERVER_ERRORS.get(type(core), ServerError)
    return cls(verb, text, core.code, line)


# ------------------------------------------------------------------- helpers
# What debug output hides: PASS's argument, APOP's digest, AUTH's initial response.
_SECRET = re.compile(r"^((?:PASS|APOP \S+|AUTH \S+) ).+", re.IGNORECASE | re.DOTALL)
_SECRET_BYTES = re.compile(rb"^((?:PASS|APOP \S+|AUTH \S+) ).+", re.IGNORECASE | re.DOTALL)
_INJECTION = re.compile(rb"[\r\n\0]")


def _masked(line: str) -> str:
    return _SECRET.sub(r"\1***", line)


def _masked_bytes(line: bytes) -> bytes:
    return _SECRET_BYTES.sub(rb"\1***", line)


# ------------------------------------------------------------------- classes
# Aliases: inside the class, ``list`` names the LIST method.
_LongResp = tuple[bytes, list[bytes], int]
_Caps = dict[str, list[str]]


class POP3:
    """A POP3 session over plain TCP, with the :class:`poplib.POP3` interface.

    ``sock`` and ``file`` are None after :meth:`close` (as in poplib); using the
    session afterwards raises AttributeError, as poplib does.
    """

    encoding = "UTF-8"
    #: poplib's APOP timestamp pattern (some programs replace it); linear, even on a
    #: hostile greeting of many ``<``: ``[^<]*`` cannot overlap ``<``.
    timestamp = re.compile(rb"\+OK.[^<]*(<.*>)")
    #: Largest multi-line reply ``retr``/``top``/... accept, in octets (None: no limit).
    #: Replaces poplib's 2048-octet line limit, which broke on real mail.
    max_message_size: int | None = None

    def __init__(
        self, host: str, port: int = POP3_PORT, timeout: float | None = net.GLOBAL_DEFAULT_TIMEOUT
    ) -> None:
        self.host = host
        self.port = port
        self._tls_established = False
        self._verb = b""  # the last command's verb, for the typed errors
        sys.audit("poplib.connect", self, host, port)
        self.sock: net.Socket = self._create_socket(timeout)
        self.file: BufferedReader = self.sock.makefile("rb")
        self._debugging = 0
        self.welcome: bytes = self._getresp()

    def _create_socket(self, timeout: float | None) -> net.Socket:
        if timeout is not None and not timeout:
            raise ValueError("Non-blocking socket (timeout=0) is not supported")
        return net.open_socket(self.host, self.port, timeout)

    # -- internals, as in poplib ---------------------------------------------------
    def _putline(self, line: bytes) -> None:
        if _INJECTION.search(line):
            raise LocalProtocolError(f"CR, LF or NUL in command line {_masked_bytes(line)!r}")
        if self._debugging > 1:
            print("*put*", repr(_masked_bytes(line)))
        sys.audit("poplib.putline", self, line)
        self._verb = line.split(b" ", 1)[0].upper()
        self.sock.sendall(line + CRLF)

    def _putcmd(self, line: str) -> None:
        if self._debugging:
            print("*cmd*", repr(_masked(line)))
        self._putline(bytes(line, self.encoding))

    def _getline(self) -> tuple[bytes, int]:
        """One line without its end, and its length with the end; no length limit."""
        line = self.file.readline()
        if self._debugging > 1:
            print("*get*", repr(line))
        if not line:
            raise ConnectionLost("-ERR EOF")
        octets = len(line)
        # Same splitting as poplib, quirk included: a line that starts with CR and ends
        # in a bare LF loses its first octet.
        if line[-2:] == CRLF:
            return line[:-2], octets
        if line[:1] == CR:
            return line[1:-1], octets
        return line[:-1], octets

    def _getresp(self) -> bytes:
        resp, _octets = self._getline()
        if self._debugging > 1:
            print("*resp*", repr(resp))
        if not resp.startswith(b"+"):
            raise _reply_error(self._verb, resp)
        return resp

    def _getlongresp(self) -> _LongResp:
        resp = self._getresp()
        lines: list[bytes] = []
        octets = 0
        limit = self.max_message_size
        line, o = self._getline()
        while line != b".":
            if line.startswith(b".."):
                o -= 1
                line = line[1:]
            octets += o
            if limit is not None and octets > limit:
                self.close()  # the rest of the reply is still coming: the session is lost
                raise MessageTooLarge(f"reply larger than {limit} octets; connection closed")
            lines.append(line)
            line, o = self._getline()
        return resp, lines, octets

    def _shortcmd(self, line: str) -> bytes:
        self._putcmd(line)
        return self._getresp()

    def _longcmd(self, line: str) -> _LongResp:
        self._putcmd(line)
        return self._getlongresp()

    # -- poplib's public API --------------------------------------------------
    def getwelcome(self) -> bytes:
        """The server greeting line, as bytes."""
        return self.welcome

    def set_debuglevel(self, level: int) -> None:
        """1 prints commands, 2 also the raw lines; passwords are always masked."""
        self._debugging = level

    def user(self, user: str) -> bytes:
        """Send USER; return the reply line."""
        return self._shortcmd(f"USER {user}")

    def pass_(self, pswd: str) -> bytes:
        """Send PASS; return the reply line (the mailbox is locked until quit())."""
        return self._shortcmd(f"PASS {pswd}")

    def stat(self) -> tuple[int, int]:
        """Return ``(message count, mailbox size)``."""
        rets = self._shortcmd("STAT").split()
        if self._debugging:
            print("*stat*", repr(rets))
        return int(rets[1]), int(rets[2])

    def list(self, which: object = None) -> bytes | _LongResp:
        """LIST: the scan line of one message, or ``(resp, ['num octets', ...], octets)``."""
        if which is not None:
            return self._shortcmd(f"LIST {which}")
        return self._longcmd("LIST")

    def retr(self, which: object) -> _LongResp:
        """Return ``(resp, lines, octets)`` of a whole message."""
        return self._longcmd(f"RETR {which}")

    def dele(self, which: object) -> bytes:
        """Mark a message deleted; return the reply line."""
        return self._shortcmd(f"DELE {which}")

    def noop(self) -> bytes:
        """NOOP; return the reply line."""
        return self._shortcmd("NOOP")

    def rset(self) -> bytes:
        """Unmark messages marked deleted."""
        return self._shortcmd("RSET")

    def quit(self) -> bytes:
        """QUIT (commits deletions) and close; return the reply line."""
        resp = self._shortcmd("QUIT")
        self.close()
        return resp

    def close(self) -> None:
        """Close the connection without QUIT; ``sock`` and ``file`` become None."""
        try:
            file = self.file
            self.file = None  # type: ignore[assignment]  # poplib's contract: None once closed
            if file is not None:
                file.close()
        finally:
            sock = self.sock
            self.sock = None  # type: ignore[assignment]
            if sock is not None:
                net.close_socket(sock)

    def rpop(self, user: str) -> bytes:
        """Send RPOP (RFC 1081); return the reply line."""
        return self._shortcmd(f"RPOP {user}")

    def apop(self, user: str, password: str) -> bytes:
        """Log in with APOP; needs a ``<timestamp>`` in the greeting."""
        secret = bytes(password, self.encoding)
        match = self.timestamp.match(self.welcome)
        if not match:
            raise error_proto("-ERR APOP not supported by server")
        digest = hashlib.md5(match.group(1) + secret).hexdigest()  # noqa: S324 - RFC 1939
        return self._shortcmd(f"APOP {user} {digest}")

    def top(self, which: object, howmuch: object) -> _LongResp:
        """Return ``(resp, lines, octets)`` of the header and ``howmuch`` body lines."""
        return self._longcmd(f"TOP {which} {howmuch}")

    def uidl(self, which: object = None) -> bytes | _LongResp:
        """UIDL: ``resp`` for one message, or ``(resp, ['num uid', ...], octets)``."""
        if which is not None:
            return self._shortcmd(f"UIDL {which}")
        return self._longcmd("UIDL")

    def utf8(self) -> bytes:
        """Enter UTF-8 mode (RFC 6856); return the reply line."""
        return self._shortcmd("UTF8")

    def capa(self) -> _Caps:
        """Return the capabilities as ``{name: [args]}``."""
        caps: _Caps = {}
        try:
            for line in self._longcmd("CAPA")[1]:
                words = line.decode("ascii").split()
                caps[words[0]] = words[1:]
        except error_proto:
            raise error_proto("-ERR CAPA not supported by server") from None
        return caps

    def stls(self, context: net.SSLContext | None = None) -> bytes:
        """Upgrade to TLS (RFC 2595); the default context verifies the certificate."""
        if self._tls_established:
            raise error_proto("-ERR TLS session already established")
        if "STLS" not in self.capa():
            raise error_proto("-ERR STLS not supported by server")
        if context is None:
            context = net.default_context()
        resp = self._shortcmd("STLS")
        # Like poplib, a new file: clear-text bytes that came with the +OK stay in the
        # old buffer and are dropped, never read as part of the TLS session.
        self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
        self.file = self.sock.makefile("rb")
        self._tls_established = True
        return resp

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class POP3_SSL(POP3):
    """POP3 over implicit TLS; ``context`` defaults to a verifying one (poplib's does not)."""

    def __init__(
        self,
        host: str,
        port: int = POP3_SSL_PORT,
        *,
        timeout: float | None = net.GLOBAL_DEFAULT_TIMEOUT,
        context: net.SSLContext | None = None,
    ) -> None:
        self.context = context if context is not None else net.default_context()
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None) -> net.Socket:
        sock = super()._create_socket(timeout)
        return self.context.wrap_socket(sock, server_hostname=self.host)

    def stls(self, context: net.SSLContext | None = None) -> bytes:
        """Always fails: the session is already encrypted."""
        raise error_proto("-ERR TLS session already established")
