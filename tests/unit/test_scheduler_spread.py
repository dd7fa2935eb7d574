"""Start-up spread and the bounded run pool: thousands of accounts, few threads, no herd."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES

from popsync.config import Account, parse_config
from popsync.scheduler import START_SPACING, AccountScheduler, _Pool, start_offset
from popsync.sync import RunResult
from tests.unit.conftest import WAIT, wait_until


def _accounts(tmp_path: Path, names: list[str], interval: str = "300s") -> dict[str, Account]:
    text = "\n".join(
        f'[accounts.{n}]\nhost = "{n}.invalid"\nusername = "u"\npassword = "pw"\n'
        f'maildir = "{tmp_path / n}"\ninterval = "{interval}"\n'
        for n in names
    )
    return dict(parse_config(text).accounts)


def test_offsets_are_deterministic_bounded_and_even() -> None:
    """Offsets depend only on the name, stay inside the window and fill it evenly."""
    names = [f"acct{k}" for k in range(10_000)]
    offsets = [start_offset(n, 300.0, len(names)) for n in names]
    assert offsets == [start_offset(n, 300.0, len(names)) for n in names]
    assert all(0 <= o < 300.0 for o in offsets)
    per_10s = [0] * 30
    for o in offsets:
        per_10s[int(o // 10)] += 1
    assert min(per_10s) > 250  # about 333 starts per 10 s
    assert max(per_10s) < 420  # and no burst
    assert abs(statistics.mean(offsets) - 150) < 5


def test_the_window_grows_with_the_accounts_up_to_the_interval() -> None:
    """One account starts at once; 200 within 20 s; 10,000 within their 5-minute interval."""
    assert start_offset("solo", 300.0, 1) < START_SPACING
    assert max(start_offset(f"a{k}", 300.0, 200) for k in range(200)) < 200 * START_SPACING
    assert max(start_offset(f"a{k}", 300.0, 200) for k in range(200)) > 15
    assert max(start_offset(f"a{k}", 60.0, 10_000) for k in range(10_000)) < 60.0


def test_first_runs_and_their_phase_follow_the_offsets(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """Each job first runs at its offset and keeps it as the phase of its later runs."""
    names = [f"s{k}" for k in range(500)]
    sched = make_scheduler(lambda a: RunResult(account=a.name), max_workers=2)
    before = datetime.now(UTC)
    sched.set_accounts(_accounts(tmp_path, names))
    after = datetime.now(UTC)
    for name in names:
        offset = start_offset(name, 300.0, len(names))
        first = sched.next_run(name)
        assert first is not None
        assert before.timestamp() + offset - 0.01 <= first.timestamp()
        assert first.timestamp() <= after.timestamp() + offset + 0.01
        job = sched._scheduler.get_job(name)
        assert job.trigger.start_date == first  # the next interval keeps this phase


def test_a_poll_of_many_accounts_runs_on_few_threads(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """SIGUSR1 on 400 accounts runs them all, never more than max_workers at once."""
    lock = threading.Lock()
    active = [0, 0]  # now, most
    done: list[str] = []

    def run(account: Account) -> RunResult:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.002)
        with lock:
            active[0] -= 1
            done.append(account.name)
        return RunResult(account=account.name)

    names = [f"p{k}" for k in range(400)]
    sched = make_scheduler(run, max_workers=4)
    sched.set_accounts(_accounts(tmp_path, names, interval="1h"))
    sched.start()
    sched.poll_now()
    wait_until(lambda: len(set(done)) == len(names), timeout=20)
    assert active[1] <= 4
    workers = [t for t in threading.enumerate() if t.name.startswith("popsync-run-")]
    assert len(workers) <= 5  # max_workers plus the one watching the queue
    assert sched.shutdown(WAIT * 2)  # every run ended: nothing logs after the test


def test_pool_keeps_order_and_starts_the_next_run_when_a_slot_lapses() -> None:
    """A task past its hold time no longer counts, so the next queued task starts."""
    pool = _Pool("t", 1)
    release = threading.Event()
    started: list[tuple[str, float]] = []

    def task(name: str, block: bool) -> Callable[[], None]:
        def go() -> None:
            started.append((name, time.monotonic()))
            if block:
                release.wait(WAIT)

        return go

    t0 = time.monotonic()
    pool.submit(task("stuck", True), 0.3)
    pool.submit(task("next", False), 0.3)
    pool.submit(task("last", False), 0.3)
    wait_until(lambda: len(started) == 3)
    assert [n for n, _ in started] == ["stuck", "next", "last"]
    assert 0.25 < started[1][1] - t0 < 2.0  # waited for the stuck task's slot to lapse
    release.set()
    assert pool.wait_idle(WAIT)
    pool.close()


def test_idle_pool_threads_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run threads with nothing to do end after the idle time."""
    monkeypatch.setattr("popsync.scheduler.IDLE_THREAD_EXIT", 0.1)
    pool = _Pool("idle", 3)
    ran = threading.Event()
    pool.submit(ran.set, 1.0)
    assert ran.wait(WAIT)
    wait_until(lambda: pool.threads == 0)
    pool.close()


def test_a_poll_of_queued_runs_does_not_spin(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """SIGUSR1 while runs wait in the pool's queue: no retry loop, each queued run runs once."""
    release = threading.Event()
    started: list[str] = []

    def run(account: Account) -> RunResult:
        started.append(account.name)
        if account.name == "a" and len(started) == 1:
            release.wait(WAIT)
        return RunResult(account=account.name)

    sched = make_scheduler(run, max_workers=1)
    skipped: list[object] = []
    sched._scheduler.add_listener(skipped.append, EVENT_JOB_MAX_INSTANCES)
    accounts = _accounts(tmp_path, ["a", "b", "c"], interval="1h")
    sched.set_accounts({"a": accounts["a"]})
    sched.start()
    wait_until(lambda: started == ["a"])
    sched.set_accounts(accounts)  # b and c are due at once, and queue behind a
    wait_until(lambda: sched._healthy._queue.__len__() == 2)
    sched.poll_now()
    time.sleep(0.5)
    assert len(skipped) <= 2  # at most one per queued run, not one every 50 ms
    release.set()
    wait_until(lambda: started.count("a") == 2)  # a was polled mid-run: it runs again
    time.sleep(0.2)
    assert started.count("b") == 1
    assert started.count("c") == 1
