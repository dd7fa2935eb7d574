"""Open a logged-in POP3 session for an account, and say plainly what is wrong when it fails.

:func:`open_session` is the one way the sync engine, ``popsync test``, ``ls`` and
``mark-seen`` connect: TLS context from the account's keys, connect, greeting, CAPA, STLS,
CAPA, UTF8, login, in mpop's order. With a ``report`` callback every step is described as
it happens (``popsync test``).

Misconfigurations become :class:`~popsync.errors.ConfigError` (exit 78, retried only slowly
by the daemon) with one line that says what to change, instead of temporary trouble:

* implicit TLS on a plain port: the handshake fails and a second, plain connection is
  greeted with ``+OK`` -> use ``tls = "starttls"`` or the POP3S port;
* STARTTLS or plain on a POP3S port: no greeting within :data:`GREETING_PATIENCE` and a
  TLS handshake on a second connection succeeds -> use ``tls = "implicit"``;
* an untrusted certificate -> the exact ``tls_fingerprint`` line that pins it, or
  ``tls_ca_file``; a host name mismatch -> the names the certificate holds.

The diagnoses cost a second connection, and only after a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from popsync import net
from popsync.client import Pop3Client, StartTlsUnavailable
from popsync.errors import CertificateError, ConfigError, TlsError
from popsync.textsafe import safe_text

if TYPE_CHECKING:
    from popsync.config import Account

__all__ = [
    "GREETING_PATIENCE",
    "Report",
    "certificate_lines",
    "clean_text",
    "open_session",
    "tls_context",
]

#: Seconds a plain connection may stay silent before popsync checks whether the port
#: expects TLS at once. Real servers greet within milliseconds; a POP3S port never does.
GREETING_PATIENCE = 3.0
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_IP_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH

#: ``report(step, text)``: one line per step of a session, for ``popsync test``.
Report = Callable[[str, str], None]


def clean_text(text: str | bytes, limit: int = 200) -> str:
    """Server-sent text for a one-line report: `popsync.textsafe.safe_text`, cut briefly."""
    return safe_text(text, limit, cut="brief")


def tls_context(account: Account) -> net.SSLContext | None:
    """The account's TLS context; a CA bundle that cannot be loaded is a ConfigError."""
    if account.tls == "none":
        return None
    try:
        return net.shared_client_context(
            account.tls_ca_file,
            verify=account.tls_verify,
            fingerprints=account.tls_fingerprint,
        )
    except ConfigError as exc:
        raise ConfigError(
            [f"accounts.{account.name}.tls_ca_file: {problem}" for problem in exc.problems]
        ) from None


def _quiet(step: str, text: str) -> None:
    """The report of a session nobody watches."""


def open_session(
    account: Account,
    secret: str | None,
    *,
    report: Report | None = None,
    on_activity: Callable[[], None] | None = None,
) -> Pop3Client:
    """Connect, upgrade to TLS as configured and log in (unless ``secret`` is None).

    Raises :class:`~popsync.errors.ConfigError` with a diagnosis for a misconfigured
    ``tls``, ``port`` or certificate trust, and the client's own errors otherwise.
    All of it is the login phase, bounded by ``login_timeout`` as a whole
    (:class:`popsync.net.PhaseTimeout`); ``on_activity`` is called whenever data arrives.
    """
    say = report or _quiet
    context = tls_context(account)
    say("connect", f"{account.host}:{account.port} (tls = {account.tls!r})")
    pace = net.Pace.budget("login", account.login_timeout, "login_timeout")
    client = _connect(account, context, pace, on_activity)
    try:
        _describe_tls(client, say)
        say("greeting", clean_text(client.welcome.text))
        caps = client.capabilities()
        say("capabilities", _caps(caps))
        if account.tls == "starttls":
            _starttls(account, client, context, say)
            caps = client.capabilities()
            say("capabilities after TLS", _caps(caps))
        if secret is None:
            return client
        if account.utf8 and "UTF8" in caps:
            client.utf8()
            say("utf8", "UTF8 mode on")
        say("login", f"as {clean_text(account.username)} with auth = {account.auth!r}{_sasl(caps)}")
        client.login(
            account.username,
            secret,
            mechanism=account.auth,
            allow_plaintext=account.allow_plaintext,
            # Exchange Online's POP3 takes XOAUTH2 only in two steps (AUTH, "+", response).
            oauth_two_step=account.oauth2_provider == "microsoft",
        )
    except BaseException:
        client.close()
        raise
    return client


def _caps(caps: dict[str, tuple[str, ...]]) -> str:
    if not caps:
        return "(none: the server does not support CAPA)"
    return clean_text(" ".join(" ".join((name, *args)) for name, args in sorted(caps.items())), 400)


def _sasl(caps: dict[str, tuple[str, ...]]) -> str:
    offered = caps.get("SASL", ())
    return f" (server offers SASL {clean_text(' '.join(offered))})" if offered else ""


def _connect(
    account: Account,
    context: net.SSLContext | None,
    pace: net.Pace,
    on_activity: Callable[[], None] | None,
) -> Pop3Client:
    implicit = account.tls == "implicit"
    try:
        stream = net.connect(
            account.host,
            account.port,
            timeout=account.timeout,
            context=context if implicit else None,
            pace=pace,
        )
    except CertificateError as exc:
        raise _certificate_problem(account, exc) from exc
    except TlsError as exc:
        if implicit:
            _check_plain_port(account, exc)
        raise
    stream.on_activity = on_activity
    try:
        if not implicit:
            _check_tls_port(account, stream)
        return Pop3Client(stream, pipelining=account.pipelining != "off")
    except BaseException:
        stream.close()
        raise


def _check_plain_port(account: Account, exc: TlsError) -> None:
    """After a failed implicit-TLS handshake: does this port greet in plain text?"""
    greeting = net.probe_greeting(
        account.host, account.port, min(account.timeout, GREETING_PATIENCE)
    )
    if greeting is not None and greeting.startswith((b"+OK", b"-ERR")):
        raise ConfigError(
            [
                f"accounts.{account.name}.tls: port {account.port} speaks plain POP3 (it "
                f'greeted "{clean_text(greeting, 60)}"), not implicit TLS: set tls = '
                '"starttls" for this port, or port = 995 for implicit TLS'
            ]
        ) from exc


def _check_tls_port(account: Account, stream: net.Stream) -> None:
    """A plain connection that stays silent: does this port expect TLS at once?"""
    patience = min(account.timeout, GREETING_PATIENCE)
    if stream.readable_within(patience):
        return
    if net.probe_tls(account.host, account.port, patience):
        raise ConfigError(
            [
                f"accounts.{account.name}.tls: port {account.port} expects TLS at once "
                f"(POP3S; no greeting in {patience:g}s, a TLS handshake succeeded) but tls = "
                f'"{account.tls}": set tls = "implicit", or port = 110 for {account.tls}'
            ]
        )
    # Only slow: Pop3Client waits for the greeting for the whole timeout.


def _starttls(
    account: Account, client: Pop3Client, context: net.SSLContext | None, say: Report
) -> None:
    assert context is not None
    if "STLS" not in client.capabilities():
        raise StartTlsUnavailable(
            f"{client.host}:{client.port}: TLS is required but the server does not offer STLS"
        )
    try:
        client.stls(context, account.host)
    except CertificateError as exc:
        raise _certificate_problem(account, exc) from exc
    _describe_tls(client, say)


def _describe_tls(client: Pop3Client, say: Report) -> None:
    if say is _quiet:
        return  # decoding the certificate costs a temporary file: only when someone reads it
    der = client.peer_certificate()
    if der is None:
        return
    say("tls", f"{client.tls_version} {client.cipher}")
    for line in certificate_lines(der):
        say("certificate", line)


def _names(decoded: dict[str, Any], field: str) -> str:
    parts = [f"{key}={value}" for rdn in decoded.get(field, ()) for key, value in rdn]
    return clean_text(", ".join(parts) or "?", 300)


def certificate_lines(der: bytes) -> list[str]:
    """Subject, issuer, names, expiry and SHA-256 of a certificate, one per line."""
    decoded = net.decode_certificate(der)
    lines = []
    if decoded:
        lines += [
            f"subject {_names(decoded, 'subject')}",
            f"issuer {_names(decoded, 'issuer')}",
            f"names {_alt_names(decoded) or '(none)'}",
            f"valid until {decoded.get('notAfter', '?')}",
        ]
    lines.append(f"fingerprint {net.certificate_fingerprint(der)}")
    return lines


def _alt_names(decoded: dict[str, Any]) -> str:
    return clean_text(", ".join(value for _, value in decoded.get("subjectAltName", ())), 300)


def _peer_certificate(account: Account) -> bytes | None:
    """Fetch the server's certificate without trusting it, the way the account connects."""
    try:
        if account.tls == "implicit":
            stream = net.connect(
                account.host,
                account.port,
                timeout=min(account.timeout, 10.0),
                context=net.unverified_context(),
            )
            try:
                return stream.peer_certificate()
            finally:
                stream.close()
        with Pop3Client.connect(
            account.host,
            account.port,
            tls="starttls",
            context=net.unverified_context(),
            timeout=min(account.timeout, 10.0),
        ) as client:
            return client.peer_certificate()
    except Exception:
        return None


def _certificate_problem(account: Account, exc: CertificateError) -> ConfigError:
    """Turn a failed certificate check into one line that says what to change."""
    key = f"accounts.{account.name}"
    if exc.fingerprint is not None:
        return ConfigError(
            [
                f"{key}.tls_fingerprint: the server's certificate is {exc.fingerprint}, which "
                "matches no tls_fingerprint: if the server really changed its certificate, "
                f'set tls_fingerprint = "{exc.fingerprint}"'
            ]
        )
    der = _peer_certificate(account)
    if exc.x509_error in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        names = _alt_names(net.decode_certificate(der)) if der else ""
        return ConfigError(
            [
                f"{key}.host: the certificate is not valid for {account.host!r}; it names "
                f"{names or 'other hosts'}: set host to one of those names"
            ]
        )
    detail = str(exc).rsplit(": ", 1)[-1]
    if der is None:
        hint = "set tls_ca_file to the CA bundle (PEM) that signed it"
    else:
        hint = (
            f'to trust exactly this certificate set tls_fingerprint = "'
            f'{net.certificate_fingerprint(der)}", or set tls_ca_file to the CA bundle (PEM) '
            'that signed it (tls_ca_file = ["system", "/path/ca.pem"] keeps the system CAs)'
        )
    return ConfigError([f"{key}.tls: the server certificate is not trusted ({detail}); {hint}"])
