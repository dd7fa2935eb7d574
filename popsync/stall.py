"""Stall detection shared by both schedulers: which runs in progress have gone silent.

A run reports signs of life (data from the server) as it goes; one silent for longer than
:func:`stall_limit` is *stalled*: not waiting for a slow server, stuck where no timeout
reaches (a hung file system, a bug). The daemon stops feeding systemd's watchdog when every
run in progress is stalled (:func:`making_progress`). `popsync.scheduler` and
`popsync.fleet` keep their runs in progress in a mapping of :class:`Watched` records and
answer with these functions, so both mean the same by "stalled".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from popsync.config import Account

__all__ = ["Watched", "making_progress", "note_activity", "stall_limit", "stalled"]


class Watched(Protocol):
    """A run in progress: when it last showed a sign of life, and for how long it may not."""

    last: float
    limit: float


def stall_limit(account: Account) -> float:
    """Seconds a run may show no sign of life before it counts as stalled.

    Twice the longest wait popsync's own limits allow (the timeout of one read, the login
    budget, the minimum-rate window): a run silent for longer is not waiting for a slow
    server, it is stuck somewhere no timeout reaches (a hung file system, a bug).
    """
    return 2 * max(account.timeout, account.login_timeout, account.low_speed_time)


def note_activity(runs: Mapping[str, Watched], name: str) -> None:
    """A sign of life from ``name``'s run, if it is in progress; cheap, called per read."""
    run = runs.get(name)
    if run is not None:
        run.last = time.monotonic()


def stalled(runs: Mapping[str, Watched]) -> list[str]:
    """The runs in progress silent for longer than their limit, by name."""
    now = time.monotonic()
    return sorted(n for n, r in list(runs.items()) if now - r.last > r.limit)


def making_progress(runs: Mapping[str, Watched]) -> bool:
    """False only when runs are in progress and every one of them is stalled."""
    return not runs or len(stalled(runs)) < len(runs)
