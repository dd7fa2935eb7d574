"""How many LMTP sessions one popsync process holds open to each LMTP server.

Each account opens up to ``lmtp_sessions`` connections to its LMTP server; a daemon runs
up to ``max_workers`` accounts at once, often all against the same Dovecot, whose every
session is a process of its own. The top-level ``lmtp_max_sessions`` caps the sum per
server address. An account always gets its first session, so every account makes
progress and none waits on another's sessions; it opens more only while the server's
budget has room. So a lone first fetch gets all its ``lmtp_sessions`` (the lever for a
big mailbox, see ``bench/RESULTS.md``), while many accounts at once stay within the cap,
or at one session each when more accounts run than the cap allows.

The budget counts sessions, open or kept idle between batches, until the account's run
closes them. It is process-wide, not fleet-wide: fleet workers each have their own.
"""

from __future__ import annotations

import threading

__all__ = ["SessionBudget"]


class SessionBudget:
    """Open LMTP sessions per server address, against one limit; thread-safe."""

    def __init__(self, limit: int) -> None:
        #: The cap per address; a config reload may change it (it applies to new sessions).
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, address: str, *, first: bool) -> bool:
        """Count one more session to ``address``: always for an account's ``first``,
        otherwise only while the address is below the limit."""
        with self._lock:
            count = self._open.get(address, 0)
            if not first and count >= self.limit:
                return False
            self._open[address] = count + 1
            return True

    def give_back(self, address: str) -> None:
        """A session to ``address`` was closed."""
        with self._lock:
            count = self._open.get(address, 0) - 1
            if count > 0:
                self._open[address] = count
            else:
                self._open.pop(address, None)

    def in_use(self, address: str) -> int:
        """Sessions to ``address`` now counted."""
        with self._lock:
            return self._open.get(address, 0)
