"""Fixtures shared by the unit tests of one concern each (the scheduler's, for now)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from popsync.config import Account
from popsync.scheduler import AccountScheduler
from popsync.sync import RunResult

#: Seconds a scheduler test waits for what it expects before it fails.
WAIT = 5.0


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., AccountScheduler]]:
    """Build schedulers that are shut down after the test."""
    made: list[AccountScheduler] = []

    def make(run: Callable[[Account], RunResult], **kwargs: object) -> AccountScheduler:
        sched = AccountScheduler(run, **kwargs)  # type: ignore[arg-type]
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.shutdown(5.0)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` every 10 ms; fail the test when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
