"""Tests for the trace header fields (add_headers)."""

from __future__ import annotations

import email
import email.policy
import email.utils

import pytest

from popsync.trace import MAX_UIDL, TraceHeaders

NOW = 1_800_000_000.0


def _parse(prefix: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(prefix + b"\r\nbody\r\n", policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_no_kinds_gives_an_empty_prefix() -> None:
    """Without add_headers nothing is prepended, so delivery stays byte-exact."""
    trace = TraceHeaders((), pop3_host="pop.example.org", user="me")
    assert not trace
    assert trace.prefix(b"abc", NOW) == b""


def test_all_fields_in_fixed_order_and_rfc5322_form() -> None:
    """Delivered-To, Received, X-Popsync-UIDL, each a CRLF-terminated, parseable field."""
    trace = TraceHeaders(
        ["x-popsync-uidl", "received", "delivered-to"],
        pop3_host="pop.example.org",
        user="me@example.org",
        local_host="box",
    )
    prefix = trace.prefix(b"UID-1", NOW)
    names = [line.split(b":")[0] for line in prefix.split(b"\r\n") if line[:1].isalpha()]
    assert names == [b"Delivered-To", b"Received", b"X-Popsync-UIDL"]
    assert prefix.endswith(b"\r\n")
    assert all(len(line) <= 998 for line in prefix.split(b"\r\n"))
    parsed = _parse(prefix)
    received = " ".join(str(parsed["Received"]).split())
    assert received.startswith("from pop.example.org by box (popsync) with POP3 (UIDL UID-1)")
    assert "for me@example.org;" in received
    date = email.utils.parsedate_to_datetime(received.rsplit(";", 1)[1])
    assert date.timestamp() == NOW
    assert parsed["X-Popsync-UIDL"] == "UID-1"
    assert parsed["Delivered-To"] == "me@example.org"


def test_recipient_overrides_the_user_in_delivered_to() -> None:
    """Delivered-To names lmtp_recipient when one is given."""
    trace = TraceHeaders(["delivered-to"], pop3_host="h", user="u", recipient="r@example.org")
    assert trace.prefix(b"x", NOW) == b"Delivered-To: r@example.org\r\n"


@pytest.mark.parametrize(
    ("uidl", "shown"),
    [
        (b"a(b)c\\d", b"(UIDL a\\(b\\)c\\\\d)"),
        (b"\xff\x00bin", b"(UIDL hex:ff0062696e)"),
    ],
)
def test_hostile_uidls_stay_inside_one_comment(uidl: bytes, shown: bytes) -> None:
    """Parentheses and backslashes are quoted; non-printable UIDLs are shown as hex."""
    trace = TraceHeaders(["received", "x-popsync-uidl"], pop3_host="h", user="u")
    prefix = trace.prefix(uidl, NOW)
    assert shown in prefix
    assert b"\x00" not in prefix


def test_long_uidl_is_cut_and_odd_user_is_quoted() -> None:
    """A huge UIDL is cut so lines stay short; a user with spaces or CR becomes a quoted word."""
    trace = TraceHeaders(
        ["received", "x-popsync-uidl"], pop3_host="::1", user='jo "x"\r\nBcc: evil'
    )
    prefix = trace.prefix(b"u" * 5000, NOW)
    assert all(len(line) <= 998 for line in prefix.split(b"\r\n"))
    assert b"u" * MAX_UIDL + b"...(cut)" in prefix
    assert b'for "jo \\"x\\"Bcc: evil";' in prefix
    assert b"from [IPv6:::1]" in prefix
    assert b"\r\nBcc" not in prefix
