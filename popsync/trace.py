"""Trace header fields a delivery may prepend (``add_headers``), in RFC 5322 form.

Opt-in and empty by default, so a delivery stays byte-exact. The fields are built before
the message's first octet arrives and written ahead of it into the same sink, so nothing
of the message is ever buffered for them. They end in CRLF like the wire; a Maildir with
``line_endings = "lf"`` converts them with the rest of the message.

Fields, always in this order whatever the order in the config::

    Delivered-To: <lmtp_recipient or the POP3 user>
    Received: from <POP3 host>
            by <local host> (popsync) with POP3 (UIDL <uidl>)
            for <user>; <RFC 5322 date>
    X-Popsync-UIDL: <uidl>

Everything that comes from outside (the user name, the UIDL) is made safe for a header:
a UIDL of printable ASCII (RFC 1939's 0x21-0x7E) is used as it is (escaped inside the
Received comment), anything else as ``hex:`` and its hex digits; control characters in a
user name are dropped. A UIDL longer than `MAX_UIDL` octets is cut (the field says so),
so no line exceeds RFC 5322's 998 octets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection

__all__ = ["MAX_UIDL", "TraceHeaders"]

#: Longest UIDL (in octets of the shown form) written into a field.
MAX_UIDL = 400

_ATEXT = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _show_uidl(uidl: bytes) -> bytes:
    shown = uidl if all(0x21 <= b <= 0x7E for b in uidl) else b"hex:" + uidl.hex().encode()
    if len(shown) > MAX_UIDL:
        shown = shown[:MAX_UIDL] + b"...(cut)"
    return shown


def _comment(text: bytes) -> bytes:
    """Escape ``(``, ``)`` and ``\\`` as quoted-pairs so the text stays one comment."""
    return re.sub(rb"([()\\])", rb"\\\1", text)


def _word(text: str) -> bytes:
    """An atom when possible, else a quoted-string; controls dropped, UTF-8 allowed (RFC 6532)."""
    raw = _CONTROLS.sub("", text).encode("utf-8", "replace") or b'""'
    if _ATEXT.fullmatch(raw):
        return raw
    return b'"' + re.sub(rb'(["\\])', rb"\\\1", raw) + b'"'


def _domain(host: str) -> bytes:
    """A host as a Received domain: an IP address becomes a domain literal."""
    import ipaddress  # here, like email.utils below: most runs write no trace field

    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return _word(host)
    prefix = "IPv6:" if address.version == 6 else ""
    return f"[{prefix}{address}]".encode()


class TraceHeaders:
    """The prefix for each message of one account's run; empty when no field is enabled."""

    def __init__(
        self,
        kinds: Collection[str],
        *,
        pop3_host: str,
        user: str,
        recipient: str | None = None,
        local_host: str | None = None,
    ) -> None:
        self.kinds = frozenset(kinds)
        if not self.kinds:
            return
        self._delivered_to = b"Delivered-To: " + _word(recipient or user) + b"\r\n"
        local = local_host if local_host is not None else os.uname().nodename
        self._from = b"Received: from " + _domain(pop3_host) + b"\r\n\tby " + _domain(local)
        self._for = b"\r\n\tfor " + _word(user) + b";\r\n\t"

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def prefix(self, uidl: bytes, now: float) -> bytes:
        """The header fields for one message, each ending in CRLF."""
        if not self.kinds:
            return b""
        shown = _show_uidl(uidl)
        out = bytearray()
        if "delivered-to" in self.kinds:
            out += self._delivered_to
        if "received" in self.kinds:
            import email.utils
            from datetime import datetime

            date = email.utils.format_datetime(datetime.fromtimestamp(now).astimezone())
            out += self._from + b" (popsync) with POP3 (UIDL " + _comment(shown) + b")"
            out += self._for + date.encode("ascii") + b"\r\n"
        if "x-popsync-uidl" in self.kinds:
            out += b"X-Popsync-UIDL: " + shown + b"\r\n"
        return bytes(out)
