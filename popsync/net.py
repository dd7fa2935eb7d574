"""The socket seam: the only popsync module that imports :mod:`socket` or :mod:`ssl`.

Opens TCP connections (IPv4 or IPv6, plain or implicit TLS), upgrades them with
STARTTLS, and maps every :class:`OSError` and :class:`ssl.SSLError` to popsync's own
errors exactly once, here (the httpx transport pattern), so callers never see a raw
socket exception:

* a timeout -> :class:`NetworkTimeout` (a :class:`~popsync.errors.NetworkError`);
* refused, reset, unreachable, unknown host -> :class:`~popsync.errors.NetworkError`;
* a certificate that fails verification -> :class:`~popsync.errors.CertificateError`;
* any other TLS failure -> :class:`~popsync.errors.TlsError`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from .errors import CertificateError, NetworkError, TlsError

__all__ = [
    "DEFAULT_RECV_SIZE",
    "GLOBAL_DEFAULT_TIMEOUT",
    "NetworkTimeout",
    "SSLCertVerificationError",
    "SSLContext",
    "SSLError",
    "Socket",
    "Stream",
    "close_socket",
    "connect",
    "default_context",
    "open_socket",
]

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


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def _mapped(where: str, action: str, timeout: float | None) -> Iterator[None]:
    """Translate socket and TLS exceptions raised inside the block into popsync errors."""
    try:
        yield
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        raise CertificateError(
            f"{where}: server certificate verification failed during {action}: {reason}"
        ) from exc
    except ssl.SSLError as exc:
        raise TlsError(f"{where}: TLS error during {action}: {exc.reason or exc}") from exc
    except TimeoutError as exc:
        raise NetworkTimeout(f"{where}: timed out during {action} after {timeout}s") from exc
    except ConnectionRefusedError as exc:
        raise NetworkError(f"{where}: connection refused") from exc
    except socket.gaierror as exc:
        raise NetworkError(f"{where}: cannot resolve host: {_describe(exc)}") from exc
    except OSError as exc:
        raise NetworkError(f"{where}: {action} failed: {_describe(exc)}") from exc


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Stream:
    """A connected byte stream, plain or TLS; every method raises only popsync errors."""

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self._sock = sock
        self.host = host
        self.port = port
        self.where = _where(host, port)
        self._timeout = sock.gettimeout()
        self._closed = False

    @property
    def is_tls(self) -> bool:
        """True once the stream is encrypted (implicit TLS or after :meth:`start_tls`)."""
        return isinstance(self._sock, ssl.SSLSocket)

    @property
    def tls_version(self) -> str | None:
        """The negotiated protocol, e.g. ``"TLSv1.3"``, for logs; None on plain streams."""
        return self._sock.version() if isinstance(self._sock, ssl.SSLSocket) else None

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite name, for logs; None on plain streams."""
        if not isinstance(self._sock, ssl.SSLSocket):
            return None
        info = self._sock.cipher()
        return info[0] if info else None

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Do a client TLS handshake on this connection (after the server's STLS +OK)."""
        with _mapped(self.where, "TLS handshake", self._timeout):
            self._sock = context.wrap_socket(self._sock, server_hostname=server_hostname)

    def recv(self, size: int = DEFAULT_RECV_SIZE) -> bytes:
        """Return up to ``size`` bytes; ``b""`` means the server closed the connection."""
        try:
            data = self._sock.recv(size)
            if isinstance(self._sock, ssl.SSLSocket) and 0 < len(data) < size:
                data = self._gather_records(data, size)
        except OSError as exc:
            with _mapped(self.where, "receive", self._timeout):
                raise exc from None
        return data

    def _gather_records(self, first: bytes, size: int) -> bytes:
        """Add the TLS records already received, without waiting for more.

        An SSL read returns one record (often 4-16 KiB); collecting what is already
        here means far fewer trips through the protocol core per megabyte.
        """
        sock = self._sock
        chunks, total = [first], len(first)
        sock.settimeout(0.0)
        try:
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
        finally:
            sock.settimeout(self._timeout)
        return b"".join(chunks)

    def sendall(self, data: bytes) -> None:
        """Send all of ``data``."""
        with _mapped(self.where, "send", self._timeout):
            self._sock.sendall(data)

    def close(self) -> None:
        """Close the socket; safe to call twice, never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()


def connect(
    host: str,
    port: int,
    *,
    timeout: float | None,
    context: ssl.SSLContext | None,
    server_hostname: str | None = None,
) -> Stream:
    """Open a TCP connection (IPv4 or IPv6); with ``context``, do implicit TLS at once.

    ``server_hostname`` is the name the certificate must match; it defaults to ``host``.
    ``timeout=None`` blocks forever (only for :mod:`popsync.poplib` compatibility).
    """
    where = _where(host, port)
    with _mapped(where, "connect", timeout):
        sock = socket.create_connection((host, port), timeout=timeout)
    try:
        # POP3 commands are tiny and latency-bound: never let Nagle hold them back.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = Stream(sock, host, port)
        if context is not None:
            stream.start_tls(context, server_hostname or host)
    except BaseException:
        sock.close()
        raise
    return stream


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
