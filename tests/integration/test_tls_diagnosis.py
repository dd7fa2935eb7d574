"""Misconfigured TLS against the real Dovecot: one line that says what to change, exit 78."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync import net
from popsync.cli import main
from popsync.config import Account, load_config
from popsync.errors import CertificateError, ConfigError, ExitCode
from popsync.seen import SeenStore
from popsync.session import open_session
from popsync.sync import sync_account
from tests.synchelp import TomlValue, dovecot_account, dovecot_keys, write_config

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


def _account(dovecot: Dovecot, user: MailUser, tmp_path: Path, **extra: TomlValue) -> Account:
    return dovecot_account(dovecot, user, tmp_path / "Maildir", tmp_path / "state", **extra)[1]


def _fingerprint(dovecot: Dovecot) -> str:
    stream = net.connect(
        dovecot.host, dovecot.pop3s_port, timeout=10, context=net.unverified_context()
    )
    try:
        der = stream.peer_certificate()
    finally:
        stream.close()
    assert der is not None
    return net.certificate_fingerprint(der)


def test_implicit_tls_on_the_plain_port_names_the_fix(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """tls = "implicit" on the plain port: the port greets in clear text, use starttls."""
    account = _account(dovecot, mail_user, tmp_path, port=dovecot.pop3_port)
    with pytest.raises(ConfigError) as info:
        open_session(account, mail_user.password)
    (line,) = info.value.problems
    assert line.startswith(f"accounts.acct.tls: port {dovecot.pop3_port} speaks plain POP3")
    assert 'set tls = "starttls" for this port' in line
    assert info.value.exit_code == ExitCode.CONFIG


def test_starttls_on_the_pop3s_port_is_found_quickly(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """tls = "starttls" on the POP3S port: no 60 s timeout, but a hint to use implicit TLS."""
    account = _account(
        dovecot, mail_user, tmp_path, tls="starttls", port=dovecot.pop3s_port, timeout="60s"
    )
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        open_session(account, mail_user.password)
    assert time.monotonic() - started < 15
    (line,) = info.value.problems
    assert line.startswith(f"accounts.acct.tls: port {dovecot.pop3s_port} expects TLS at once")
    assert 'set tls = "implicit"' in line


def test_untrusted_certificate_prints_the_pin_and_the_pin_works(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """Without the test CA the error holds the exact tls_fingerprint line, which then works."""
    fingerprint = _fingerprint(dovecot)
    for tls, port in (("implicit", dovecot.pop3s_port), ("starttls", dovecot.pop3_port)):
        keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", tls=tls, port=port)
        del keys["tls_ca_file"]
        config = write_config(tmp_path / f"{tls}.toml", tmp_path / "state", {"acct": keys})
        account = load_config(config).accounts["acct"]
        with pytest.raises(ConfigError) as info:
            open_session(account, mail_user.password)
        (line,) = info.value.problems
        assert line.startswith("accounts.acct.tls: the server certificate is not trusted")
        assert f'set tls_fingerprint = "{fingerprint}"' in line
        assert "tls_ca_file" in line
        pinned = account.model_copy(update={"tls_fingerprint": (fingerprint,)})
        client = open_session(pinned, mail_user.password)
        assert client.stat() == (0, 0)
        client.quit()


def test_wrong_pin_is_refused(dovecot: Dovecot, mail_user: MailUser, tmp_path: Path) -> None:
    """A pinned fingerprint that does not match refuses the server, even with a trusted chain."""
    wrong = "sha256:" + ":".join(["00"] * 32)
    account = _account(dovecot, mail_user, tmp_path)
    account = account.model_copy(update={"tls_ca_file": None, "tls_fingerprint": (wrong,)})
    with pytest.raises(ConfigError, match="matches no tls_fingerprint") as info:
        open_session(account, mail_user.password)
    assert _fingerprint(dovecot) in info.value.problems[0]
    assert isinstance(info.value.__cause__, CertificateError)


def test_ca_list_with_system_and_missing_bundle(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """["system", ca] trusts the test CA too; a missing bundle is a config error naming it."""
    account = _account(dovecot, mail_user, tmp_path)
    both = account.model_copy(update={"tls_ca_file": ("system", str(dovecot.ca_file))})
    client = open_session(both, mail_user.password)
    client.quit()
    missing = account.model_copy(update={"tls_ca_file": (str(tmp_path / "nope.pem"),)})
    with pytest.raises(ConfigError) as info:
        open_session(missing, mail_user.password)
    assert info.value.problems == [
        f"accounts.acct.tls_ca_file: {tmp_path / 'nope.pem'} does not exist"
    ]


def test_name_mismatch_lists_the_certificate_names(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host the certificate does not name: the error lists the names it holds."""
    real = socket.getaddrinfo

    def to_loopback(host: str | bytes, *args: object, **kwargs: object) -> object:
        # The name resolves to this machine, as it would through /etc/hosts.
        name = host.decode() if isinstance(host, bytes) else host  # popsync passes ASCII as bytes
        return real("127.0.0.1" if name == "mail.example.org" else host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", to_loopback)
    account = _account(dovecot, mail_user, tmp_path)
    account = account.model_copy(update={"host": "mail.example.org"})
    with pytest.raises(ConfigError) as info:
        open_session(account, mail_user.password)
    (line,) = info.value.problems
    assert line.startswith(
        "accounts.acct.host: the certificate is not valid for 'mail.example.org'"
    )
    assert "localhost, 127.0.0.1" in line


def test_once_exits_78_and_the_sync_result_says_config(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """popsync --once with implicit TLS on the plain port exits 78 with the hint."""
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", port=dovecot.pop3_port)
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert main(["--once", "--no-progress", "-c", str(config)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert re.search(r"acct: FAILED \(config\) accounts\.acct\.tls: port \d+ speaks plain", err)
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        (run,) = store.last_runs().values()  # keyed by mailbox, not by the label "acct"
        assert run.outcome == "config"


def test_missing_maildir_parent_is_a_config_error(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """A Maildir whose parent does not exist fails the run as a config error with its key."""
    account = dovecot_account(
        dovecot, mail_user, tmp_path / "no" / "such" / "Maildir", tmp_path / "state"
    )[1]
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        result = sync_account(account, store)
    assert result.exit_code == ExitCode.CONFIG
    assert result.error is not None
    assert result.error.startswith(
        f"accounts.acct.maildir: parent directory {tmp_path / 'no' / 'such'} does not exist"
    )


def test_popsync_test_prints_every_step(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """popsync test shows TLS, certificate, greeting, CAPA before/after TLS and login, STAT."""
    dovecot.deliver(mail_user, b"Subject: one\r\n\r\nbody\r\n")
    keys = dovecot_keys(
        dovecot, mail_user, tmp_path / "Maildir", tls="starttls", port=dovecot.pop3_port
    )
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert main(["test", "acct", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    for step in (
        "connect:",
        "greeting:",
        "capabilities:",
        "tls:",
        "certificate:",
        "capabilities after TLS:",
        "login:",
        "capabilities now:",
    ):
        assert f"  {step}" in out, step
    assert "STLS" in out.split("capabilities after TLS:")[0]
    assert f"fingerprint {_fingerprint(dovecot)}" in out
    assert "stat:                    1 message(s)" in out
    assert mail_user.password not in out


def test_check_config_connect_reports_each_account(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config --connect tests every account and exits with the worst code."""
    good = dovecot_keys(dovecot, mail_user, tmp_path / "a")
    swapped = dovecot_keys(dovecot, mail_user, tmp_path / "b", port=dovecot.pop3_port)
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"a": good, "b": swapped})
    assert main(["check-config", "--connect", "-c", str(config)]) == ExitCode.CONFIG
    out = capsys.readouterr().out
    assert "a:\n" in out
    assert "b:\n  " in out
    assert "FAILED (configuration): accounts.b.tls: port" in out
    assert out.count("FAILED") == 1
