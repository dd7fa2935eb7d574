"""Built-in OAuth2 for XOAUTH2 / OAUTHBEARER accounts: log in once, refresh forever.

``popsync oauth2 login ACCOUNT`` obtains the first refresh token, by the device-authorization
grant (RFC 8628) where the provider allows it for mail (Microsoft), or by the installed-app
flow with a loopback redirect and PKCE (RFC 8252, RFC 7636) where it does not (Google). Every
sync then calls :func:`access_token`, which returns the cached access token while it has more
than a margin of validity left and otherwise refreshes it (RFC 6749 section 6).

The token file (``state_dir/oauth2/ACCOUNT.json``, mode 0600) is only ever replaced whole by
:func:`popsync.statefile.write_atomic`: a rotated refresh token is on disk (fsynced, renamed)
before the access token that came with it is used, and a crash at any instruction leaves the
old file or the new one. Providers keep the old refresh token valid until its successor is
used, so even a kill -9 after the provider answered and before the rename loses nothing.
A refresh holds ``state_dir/locks/oauth2-ACCOUNT.lock`` (flock) from reading the file to
storing its successor, and re-reads the file once it has the lock: two processes (the daemon
and a `popsync test` or `ls`, which do not take the account's lock) never both spend the same
rotating refresh token, and the second simply uses the token the first stored.

HTTP and OAuth2 are authlib's ``OAuth2Client`` over httpx2 (see docs/internals.md for why);
both are imported only here and only when an OAuth2 account runs.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import secrets
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from popsync.errors import ExitCode, LocalIOError, NetworkError, PopsyncError
from popsync.statefile import write_atomic
from popsync.textsafe import safe_text

if TYPE_CHECKING:
    from authlib.integrations.httpx_client import OAuth2Client

    from popsync.config import Account

__all__ = [
    "DEVICE_GRANT",
    "PROVIDERS",
    "Endpoints",
    "OAuth2Error",
    "StoredToken",
    "TokenEndpointError",
    "access_token",
    "check_account",
    "endpoints",
    "load_token",
    "login",
    "token_path",
]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: An access token is refreshed when less than this share of its lifetime is left...
_MARGIN_SHARE = 0.25
#: ...or less than this many seconds, whichever is smaller.
_MARGIN_MAX = 300.0
#: How long `popsync oauth2 login` waits for the browser's redirect or the device approval.
LOGIN_TIMEOUT = 600.0
_MAX_TOKEN_FILE = 1 << 16
#: Seconds a refresh waits for another process's refresh of the same account to end.
REFRESH_LOCK_WAIT = 60.0
_MAX_SERVER_TEXT = 300


@dataclass(frozen=True)
class Endpoints:
    """Where to get tokens for one account, and which login flow to use."""

    token_url: str
    scope: str
    device_url: str | None = None
    auth_url: str | None = None
    #: Extra query parameters for the authorization URL.
    auth_params: tuple[tuple[str, str], ...] = ()

    @property
    def flow(self) -> str:
        return "device" if self.device_url else "loopback"


# Presets, checked against the providers' documentation (tests/unit/test_oauth2.py):
# Microsoft identity platform v2.0 endpoints, device code flow:
#   https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code
#   POST https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode, then .../token.
# POP scope: https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/
#   how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
#   ("https://outlook.office.com/POP.AccessAsUser.All"; offline_access for a refresh token).
# Google, installed apps (loopback redirect + PKCE):
#   https://developers.google.com/identity/protocols/oauth2/native-app
#   https://accounts.google.com/o/oauth2/v2/auth and https://oauth2.googleapis.com/token;
#   access_type=offline for a refresh token. Gmail POP/IMAP scope "https://mail.google.com/":
#   https://developers.google.com/gmail/imap/xoauth2-protocol. Google's device flow does not
#   allow that scope (its "allowed scopes" list for TVs and limited-input devices).
MICROSOFT_BASE = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
MICROSOFT_SCOPE = "https://outlook.office.com/POP.AccessAsUser.All offline_access"
GOOGLE_AUTH_URL = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
GOOGLE_SCOPE = "https://mail.google.com/"
PROVIDERS = ("google", "microsoft", "custom")


def endpoints(account: Account) -> Endpoints:
    """The account's endpoints: its provider's preset, or its own URLs for "custom"."""
    provider = account.oauth2_provider
    if provider == "microsoft":
        base = MICROSOFT_BASE.format(tenant=urllib.parse.quote(account.oauth2_tenant or "common"))
        return Endpoints(
            token_url=f"{base}/token",
            device_url=f"{base}/devicecode",
            scope=account.oauth2_scope or MICROSOFT_SCOPE,
        )
    if provider == "google":
        return Endpoints(
            token_url=GOOGLE_TOKEN_URL,
            auth_url=GOOGLE_AUTH_URL,
            scope=account.oauth2_scope or GOOGLE_SCOPE,
            # A refresh token only with offline access, and again on every consent.
            auth_params=(("access_type", "offline"), ("prompt", "consent")),
        )
    assert account.oauth2_token_url is not None  # config enforces it for "custom"
    return Endpoints(
        token_url=account.oauth2_token_url,
        device_url=account.oauth2_device_url,
        auth_url=account.oauth2_auth_url,
        scope=account.oauth2_scope or "",
    )


# ------------------------------------------------------------------------------ errors
class OAuth2Error(PopsyncError):
    """The provider refused (invalid_grant, invalid_client...) or no token is stored: 77."""

    exit_code = ExitCode.AUTH


class TokenEndpointError(NetworkError):
    """The token endpoint could not be reached or answered garbage: retry later (75)."""


def _clean(text: object) -> str:
    """Server-sent text, bounded and without control characters, fit for one log line."""
    return safe_text(str(text), _MAX_SERVER_TEXT, cut="brief")


def _login_hint(account: Account) -> str:
    return f"run `popsync oauth2 login {account.name}` to log in again"


# ------------------------------------------------------------------------- token file
@dataclass(frozen=True)
class StoredToken:
    """What ``state_dir/oauth2/ACCOUNT.json`` holds."""

    refresh_token: str
    client_id: str
    token_url: str
    access_token: str | None = None
    #: Unix times; None when the provider gave no lifetime (then refreshed every run).
    expires_at: float | None = None
    issued_at: float | None = None

    def usable(self, now: float) -> bool:
        """True while the access token has more than the margin of its lifetime left."""
        if not self.access_token or self.expires_at is None or self.issued_at is None:
            return False
        lifetime = max(0.0, self.expires_at - self.issued_at)
        margin = min(_MARGIN_MAX, lifetime * _MARGIN_SHARE)
        return self.expires_at - now > margin


def token_path(state_dir: Path, account: str) -> Path:
    return state_dir / "oauth2" / f"{account}.json"


def load_token(path: Path) -> StoredToken | None:
    """The stored token, or None when there is none; OAuth2Error when it is unreadable."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_TOKEN_FILE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OAuth2Error(f"cannot read the OAuth2 token file {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
        return StoredToken(**{k: data[k] for k in data if k in StoredToken.__dataclass_fields__})
    except (ValueError, TypeError, KeyError):
        raise OAuth2Error(f"the OAuth2 token file {path} is damaged") from None


def _save(path: Path, token: StoredToken) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(token), indent=1).encode() + b"\n")


# ----------------------------------------------------------------------------- client
def _client_secret(account: Account) -> str | None:
    """The client secret, from a file (a bare name is a systemd credential), or None."""
    path = account.oauth2_client_secret_file
    if path is None:
        return None
    if not path.is_absolute():
        credentials = os.environ.get("CREDENTIALS_DIRECTORY", "")
        if not credentials:
            raise OAuth2Error(
                f"oauth2_client_secret_file: relative path {str(path)!r} needs "
                "$CREDENTIALS_DIRECTORY (systemd LoadCredential=); use an absolute path otherwise"
            )
        path = Path(credentials) / path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OAuth2Error(f"oauth2_client_secret_file {path} is not a regular file")
            text = handle.read(_MAX_TOKEN_FILE).decode("utf-8").strip()
    except OSError as exc:
        raise OAuth2Error(f"cannot read oauth2_client_secret_file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise OAuth2Error(f"oauth2_client_secret_file {path} is not UTF-8") from None
    if not text:
        raise OAuth2Error(f"oauth2_client_secret_file {path} is empty")
    return text


def _client(account: Account, **kwargs: Any) -> OAuth2Client:
    from authlib.integrations.httpx_client import OAuth2Client

    assert account.oauth2_client_id is not None  # config enforces it
    secret = _client_secret(account)
    return OAuth2Client(
        client_id=account.oauth2_client_id,
        client_secret=secret,
        # A public client (no secret) identifies itself by client_id in the body.
        token_endpoint_auth_method="client_secret_post" if secret else "none",
        timeout=account.timeout,
        **kwargs,
    )


def _token_call(account: Account, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one token-endpoint request; map every failure to OAuth2Error or TokenEndpointError."""
    import httpx2
    from authlib.integrations.base_client import OAuthError

    try:
        token = call()
    except OAuthError as exc:
        raise _refused(account, exc.error, exc.description) from None
    except httpx2.HTTPStatusError as exc:
        status = exc.response.status_code
        if status >= 500 or status == 429:
            raise TokenEndpointError(
                f"accounts.{account.name}: token endpoint answered HTTP {status}; will retry"
            ) from None
        raise OAuth2Error(
            f"accounts.{account.name}: token endpoint answered HTTP {status}"
        ) from None
    except httpx2.HTTPError as exc:
        reason = _clean(exc) or type(exc).__name__
        raise TokenEndpointError(
            f"accounts.{account.name}: cannot reach the token endpoint: {reason}"
        ) from None
    except ValueError as exc:  # a body that is not a JSON object
        raise TokenEndpointError(f"accounts.{account.name}: {_clean(exc)}") from None
    if not isinstance(token.get("access_token"), str) or not token["access_token"]:
        raise TokenEndpointError(f"accounts.{account.name}: token response without access_token")
    return token


def _refused(account: Account, error: object, description: object) -> OAuth2Error:
    code = _clean(error or "error")
    detail = f" ({_clean(description)})" if description else ""
    if code == "invalid_grant":
        return OAuth2Error(
            f"accounts.{account.name}: the provider refused the refresh token "
            f"(invalid_grant{detail}); {_login_hint(account)}"
        )
    return OAuth2Error(f"accounts.{account.name}: the token endpoint refused: {code}{detail}")


def _stored(
    account: Account, where: Endpoints, token: dict[str, Any], old: str | None, now: float
) -> StoredToken:
    refresh = token.get("refresh_token") or old
    if not isinstance(refresh, str) or not refresh:
        raise OAuth2Error(
            f"accounts.{account.name}: the provider issued no refresh token (for Microsoft "
            "the scope needs offline_access; Google needs a fresh consent)"
        )
    expires_in = token.get("expires_in")
    try:
        lifetime = float(expires_in) if expires_in is not None else None
    except (TypeError, ValueError):
        lifetime = None
    assert account.oauth2_client_id is not None
    return StoredToken(
        refresh_token=refresh,
        client_id=account.oauth2_client_id,
        token_url=where.token_url,
        access_token=str(token["access_token"]),
        expires_at=None if lifetime is None else now + lifetime,
        issued_at=now,
    )


# --------------------------------------------------------------------------- refresh
def access_token(
    account: Account, state_dir: Path, *, clock: Callable[[], float] = time.time
) -> str:
    """A valid access token for ``account``: the cached one, or a freshly refreshed one.

    The caller holds the account's lock. Raises OAuth2Error (77) when there is no token or
    the provider refused it, TokenEndpointError (75) when the endpoint is unreachable.
    """
    path = token_path(state_dir, account.name)
    stored = load_token(path)
    if stored is None:
        raise OAuth2Error(
            f"accounts.{account.name}: no OAuth2 token stored in {path}; "
            f"run `popsync oauth2 login {account.name}` first"
        )
    where = endpoints(account)
    if stored.client_id != account.oauth2_client_id or stored.token_url != where.token_url:
        raise OAuth2Error(
            f"accounts.{account.name}: the stored OAuth2 token belongs to another client or "
            f"provider; {_login_hint(account)}"
        )
    if stored.usable(clock()):
        return str(stored.access_token)
    with _refresh_lock(state_dir, account.name):
        return _refresh(account, path, where, clock)


def _refresh(account: Account, path: Path, where: Endpoints, clock: Callable[[], float]) -> str:
    """Refresh under the lock; another process may have done it while we waited."""
    stored = load_token(path)
    now = clock()
    if stored is None:
        raise OAuth2Error(f"accounts.{account.name}: the OAuth2 token file {path} disappeared")
    if stored.usable(now):
        return str(stored.access_token)
    with _client(account) as client:
        token = _token_call(
            account,
            lambda: dict(
                client.refresh_token(
                    where.token_url,
                    refresh_token=stored.refresh_token,
                    **({"scope": where.scope} if where.scope else {}),
                )
            ),
        )
    fresh = _stored(account, where, token, stored.refresh_token, now)
    # On disk before use: a rotated refresh token must never exist only in memory.
    try:
        _save(path, fresh)
    except OSError as exc:
        raise LocalIOError(f"cannot store the OAuth2 token in {path}: {exc.strerror}") from None
    assert fresh.access_token is not None
    return fresh.access_token


@contextmanager
def _refresh_lock(state_dir: Path, account: str) -> Iterator[None]:
    """Hold the account's refresh lock, waiting at most `REFRESH_LOCK_WAIT` seconds for it."""
    folder = state_dir / "locks"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(folder / f"oauth2-{account}.lock", flags, 0o600)
    try:
        deadline = time.monotonic() + REFRESH_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TokenEndpointError(
                        f"accounts.{account}: another popsync process has been refreshing the "
                        f"OAuth2 token for {REFRESH_LOCK_WAIT:g}s; try again later"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def check_account(account: Account, state_dir: Path) -> list[str]:
    """Problems `popsync check-config` reports for an OAuth2 account, without the network."""
    problems = []
    try:
        _client_secret(account)
        if load_token(token_path(state_dir, account.name)) is None:
            problems.append(
                f"no OAuth2 token stored yet; run `popsync oauth2 login {account.name}`"
            )
    except OAuth2Error as exc:
        problems.append(str(exc))
    return problems


# ----------------------------------------------------------------------------- login
def login(
    account: Account,
    state_dir: Path,
    out: TextIO,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = LOGIN_TIMEOUT,
) -> Path:
    """Run the account's login flow, store the refresh token, return the token file's path."""
    where = endpoints(account)
    if where.device_url:
        token = _device_login(account, where, out, clock, sleep, timeout)
    elif where.auth_url:
        token = _loopback_login(account, where, out, timeout)
    else:  # pragma: no cover - config requires one of the two
        raise OAuth2Error(f"accounts.{account.name}: no device or authorization URL")
    path = token_path(state_dir, account.name)
    _save(path, _stored(account, where, token, None, clock()))
    return path


def _device_login(
    account: Account,
    where: Endpoints,
    out: TextIO,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    timeout: float,
) -> dict[str, Any]:
    """RFC 8628: ask for a user code, show it, poll the token endpoint until approved."""
    import httpx2

    assert where.device_url is not None
    with _client(account) as client:
        data: dict[str, Any] = {"client_id": account.oauth2_client_id}
        if where.scope:
            data["scope"] = where.scope
        try:
            # withhold_token: this request is how we get one.
            response = client.request("POST", where.device_url, data=data, withhold_token=True)
            grant = response.json()
        except (httpx2.HTTPError, ValueError) as exc:
            raise TokenEndpointError(
                f"accounts.{account.name}: device authorization failed: {_clean(exc)}"
            ) from None
        if not isinstance(grant, dict) or "device_code" not in grant:
            error = grant.get("error") if isinstance(grant, dict) else None
            description = grant.get("error_description") if isinstance(grant, dict) else None
            raise _refused(account, error or f"HTTP {response.status_code}", description)
        uri = grant.get("verification_uri") or grant.get("verification_url") or "?"
        out.write(
            f"To authorize popsync for {account.name}, open {_clean(uri)}\n"
            f"and enter the code {_clean(grant.get('user_code', '?'))}\n"
        )
        out.flush()
        interval = max(1.0, float(grant.get("interval") or 5))
        deadline = clock() + min(timeout, float(grant.get("expires_in") or timeout))
        while clock() < deadline:
            sleep(interval)
            try:
                return _token_call(
                    account,
                    lambda: dict(
                        client.fetch_token(
                            where.token_url,
                            grant_type=DEVICE_GRANT,
                            device_code=grant["device_code"],
                        )
                    ),
                )
            except OAuth2Error as exc:
                if "authorization_pending" in str(exc):
                    continue
                if "slow_down" in str(exc):
                    interval += 5  # RFC 8628 section 3.5
                    continue
                raise
    raise OAuth2Error(f"accounts.{account.name}: the code was not entered in time; try again")


class _Redirect(http.server.BaseHTTPRequestHandler):
    """Receives the browser's redirect to http://127.0.0.1:PORT/?code=...&state=..."""

    received: list[str]

    def do_GET(self) -> None:
        query = urllib.parse.urlsplit(self.path).query
        if "code=" not in query and "error=" not in query:
            self.send_error(404)
            return
        self.received.append(self.path)
        body = b"popsync: authorization received; you can close this window.\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _loopback_login(
    account: Account, where: Endpoints, out: TextIO, timeout: float
) -> dict[str, Any]:
    """RFC 8252 + RFC 7636: a browser URL, a one-shot listener on 127.0.0.1, PKCE S256."""
    assert where.auth_url is not None
    received: list[str] = []
    handler = type("Handler", (_Redirect,), {"received": received})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 1.0
    redirect_uri = f"http://127.0.0.1:{server.server_port}/"
    verifier = secrets.token_urlsafe(64)
    try:
        with _client(
            account,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            scope=where.scope or None,
        ) as client:
            url, state = client.create_authorization_url(
                where.auth_url, code_verifier=verifier, **dict(where.auth_params)
            )
            out.write(
                f"To authorize popsync for {account.name}, open this URL in a browser:\n{url}\n"
                f"(waiting for the redirect to {redirect_uri})\n"
            )
            out.flush()
            deadline = time.monotonic() + timeout
            while not received and time.monotonic() < deadline:
                server.handle_request()
            if not received:
                raise OAuth2Error(f"accounts.{account.name}: no redirect arrived in time")
            response = redirect_uri.rstrip("/") + received[0]
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(response).query))
            if "error" in query:
                raise _refused(account, query["error"], query.get("error_description"))
            if query.get("state") != state:
                raise OAuth2Error(f"accounts.{account.name}: the redirect's state does not match")
            return _token_call(
                account,
                lambda: dict(
                    client.fetch_token(
                        where.token_url,
                        authorization_response=response,
                        code_verifier=verifier,
                        state=state,
                    )
                ),
            )
    finally:
        server.server_close()
