"""The error classes: who is at fault, and -ERR replies typed by their RFC 2449/3206 code."""

from __future__ import annotations

import pytest

from popsync.pop3 import (
    AuthFailed,
    LocalProtocolError,
    LoginDelay,
    MailboxInUse,
    PermFailure,
    Pop3Error,
    RemoteProtocolError,
    ServerError,
    TempFailure,
    Utf8Required,
    server_error,
)

__all__: list[str] = []


@pytest.mark.parametrize(
    ("text", "kind", "code"),
    [
        ("[AUTH] Authentication failed.", AuthFailed, "AUTH"),
        ("[IN-USE] Mailbox is locked", MailboxInUse, "IN-USE"),
        ("[LOGIN-DELAY] wait", LoginDelay, "LOGIN-DELAY"),
        ("[SYS/TEMP] try later", TempFailure, "SYS/TEMP"),
        ("[SYS/PERM] gone", PermFailure, "SYS/PERM"),
        ("[UTF8] needs UTF8", Utf8Required, "UTF8"),
        ("[SYS/TEMP/FOO] quota", TempFailure, "SYS/TEMP/FOO"),
        ("[AUTH/EXPIRED] renew", AuthFailed, "AUTH/EXPIRED"),
        ("[in-use] lower case", MailboxInUse, "IN-USE"),
        ("[SYS/TEMPX] not a child of SYS/TEMP", ServerError, "SYS/TEMPX"),
        ("[SYS] parent only", ServerError, "SYS"),
        ("[XYZZY] unknown", ServerError, "XYZZY"),
        ("plain text", ServerError, None),
        ("", ServerError, None),
        ("failed [AUTH] not at the start", ServerError, None),
        ("[AUTH no closing bracket", ServerError, None),
    ],
)
def test_server_error_picks_the_class_by_code(
    text: str, kind: type[ServerError], code: str | None
) -> None:
    """The response code picks the subclass; hierarchy matches whole segments only."""
    error = server_error(b"PASS", text)
    assert type(error) is kind
    assert error.code == code
    assert error.command == b"PASS"
    assert error.text == text


@pytest.mark.parametrize(
    ("kind", "temporary"),
    [
        (ServerError, False),
        (AuthFailed, False),
        (MailboxInUse, True),
        (LoginDelay, True),
        (TempFailure, True),
        (PermFailure, False),
        (Utf8Required, False),
    ],
)
def test_temporary_flag(kind: type[ServerError], temporary: bool) -> None:
    """Only IN-USE, LOGIN-DELAY and SYS/TEMP are worth retrying later."""
    assert kind(b"PASS", "x").temporary is temporary


def test_error_text_names_the_command() -> None:
    """str() says which command got which -ERR; a greeting error says 'greeting'."""
    assert str(server_error(b"RETR", "[SYS/TEMP] busy")) == "RETR: -ERR [SYS/TEMP] busy"
    assert str(server_error(b"", "go away")) == "greeting: -ERR go away"
    assert str(server_error(b"QUIT", "")) == "QUIT: -ERR"


def test_hierarchy_splits_blame() -> None:
    """Every error is a Pop3Error; the three branches are distinct."""
    for kind in (AuthFailed, MailboxInUse, LoginDelay, TempFailure, PermFailure, Utf8Required):
        assert issubclass(kind, ServerError)
    for branch in (LocalProtocolError, RemoteProtocolError, ServerError):
        assert issubclass(branch, Pop3Error)
    assert not issubclass(RemoteProtocolError, ServerError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_response_code_attribute_matches_the_rfc_names() -> None:
    """Each subclass advertises the code it stands for."""
    names = {
        kind.response_code
        for kind in (AuthFailed, MailboxInUse, LoginDelay, TempFailure, PermFailure, Utf8Required)
    }
    assert names == {"AUTH", "IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM", "UTF8"}
    assert ServerError.response_code is None
