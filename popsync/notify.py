"""The sd_notify protocol without libsystemd: tell systemd we are ready, reloading or alive.

systemd hands a ``Type=notify`` service the address of a datagram socket in ``$NOTIFY_SOCKET``
(a file system path, or ``@name`` for a Linux abstract socket). Each message is one datagram of
newline-separated ``KEY=value`` lines. Outside systemd the variable is unset and every call is a
cheap no-op, so the daemon can call these unconditionally.

Sending never raises: a failed notification must not take down the sync daemon. Each method
returns ``True`` only when a datagram was actually sent. A fresh socket is used per message
(as libsystemd does), which keeps the class thread-safe without a lock.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["Notifier", "watchdog_interval"]


def _socket_address(value: str | None) -> str | bytes | None:
    """Translate ``$NOTIFY_SOCKET`` into an AF_UNIX address, or None when unusable."""
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of the "@".
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # Relative paths and vsock:... addresses (systemd 254+ in VMs) are not supported.
    return None


def _clean(text: str) -> str:
    """Keep a value on one line: a newline would start a new KEY=value assignment."""
    return " ".join(text.splitlines())


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Return the watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None when disabled.

    ``$WATCHDOG_PID``, when set, must name this process: otherwise the variable was inherited
    from a parent and the watchdog is not ours. Ping at half the returned interval.
    """
    env = os.environ if environ is None else environ
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, address: str | None = None) -> None:
        """Use ``address`` (``/path`` or ``@abstract``), or no socket at all when None."""
        self._address = _socket_address(address)

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``; ``unset=True`` hides it from child processes.

        Unsetting matters because ``password_command`` children would otherwise inherit the
        socket (harmless under ``NotifyAccess=main``, but confusing under ``all``).
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines; True when it was sent."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(f"{key}={_clean(str(value))}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload.encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete; systemd may consider the service started."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``."""
        return self.send(WATCHDOG=1)

    def stopping(self) -> bool:
        """Graceful shutdown has begun."""
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        """A configuration reload has begun; send ``ready()`` when it is done.

        systemd 253+ (``Type=notify-reload``) requires ``MONOTONIC_USEC`` with the reload
        notification; older versions ignore the extra field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time in the current start/stop phase (e.g. to finish a running sync)."""
        return self.send(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def watchdog_interval(self, environ: Mapping[str, str] | None = None) -> float | None:
        """Watchdog timeout in seconds for this process, or None (see ``watchdog_interval``)."""
        if self._address is None:
            return None
        return watchdog_interval(environ)
