"""popsync's exception ladder: every error a user can see maps to one sysexits exit code.

The CLI catches `PopsyncError` and exits with its `exit_code`; anything else is a bug
(`ExitCode.SOFTWARE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

__all__ = [
    "CertificateError",
    "ConfigError",
    "ExitCode",
    "LocalIOError",
    "LockBusy",
    "NetworkError",
    "PopsyncError",
    "SecretError",
    "TlsError",
    "TlsVersionError",
    "UserError",
    "describe_exit",
]


class ExitCode(IntEnum):
    """Process exit codes, from sysexits.h."""

    OK = 0
    USAGE = 64
    SOFTWARE = 70
    LOCAL_IO = 74
    TEMPORARY = 75
    PROTOCOL = 76
    AUTH = 77
    CONFIG = 78


def describe_exit(returncode: int) -> str:
    """How a child process ended: ``exited with status 3`` or ``was killed by SIGTERM``."""
    if returncode < 0:
        import signal  # here: every command imports this module, few run a child

        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class PopsyncError(Exception):
    """Root of every error popsync raises on purpose."""

    exit_code: ExitCode = ExitCode.SOFTWARE


class UserError(PopsyncError):
    """Something the user can fix (configuration, permissions, usage)."""

    exit_code = ExitCode.USAGE


class ConfigError(UserError):
    """The configuration is invalid; `problems` lists every problem found, one per line."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


class SecretError(ConfigError):
    """A password or token could not be obtained (missing file, unsafe mode, failed command)."""


class NetworkError(PopsyncError):
    """Connecting or talking to the server failed in a way worth retrying later."""

    exit_code = ExitCode.TEMPORARY


class TlsError(PopsyncError):
    """A TLS handshake or connection failed transiently; retry later."""

    exit_code = ExitCode.TEMPORARY


class TlsVersionError(TlsError):
    """The server offers only TLS older than 1.2 (popsync's minimum); nothing was sent.

    Not temporary either: an old server does not learn TLS 1.2 by itself (PROTOCOL, 76).
    """

    exit_code = ExitCode.PROTOCOL


class CertificateError(TlsError):
    """The server's certificate failed verification.

    Not temporary: retrying will not fix a wrong certificate, and an operator must look at it,
    so this maps to PROTOCOL (76) rather than TEMPORARY.
    """

    exit_code = ExitCode.PROTOCOL
    #: OpenSSL's X509_V_ERR code when verification failed (62 = host name mismatch).
    x509_error: int | None = None
    #: The certificate's ``sha256:...`` fingerprint when it matched no tls_fingerprint.
    fingerprint: str | None = None


class LocalIOError(PopsyncError):
    """Local disk or filesystem failure (disk full, unwritable Maildir or state directory)."""

    exit_code = ExitCode.LOCAL_IO


class LockBusy(PopsyncError):
    """Another popsync process holds this account's lock; try again later."""

    exit_code = ExitCode.TEMPORARY
