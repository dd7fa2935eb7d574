"""POP3 commands as values, and their encoding to the wire.

Every command is a frozen :class:`Command`; the constructors below are the only way
the rest of popsync builds one. :meth:`Command.encode` is the injection guard: an
argument with CR, LF or NUL, or a line over the 255 octets RFC 2449 allows, is refused
before a byte is sent (aiosmtplib does the same for SMTP).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LocalProtocolError

__all__ = [
    "MAX_COMMAND_LINE",
    "MULTILINE_VERBS",
    "Command",
    "apop",
    "auth",
    "capa",
    "dele",
    "list_",
    "noop",
    "pass_",
    "quit",
    "retr",
    "rpop",
    "rset",
    "stat",
    "stls",
    "top",
    "uidl",
    "user",
    "utf8",
]

#: RFC 2449 section 4: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255

#: Commands whose success reply is followed by a dot-terminated body, when called
#: without a message number (LIST and UIDL) or always (CAPA, RETR, TOP).
MULTILINE_VERBS = frozenset({b"CAPA", b"RETR", b"TOP"})

_FORBIDDEN = (b"\r", b"\n", b"\0")


@dataclass(frozen=True, slots=True)
class Command:
    """One POP3 command: a verb, its arguments, and whether a multi-line body follows."""

    verb: bytes
    args: tuple[bytes, ...] = ()
    multiline: bool = False

    def encode(self) -> bytes:
        """Return the command line with CRLF, refusing anything that could inject a command."""
        for part in (self.verb, *self.args):
            if any(bad in part for bad in _FORBIDDEN):
                raise LocalProtocolError(
                    f"{self.verb.decode('ascii', 'replace')}: argument contains CR, LF or NUL"
                )
        line = b" ".join((self.verb, *self.args)) + b"\r\n"
        if len(line) > MAX_COMMAND_LINE:
            raise LocalProtocolError(
                f"{self.verb.decode('ascii', 'replace')}: command line is {len(line)} octets, "
                f"over the {MAX_COMMAND_LINE} that RFC 2449 allows"
            )
        return line

    def __repr__(self) -> str:
        # Arguments of credential commands are never shown, even in a traceback.
        shown = self.args if self.verb not in _SECRET_VERBS else ("***",) * len(self.args)
        return f"Command({self.verb.decode('ascii', 'replace')} {' '.join(map(str, shown))})"


_SECRET_VERBS = frozenset({b"PASS", b"APOP", b"RPOP", b"AUTH"})


def _text(value: str | bytes, encoding: str = "utf-8") -> bytes:
    return value if isinstance(value, bytes) else value.encode(encoding)


def _msgnum(which: int) -> bytes:
    if isinstance(which, bool) or not isinstance(which, int) or which < 1:
        raise LocalProtocolError(f"message numbers start at 1, got {which!r}")
    return str(which).encode("ascii")


def user(name: str | bytes) -> Command:
    return Command(b"USER", (_text(name),))


def pass_(secret: str | bytes) -> Command:
    # PASS takes the rest of the line, spaces included (RFC 1939).
    return Command(b"PASS", (_text(secret),))


def apop(name: str | bytes, digest: str | bytes) -> Command:
    return Command(b"APOP", (_text(name), _text(digest)))


def rpop(name: str | bytes) -> Command:
    return Command(b"RPOP", (_text(name),))


def auth(mechanism: str, initial: bytes | None = None) -> Command:
    """AUTH with an optional initial response, already base64-encoded (RFC 5034)."""
    if not mechanism.isascii():
        raise LocalProtocolError(f"SASL mechanism names are ASCII, got {mechanism!r}")
    name = mechanism.upper().encode("ascii")
    if initial is None:
        return Command(b"AUTH", (name,))
    # RFC 5034 section 4: an empty initial response is sent as a single "=".
    return Command(b"AUTH", (name, initial or b"="))


def stat() -> Command:
    return Command(b"STAT")


def list_(which: int | None = None) -> Command:
    if which is None:
        return Command(b"LIST", (), multiline=True)
    return Command(b"LIST", (_msgnum(which),))


def uidl(which: int | None = None) -> Command:
    if which is None:
        return Command(b"UIDL", (), multiline=True)
    return Command(b"UIDL", (_msgnum(which),))


def retr(which: int) -> Command:
    return Command(b"RETR", (_msgnum(which),), multiline=True)


def top(which: int, howmax: int) -> Command:
    if isinstance(howmax, bool) or not isinstance(howmax, int) or howmax < 0:
        raise LocalProtocolError(f"TOP needs a line count >= 0, got {howmax!r}")
    return Command(b"TOP", (_msgnum(which), str(howmax).encode("ascii")), multiline=True)


def dele(which: int) -> Command:
    return Command(b"DELE", (_msgnum(which),))


def rset() -> Command:
    return Command(b"RSET")


def noop() -> Command:
    return Command(b"NOOP")


def quit() -> Command:
    return Command(b"QUIT")


def capa() -> Command:
    return Command(b"CAPA", (), multiline=True)


def stls() -> Command:
    return Command(b"STLS")


def utf8() -> Command:
    return Command(b"UTF8")
