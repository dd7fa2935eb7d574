"""Commands as values: wire encoding, the injection guard, argument checks, secret-safe repr."""

from __future__ import annotations

import dataclasses

import pytest

from popsync.pop3 import Command, LocalProtocolError
from popsync.pop3 import commands as cmd
from popsync.pop3.commands import MAX_COMMAND_LINE

__all__: list[str] = []


@pytest.mark.parametrize(
    ("command", "wire", "multiline"),
    [
        (cmd.user("alice"), b"USER alice\r\n", False),
        (cmd.user("j\u00fcrgen"), b"USER j\xc3\xbcrgen\r\n", False),
        (cmd.pass_("two words"), b"PASS two words\r\n", False),
        (cmd.apop("mrose", b"c4c9334bac560ecc979e58001b3e22fb"), None, False),
        (cmd.rpop("bob"), b"RPOP bob\r\n", False),
        (cmd.auth("plain"), b"AUTH PLAIN\r\n", False),
        (cmd.auth("PLAIN", b"AGEAYg=="), b"AUTH PLAIN AGEAYg==\r\n", False),
        (cmd.auth("PLAIN", b""), b"AUTH PLAIN =\r\n", False),
        (cmd.stat(), b"STAT\r\n", False),
        (cmd.list_(), b"LIST\r\n", True),
        (cmd.list_(3), b"LIST 3\r\n", False),
        (cmd.uidl(), b"UIDL\r\n", True),
        (cmd.uidl(12), b"UIDL 12\r\n", False),
        (cmd.retr(1), b"RETR 1\r\n", True),
        (cmd.top(2, 0), b"TOP 2 0\r\n", True),
        (cmd.dele(7), b"DELE 7\r\n", False),
        (cmd.rset(), b"RSET\r\n", False),
        (cmd.noop(), b"NOOP\r\n", False),
        (cmd.quit(), b"QUIT\r\n", False),
        (cmd.capa(), b"CAPA\r\n", True),
        (cmd.stls(), b"STLS\r\n", False),
        (cmd.utf8(), b"UTF8\r\n", False),
    ],
    ids=lambda value: repr(value) if isinstance(value, Command) else None,
)
def test_encoding_and_multiline_flag(command: Command, wire: bytes | None, multiline: bool) -> None:
    """Each constructor gives the RFC wire form and says whether a dot-terminated body follows."""
    expected = wire or b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"
    assert command.encode() == expected
    assert command.multiline is multiline


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b", "\r\n", "x\r\nDELE 1"])
@pytest.mark.parametrize("make", [cmd.user, cmd.pass_, cmd.rpop, lambda v: cmd.apop("u", v)])
def test_cr_lf_nul_in_arguments_are_refused(make: object, bad: str) -> None:
    """An argument with CR, LF or NUL cannot be encoded, so no command can be smuggled."""
    assert callable(make)
    command = make(bad)
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        command.encode()


def test_cr_lf_nul_in_verb_or_sasl_initial_are_refused() -> None:
    """The guard covers the verb and the AUTH initial response too."""
    with pytest.raises(LocalProtocolError):
        Command(b"NOOP\r\nDELE 1").encode()
    with pytest.raises(LocalProtocolError):
        cmd.auth("PLAIN", b"abc\r\nQUIT").encode()


def test_line_limit_is_255_octets_including_crlf() -> None:
    """RFC 2449: 255 octets with CRLF is fine, 256 is refused before sending."""
    fits = cmd.user("u" * (MAX_COMMAND_LINE - len(b"USER \r\n")))
    assert len(fits.encode()) == 255
    too_long = cmd.user("u" * (MAX_COMMAND_LINE - len(b"USER \r\n") + 1))
    with pytest.raises(LocalProtocolError, match="256 octets"):
        too_long.encode()


def test_line_limit_counts_octets_not_characters() -> None:
    """A UTF-8 name is measured in encoded octets."""
    assert len(cmd.user("\u00e9" * 124).encode()) == 255  # 5 + 248 + 2 octets
    with pytest.raises(LocalProtocolError):
        cmd.user("\u00e9" * 125).encode()  # only 132 characters, but 257 octets


@pytest.mark.parametrize("which", [0, -1, True, False, "1", 1.0, None])
@pytest.mark.parametrize("make", [cmd.retr, cmd.dele, cmd.list_, cmd.uidl, lambda n: cmd.top(n, 0)])
def test_message_numbers_must_be_positive_ints(make: object, which: object) -> None:
    """Message numbers start at 1; bools, strings, floats are refused (None only for listings)."""
    assert callable(make)
    if which is None and make in (cmd.list_, cmd.uidl):
        assert make(which).multiline
        return
    with pytest.raises(LocalProtocolError):
        make(which)


@pytest.mark.parametrize("howmax", [-1, True, "0", 0.5])
def test_top_line_count_must_be_a_non_negative_int(howmax: object) -> None:
    """TOP n -1, TOP n True and friends are caller bugs."""
    with pytest.raises(LocalProtocolError, match="line count"):
        cmd.top(1, howmax)  # type: ignore[arg-type]


def test_huge_message_number_hits_the_line_limit() -> None:
    """A 300-digit message number is refused by the line limit, not sent."""
    with pytest.raises(LocalProtocolError):
        cmd.retr(10**300).encode()


def test_non_ascii_sasl_mechanism_is_a_local_error() -> None:
    """A mechanism name that is not ASCII is a LocalProtocolError, not a UnicodeError."""
    with pytest.raises(LocalProtocolError, match="ASCII"):
        cmd.auth("PL\u0130N")


@pytest.mark.parametrize(
    "command",
    [
        cmd.pass_("hunter2"),
        cmd.apop("alice", "0123456789abcdef0123456789abcdef"),
        cmd.rpop("hunter2"),
        cmd.auth("PLAIN", b"AGFsaWNlAGh1bnRlcjI="),
    ],
    ids=lambda c: c.verb.decode(),
)
def test_repr_hides_credentials(command: Command) -> None:
    """repr (and so tracebacks and event reprs) never show credential arguments."""
    shown = repr(command)
    assert command.verb.decode() in shown
    for arg in command.args:
        assert arg.decode() not in shown
    assert "***" in shown
    assert "hunter2" not in str([command])


def test_repr_shows_ordinary_arguments() -> None:
    """Non-secret commands show their arguments, which helps debugging."""
    assert "alice" in repr(cmd.user("alice"))
    assert "7" in repr(cmd.dele(7))


def test_commands_are_frozen_and_comparable() -> None:
    """Commands are values: equal when built alike, immutable."""
    assert cmd.retr(1) == cmd.retr(1)
    assert cmd.retr(1) != cmd.retr(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.retr(1).verb = b"DELE"  # type: ignore[misc]
