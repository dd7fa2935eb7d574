"""SASL mechanisms for POP3 ``AUTH`` (RFC 5034), as pure objects.

A mechanism turns server challenges into client responses; the driver does the base64
and the I/O. ``initial()`` gives the optional initial response (sent on the AUTH line
itself, RFC 4954 style, when it fits in 255 octets), ``step(challenge)`` answers each
``+`` continuation, and ``succeeded()`` checks the server's ``+OK`` (SCRAM accepts it only
after the server proved it knows the password). Every mechanism answers a fixed, small
number of challenges and refuses more, so a server cannot make popsync send a credential
over and over. No sockets, no clock; the SCRAM nonce may be injected for tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Protocol

from .errors import LocalProtocolError, RemoteProtocolError, SaslAuthError

__all__ = [
    "MAX_SCRAM_ITERATIONS",
    "MECHANISMS",
    "MIN_SCRAM_ITERATIONS",
    "REVEALING",
    "SASL_PREFERENCE",
    "CramMd5",
    "Login",
    "Mechanism",
    "OAuthBearer",
    "Plain",
    "ScramSha256",
    "XOAuth2",
    "apop_digest",
    "credential_forms",
    "make_mechanism",
]


class Mechanism(Protocol):
    """One SASL exchange; a fresh object per attempt."""

    name: str

    def initial(self) -> bytes | None:
        """The initial response, or None if the mechanism starts with a server challenge."""
        ...

    def step(self, challenge: bytes) -> bytes:
        """Answer one decoded server challenge with the raw (not yet base64) response."""
        ...

    def succeeded(self) -> None:
        """The server said ``+OK``; raise :class:`SaslAuthError` if that is not enough."""
        ...


def _utf8(value: str) -> bytes:
    return value.encode("utf-8")


def apop_digest(timestamp: bytes, secret: str) -> bytes:
    """The APOP digest of RFC 1939: hex MD5 of the greeting's timestamp and the secret."""
    digest = hashlib.md5(timestamp + _utf8(secret), usedforsecurity=False)
    return digest.hexdigest().encode("ascii")


class Plain:
    """PLAIN (RFC 4616): authzid NUL authcid NUL password, all in one response."""

    name = "PLAIN"

    def __init__(self, user: str, secret: str, authzid: str = "") -> None:
        self._message = b"\0".join((_utf8(authzid), _utf8(user), _utf8(secret)))
        self._answered = False

    def initial(self) -> bytes | None:
        return self._message

    def step(self, challenge: bytes) -> bytes:
        # Servers that ignore the initial response send an empty challenge; one such
        # repeat is fine, a second would only serve to collect the password again.
        if self._answered:
            raise RemoteProtocolError("PLAIN: server asked for the credentials again")
        self._answered = True
        return self._message

    def succeeded(self) -> None:
        pass


class Login:
    """LOGIN (draft-murchison-sasl-login): the user name, then the password."""

    name = "LOGIN"

    def __init__(self, user: str, secret: str) -> None:
        self._answers = [_utf8(user), _utf8(secret)]

    def initial(self) -> bytes | None:
        return None

    def step(self, challenge: bytes) -> bytes:
        if not self._answers:
            raise RemoteProtocolError("server sent more LOGIN challenges than user and password")
        return self._answers.pop(0)

    def succeeded(self) -> None:
        pass


class CramMd5:
    """CRAM-MD5 (RFC 2195): the user name and the HMAC-MD5 of the challenge."""

    name = "CRAM-MD5"

    def __init__(self, user: str, secret: str) -> None:
        self._user = _utf8(user)
        self._secret = _utf8(secret)
        self._answered = False

    def initial(self) -> bytes | None:
        return None

    def step(self, challenge: bytes) -> bytes:
        # Each answer is a keyed hash an attacker could try to crack offline: give one.
        if self._answered:
            raise RemoteProtocolError("CRAM-MD5: server sent a second challenge")
        self._answered = True
        digest = hmac.new(self._secret, challenge, hashlib.md5).hexdigest()
        return self._user + b" " + digest.encode("ascii")

    def succeeded(self) -> None:
        pass


class XOAuth2:
    """XOAUTH2 (Google, Microsoft): a bearer token.

    ``two_step`` sends ``AUTH XOAUTH2`` alone and the token after the empty ``+``
    challenge, as Office 365's POP3 requires. When the token is refused the server
    sends a JSON error as a challenge; the client must answer with an empty line
    to get the final ``-ERR``.
    """

    name = "XOAUTH2"

    def __init__(self, user: str, token: str, *, two_step: bool = False) -> None:
        self._message = b"user=" + _utf8(user) + b"\x01auth=Bearer " + _utf8(token) + b"\x01\x01"
        self._two_step = two_step
        self._sent = not two_step
        self._acknowledged = False

    def initial(self) -> bytes | None:
        return None if self._two_step else self._message

    def step(self, challenge: bytes) -> bytes:
        if not self._sent:
            self._sent = True
            return self._message
        if self._acknowledged:
            raise RemoteProtocolError("XOAUTH2: server sent more than one error challenge")
        self._acknowledged = True
        return b""  # the challenge was the error report

    def succeeded(self) -> None:
        pass


class OAuthBearer:
    """OAUTHBEARER (RFC 7628), with the GS2 header naming the user."""

    name = "OAUTHBEARER"

    def __init__(self, user: str, token: str, host: str = "", port: int | None = None) -> None:
        fields = [b"n,a=" + _scram_name(user) + b","]
        if host:
            fields.append(b"host=" + _utf8(host))
        if port is not None:
            fields.append(b"port=" + str(port).encode("ascii"))
        fields.append(b"auth=Bearer " + _utf8(token))
        self._message = b"\x01".join(fields) + b"\x01\x01"
        self._acknowledged = False

    def initial(self) -> bytes | None:
        return self._message

    def step(self, challenge: bytes) -> bytes:
        # RFC 7628 3.2.3: after an error challenge the client sends a lone %x01.
        if self._acknowledged:
            raise RemoteProtocolError("OAUTHBEARER: server sent more than one error challenge")
        self._acknowledged = True
        return b"\x01"

    def succeeded(self) -> None:
        pass


#: A hostile server could name a huge iteration count to make the client spin; real servers
#: use 4096 to a few hundred thousand.
MAX_SCRAM_ITERATIONS = 1_000_000
#: RFC 7677 section 4: at least 4096. Fewer would make the proof popsync sends cheap to
#: crack offline, which is exactly what an impostor asking for ``i=1`` hopes for.
MIN_SCRAM_ITERATIONS = 4096


def _scram_name(user: str) -> bytes:
    return _utf8(user).replace(b"=", b"=3D").replace(b",", b"=2C")


class ScramSha256:
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding; verifies the server."""

    name = "SCRAM-SHA-256"

    def __init__(self, user: str, secret: str, *, nonce: str | None = None) -> None:
        self._secret = _utf8(secret)
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._first_bare = b"n=" + _scram_name(user) + b",r=" + self._nonce.encode("ascii")
        self._server_signature: bytes | None = None
        self._done = False

    def initial(self) -> bytes | None:
        return b"n,," + self._first_bare

    def step(self, challenge: bytes) -> bytes:
        if self._server_signature is None:
            return self._client_final(challenge)
        if self._done:
            raise RemoteProtocolError("SCRAM: unexpected extra challenge")
        fields = _scram_fields(challenge)
        if "e" in fields:
            # The server's own error names what it disliked; server text, so kept short.
            raise SaslAuthError(f"SCRAM: server reports error {fields['e'][:60]!r}")
        if "v" not in fields:
            raise SaslAuthError("SCRAM: server final message has no signature (v=)")
        try:
            signature = base64.b64decode(fields["v"], validate=True)
        except ValueError:
            raise SaslAuthError("SCRAM: server signature is not base64") from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise SaslAuthError("SCRAM: server signature does not match (an impostor?)")
        self._done = True
        return b""

    def succeeded(self) -> None:
        # RFC 5802 section 5: success without a verified v= is an authentication failure.
        if not self._done:
            raise SaslAuthError(
                "SCRAM: server accepted the login without proving it knows the password "
                "(no server signature); not trusting it"
            )

    def _client_final(self, server_first: bytes) -> bytes:
        fields = _scram_fields(server_first)
        try:
            nonce, salt = fields["r"], base64.b64decode(fields["s"])
            iterations = int(fields["i"])
            wire_nonce = nonce.encode("ascii")  # a non-ASCII nonce is a server error
        except (KeyError, ValueError) as exc:
            raise RemoteProtocolError(f"SCRAM: malformed server-first message: {exc}") from None
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise RemoteProtocolError("SCRAM: server nonce is invalid")
        if iterations < MIN_SCRAM_ITERATIONS:
            raise SaslAuthError(
                f"SCRAM: server asks for {iterations} iterations, fewer than the "
                f"{MIN_SCRAM_ITERATIONS} RFC 7677 requires; not sending a proof"
            )
        if iterations > MAX_SCRAM_ITERATIONS:
            raise RemoteProtocolError("SCRAM: server iteration count is invalid")
        salted = hashlib.pbkdf2_hmac("sha256", self._secret, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = b"c=biws,r=" + wire_nonce
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return without_proof + b",p=" + base64.b64encode(proof)


def _scram_fields(message: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in message.decode("utf-8", "replace").split(","):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


#: Mechanism names popsync can speak, strongest first (what ``auth = "auto"`` tries).
SASL_PREFERENCE = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")

MECHANISMS = frozenset({*SASL_PREFERENCE, "XOAUTH2", "OAUTHBEARER"})

#: Mechanisms and login verbs that hand the server the secret itself (or a bearer token
#: anyone may replay): over an unencrypted connection, everyone on the path learns it.
REVEALING = frozenset({"USER", "RPOP", "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"})


def credential_forms(
    user: str, secret: str, *, host: str = "", port: int | None = None
) -> list[str]:
    """Every form in which popsync may send ``secret``: as is, and base64 as SASL sends it.

    Used to scrub a server's echo of what it was sent (``-ERR bad password hunter2``)
    from anything popsync shows. Hashes (APOP, CRAM-MD5, SCRAM) do not reveal the secret
    and are not listed.
    """
    raws = [
        _utf8(secret),  # PASS, RPOP, the LOGIN password step
        Plain(user, secret)._message,
        XOAuth2(user, secret)._message,
        OAuthBearer(user, secret, host, port)._message,
    ]
    forms = {secret}
    for raw in raws:
        encoded = base64.b64encode(raw).decode("ascii")
        forms.update((encoded, encoded.rstrip("=")))
    return sorted(forms, key=len, reverse=True)


def make_mechanism(name: str, user: str, secret: str, **options: object) -> Mechanism:
    """Build the mechanism called ``name`` (case-insensitive) for one attempt."""
    key = name.upper()
    if key == "PLAIN":
        return Plain(user, secret)
    if key == "LOGIN":
        return Login(user, secret)
    if key == "CRAM-MD5":
        return CramMd5(user, secret)
    if key == "SCRAM-SHA-256":
        return ScramSha256(user, secret)
    if key == "XOAUTH2":
        return XOAuth2(user, secret, two_step=bool(options.get("two_step", False)))
    if key == "OAUTHBEARER":
        host = options.get("host", "")
        port = options.get("port")
        return OAuthBearer(user, secret, str(host), port if isinstance(port, int) else None)
    raise LocalProtocolError(f"unsupported SASL mechanism {name!r}")
