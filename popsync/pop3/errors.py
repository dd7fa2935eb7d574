"""Errors of the POP3 core, split by who is at fault (after h11's ``_util.py``).

* :class:`LocalProtocolError`: the caller asked for something the protocol forbids
  (a CR in an argument, RETR before login). A bug or bad input on our side.
* :class:`RemoteProtocolError`: the server sent bytes that are not POP3. The session
  cannot be trusted any more and must be dropped.
* :class:`ServerError`: a well-formed ``-ERR``. The session goes on. Subclasses are
  picked by the RFC 2449/3206 response code so callers can act on them: back off on
  ``[IN-USE]``, wait on ``[LOGIN-DELAY]``, stop on ``[AUTH]``.
"""

from __future__ import annotations

import re

__all__ = [
    "AuthFailed",
    "LocalProtocolError",
    "LoginDelay",
    "MailboxInUse",
    "PermFailure",
    "Pop3Error",
    "RemoteProtocolError",
    "SaslAuthError",
    "ServerError",
    "TempFailure",
    "Utf8Required",
    "server_error",
]


class Pop3Error(Exception):
    """Root of every error the POP3 core raises."""


class LocalProtocolError(Pop3Error):
    """The caller misused the protocol; nothing was sent."""


class RemoteProtocolError(Pop3Error):
    """The server sent something that is not valid POP3; drop the connection."""


class SaslAuthError(RemoteProtocolError):
    """A SASL exchange failed the client's own checks; the server is not who it claims.

    The SCRAM server signature was missing or wrong, the server reported a SCRAM error, or
    it asked for too weak a key derivation. Like any remote protocol error the session is
    dropped, but it counts as an authentication failure (exit code 77), not a protocol one.
    """


class ServerError(Pop3Error):
    """A well-formed ``-ERR`` reply, with the RFC 2449 response code if there was one."""

    #: The response code this class stands for (``None`` for the generic class).
    response_code: str | None = None

    def __init__(self, command: bytes, text: str, code: str | None = None) -> None:
        self.command = command
        self.text = text
        self.code = code
        super().__init__(self._render())

    def _render(self) -> str:
        verb = self.command.decode("ascii", "replace") or "greeting"
        return f"{verb}: -ERR {self.text}".rstrip()

    @property
    def temporary(self) -> bool:
        """True when retrying later may succeed."""
        return False


class AuthFailed(ServerError):
    """``[AUTH]``: the credentials were refused (RFC 3206)."""

    response_code = "AUTH"


class MailboxInUse(ServerError):
    """``[IN-USE]``: another session holds the maildrop lock (RFC 2449)."""

    response_code = "IN-USE"

    @property
    def temporary(self) -> bool:
        return True


class LoginDelay(ServerError):
    """``[LOGIN-DELAY]``: logged in too recently; wait before the next attempt (RFC 2449)."""

    response_code = "LOGIN-DELAY"

    @property
    def temporary(self) -> bool:
        return True


class TempFailure(ServerError):
    """``[SYS/TEMP]``: a temporary server-side failure (RFC 3206)."""

    response_code = "SYS/TEMP"

    @property
    def temporary(self) -> bool:
        return True


class PermFailure(ServerError):
    """``[SYS/PERM]``: a permanent server-side failure; retrying will not help (RFC 3206)."""

    response_code = "SYS/PERM"


class Utf8Required(ServerError):
    """``[UTF8]``: the command needs the UTF8 mode of RFC 6856."""

    response_code = "UTF8"


_BY_CODE: dict[str, type[ServerError]] = {
    cls.response_code: cls
    for cls in (AuthFailed, MailboxInUse, LoginDelay, TempFailure, PermFailure, Utf8Required)
    if cls.response_code is not None
}

# RFC 2449 section 8: "[" resp-code "]" where codes are hierarchical, "/"-separated.
_CODE_RE = re.compile(r"^\[([A-Za-z0-9/_.-]+)\]\s*")


def server_error(command: bytes, text: str) -> ServerError:
    """Build the :class:`ServerError` subclass that matches the response code in *text*.

    Codes are hierarchical (RFC 2449 8.2), so ``SYS/TEMP/QUOTA`` is a :class:`TempFailure`;
    an unknown code gives a plain :class:`ServerError` that still carries it.
    """
    match = _CODE_RE.match(text)
    if match is None:
        return ServerError(command, text, None)
    code = match.group(1).upper()
    parts = code.split("/")
    for end in range(len(parts), 0, -1):
        cls = _BY_CODE.get("/".join(parts[:end]))
        if cls is not None:
            return cls(command, text, code)
    return ServerError(command, text, code)
