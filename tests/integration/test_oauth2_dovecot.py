"""Built-in OAuth2 end to end: a local authorization server and Dovecot's oauth2 passdb.

Dovecot 2.3 validates every XOAUTH2/OAUTHBEARER login by POSTing the token to the test
authorization server's introspection endpoint (``introspection_mode = post``), so a login
succeeds only with an access token that server issued and that has not expired. The server
expires access tokens after a few seconds and rotates refresh tokens on every refresh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser, dovecot_available
from tests.conftest import in_ci
from tests.oauth_server import AuthServer
from tests.synchelp import (
    REPO,
    TomlValue,
    maildir_messages,
    make_message,
    run_popsync,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

#: Access-token lifetimes: a short one that really runs out during a test, and the one a
#: login gets, long enough that a slow machine's next run still finds it fresh.
LIFETIME = 5.0
LOGIN_LIFETIME = 60.0


@pytest.fixture(scope="module")
def _auth_server() -> Iterator[AuthServer]:
    server = AuthServer(access_lifetime=LOGIN_LIFETIME).start()
    yield server
    server.stop()


@pytest.fixture
def auth_server(_auth_server: AuthServer) -> Iterator[AuthServer]:
    """The module's authorization server, with its knobs reset after each test."""
    yield _auth_server
    _auth_server.access_lifetime = LOGIN_LIFETIME
    _auth_server.refresh_delay = 0.0


@pytest.fixture(scope="module")
def oauth_dovecot(_auth_server: AuthServer) -> Iterator[Dovecot]:
    """A Dovecot whose XOAUTH2/OAUTHBEARER logins are checked by the auth server."""
    if not dovecot_available():
        if in_ci():
            pytest.fail("Dovecot is required in CI (install dovecot-core and dovecot-pop3d)")
        pytest.skip("Dovecot is not installed")
    # In /tmp, not pytest's 0700 temp base: Dovecot's mail processes run as nobody.
    root = Path(tempfile.mkdtemp(prefix="popsync-dovecot-oauth-"))
    conf = root / "oauth2.conf.ext"
    conf.write_text(
        "introspection_mode = post\n"
        f"introspection_url = {_auth_server.url}/introspect\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
        "force_introspection = yes\n"
    )
    extra = (
        "auth_mechanisms = plain login cram-md5 apop xoauth2 oauthbearer\n"
        "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
        f"  args = {conf}\n}}\n"
    )
    try:
        with Dovecot(root, extra_config=extra) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _account(
    dovecot: Dovecot,
    auth: AuthServer,
    user: MailUser,
    tmp_path: Path,
    *,
    mechanism: str = "xoauth2",
    flow: str = "device",
    token_url: str | None = None,
) -> dict[str, TomlValue]:
    keys: dict[str, TomlValue] = {
        "host": dovecot.host,
        "port": dovecot.pop3s_port,
        "tls": "implicit",
        "tls_ca_file": str(dovecot.ca_file),
        "username": user.name,
        "auth": mechanism,
        "oauth2_provider": "custom",
        "oauth2_client_id": auth.client_id,
        "oauth2_token_url": token_url or f"{auth.url}/token",
        "oauth2_scope": "pop",
        "maildir": str(tmp_path / f"Maildir-{user.name}"),
        "timeout": "10s",
    }
    keys["oauth2_device_url" if flow == "device" else "oauth2_auth_url"] = (
        f"{auth.url}/device" if flow == "device" else f"{auth.url}/authorize"
    )
    return keys


def _config(tmp_path: Path, accounts: dict[str, dict[str, TomlValue]]) -> Path:
    return write_config(tmp_path / "config.toml", tmp_path / "state", accounts)


def _token_file(tmp_path: Path, account: str) -> Path:
    return tmp_path / "state" / "oauth2" / f"{account}.json"


def _stored(tmp_path: Path, account: str) -> dict[str, object]:
    data = json.loads(_token_file(tmp_path, account).read_text())
    assert isinstance(data, dict)
    return data


def _expire(tmp_path: Path, account: str) -> None:
    """Age the cached access token so the next run must refresh (what time would do)."""
    path = _token_file(tmp_path, account)
    data = _stored(tmp_path, account)
    data["expires_at"] = time.time() - 1
    path.write_text(json.dumps(data))


def _login(config: Path, account: str, auth: AuthServer, flow: str) -> str:
    """Run `popsync oauth2 login` as a user would: read its instructions, act on them."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "popsync", "oauth2", "login", account, "-c", str(config)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if flow == "device" and "enter the code" in line:
                auth.approve(line.rsplit(" ", 1)[1].strip())
            if flow == "loopback" and line.startswith(auth.url + "/authorize?"):
                # The "browser": the server consents at once and redirects to popsync.
                with urllib.request.urlopen(line.strip(), timeout=10) as response:
                    assert b"authorization received" in response.read()
        assert proc.wait(30) == 0, "".join(lines) + (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return "".join(lines)


def test_device_login_then_xoauth2_sync_uses_cache_then_refreshes_after_expiry(
    oauth_dovecot: Dovecot, auth_server: AuthServer, tmp_path: Path
) -> None:
    """Device login stores a 0600 token; runs log in with XOAUTH2, refreshing only on expiry."""
    user = oauth_dovecot.new_user()
    auth_server.user = user.name
    config = _config(tmp_path, {"work": _account(oauth_dovecot, auth_server, user, tmp_path)})
    output = _login(config, "work", auth_server, "device")
    assert "refresh token stored in" in output
    path = _token_file(tmp_path, "work")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = _stored(tmp_path, "work")
    assert auth_server.refresh_valid(str(first["refresh_token"]))
    assert str(first["access_token"]) not in output  # the token is never printed

    oauth_dovecot.deliver(user, make_message(1))
    refreshes = auth_server.refreshes
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 0, run.stderr
    assert "1 fetched" in run.stdout
    assert auth_server.refreshes == refreshes  # the login's access token was still fresh
    check = run_popsync(["check-config", "-c", str(config)])
    assert check.returncode == 0, check.stderr

    # Access tokens live 5 s now. A refresh (forced) yields one, which then runs out.
    auth_server.access_lifetime = LIFETIME
    _expire(tmp_path, "work")
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 0, run.stderr
    assert auth_server.refreshes == refreshes + 1
    short = _stored(tmp_path, "work")
    time.sleep(LIFETIME + 0.5)
    assert not auth_server.access_valid(str(short["access_token"]))  # Dovecot would refuse it
    auth_server.access_lifetime = LOGIN_LIFETIME  # the next one must outlive the checks below
    oauth_dovecot.deliver(user, make_message(2))
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 0, run.stderr
    assert "1 fetched" in run.stdout
    assert auth_server.refreshes == refreshes + 2
    # The refresh before this one rotated the token, and using its successor revoked it.
    assert not auth_server.refresh_valid(str(first["refresh_token"]))
    second = _stored(tmp_path, "work")
    # Rotated again: the newest refresh token is stored, with the new access token.
    assert second["refresh_token"] not in (first["refresh_token"], short["refresh_token"])
    assert auth_server.refresh_valid(str(second["refresh_token"]))
    assert auth_server.access_valid(str(second["access_token"]))
    assert len(maildir_messages(tmp_path / f"Maildir-{user.name}")) == 2
    for text in (run.stdout, run.stderr):
        assert str(second["access_token"]) not in text
        assert str(second["refresh_token"]) not in text


def test_loopback_pkce_login_then_oauthbearer_sync(
    oauth_dovecot: Dovecot, auth_server: AuthServer, tmp_path: Path
) -> None:
    """The browser flow (PKCE, loopback redirect) stores a token that logs in with OAUTHBEARER."""
    user = oauth_dovecot.new_user()
    auth_server.user = user.name
    keys = _account(
        oauth_dovecot, auth_server, user, tmp_path, mechanism="oauthbearer", flow="loopback"
    )
    config = _config(tmp_path, {"home": keys})
    output = _login(config, "home", auth_server, "loopback")
    assert "code_challenge_method=S256" in output
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in output
    oauth_dovecot.deliver(user, make_message(1))
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 0, run.stderr
    assert "1 fetched" in run.stdout


def _granted(
    oauth_dovecot: Dovecot, auth: AuthServer, tmp_path: Path, **extra: str
) -> tuple[Path, MailUser]:
    """An account logged in through the device flow."""
    user = oauth_dovecot.new_user()
    auth.user = user.name
    keys = {**_account(oauth_dovecot, auth, user, tmp_path), **extra}
    config = _config(tmp_path, {"work": keys})
    _login(config, "work", auth, "device")
    return config, user


def test_kill_9_during_a_refresh_keeps_a_working_refresh_token(
    oauth_dovecot: Dovecot, auth_server: AuthServer, tmp_path: Path
) -> None:
    """A run killed while the token endpoint answers leaves the old token file intact and usable."""
    config, user = _granted(oauth_dovecot, auth_server, tmp_path)
    _expire(tmp_path, "work")
    before = _token_file(tmp_path, "work").read_bytes()
    requests = auth_server.refresh_requests
    auth_server.refresh_delay = 2.0
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "popsync", "--once", "-c", str(config)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while auth_server.refresh_requests == requests:
            assert proc.poll() is None, "popsync exited before refreshing"
            assert time.monotonic() < deadline, "no refresh request arrived"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(auth_server.refresh_delay + 0.5)  # the server finishes (and rotates)
    finally:
        auth_server.refresh_delay = 0.0
    assert _token_file(tmp_path, "work").read_bytes() == before
    assert os.listdir(_token_file(tmp_path, "work").parent) == ["work.json"]

    oauth_dovecot.deliver(user, make_message(1))
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 0, run.stderr
    assert "1 fetched" in run.stdout
    assert _token_file(tmp_path, "work").read_bytes() != before


def test_invalid_grant_exits_77_and_says_to_log_in_again(
    oauth_dovecot: Dovecot, auth_server: AuthServer, tmp_path: Path
) -> None:
    """A revoked refresh token is an authentication failure naming the login command."""
    config, _user = _granted(oauth_dovecot, auth_server, tmp_path)
    stored = _stored(tmp_path, "work")
    _expire(tmp_path, "work")
    auth_server.revoke_all()
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 77, run.stderr
    assert "invalid_grant" in run.stderr
    assert "run `popsync oauth2 login work`" in run.stderr
    assert str(stored["refresh_token"]) not in run.stdout + run.stderr
    # The refused token is kept (a later login replaces it), never half-deleted.
    assert _stored(tmp_path, "work")["refresh_token"] == stored["refresh_token"]


def test_unreachable_token_endpoint_is_temporary(oauth_dovecot: Dovecot, tmp_path: Path) -> None:
    """Network trouble with the token endpoint exits 75, and the stored token is kept."""
    gone = AuthServer(access_lifetime=LOGIN_LIFETIME).start()
    try:
        config, _user = _granted(oauth_dovecot, gone, tmp_path)
    finally:
        gone.stop()  # its port now refuses connections
    _expire(tmp_path, "work")
    before = _token_file(tmp_path, "work").read_bytes()
    run = run_popsync(["--once", "-c", str(config)])
    assert run.returncode == 75, run.stderr
    assert "cannot reach the token endpoint" in run.stderr
    assert _token_file(tmp_path, "work").read_bytes() == before
