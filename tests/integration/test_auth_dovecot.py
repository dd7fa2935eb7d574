"""The authentication policy and SCRAM-SHA-256 against a real Dovecot (what it logs proves it)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devtools.dovecot import Dovecot, MailUser
from popsync.config import Account
from popsync.errors import ExitCode
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.synchelp import (
    dovecot_account,
    dovecot_keys,
    maildir_messages,
    make_message,
    run_popsync,
    stored_form,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


@pytest.fixture(scope="module")
def plain_only(dovecot: Dovecot) -> Iterator[Dovecot]:
    """A second Dovecot offering only PLAIN, LOGIN and USER: nothing that hides the password."""
    root = Path(tempfile.mkdtemp(prefix="popsync-dovecot-plain-"))
    root.chmod(0o711)
    try:
        with Dovecot(root, extra_config="auth_mechanisms = plain login\n") as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """A fresh seen-store in the test's state directory."""
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as opened:
        yield opened


def _account(server: Dovecot, user: MailUser, tmp_path: Path, **extra: str | int | bool) -> Account:
    return dovecot_account(server, user, tmp_path / "Maildir", tmp_path / "state", **extra)[1]


def _clear_text(server: Dovecot) -> dict[str, str | int | bool]:
    return {"tls": "none", "port": server.pop3_port, "allow_plaintext": True}


def _log_lines(server: Dovecot, user: MailUser) -> list[str]:
    text = server.log_file.read_text(errors="replace")
    return [line for line in text.splitlines() if f"<{user.name}>" in line or user.name in line]


def _login_methods(server: Dovecot, user: MailUser, count: int) -> list[str]:
    """The login methods Dovecot logged for ``user``, oldest first, once ``count`` are there.

    Dovecot's log process writes a line a moment after the login: wait for it (5 s at most).
    """
    deadline = time.monotonic() + 5
    while True:
        methods = [
            line.split("method=", 1)[1].split(",", 1)[0]
            for line in _log_lines(server, user)
            if "Login: " in line and "method=" in line
        ]
        if len(methods) >= count or time.monotonic() > deadline:
            return methods
        time.sleep(0.05)


def _wait_for_line(server: Dovecot, user: MailUser, needle: str) -> bool:
    """True once a log line about ``user`` contains ``needle`` (case-insensitive; 5 s)."""
    deadline = time.monotonic() + 5
    while not any(needle in line.lower() for line in _log_lines(server, user)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _run(account: Account, store: SeenStore) -> tuple[RunResult, list[MutableMapping[str, Any]]]:
    with capture_logs() as logs:
        result = sync_account(account, store)
    return result, logs


def test_auto_over_clear_text_uses_scram(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """tls = none, auth = auto: Dovecot offers PLAIN first, popsync picks SCRAM-SHA-256."""
    message = make_message(1)
    dovecot.deliver(mail_user, message)
    result, logs = _run(_account(dovecot, mail_user, tmp_path, **_clear_text(dovecot)), store)
    assert result.outcome == "ok", result.error
    assert _login_methods(dovecot, mail_user, 1) == ["SCRAM-SHA-256"]
    assert maildir_messages(tmp_path / "Maildir") == [stored_form(message)]
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_scram_over_tls_is_verified_and_logged(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """auth = scram-sha-256 over POP3S: Dovecot logs the mechanism; the messages arrive."""
    message = make_message(2)
    dovecot.deliver(mail_user, message)
    result, _ = _run(_account(dovecot, mail_user, tmp_path, auth="scram-sha-256"), store)
    assert result.outcome == "ok", result.error
    assert _login_methods(dovecot, mail_user, 1) == ["SCRAM-SHA-256"]
    assert maildir_messages(tmp_path / "Maildir") == [stored_form(message)]


def test_scram_wrong_password_is_an_auth_failure(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """A wrong password with SCRAM: exit 77, Dovecot saw a SCRAM attempt, nothing fetched."""
    dovecot.deliver(mail_user, make_message(3))
    account = _account(dovecot, mail_user, tmp_path, auth="scram-sha-256", password="wrong")
    result, _ = _run(account, store)
    assert (result.outcome, result.exit_code) == ("auth", ExitCode.AUTH)
    assert _wait_for_line(dovecot, mail_user, "scram-sha-256")
    assert maildir_messages(tmp_path / "Maildir") == []


def test_auto_over_clear_text_without_hiding_mechanism_sends_nothing(
    plain_only: Dovecot, tmp_path: Path, store: SeenStore
) -> None:
    """Only PLAIN/LOGIN/USER offered: exit 78 with the fix named; Dovecot saw no login."""
    user = plain_only.new_user()
    plain_only.deliver(user, make_message(4))

    def unauthenticated() -> int:
        text = plain_only.log_file.read_text(errors="replace")
        return text.count("no auth attempts")

    before = unauthenticated()
    result, _ = _run(_account(plain_only, user, tmp_path, **_clear_text(plain_only)), store)
    assert (result.outcome, result.exit_code) == ("config", ExitCode.CONFIG)
    assert result.error is not None
    assert 'set auth = "user" together with allow_plaintext = true' in result.error
    # Dovecot logs our connection as one without any auth attempt; nothing names the user.
    deadline = time.monotonic() + 5
    while unauthenticated() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unauthenticated() > before
    assert _log_lines(plain_only, user) == []
    assert maildir_messages(tmp_path / "Maildir") == []


def test_explicit_user_over_clear_text_logs_in_with_one_warning(
    plain_only: Dovecot, tmp_path: Path, store: SeenStore
) -> None:
    """auth = user, tls = none, allow_plaintext: logs in as asked and warns once per run."""
    user = plain_only.new_user()
    message = make_message(5)
    plain_only.deliver(user, message)
    account = _account(plain_only, user, tmp_path, auth="user", **_clear_text(plain_only))
    for _run_number in range(2):
        result, logs = _run(account, store)
        assert result.outcome == "ok", result.error
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [e["event"] for e in warnings] == ["sending the password unencrypted"]
    assert _login_methods(plain_only, user, 2) == [
        "PLAIN",
        "PLAIN",
    ]  # USER/PASS, as Dovecot logs it
    assert maildir_messages(tmp_path / "Maildir") == [stored_form(message)]


def test_cli_once_names_the_fix_and_exits_78(plain_only: Dovecot, tmp_path: Path) -> None:
    """popsync --once over clear text with nothing safe offered: one clear line, exit 78."""
    user = plain_only.new_user()
    keys = dovecot_keys(plain_only, user, tmp_path / "Maildir", **_clear_text(plain_only))
    config = write_config(tmp_path / "popsync.toml", tmp_path / "state", {"acct": keys})
    done = run_popsync(["--once", "-c", str(config)])
    assert done.returncode == ExitCode.CONFIG, done.stdout + done.stderr
    # The failure summary line, besides the JSON log event of the same failure.
    [line] = [line for line in done.stderr.splitlines() if line.startswith("acct: FAILED")]
    assert line.startswith("acct: FAILED (config) ")
    assert 'auth = "user" together with allow_plaintext = true' in line
    assert user.password not in done.stdout + done.stderr
