"""The socket seam: the only popsync module that imports :mod:`socket` or :mod:`ssl`.

Opens TCP connections (IPv4 or IPv6, plain or implicit TLS), upgrades them with
STARTTLS, and maps every :class:`OSError` and :class:`ssl.SSLError` to popsync's own
errors exactly once, here (the httpx transport pattern), so callers never see a raw
socket exception:

* a timeout -> :class:`NetworkTimeout` (a :class:`~popsync.errors.NetworkError`);
* refused, reset, unreachable, unknown host -> :class:`~popsync.errors.NetworkError`;
* a certificate that fails verification -> :class:`~popsync.errors.CertificateError`;
* any other TLS failure -> :class:`~popsync.errors.TlsError`.

Trust is built by :func:`client_context`: the system CAs, only the given CA bundles, both
(``"system"`` among them), or certificate pinning (``tls_fingerprint``), where the leaf
certificate's SHA-256 must match and its chain and names do not matter.

TLS is cheap on the second connection: :func:`shared_client_context` keeps one context per
set of TLS settings (and per content of the CA files: a replaced bundle gets a new one), so a
daemon does not parse the system's CA store on every run; and every TLS stream offers the last
session of its (context, host, port, name) for resumption, saved when a stream closes. A
resumed handshake skips the certificate chain, its verification and the server's signature
(both sides save most of the handshake's CPU). The session proves the peer once verified
under the same context, so trust is unchanged; a server that declines simply does a full
handshake. The probes at the
end (:func:`probe_greeting`, :func:`probe_tls`) open a second, short connection to tell a
misconfiguration (implicit TLS on a plain port, or the reverse) from a network problem.

Timeouts come in three kinds, all enforced here so that no clock enters the sans-I/O core:

* ``timeout``: how long one network operation (resolve, connect, one read) may wait;
* a phase *deadline* (:class:`Pace`): a wall-clock budget for a whole phase, such as
  connect + TLS + greeting + login, so a server dripping one byte per second cannot
  stretch a phase forever. Every wait is cut to what is left of the budget;
* a minimum *rate* (:class:`Pace`, after curl's ``--speed-limit``/``--speed-time``): when
  fewer than ``low_speed_limit`` bytes per second arrive during ``low_speed_time``
  seconds spent waiting for the server, the transfer is abandoned. A big message on a
  slow link passes, a drip does not.

Running out of either raises :class:`PhaseTimeout`, whose text names the phase and the
config key to raise. Name resolution runs in a helper thread so that it, too, honours
the timeout (``getaddrinfo`` itself cannot be interrupted).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CertificateError, ConfigError, NetworkError, TlsError, TlsVersionError
from .units import normalize_fingerprint

__all__ = [
    "DEFAULT_RECV_SIZE",
    "GLOBAL_DEFAULT_TIMEOUT",
    "SYSTEM_CAS",
    "NetworkTimeout",
    "Pace",
    "PhaseTimeout",
    "PinnedContext",
    "SSLCertVerificationError",
    "SSLContext",
    "SSLError",
    "Socket",
    "Stream",
    "certificate_fingerprint",
    "check_ca_file",
    "client_context",
    "close_socket",
    "connect",
    "connect_unix",
    "decode_certificate",
    "default_context",
    "normalize_fingerprint",
    "open_socket",
    "probe_greeting",
    "probe_tls",
    "shared_client_context",
    "unverified_context",
]

#: In a ``tls_ca_file`` list, this entry stands for the system's trusted CAs.
SYSTEM_CAS = "system"

#: Read size: large reads mean few system calls and few core calls per message.
DEFAULT_RECV_SIZE = 256 * 1024

#: Re-exported so other modules can name these without importing :mod:`ssl`.
SSLContext = ssl.SSLContext
SSLError = ssl.SSLError
SSLCertVerificationError = ssl.SSLCertVerificationError
Socket = socket.socket
#: poplib's default timeout: whatever :func:`socket.setdefaulttimeout` set (None: none).
GLOBAL_DEFAULT_TIMEOUT: float | None = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]


class NetworkTimeout(NetworkError):
    """The server did not answer (or accept) within the timeout."""


class PhaseTimeout(NetworkTimeout):
    """A phase ran out of its wall-clock budget, or data came slower than the minimum rate."""

    def __init__(self, message: str, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


@dataclass(frozen=True)
class Pace:
    """The limits of the phase a stream is in; see the module docstring.

    ``deadline`` is a :func:`time.monotonic` value (None: no budget) set from
    ``budget_key = seconds`` in the config, both named in the error.
    ``low_speed_limit`` is in bytes per second (0: no minimum rate).
    """

    phase: str = "session"
    deadline: float | None = None
    budget_key: str = ""
    seconds: float = 0.0
    low_speed_limit: int = 0
    low_speed_time: float = 60.0

    @classmethod
    def budget(
        cls,
        phase: str,
        seconds: float,
        key: str,
        *,
        low_speed_limit: int = 0,
        low_speed_time: float = 60.0,
    ) -> Pace:
        """A phase that must end within ``seconds`` from now."""
        deadline = time.monotonic() + seconds
        return cls(phase, deadline, key, seconds, low_speed_limit, low_speed_time)

    def remaining(self) -> float | None:
        """Seconds left of the budget (may be negative), or None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def overrun(self, where: str) -> PhaseTimeout:
        """The error for a phase whose deadline has passed."""
        return PhaseTimeout(
            f"{where}: timed out in the {self.phase} phase: not done within "
            f"{self.budget_key} = {self.seconds:g}s",
            self.phase,
        )

    def too_slow(self, where: str, received: int, waited: float) -> PhaseTimeout:
        """The error for a transfer that fell below the minimum rate."""
        return PhaseTimeout(
            f"{where}: too slow in the {self.phase} phase: {received} bytes in {waited:.0f}s, "
            f"below low_speed_limit = {self.low_speed_limit} bytes/s "
            f"over low_speed_time = {self.low_speed_time:g}s",
            self.phase,
        )


def default_context(cafile: Path | None = None, verify: bool = True) -> ssl.SSLContext:
    """Return a client context: system (or ``cafile``) trust, TLS 1.2 or newer.

    ``verify=False`` turns off certificate and host name checks; only for test servers.
    """
    context = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class PinnedContext(ssl.SSLContext):
    """A context that accepts exactly the certificates whose SHA-256 is in ``pins``.

    The handshake itself verifies nothing (a self-signed certificate has no chain to check);
    :meth:`Stream.start_tls` compares the leaf certificate before any byte is exchanged.
    """

    pins: frozenset[str] = frozenset()


def certificate_fingerprint(der: bytes) -> str:
    """The ``sha256:AB:CD:...`` fingerprint of a DER certificate, as tls_fingerprint takes it."""
    return normalize_fingerprint(hashlib.sha256(der).hexdigest())


def decode_certificate(der: bytes) -> dict[str, Any]:
    """Subject, issuer, validity and names of a DER certificate, as ``getpeercert()`` gives.

    ``getpeercert()`` parses only certificates that passed verification, but a diagnosis
    needs the untrusted ones too; CPython's own decoder (``_test_decode_cert``, used by its
    test suite) reads a PEM file. Returns {} if that decoder is unavailable or fails.
    """
    decoder = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decoder is None:
        return {}
    import tempfile  # only a diagnosis gets here; with shutil and random, ~3 ms of a start

    fd, name = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(ssl.DER_cert_to_PEM_cert(der))
        return dict(decoder(name))
    except (OSError, ValueError, ssl.SSLError):
        return {}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _tls12(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def unverified_context() -> ssl.SSLContext:
    """A context that checks nothing: only for looking at a certificate, never for a login."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return _tls12(context)


def check_ca_file(path: Path) -> str | None:
    """Why ``path`` cannot serve as a CA bundle, or None when it loads."""
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except ssl.SSLError as exc:
        return f"{path} holds no usable PEM certificate ({exc.reason or exc})"
    return None


def client_context(
    ca_files: Sequence[Path | str] | None = None,
    *,
    verify: bool = True,
    fingerprints: Sequence[str] = (),
) -> ssl.SSLContext:
    """The TLS context for an account: TLS 1.2 or newer, and trust as configured.

    ``ca_files`` None trusts the system CAs; otherwise only the bundles listed, plus the
    system CAs when :data:`SYSTEM_CAS` is among them. ``fingerprints`` pins the server
    certificate instead (chain and names are then not checked). A bundle that cannot be
    loaded raises :class:`~popsync.errors.ConfigError` naming it.
    """
    if fingerprints:
        pinned = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE
        pinned.pins = frozenset(normalize_fingerprint(f) for f in fingerprints)
        return _tls12(pinned)
    if ca_files is None:
        return default_context(verify=verify)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    problems = []
    for entry in ca_files:
        if str(entry) == SYSTEM_CAS:
            context.load_default_certs()
            continue
        problem = check_ca_file(Path(entry))
        if problem is None:
            context.load_verify_locations(cafile=str(entry))
        else:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return _tls12(context)


_ContextKey = tuple[tuple[tuple[str, int, int], ...] | None, bool, tuple[str, ...]]
_contexts: dict[_ContextKey, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()
#: At most this many shared contexts are kept (a daemon has a handful of distinct settings).
_MAX_CONTEXTS = 256


def _file_signature(entry: Path | str) -> tuple[str, int, int]:
    """A CA file's name, modification time and size (a replaced file differs)."""
    if str(entry) == SYSTEM_CAS:
        return (SYSTEM_CAS, 0, 0)
    try:
        st = os.stat(entry)
    except OSError:
        return (str(entry), -1, -1)  # client_context names the problem
    return (str(entry), st.st_mtime_ns, st.st_size)


def shared_client_context(
    ca_files: Sequence[Path | str] | None = None,
    *,
    verify: bool = True,
    fingerprints: Sequence[str] = (),
) -> ssl.SSLContext:
    """:func:`client_context`, built once per set of settings and reused (see the module doc).

    Reusing the context is also what lets a later connection resume an earlier TLS session.
    """
    files = None if ca_files is None else tuple(_file_signature(f) for f in ca_files)
    key: _ContextKey = (files, verify, tuple(fingerprints))
    with _contexts_lock:
        context = _contexts.get(key)
    if context is None:
        context = client_context(ca_files, verify=verify, fingerprints=fingerprints)
        with _contexts_lock:
            if len(_contexts) >= _MAX_CONTEXTS:
                _contexts.clear()
            context = _contexts.setdefault(key, context)
    return context


_SessionKey = tuple[str, int, str | None]
_Saved = tuple[ssl.SSLSession, float]  # the session, and when it was saved (monotonic)
_sessions: weakref.WeakKeyDictionary[ssl.SSLContext, dict[_SessionKey, _Saved]] = (
    weakref.WeakKeyDictionary()
)
_sessions_lock = threading.Lock()
#: A resumed session is saved again (with the server's fresh ticket) after this many seconds.
#: Reading a session from OpenSSL costs about as much as the resumption saves, so not on
#: every connection; a ticket the server no longer takes just means one full handshake.
SESSION_REFRESH = 60.0


def _saved_session(context: ssl.SSLContext, key: _SessionKey) -> ssl.SSLSession | None:
    with _sessions_lock:
        saved = _sessions.get(context, {}).get(key)
    return None if saved is None else saved[0]


def _needs_saving(context: ssl.SSLContext, key: _SessionKey, resumed: bool) -> bool:
    if not resumed:
        return True
    with _sessions_lock:
        saved = _sessions.get(context, {}).get(key)
    return saved is None or time.monotonic() - saved[1] > SESSION_REFRESH


def _save_session(context: ssl.SSLContext, key: _SessionKey, session: ssl.SSLSession) -> None:
    with _sessions_lock:
        _sessions.setdefault(context, {})[key] = (session, time.monotonic())


#: OpenSSL's reasons when client and server share no TLS version (the server's is too old).
_OLD_TLS_REASONS = frozenset(
    {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "WRONG_SSL_VERSION"}
)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


#: A timer may fire a hair before the deadline it was cut to; this much counts as reached.
_DEADLINE_SLACK = 0.01


@contextlib.contextmanager
def _mapped(
    where: str, action: str, timeout: float | None, pace: Pace | None = None
) -> Iterator[None]:
    """Translate socket and TLS exceptions raised inside the block into popsync errors."""
    try:
        yield
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        error = CertificateError(
            f"{where}: server certificate verification failed during {action}: {reason}"
        )
        error.x509_error = exc.verify_code
        raise error from exc
    except ssl.SSLError as exc:
        if exc.reason in _OLD_TLS_REASONS:
            raise TlsVersionError(
                f"{where}: the server offers no TLS 1.2 or newer (during {action}:"
                f" {exc.reason}); popsync refuses older TLS"
            ) from exc
        raise TlsError(f"{where}: TLS error during {action}: {exc.reason or exc}") from exc
    except TimeoutError as exc:
        remaining = None if pace is None else pace.remaining()
        if pace is not None and remaining is not None and remaining <= _DEADLINE_SLACK:
            raise pace.overrun(where) from exc
        raise NetworkTimeout(f"{where}: timed out during {action} after {timeout}s") from exc
    except ConnectionRefusedError as exc:
        raise NetworkError(f"{where}: connection refused") from exc
    except socket.gaierror as exc:
        raise NetworkError(f"{where}: cannot resolve host: {_describe(exc)}") from exc
    except OSError as exc:
        raise NetworkError(f"{where}: {action} failed: {_describe(exc)}") from exc


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_limit(timeout: float | None, pace: Pace, where: str) -> float | None:
    """How long one wait may last: ``timeout`` cut to what is left of the phase budget."""
    remaining = pace.remaining()
    if remaining is None:
        return timeout
    if remaining <= 0:
        raise pace.overrun(where)
    return remaining if timeout is None else min(timeout, remaining)


#: Linux only; elsewhere ACKs are left to the system.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class Stream:
    """A connected byte stream, plain or TLS; every method raises only popsync errors."""

    def __init__(self, sock: socket.socket, host: str, port: int, pace: Pace | None = None) -> None:
        self._sock = sock
        self.host = host
        self.port = port
        self.where = host if host.startswith("unix:") else _where(host, port)
        self._timeout = sock.gettimeout()
        self._applied = self._timeout
        self._closed = False
        self._pace = pace or Pace()
        # The minimum-rate window: seconds spent waiting for the server, bytes received.
        self._waited = 0.0
        self._received = 0
        #: Called after every read that brought data (a sign of life for the daemon).
        self.on_activity: Callable[[], None] | None = None
        self._resume: tuple[ssl.SSLContext, _SessionKey] | None = None

    @property
    def pace(self) -> Pace:
        """The limits of the current phase."""
        return self._pace

    def set_pace(self, pace: Pace) -> None:
        """Enter a new phase with its own budget and rate; the rate window starts afresh."""
        self._pace = pace
        self._waited = 0.0
        self._received = 0

    @property
    def is_tls(self) -> bool:
        """True once the stream is encrypted (implicit TLS or after :meth:`start_tls`)."""
        return isinstance(self._sock, ssl.SSLSocket)

    @property
    def tls_version(self) -> str | None:
        """The negotiated protocol, e.g. ``"TLSv1.3"``, for logs; None on plain streams."""
        return self._sock.version() if isinstance(self._sock, ssl.SSLSocket) else None

    @property
    def session_reused(self) -> bool:
        """True when the TLS handshake resumed an earlier session (see the module docstring)."""
        return isinstance(self._sock, ssl.SSLSocket) and bool(self._sock.session_reused)

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite name, for logs; None on plain streams."""
        if not isinstance(self._sock, ssl.SSLSocket):
            return None
        info = self._sock.cipher()
        return info[0] if info else None

    def _settimeout(self, value: float | None) -> None:
        if value != self._applied:
            self._sock.settimeout(value)
            self._applied = value

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Do a client TLS handshake on this connection (after the server's STLS +OK).

        The whole handshake is bounded by the timeout and the phase budget: the ssl
        module applies a socket timeout to the handshake as a whole, not per read.
        """
        key = (self.host, self.port, server_hostname)
        with _mapped(self.where, "TLS handshake", self._timeout, self._pace):
            self._settimeout(_wait_limit(self._timeout, self._pace, self.where))
            self._sock = context.wrap_socket(
                self._sock, server_hostname=server_hostname, session=_saved_session(context, key)
            )
        if isinstance(context, PinnedContext):
            self._check_pin(context.pins)
        self._resume = (context, key)  # only a session that passed every check is kept

    def _check_pin(self, pins: frozenset[str]) -> None:
        der = self.peer_certificate()
        found = certificate_fingerprint(der) if der else "none"
        if found not in pins:
            self.close()
            error = CertificateError(
                f"{self.where}: the server certificate ({found}) matches no tls_fingerprint"
            )
            error.fingerprint = found
            raise error

    def peer_certificate(self) -> bytes | None:
        """The server's leaf certificate (DER) on a TLS stream, verified or not."""
        if not isinstance(self._sock, ssl.SSLSocket):
            return None
        return self._sock.getpeercert(binary_form=True)

    def readable_within(self, seconds: float) -> bool:
        """True when the server sent something (or closed) within ``seconds``; reads nothing."""
        try:
            ready, _, _ = select.select([self._sock], [], [], seconds)
        except (OSError, ValueError):
            return True  # let the next recv() report it
        return bool(ready)

    def _read_limit(self) -> tuple[float | None, bool]:
        """The wait for the next read, and whether the rate window (not a timeout) bounds it."""
        limit = _wait_limit(self._timeout, self._pace, self.where)
        if not self._pace.low_speed_limit:
            return limit, False
        left = max(self._pace.low_speed_time - self._waited, 0.001)
        if limit is None or left < limit:
            return left, True
        return limit, False

    def _count(self, received: int, waited: float) -> None:
        """Book a read into the rate window; at the window's end, judge the rate."""
        pace = self._pace
        self._waited += waited
        self._received += received
        if not pace.low_speed_limit or self._waited < pace.low_speed_time:
            return
        if self._received < pace.low_speed_limit * self._waited:
            raise pace.too_slow(self.where, self._received, self._waited)
        self._waited = 0.0
        self._received = 0

    def recv(self, size: int = DEFAULT_RECV_SIZE) -> bytes:
        """Return up to ``size`` bytes; ``b""`` means the server closed the connection."""
        while True:
            limit, rate_bound = self._read_limit()
            started = time.monotonic()
            try:
                self._settimeout(limit)
                data = self._sock.recv(size)
                if isinstance(self._sock, ssl.SSLSocket) and 0 < len(data) < size:
                    data = self._gather_records(data, size)
            except TimeoutError as exc:
                if not rate_bound:
                    with _mapped(self.where, "receive", self._timeout, self._pace):
                        raise exc from None
                # The rate window ended while waiting: judge it, and wait on if it passed.
                self._count(0, time.monotonic() - started)
                continue
            except OSError as exc:
                with _mapped(self.where, "receive", self._timeout, self._pace):
                    raise exc from None
            self._count(len(data), time.monotonic() - started)
            if data and _QUICKACK is not None:
                self._ack_at_once()
            if data and self.on_activity is not None:
                self.on_activity()
            return data

    def _ack_at_once(self) -> None:
        """Ask Linux to acknowledge what arrives next without its delayed-ACK wait.

        A server with Nagle on (Dovecot) holds a small reply until its previous one is
        acknowledged, and Linux delays that ACK by up to 40 ms: a pipelined USER and PASS
        took 41 ms to answer instead of 7. The flag is not sticky (the kernel falls back
        to delayed ACKs on its own), so it is set again after every read.
        """
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]

    def _gather_records(self, first: bytes, size: int) -> bytes:
        """Add the TLS records already received, without waiting for more.

        An SSL read returns one record (often 4-16 KiB); collecting what is already
        here means far fewer trips through the protocol core per megabyte.
        """
        sock = self._sock
        chunks, total = [first], len(first)
        self._settimeout(0.0)
        while total < size:
            try:
                more = sock.recv(size - total)
            except OSError:
                # Nothing more yet; or an error (a ragged EOF, say) that the next
                # recv() reports: the bytes already read must not be lost.
                break
            if not more:
                break
            chunks.append(more)
            total += len(more)
        return b"".join(chunks)

    def sendall(self, data: bytes) -> None:
        """Send all of ``data`` (bounded by the timeout and the phase budget as a whole)."""
        with _mapped(self.where, "send", self._timeout, self._pace):
            self._settimeout(_wait_limit(self._timeout, self._pace, self.where))
            self._sock.sendall(data)

    def close(self) -> None:
        """Close the socket; safe to call twice, never raises.

        A TLS stream first saves its session (with the ticket the server sent after the
        handshake) for the next connection to resume.
        """
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        if self._resume is not None and isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                if _needs_saving(*self._resume, bool(sock.session_reused)):
                    session = sock.session
                    if session is not None:
                        _save_session(*self._resume, session)
        with contextlib.suppress(OSError):
            self._sock.close()


_AddrInfo = tuple[
    socket.AddressFamily,
    socket.SocketKind,
    int,
    str,
    tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes],
]


def _resolve(host: str, port: int, limit: float | None) -> Sequence[_AddrInfo]:
    """getaddrinfo bounded by ``limit`` seconds (raises TimeoutError when it is reached).

    The C resolver cannot be interrupted, so a slow lookup runs in a daemon thread and
    is abandoned at the limit; it ends on its own when the resolver gives up.
    """
    # A str host goes through the idna codec, whose import (with unicodedata and stringprep)
    # is ~3 ms of every start; an ASCII name needs none of it.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    with contextlib.suppress(socket.gaierror):
        # An address literal needs no resolver: no thread.
        return socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    if limit is None:
        return socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    outcome: list[Sequence[_AddrInfo] | OSError] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(name, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="popsync-resolve", daemon=True).start()
    if not done.wait(limit):
        raise TimeoutError("name resolution")
    result = outcome[0]
    if isinstance(result, OSError):
        raise result
    return result


def _open(
    infos: Sequence[_AddrInfo], timeout: float | None, pace: Pace, where: str
) -> socket.socket:
    """Connect to the first address that accepts, as socket.create_connection does."""
    error: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_wait_limit(timeout, pace, where))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            if isinstance(exc, TimeoutError):
                break  # the timeout (or the budget) is spent: do not start over
            continue
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock
    raise error or OSError("getaddrinfo returned no addresses")


def connect(
    host: str,
    port: int,
    *,
    timeout: float | None,
    context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    pace: Pace | None = None,
) -> Stream:
    """Open a TCP connection (IPv4 or IPv6); with ``context``, do implicit TLS at once.

    ``server_hostname`` is the name the certificate must match; it defaults to ``host``.
    ``timeout=None`` blocks forever (only for :mod:`popsync.poplib` compatibility).
    Name resolution, connect and the TLS handshake each honour ``timeout``, and all
    together ``pace``'s budget; the stream keeps ``pace`` for what follows.
    """
    where = _where(host, port)
    pace = pace or Pace()
    with _mapped(where, "name resolution", timeout, pace):
        infos = _resolve(host, port, _wait_limit(timeout, pace, where))
    with _mapped(where, "connect", timeout, pace):
        sock = _open(infos, timeout, pace, where)
    try:
        # POP3 commands are tiny and latency-bound: never let Nagle hold them back.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = Stream(sock, host, port, pace)
        if context is not None:
            stream.start_tls(context, server_hostname or host)
    except BaseException:
        sock.close()
        raise
    return stream


def _dial(host: str, port: int, timeout: float) -> socket.socket:
    """socket.create_connection, with name resolution bounded by ``timeout`` as well."""
    return _open(_resolve(host, port, timeout), timeout, Pace(), _where(host, port))


def open_socket(host: str, port: int, timeout: float | None) -> socket.socket:
    """A raw TCP socket with unmapped errors, for :mod:`popsync.poplib` (poplib raises OSError)."""
    return socket.create_connection((host, port), timeout)


def close_socket(sock: socket.socket) -> None:
    """Shut down and close ``sock`` exactly as poplib's ``close()`` does (ENOTCONN is fine)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
    finally:
        sock.close()


def probe_greeting(host: str, port: int, timeout: float) -> bytes | None:
    """Connect in plain text and return the first line the server sends (at most 512 bytes).

    None when nothing arrives in ``timeout`` or the connection fails. Used after a failed
    TLS handshake: a ``+OK`` here means the port speaks plain POP3.
    """
    try:
        with _dial(host, port, timeout) as sock:
            data = b""
            while b"\n" not in data and len(data) < 512:
                chunk = sock.recv(512 - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data.split(b"\n", 1)[0][:512] or None


def probe_tls(host: str, port: int, timeout: float, server_hostname: str | None = None) -> bool:
    """True when a TLS handshake (checking nothing) succeeds on a fresh connection.

    Used when a plain connection stays silent: a POP3S port waits for our ClientHello.
    """
    try:
        with (
            _dial(host, port, timeout) as sock,
            unverified_context().wrap_socket(sock, server_hostname=server_hostname or host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def connect_unix(path: str, *, timeout: float | None) -> Stream:
    """Open a Unix stream socket (an LMTP server's socket, say); errors mapped like connect()."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with _mapped(f"unix:{path}", "connect", timeout):
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
    return Stream(sock, f"unix:{path}", 0)
