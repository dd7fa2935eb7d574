"""A drop-in replacement for the standard library's :mod:`poplib`.

``import popsync.poplib as poplib`` and the rest of a program stays the same: the
classes, methods, arguments and return values are poplib's (Python 3.11-3.13). Under
the hood it is :class:`popsync.client.Pop3Client`, so messages are read in large
chunks instead of line by line. Deliberate differences (each a poplib bug or risk) are
listed in ``docs/library.md``: no 2048-byte line limit, certificates verified by
default, a default timeout, ``capa()`` survives non-ASCII, CR/LF/NUL in arguments
refused, STARTTLS injection detected, passwords masked in debug output.

Every POP3 error raised here is an :class:`error_proto`; the typed ones also subclass
the matching :mod:`popsync.pop3` class (``except poplib.error_proto`` and ``except
popsync.pop3.AuthFailed`` both work). Network and TLS failures are raised as
:class:`OSError` / :class:`ssl.SSLError` subclasses, as the standard module does.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from . import client as _client
from . import errors as _errors
from . import net, pop3
from .pop3 import Capabilities, Command, MessageStart, ScanListing, UidlListing, commands

__all__ = [
    "CR",
    "CRLF",
    "DEFAULT_TIMEOUT",
    "HAVE_SSL",
    "LF",
    "POP3",
    "POP3_PORT",
    "POP3_SSL",
    "POP3_SSL_PORT",
    "AuthFailed",
    "CertificateError",
    "ConnectionLost",
    "LocalProtocolError",
    "LoginDelay",
    "MailboxInUse",
    "MessageTooLarge",
    "NetworkError",
    "NetworkTimeout",
    "PermFailure",
    "RemoteProtocolError",
    "ServerError",
    "TempFailure",
    "TlsError",
    "Utf8Required",
    "error_proto",
]

POP3_PORT = 110
POP3_SSL_PORT = 995
CR = b"\r"
LF = b"\n"
CRLF = CR + LF
HAVE_SSL = True

#: Unlike poplib (which waits forever), every connection has a timeout by default.
DEFAULT_TIMEOUT = _client.DEFAULT_TIMEOUT


# --------------------------------------------------------------------- errors
class error_proto(Exception):
    """Every POP3-level error of this module (as in :mod:`poplib`)."""


class LocalProtocolError(error_proto, pop3.LocalProtocolError):
    """Bad argument or a command the session state forbids; nothing was sent."""


class RemoteProtocolError(error_proto, pop3.RemoteProtocolError):
    """The server sent something that is not POP3; the connection is closed."""


class MessageTooLarge(error_proto, _client.MessageTooLarge):
    """A message exceeded :attr:`POP3.max_message_size`; the connection is closed."""


class ServerError(error_proto, pop3.ServerError):
    """A ``-ERR`` reply; ``args[0]`` is the reply line as bytes, as in poplib."""

    def __init__(self, command: bytes, text: str, code: str | None = None) -> None:
        super().__init__(command, text, code)
        self.args = ((b"-ERR " + text.encode("utf-8", "replace")).rstrip(),)


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


class NetworkError(_errors.NetworkError, OSError):
    """Connecting or talking to the server failed (an :class:`OSError`, as in poplib)."""


class NetworkTimeout(NetworkError, net.NetworkTimeout, TimeoutError):
    """The server did not answer in time (a :class:`TimeoutError`, as in poplib)."""


class ConnectionLost(NetworkError, _client.ConnectionLost, error_proto):
    """The server hung up mid-reply (poplib raises ``error_proto('-ERR EOF')`` here)."""


class TlsError(_errors.TlsError, net.SSLError):
    """The TLS handshake or session failed (an :class:`ssl.SSLError`)."""

    def __str__(self) -> str:
        # ssl.SSLError renders its args tuple when no strerror is set.
        return str(self.args[0]) if self.args else ""


class CertificateError(_errors.CertificateError, TlsError, net.SSLCertVerificationError):
    """The server certificate failed verification (an :class:`ssl.SSLCertVerificationError`)."""


_SERVER_ERRORS: dict[type[pop3.ServerError], type[ServerError]] = {
    pop3.AuthFailed: AuthFailed,
    pop3.MailboxInUse: MailboxInUse,
    pop3.LoginDelay: LoginDelay,
    pop3.TempFailure: TempFailure,
    pop3.PermFailure: PermFailure,
    pop3.Utf8Required: Utf8Required,
}

# Most specific first: the first isinstance match wins.
_OTHER_ERRORS: tuple[tuple[type[BaseException], type[BaseException]], ...] = (
    (_client.MessageTooLarge, MessageTooLarge),
    (pop3.LocalProtocolError, LocalProtocolError),
    (pop3.RemoteProtocolError, RemoteProtocolError),
    (_client.ConnectionLost, ConnectionLost),
    (net.NetworkTimeout, NetworkTimeout),
    (_errors.NetworkError, NetworkError),
    (_errors.CertificateError, CertificateError),
    (_errors.TlsError, TlsError),
)


def _translate(exc: BaseException) -> BaseException | None:
    """The compatible exception for ``exc``, or None if it needs no translation."""
    if isinstance(exc, error_proto | OSError):
        return None
    if isinstance(exc, pop3.ServerError):
        cls = _SERVER_ERRORS.get(type(exc), ServerError)
        return cls(exc.command, exc.text, exc.code)
    for core, compat in _OTHER_ERRORS:
        if isinstance(exc, core):
            return compat(str(exc))
    return None


@contextlib.contextmanager
def _compatible_errors() -> Iterator[None]:
    """The one place where popsync errors become poplib-compatible ones."""
    try:
        yield
    except (pop3.Pop3Error, _errors.PopsyncError) as exc:
        new = _translate(exc)
        if new is None:
            raise
        raise new from exc


# ------------------------------------------------------------------- helpers
_MASKED_VERBS = frozenset({b"PASS", b"APOP", b"RPOP", b"AUTH"})


def _shown(command: Command) -> str:
    """The command line for debug output, with secrets masked (poplib prints them)."""
    verb = command.verb.decode("ascii", "replace")
    if command.verb in _MASKED_VERBS and command.args:
        keep = command.args[:1] if command.verb == b"APOP" else ()
        return " ".join([verb, *(a.decode("utf-8", "replace") for a in keep), "***"])
    return " ".join([verb, *(a.decode("utf-8", "replace") for a in command.args)])


def _number(value: int | str, what: str = "message number") -> int:
    """poplib accepts ``retr(1)`` and ``retr("1")`` alike."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise LocalProtocolError(f"bad {what}: {value!r}")


def _split_lines(body: bytes) -> list[bytes]:
    """Split a body into lines without their CRLF or LF, as poplib returns them."""
    if body.count(b"\n") == body.count(b"\r\n"):
        lines = body.split(b"\r\n")
    else:
        lines = [line.removesuffix(b"\r") for line in body.split(b"\n")]
    if lines and not lines[-1]:
        lines.pop()
    return lines


# ------------------------------------------------------------------- classes
# Aliases: inside the class, ``list`` names the LIST method.
_LongResp = tuple[bytes, list[bytes], int]
_Caps = dict[str, list[str]]


class POP3:
    """A POP3 session over plain TCP, with the :class:`poplib.POP3` interface."""

    encoding = "UTF-8"
    #: Largest message ``retr``/``top`` accept, in octets (None: no limit). Replaces
    #: poplib's 2048-octet line limit, which broke on real mail.
    max_message_size: int | None = None

    def __init__(
        self, host: str, port: int = POP3_PORT, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        if timeout is not None and not timeout:
            raise ValueError("Non-blocking socket (timeout=0) is not supported")
        self.host = host
        self.port = port
        self._debugging = 0
        self._tls_established = False
        with _compatible_errors():
            stream = net.connect(host, port, timeout=timeout, context=self._implicit_context())
            self._client = _client.Pop3Client(stream)
        self.welcome: bytes = self._client.welcome.raw

    def _implicit_context(self) -> net.SSLContext | None:
        return None

    # -- internals ----------------------------------------------------------
    def _putcmd(self, command: Command) -> None:
        if self._debugging:
            print("*cmd*", repr(_shown(command)))

    def _shortcmd(self, command: Command) -> bytes:
        self._putcmd(command)
        with _compatible_errors():
            resp = self._client.simple(command).raw
        if self._debugging > 1:
            print("*resp*", repr(resp))
        return resp

    def _longcmd(self, command: Command) -> _LongResp:
        self._putcmd(command)
        with _compatible_errors():
            event = self._client.request(command)
            if isinstance(event, MessageStart):
                body = io.BytesIO()
                octets = self._client.read_body_into(body, self.max_message_size)
                resp, lines = event.raw, _split_lines(body.getvalue())
            elif isinstance(event, Capabilities | ScanListing | UidlListing):
                resp, lines = event.raw, list(event.lines)
                # poplib counts each line with its CRLF, after dot-unstuffing.
                octets = sum(len(line) + 2 for line in lines)
            else:
                raise pop3.RemoteProtocolError(f"unexpected reply {event!r}")
        if self._debugging > 1:
            print("*resp*", repr(resp))
        return resp, lines, octets

    # -- poplib's public API --------------------------------------------------
    def getwelcome(self) -> bytes:
        """The server greeting line, as bytes."""
        return self.welcome

    def set_debuglevel(self, level: int) -> None:
        """1 prints commands, 2 also replies; passwords are always masked."""
        self._debugging = level

    def user(self, user: str) -> bytes:
        """Send USER; return the reply line."""
        return self._shortcmd(commands.user(user))

    def pass_(self, pswd: str) -> bytes:
        """Send PASS; return the reply line (the mailbox is locked until quit())."""
        return self._shortcmd(commands.pass_(pswd))

    def stat(self) -> tuple[int, int]:
        """Return ``(message count, mailbox size)``."""
        rets = self._shortcmd(commands.stat()).split()
        if self._debugging:
            print("*stat*", repr(rets))
        try:
            return int(rets[1]), int(rets[2])
        except (IndexError, ValueError):
            raise RemoteProtocolError(f"bad STAT reply: {rets!r}") from None

    def list(self, which: int | str | None = None) -> bytes | _LongResp:
        """LIST: the scan line of one message, or ``(resp, ['num octets', ...], octets)``."""
        if which is not None:
            return self._shortcmd(commands.list_(_number(which)))
        return self._longcmd(commands.list_())

    def retr(self, which: int | str) -> _LongResp:
        """Return ``(resp, lines, octets)`` of a whole message."""
        return self._longcmd(commands.retr(_number(which)))

    def dele(self, which: int | str) -> bytes:
        """Mark a message deleted; return the reply line."""
        return self._shortcmd(commands.dele(_number(which)))

    def noop(self) -> bytes:
        """NOOP; return the reply line."""
        return self._shortcmd(commands.noop())

    def rset(self) -> bytes:
        """Unmark messages marked deleted."""
        return self._shortcmd(commands.rset())

    def quit(self) -> bytes:
        """QUIT (commits deletions) and close; return the reply line."""
        try:
            return self._shortcmd(commands.quit())
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection without QUIT."""
        self._client.close()

    def rpop(self, user: str) -> bytes:
        """Send RPOP (RFC 1081); return the reply line."""
        return self._shortcmd(commands.rpop(user))

    def apop(self, user: str, password: str) -> bytes:
        """Log in with APOP; needs a timestamp in the greeting."""
        stamp = self._client.welcome.timestamp
        if stamp is None:
            raise error_proto("-ERR APOP not supported by server")
        return self._shortcmd(commands.apop(user, pop3.sasl.apop_digest(stamp, password)))

    def top(self, which: int | str, howmuch: int | str) -> _LongResp:
        """Return ``(resp, lines, octets)`` of the header and ``howmuch`` body lines."""
        return self._longcmd(commands.top(_number(which), _number(howmuch, "line count")))

    def uidl(self, which: int | str | None = None) -> bytes | _LongResp:
        """UIDL: ``resp`` for one message, or ``(resp, ['num uid', ...], octets)``."""
        if which is not None:
            return self._shortcmd(commands.uidl(_number(which)))
        return self._longcmd(commands.uidl())

    def utf8(self) -> bytes:
        """Enter UTF-8 mode (RFC 6856); return the reply line."""
        return self._shortcmd(commands.utf8())

    def capa(self) -> _Caps:
        """Return the capabilities as ``{name: [args]}``; non-ASCII is decoded, not fatal."""
        try:
            _resp, lines, _octets = self._longcmd(commands.capa())
        except ServerError:
            raise error_proto("-ERR CAPA not supported by server") from None
        caps: _Caps = {}
        for line in lines:
            words = line.decode("utf-8", "replace").split()
            if words:
                caps[words[0]] = words[1:]
        return caps

    def stls(self, context: net.SSLContext | None = None) -> bytes:
        """Upgrade to TLS (RFC 2595); the default context verifies the certificate."""
        if self._tls_established:
            raise error_proto("-ERR TLS session already established")
        if "STLS" not in self.capa():
            raise error_proto("-ERR STLS not supported by server")
        self._putcmd(commands.stls())
        with _compatible_errors():
            self._client.stls(context or net.default_context(), self.host)
            assert self._client.last_ok is not None
            resp = self._client.last_ok.raw
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
        timeout: float | None = DEFAULT_TIMEOUT,
        context: net.SSLContext | None = None,
    ) -> None:
        self.context = context if context is not None else net.default_context()
        super().__init__(host, port, timeout)
        self._tls_established = True

    def _implicit_context(self) -> net.SSLContext | None:
        return self.context

    def stls(self, context: net.SSLContext | None = None) -> bytes:
        """Always fails: the session is already encrypted."""
        raise error_proto("-ERR TLS session already established")
