"""Built-in OAuth2 without a mail server: presets, config rules, the token cache, refresh errors."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.config import Account, parse_config
from popsync.errors import ConfigError, ExitCode
from popsync.oauth2 import (
    OAuth2Error,
    StoredToken,
    TokenEndpointError,
    access_token,
    check_account,
    endpoints,
    load_token,
    token_path,
)
from tests.oauth_server import AuthServer

__all__: list[str] = []

_BASE = """
[accounts.a]
host = "pop.example.org"
username = "jane@example.org"
maildir = "/tmp/m"
"""


def _account(**keys: str) -> Account:
    lines = "".join(f'{key} = "{value}"\n' for key, value in keys.items())
    return parse_config(_BASE + lines).accounts["a"]


def _problems(**keys: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _account(**keys)
    return info.value.problems


# The providers' documented endpoints, copied from their documentation:
# Microsoft, https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code
# ("POST https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode", token at
# ".../oauth2/v2.0/token") and, for the POP scope, https://learn.microsoft.com/en-us/exchange/
# client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
# Google, https://developers.google.com/identity/protocols/oauth2/native-app
# ("https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token") and
# https://developers.google.com/gmail/imap/xoauth2-protocol ("https://mail.google.com/").
def test_microsoft_preset_matches_the_documented_endpoints() -> None:
    """Microsoft uses the v2.0 device-code and token endpoints of the tenant, POP scope."""
    account = _account(auth="xoauth2", oauth2_provider="microsoft", oauth2_client_id="c")
    where = endpoints(account)
    assert where.device_url == "https://login.microsoftonline.com/common/oauth2/v2.0/devicecode"
    assert where.token_url == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert where.scope == "https://outlook.office.com/POP.AccessAsUser.All offline_access"
    assert where.flow == "device"
    tenant = _account(
        auth="xoauth2",
        oauth2_provider="microsoft",
        oauth2_client_id="c",
        oauth2_tenant="contoso.com",
    )
    assert endpoints(tenant).token_url == (
        "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
    )


def test_google_preset_matches_the_documented_endpoints() -> None:
    """Google uses the installed-app authorization and token endpoints, Gmail's scope, offline."""
    where = endpoints(_account(auth="xoauth2", oauth2_provider="google", oauth2_client_id="c"))
    assert where.auth_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert where.token_url == "https://oauth2.googleapis.com/token"
    assert where.scope == "https://mail.google.com/"
    assert where.flow == "loopback"
    assert ("access_type", "offline") in where.auth_params


def test_scope_override() -> None:
    """oauth2_scope replaces the provider's default scope."""
    account = _account(
        auth="oauthbearer", oauth2_provider="google", oauth2_client_id="c", oauth2_scope="x y"
    )
    assert endpoints(account).scope == "x y"


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        (
            {"oauth2_provider": "google", "oauth2_client_id": "c", "auth": "plain"},
            'accounts.a.auth: must be "xoauth2" or "oauthbearer" with oauth2_provider',
        ),
        (
            {"oauth2_provider": "google", "auth": "xoauth2"},
            "accounts.a.oauth2_client_id: required with oauth2_provider",
        ),
        (
            {"oauth2_provider": "google", "oauth2_client_id": "c", "auth": "xoauth2",
             "password": "p"},
            "accounts.a.password: conflicts with oauth2_provider",
        ),
        (
            {"oauth2_provider": "google", "oauth2_client_id": "c", "auth": "xoauth2",
             "oauth2_tenant": "t"},
            'accounts.a.oauth2_tenant: only allowed with oauth2_provider = "microsoft"',
        ),
        (
            {"oauth2_provider": "custom", "oauth2_client_id": "c", "auth": "xoauth2",
             "oauth2_device_url": "https://id.example/device"},
            'accounts.a.oauth2_token_url: required with oauth2_provider = "custom"',
        ),
        (
            {"oauth2_provider": "custom", "oauth2_client_id": "c", "auth": "xoauth2",
             "oauth2_token_url": "https://id.example/token"},
            "accounts.a.oauth2_device_url: set it (device login) or oauth2_auth_url",
        ),
        (
            {"oauth2_provider": "microsoft", "oauth2_client_id": "c", "auth": "xoauth2",
             "oauth2_token_url": "https://id.example/token"},
            'accounts.a.oauth2_token_url: only allowed with oauth2_provider = "custom"',
        ),
        (
            {"password": "p", "oauth2_client_id": "c"},
            "accounts.a.oauth2_client_id: only allowed with oauth2_provider",
        ),
        (
            {"oauth2_provider": "custom", "oauth2_client_id": "c", "auth": "xoauth2",
             "oauth2_token_url": "http://id.example/token",
             "oauth2_device_url": "https://id.example/device"},
            "accounts.a.oauth2_token_url: must be an https:// URL (got 'http://id.example/token')",
        ),
    ],
)  # fmt: skip
def test_config_rules_for_oauth2_keys(keys: dict[str, str], problem: str) -> None:
    """Each broken OAuth2 combination is reported under the key to fix."""
    assert any(line.startswith(problem) for line in _problems(**keys)), _problems(**keys)


def test_http_endpoints_are_allowed_on_loopback_only() -> None:
    """A local authorization server (tests, an SSH tunnel) may use plain http on 127.0.0.1."""
    account = _account(
        auth="xoauth2",
        oauth2_provider="custom",
        oauth2_client_id="c",
        oauth2_token_url="http://127.0.0.1:8080/token",
        oauth2_device_url="http://[::1]:8080/device",
    )
    assert endpoints(account).device_url == "http://[::1]:8080/device"


# ------------------------------------------------------------------------- the token cache
@pytest.fixture
def server() -> Iterator[AuthServer]:
    auth = AuthServer(access_lifetime=60).start()
    yield auth
    auth.stop()


def _custom(auth: AuthServer) -> Account:
    return _account(
        auth="xoauth2",
        oauth2_provider="custom",
        oauth2_client_id=auth.client_id,
        oauth2_token_url=f"{auth.url}/token",
        oauth2_device_url=f"{auth.url}/device",
    )


def _store(state: Path, account: Account, **fields: object) -> Path:
    where = endpoints(account)
    token = {
        "refresh_token": "rt-x",
        "client_id": account.oauth2_client_id,
        "token_url": where.token_url,
        **fields,
    }
    path = token_path(state, account.name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(token))
    return path


def test_usable_keeps_a_margin_of_the_lifetime() -> None:
    """A token is reused while more than min(300 s, a quarter of its lifetime) is left."""
    hour = StoredToken("r", "c", "u", access_token="a", issued_at=0.0, expires_at=3600.0)
    assert hour.usable(3299.0)
    assert not hour.usable(3301.0)
    short = StoredToken("r", "c", "u", access_token="a", issued_at=0.0, expires_at=4.0)
    assert short.usable(2.9)
    assert not short.usable(3.1)
    assert not StoredToken("r", "c", "u", access_token="a").usable(0.0)


def test_cached_access_token_is_used_without_the_network(tmp_path: Path) -> None:
    """While fresh, the cached access token is returned; the (dead) endpoint is not called."""
    account = _account(
        auth="xoauth2",
        oauth2_provider="custom",
        oauth2_client_id="c",
        oauth2_token_url="http://127.0.0.1:9/token",
        oauth2_device_url="http://127.0.0.1:9/device",
    )
    now = time.time()
    _store(tmp_path, account, access_token="at-cached", issued_at=now, expires_at=now + 3600)
    assert access_token(account, tmp_path) == "at-cached"


def test_refresh_stores_the_rotated_token_atomically(tmp_path: Path, server: AuthServer) -> None:
    """An expired token is refreshed; the rotated refresh token replaces the old one, 0600."""
    account = _custom(server)
    granted = server.grant("alice")
    path = _store(tmp_path, account, refresh_token=granted, access_token="old", expires_at=1.0,
                  issued_at=0.0)  # fmt: skip
    token = access_token(account, tmp_path)
    assert server.access_valid(token)
    stored = load_token(path)
    assert stored is not None
    assert stored.refresh_token != granted
    assert stored.access_token == token
    assert server.refresh_valid(stored.refresh_token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    assert access_token(account, tmp_path) == token  # cached now
    assert server.refreshes == 1


def test_concurrent_refreshes_spend_the_refresh_token_once(
    tmp_path: Path, server: AuthServer
) -> None:
    """Two callers refreshing one expired token: one refreshes, the other uses its result."""
    account = _custom(server)
    granted = server.grant("alice")
    _store(tmp_path, account, refresh_token=granted, access_token="old", expires_at=1.0,
           issued_at=0.0)  # fmt: skip
    server.refresh_delay = 0.5  # both callers are inside access_token at once
    got: list[str] = []
    callers = [
        threading.Thread(target=lambda: got.append(access_token(account, tmp_path)))
        for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    assert len(got) == 2
    assert got[0] == got[1]
    assert server.access_valid(got[0])
    # Without the lock both would spend the same rotating refresh token.
    assert server.refresh_requests == 1


def test_invalid_grant_is_auth_with_the_login_hint(tmp_path: Path, server: AuthServer) -> None:
    """A refused refresh token raises OAuth2Error (77) naming `popsync oauth2 login a`."""
    account = _custom(server)
    _store(tmp_path, account, refresh_token="rt-unknown")
    with pytest.raises(OAuth2Error) as info:
        access_token(account, tmp_path)
    assert info.value.exit_code == ExitCode.AUTH
    assert "invalid_grant" in str(info.value)
    assert "run `popsync oauth2 login a` to log in again" in str(info.value)


def test_wrong_client_is_auth(tmp_path: Path, server: AuthServer) -> None:
    """invalid_client (a wrong client id) is an authentication failure too."""
    server.client_id = "someone-else"
    account = _custom(server)
    server.client_id = "popsync-test"
    _store(tmp_path, account, refresh_token=server.grant("alice"))
    with pytest.raises(OAuth2Error, match="refused: invalid_client"):
        access_token(account, tmp_path)


def test_unreachable_endpoint_is_temporary(tmp_path: Path) -> None:
    """A refused connection to the token endpoint raises TokenEndpointError (75)."""
    account = _account(
        auth="xoauth2",
        oauth2_provider="custom",
        oauth2_client_id="c",
        oauth2_token_url="http://127.0.0.1:9/token",
        oauth2_device_url="http://127.0.0.1:9/device",
    )
    _store(tmp_path, account)
    with pytest.raises(TokenEndpointError) as info:
        access_token(account, tmp_path)
    assert info.value.exit_code == ExitCode.TEMPORARY


def test_missing_or_damaged_token_file(tmp_path: Path) -> None:
    """No token: 77 with the login command; a damaged file is reported, not overwritten."""
    account = _account(auth="xoauth2", oauth2_provider="google", oauth2_client_id="c")
    with pytest.raises(OAuth2Error, match=r"run `popsync oauth2 login a` first"):
        access_token(account, tmp_path)
    assert check_account(account, tmp_path) == [
        "no OAuth2 token stored yet; run `popsync oauth2 login a`"
    ]
    path = token_path(tmp_path, "a")
    path.parent.mkdir()
    path.write_text("{half")
    with pytest.raises(OAuth2Error, match="is damaged"):
        access_token(account, tmp_path)
    assert path.read_text() == "{half"


def test_token_of_another_client_needs_a_new_login(tmp_path: Path) -> None:
    """A token stored for another client id or provider is not sent to this one."""
    account = _account(auth="xoauth2", oauth2_provider="google", oauth2_client_id="c")
    _store(tmp_path, account, client_id="other", access_token="a", issued_at=time.time(),
           expires_at=time.time() + 3600)  # fmt: skip
    with pytest.raises(OAuth2Error, match="belongs to another client"):
        access_token(account, tmp_path)


def test_microsoft_accounts_send_xoauth2_in_two_steps(tmp_path: Path) -> None:
    """Exchange Online gets AUTH XOAUTH2, then the response after "+", with the cached token."""
    import base64

    from popsync.session import open_session
    from tests.fake_pop3 import Expect, FakePop3Server, Send, StartTLS, Step

    response = base64.b64encode(b"user=jane@example.org\x01auth=Bearer at-cached\x01\x01")
    steps: list[Step] = [
        StartTLS(),
        Send(b"+OK ready\r\n"),
        Expect(b"CAPA", reply=b"+OK\r\nSASL XOAUTH2\r\n.\r\n"),
        Expect(b"AUTH XOAUTH2", reply=b"+ \r\n"),
        Expect(response, reply=b"+OK logged in\r\n"),
    ]
    with FakePop3Server(steps) as server:
        text = _BASE.replace('"pop.example.org"', f'"{server.host}"') + (
            f'port = {server.port}\ntls_ca_file = "{server.ca_file}"\n'
            'auth = "xoauth2"\noauth2_provider = "microsoft"\noauth2_client_id = "c"\n'
        )
        account = parse_config(text).accounts["a"]
        now = time.time()
        _store(tmp_path, account, access_token="at-cached", issued_at=now, expires_at=now + 3600)
        client = open_session(account, access_token(account, tmp_path))
        client.close()
    server.check()
