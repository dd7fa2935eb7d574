"""A small OAuth2 authorization server for the tests: token, device, authorize, introspect.

It behaves like the providers popsync must survive, on purpose strictly:

* access tokens expire after ``access_lifetime`` seconds (short, so tests see expiry);
* every refresh rotates the refresh token. The old one stays valid only until the new one
  is first used (the grace the OAuth 2.0 Security BCP describes and Microsoft practises),
  so a client that loses the new token after a crash can still use the old one, but a
  client that keeps using an old token after its successor was used gets ``invalid_grant``;
* the device grant (RFC 8628) answers ``authorization_pending`` until :meth:`approve`;
* the authorization-code grant insists on PKCE S256 (RFC 7636) and a loopback redirect;
* ``/introspect`` (RFC 7662, POST ``token=``) is what Dovecot's oauth2 passdb calls.

Built on the standard library's ``http.server`` on 127.0.0.1, port 0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["AuthServer"]


@dataclass
class _Refresh:
    user: str
    #: The refresh token this one replaced; revoked when this one is first used.
    parent: str | None = None
    used: bool = False


@dataclass
class _Device:
    user: str
    user_code: str
    approved: bool = False
    done: bool = False


@dataclass
class AuthServer:
    """See the module docstring; start with :meth:`start`, stop with :meth:`stop`."""

    client_id: str = "popsync-test"
    client_secret: str | None = None
    access_lifetime: float = 3.0
    #: Seconds /token sleeps before answering a refresh (to kill a client mid-refresh).
    refresh_delay: float = 0.0
    refreshes: int = 0
    _access: dict[str, tuple[str, float]] = field(default_factory=dict)
    _refresh: dict[str, _Refresh] = field(default_factory=dict)
    _devices: dict[str, _Device] = field(default_factory=dict)
    _codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    #: Refresh requests that arrived (answered or not), to see that a client tried.
    refresh_requests: int = 0
    #: The user the next device or code grant is for.
    user: str = "alice"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AuthServer:
        server = self

        class Handler(_Handler):
            auth = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_port}"

    # ------------------------------------------------------------------- control
    def grant(self, user: str) -> str:
        """A fresh refresh token for ``user``, as a finished login would have stored."""
        token = "rt-" + secrets.token_urlsafe(16)
        with self._lock:
            self._refresh[token] = _Refresh(user)
        return token

    def revoke_all(self) -> None:
        """Every refresh and access token becomes invalid (password changed, consent revoked)."""
        with self._lock:
            self._refresh.clear()
            self._access.clear()

    def refresh_valid(self, token: str) -> bool:
        with self._lock:
            return token in self._refresh

    def access_valid(self, token: str) -> bool:
        with self._lock:
            entry = self._access.get(token)
            return entry is not None and entry[1] > time.time()

    def approve(self, user_code: str) -> None:
        """The user entered ``user_code`` at the verification page and consented."""
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code:
                    device.approved = True
                    return
        raise KeyError(user_code)

    # ------------------------------------------------------------------ grants
    def _issue(self, user: str, parent: str | None) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(16)
        refresh = "rt-" + secrets.token_urlsafe(16)
        self._access[access] = (user, time.time() + self.access_lifetime)
        self._refresh[refresh] = _Refresh(user, parent)
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_lifetime,
            "refresh_token": refresh,
            "scope": "pop",
        }

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client"}
        if self.client_secret is not None and form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client"}
        grant = form.get("grant_type")
        if grant == "refresh_token":
            return self._refresh_grant(form.get("refresh_token", ""))
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            return self._device_grant(form.get("device_code", ""))
        if grant == "authorization_code":
            return self._code_grant(form)
        return 400, {"error": "unsupported_grant_type"}

    def _refresh_grant(self, token: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.refresh_requests += 1
        if self.refresh_delay:
            time.sleep(self.refresh_delay)
        with self._lock:
            entry = self._refresh.get(token)
            if entry is None:
                return 400, {"error": "invalid_grant", "error_description": "token revoked"}
            if not entry.used and entry.parent is not None:
                self._refresh.pop(entry.parent, None)  # the successor is in use now
            entry.used = True
            self.refreshes += 1
            return 200, self._issue(entry.user, token)

    def _device_grant(self, code: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            device = self._devices.get(code)
            if device is None or device.done:
                return 400, {"error": "expired_token"}
            if not device.approved:
                return 400, {"error": "authorization_pending"}
            device.done = True
            return 200, self._issue(device.user, None)

    def _code_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            entry = self._codes.pop(form.get("code", ""), None)
            if entry is None:
                return 400, {"error": "invalid_grant"}
            user, challenge, redirect = entry
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge:
                return 400, {"error": "invalid_grant", "error_description": "PKCE failed"}
            if form.get("redirect_uri") != redirect:
                return 400, {"error": "invalid_grant", "error_description": "redirect_uri"}
            return 200, self._issue(user, None)

    def device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client"}
        code = secrets.token_urlsafe(16)
        user_code = secrets.token_hex(4).upper()
        with self._lock:
            self._devices[code] = _Device(self.user, user_code)
        return 200, {
            "device_code": code,
            "user_code": user_code,
            "verification_uri": f"{self.url}/device-login",
            "expires_in": 120,
            "interval": 1,
            "message": f"To sign in, open {self.url}/device-login and enter {user_code}.",
        }

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """Consent at once; return (status, redirect location or error text)."""
        redirect = query.get("redirect_uri", "")
        host = urllib.parse.urlsplit(redirect).hostname
        if query.get("client_id") != self.client_id or host not in ("127.0.0.1", "::1"):
            return 400, "bad client or redirect_uri"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, "PKCE S256 required"
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = (self.user, query["code_challenge"], redirect)
        params = urllib.parse.urlencode({"code": code, "state": query.get("state", "")})
        return 302, f"{redirect}?{params}"

    def introspect(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            entry = self._access.get(form.get("token", ""))
        if entry is None or entry[1] <= time.time():
            return 200, {"active": False}
        return 200, {"active": True, "username": entry[0], "exp": int(entry[1])}


class _Handler(BaseHTTPRequestHandler):
    auth: AuthServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        form = dict(urllib.parse.parse_qsl(body))
        basic = self.headers.get("Authorization", "")
        if basic.startswith("Basic "):
            user, _, password = base64.b64decode(basic[6:]).decode().partition(":")
            form.setdefault("client_id", urllib.parse.unquote_plus(user))
            form.setdefault("client_secret", urllib.parse.unquote_plus(password))
        return form

    def _json(self, status: int, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        form = self._form()
        if path == "/token":
            self._json(*self.auth.token(form))
        elif path == "/device":
            self._json(*self.auth.device(form))
        elif path == "/introspect":
            self._json(*self.auth.introspect(form))
        else:
            self._json(404, {"error": "not found"})

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/authorize":
            self._json(404, {"error": "not found"})
            return
        status, text = self.auth.authorize(dict(urllib.parse.parse_qsl(parts.query)))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", text)
        self.send_header("Content-Length", "0")
        self.end_headers()
