"""Certificate checks and the TLS 1.2 minimum, end to end: config -> ``popsync --once`` and the
daemon (issue 8, 9b). A wrong CA fails against the real Dovecot before any credential is sent;
a server stuck at TLS 1.1 (scripted: Dovecot 2.3 cannot be limited to it) is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from devtools.dovecot import Dovecot, MailUser
from tests.fake_pop3 import FakePop3Server, StartTLS
from tests.integration.test_daemon import DaemonProcess, ev
from tests.synchelp import TomlValue, dovecot_keys, maildir_files, run_popsync, write_config

__all__: list[str] = []


def _other_ca(tmp_path: Path) -> Path:
    """A CA that did not sign the server's certificate."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def _config(tmp_path: Path, keys: dict[str, TomlValue]) -> Path:
    return write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})


@contextmanager
def _daemon(config: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(config, "--log-format", "json")
    try:
        yield daemon
    finally:
        daemon.kill()


def _assert_no_login(dovecot: Dovecot, user: MailUser, tmp_path: Path) -> None:
    """Dovecot never saw this user: no USER, PASS or AUTH reached it, and nothing was fetched."""
    assert user.name not in dovecot.log_file.read_text(errors="replace")
    assert maildir_files(tmp_path / "Maildir") == []


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_wrong_ca_fails_before_any_credential(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, tls: str
) -> None:
    """--once with a CA that did not sign Dovecot's certificate fails with one clear line."""
    port = dovecot.pop3s_port if tls == "implicit" else dovecot.pop3_port
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", tls=tls, port=port)
    keys["tls_ca_file"] = str(_other_ca(tmp_path))
    proc = run_popsync(["--once", "-c", str(_config(tmp_path, keys))])
    assert proc.returncode == 78, proc.stderr  # configuration: the CA is the thing to fix
    assert "certificate is not trusted" in proc.stderr
    assert "tls_ca_file" in proc.stderr
    assert mail_user.password not in proc.stdout + proc.stderr
    _assert_no_login(dovecot, mail_user, tmp_path)


def test_daemon_with_wrong_ca_never_logs_in(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """The daemon's run fails on the certificate, status shows why, and Dovecot saw no login."""
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", interval="10s")
    keys["tls_ca_file"] = str(_other_ca(tmp_path))
    config = _config(tmp_path, keys)
    with _daemon(config) as daemon:
        failed = daemon.wait_for(ev("sync failed", account="acct"), timeout=40)
        assert "certificate is not trusted" in failed["error"]
        assert daemon.stop()[0] == 0
    status = run_popsync(["status", "--json", "-c", str(config)])
    (row,) = json.loads(status.stdout)
    assert row["outcome"] == "config"
    assert mail_user.password not in "".join(daemon.raw)
    _assert_no_login(dovecot, mail_user, tmp_path)


def _legacy_keys(server: FakePop3Server, tmp_path: Path) -> dict[str, TomlValue]:
    return {
        "host": server.host,
        "port": server.port,
        "tls": "implicit",
        "tls_ca_file": str(server.ca_file),
        "username": "me",
        "password": "legacy-pw-1d9f",
        "maildir": str(tmp_path / "Maildir"),
        "timeout": "5s",
        "interval": "10s",
    }


def test_tls_1_1_only_server_is_refused_by_once(tmp_path: Path) -> None:
    """A server that offers only TLS 1.1 is refused (76) and never sees a command."""
    with FakePop3Server([StartTLS(legacy=True)], linger=0.2) as server:
        proc = run_popsync(["--once", "-c", str(_config(tmp_path, _legacy_keys(server, tmp_path)))])
    server.check()
    assert server.legacy_refused == 1
    assert server.commands == []
    assert proc.returncode == 76, proc.stderr
    assert "offers no TLS 1.2 or newer" in proc.stderr
    assert "legacy-pw-1d9f" not in proc.stdout + proc.stderr


def test_tls_1_1_only_server_is_refused_by_the_daemon(tmp_path: Path) -> None:
    """The daemon refuses the same server, logs why, and sends it nothing."""
    with FakePop3Server([StartTLS(legacy=True)], linger=0.2) as server:
        config = _config(tmp_path, _legacy_keys(server, tmp_path))
        with _daemon(config) as daemon:
            failed = daemon.wait_for(ev("sync failed", account="acct"), timeout=40)
            assert failed["outcome"] == "protocol"
            assert "offers no TLS 1.2 or newer" in failed["error"]
            assert daemon.stop()[0] == 0
    server.check()
    assert server.legacy_refused >= 1
    assert server.commands == []
