"""When to try an account again after a run: pure rules, no clock.

The server's own word comes first: ``[LOGIN-DELAY]`` and the CAPA ``LOGIN-DELAY n``
value (RFC 2449) set a floor. Temporary trouble (``[IN-USE]``, ``[SYS/TEMP]``, timeouts,
refused connections) backs off exponentially from the account's interval up to a cap,
and the first success returns to the plain interval. Refused credentials and permanent
failures are retried only slowly: a daemon that hammers a server with a wrong password
gets the account locked.
"""

from __future__ import annotations

__all__ = ["MAX_BACKOFF", "SLOW_RETRY", "SLOW_START", "next_delay"]

#: The longest a temporary failure can push the next attempt out (seconds).
MAX_BACKOFF = 3600.0
#: The first delay after an authentication or permanent failure (seconds)...
SLOW_START = 1800.0
#: ...doubling up to this.
SLOW_RETRY = 6 * 3600.0


def next_delay(
    outcome: str,
    failures: int,
    interval: float,
    *,
    retry_after: float | None = None,
) -> float:
    """Seconds until the next run of an account.

    ``failures`` counts consecutive failed runs including this one (0 after a success).
    """
    exponent = max(0, min(failures, 16) - 1)
    if outcome == "ok":
        delay = interval
    elif outcome in ("auth", "config") or (outcome == "protocol" and failures > 3):
        # Start at half an hour and double up to SLOW_RETRY; SIGUSR1 or SIGHUP retries now.
        delay = min(max(interval, SLOW_START) * 2**exponent, max(SLOW_RETRY, interval))
    else:
        # temporary, local_io, protocol (first few), error: exponential from the interval.
        delay = min(interval * 2**exponent, max(MAX_BACKOFF, interval))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
