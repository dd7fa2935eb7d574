"""A corpus of awkward but real messages, as generator functions (issue 2).

Each function returns the message as it is stored (CRLF line ends unless the point is
otherwise). :func:`served` says what a POP3 server hands out for it: Dovecot turns a
bare LF into CRLF and ends a message that lacks a final line end with CRLF, so the
bytes popsync must deliver byte-exact are ``served(stored)``. The Dovecot round-trip
test checks this definition against the bytes Dovecot really sends on a raw socket.
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Callable

__all__ = ["CORPUS", "long_line", "served", "stuff"]

_HEAD = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
)


def _msg(subject: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return _HEAD + extra + b"Subject: " + subject + b"\r\n\r\n" + body


def long_line(length: int, seed: int = 0) -> bytes:
    """A printable line of exactly ``length`` octets without its CRLF."""
    rng = random.Random(seed)
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789 .,;:-_=+"
    return bytes(rng.choice(alphabet) for _ in range(length))


def line_2100() -> bytes:
    """Just over poplib's 2048-octet line limit."""
    return _msg(b"line of 2100", b"before\r\n" + long_line(2100, 1) + b"\r\nafter\r\n")


def line_12000() -> bytes:
    return _msg(b"line of 12000", long_line(12000, 2) + b"\r\n")


def line_70000() -> bytes:
    """Longer than any 64 KiB read buffer."""
    return _msg(b"line of 70000", b"x\r\n" + long_line(70000, 3) + b"\r\ny\r\n")


def header_3000() -> bytes:
    """One unfolded header line of 3000 octets."""
    value = long_line(3000 - len(b"X-Long: "), 4)
    return _msg(b"long header", b"body\r\n", extra=b"X-Long: " + value + b"\r\n")


def dot_lines() -> bytes:
    """Lines that start with a dot, including a lone dot and a dot-CR-LF lookalike."""
    body = b".\r\n..\r\n.hidden\r\n...three\r\n. space\r\nend.\r\n.\r\n"
    return _msg(b"dots", body)


def bare_cr() -> bytes:
    """A CR that does not end a line."""
    return _msg(b"bare CR", b"carriage\rreturn inside\r\nand \r at the end\r\n")


def raw_8bit_header() -> bytes:
    """Latin-1 octets in a header, not MIME-encoded (RFC 5322 forbids it; it happens)."""
    return _msg(b"caf\xe9 cr\xe8me \xa3", b"8-bit body: na\xefve\r\n")


def utf8_header() -> bytes:
    """Raw UTF-8 in headers (RFC 6532)."""
    subject = "Grüße aus München, 日本語".encode()
    return _msg(subject, "Körper\r\n".encode(), extra="X-Name: Zoë\r\n".encode())


def empty_body() -> bytes:
    """Headers, the blank separator line, and nothing else."""
    return _msg(b"empty body", b"")


def no_body() -> bytes:
    """Headers only, without even the blank separator line."""
    return _HEAD + b"Subject: no body\r\n"


def no_final_newline() -> bytes:
    """The last line has no line end."""
    return _msg(b"no final newline", b"first\r\nlast line without end")


def lf_only() -> bytes:
    """Bare LF line ends throughout (common in Maildirs written by Unix tools)."""
    return _msg(b"bare LF", b"one\r\ntwo\r\n").replace(b"\r\n", b"\n")


def base64_attachment() -> bytes:
    """A MIME message with a 60 KiB binary attachment in base64."""
    data = random.Random(5).randbytes(60 * 1024)
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    body = (
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b"--XYZ\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="blob.bin"\r\n\r\n' + encoded + b"--XYZ--\r\n"
    )
    extra = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XYZ"\r\n'
    return _msg(b"attachment", body, extra=extra)


CORPUS: dict[str, Callable[[], bytes]] = {
    f.__name__: f
    for f in (
        line_2100,
        line_12000,
        line_70000,
        header_3000,
        dot_lines,
        bare_cr,
        raw_8bit_header,
        utf8_header,
        empty_body,
        no_body,
        no_final_newline,
        lf_only,
        base64_attachment,
    )
}

_BARE_LF = re.compile(rb"(?<!\r)\n")


def served(stored: bytes) -> bytes:
    """What a POP3 server sends for ``stored`` (unstuffed): LF -> CRLF, final CRLF added."""
    data = _BARE_LF.sub(b"\r\n", stored)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def stuff(message: bytes) -> bytes:
    """The RETR body on the wire: dot-stuffed, then the CRLF.CRLF terminator."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    if stuffed and not stuffed.endswith(b"\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"
