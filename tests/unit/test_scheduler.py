"""AccountScheduler with a fake run function: first runs, backoff rescheduling, reloads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from popsync.config import Account, parse_config
from popsync.errors import ExitCode
from popsync.scheduler import AccountScheduler
from popsync.sync import RunResult

WAIT = 5.0


def _accounts(tmp_path: Path, *names: str, interval: str = "60s") -> dict[str, Account]:
    text = "\n".join(
        f'[accounts.{n}]\nhost = "{n}.invalid"\nusername = "u"\npassword = "pw"\n'
        f'maildir = "{tmp_path / n}"\ninterval = "{interval}"\n'
        for n in names
    )
    return dict(parse_config(text).accounts)


class FakeRuns:
    """Records runs and answers each with the next scripted outcome per account."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.outcomes: dict[str, list[RunResult]] = {}
        self.cond = threading.Condition()

    def __call__(self, account: Account) -> RunResult:
        script = self.outcomes.get(account.name)
        result = script.pop(0) if script else RunResult(account=account.name)
        with self.cond:
            self.runs.append(account.name)
            self.cond.notify_all()
        return result

    def wait_count(self, name: str, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.runs.count(name) >= count, WAIT), self.runs


@pytest.fixture
def runs() -> FakeRuns:
    """A fake run function."""
    return FakeRuns()


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., AccountScheduler]]:
    """Build schedulers that are shut down after the test."""
    made: list[AccountScheduler] = []

    def make(run: Callable[[Account], RunResult], **kwargs: object) -> AccountScheduler:
        kwargs.setdefault("max_workers", 2)
        sched = AccountScheduler(run, **kwargs)  # type: ignore[arg-type]
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.shutdown(5.0)


def _seconds_until(when: datetime | None) -> float:
    assert when is not None
    return (when - datetime.now(UTC)).total_seconds()


def _wait(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_every_account_runs_right_at_start(
    tmp_path: Path, runs: FakeRuns, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """Each account gets a first run immediately, then waits about one interval."""
    sched = make_scheduler(runs)
    sched.set_accounts(_accounts(tmp_path, "a", "b"))
    sched.start()
    runs.wait_count("a", 1)
    runs.wait_count("b", 1)
    _wait(lambda: _seconds_until(sched.next_run("a")) > 0)
    assert 50 < _seconds_until(sched.next_run("a")) <= 66  # 60 s plus at most 6 s jitter


def test_temporary_failures_back_off_and_success_recovers(
    tmp_path: Path, runs: FakeRuns, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """Consecutive IN-USE-like failures push the next run out 2x, 4x; success resets."""
    fail = RunResult(account="a", outcome="temporary", exit_code=ExitCode.TEMPORARY)
    runs.outcomes["a"] = [fail, fail, fail, RunResult(account="a")]
    results: list[RunResult] = []
    sched = make_scheduler(runs, on_result=results.append)
    sched.set_accounts(_accounts(tmp_path, "a"))
    with capture_logs() as logs:
        sched.start()
        runs.wait_count("a", 1)
        _wait(lambda: len(results) == 1)
        assert sched.describe()["a"]["failures"] == 1
        for count, low in ((2, 115), (3, 235)):
            sched.poll_now()
            runs.wait_count("a", count)
            _wait(lambda c=count: len(results) == c)  # type: ignore[misc]
            _wait(lambda lo=low: _seconds_until(sched.next_run("a")) > lo)  # type: ignore[misc]
            assert sched.describe()["a"]["failures"] == count
            assert _seconds_until(sched.next_run("a")) <= low + 6
        sched.poll_now()
        runs.wait_count("a", 4)
        _wait(lambda: len(results) == 4)
    assert sched.describe()["a"]["failures"] == 0
    delays = [e["delay"] for e in logs if e["event"] == "next run delayed"]
    assert delays == [120.0, 240.0]


def test_login_delay_sets_a_floor(
    tmp_path: Path, runs: FakeRuns, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """A run reporting retry_after (LOGIN-DELAY) is not retried before that many seconds."""
    runs.outcomes["a"] = [RunResult(account="a", retry_after=900.0)]
    results: list[RunResult] = []
    sched = make_scheduler(runs, on_result=results.append)
    sched.set_accounts(_accounts(tmp_path, "a"))
    sched.start()
    _wait(lambda: len(results) == 1)
    _wait(lambda: _seconds_until(sched.next_run("a")) > 850)
    assert _seconds_until(sched.next_run("a")) <= 900
    assert sched.describe()["a"]["failures"] == 0


def test_reload_adds_removes_and_changes_jobs(
    tmp_path: Path, runs: FakeRuns, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """set_accounts reports the differences and runs added and changed accounts at once."""
    sched = make_scheduler(runs)
    assert sched.set_accounts(_accounts(tmp_path, "a", "b")) == (["a", "b"], [], [])
    sched.start()
    runs.wait_count("a", 1)
    runs.wait_count("b", 1)
    new = {**_accounts(tmp_path, "a", "c"), "a": _accounts(tmp_path, "a", interval="2m")["a"]}
    assert sched.set_accounts(new) == (["c"], ["b"], ["a"])
    runs.wait_count("c", 1)
    runs.wait_count("a", 2)
    assert sched.next_run("b") is None
    assert set(sched.describe()) == {"a", "c"}
    _wait(lambda: _seconds_until(sched.next_run("a")) > 100)


def test_a_stalled_account_does_not_block_the_others(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """While one account's run hangs, another keeps being polled."""
    release = threading.Event()
    counts = {"slow": 0, "fast": 0}

    def run(account: Account) -> RunResult:
        counts[account.name] += 1
        if account.name == "slow":
            release.wait(WAIT)
        return RunResult(account=account.name)

    sched = make_scheduler(run, max_workers=2)
    sched.set_accounts(_accounts(tmp_path, "slow", "fast"))
    sched.start()
    for target in (1, 2, 3):
        _wait(lambda t=target: counts["fast"] >= t)  # type: ignore[misc]
        sched.poll_now()
    assert counts["slow"] == 1  # max_instances=1: never a second overlapping run
    release.set()


def test_a_crashing_run_counts_as_a_failure(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """An exception from the run function becomes an "error" result and keeps the job."""
    results: list[RunResult] = []

    def run(account: Account) -> RunResult:
        raise RuntimeError("bug")

    sched = make_scheduler(run, on_result=results.append)
    sched.set_accounts(_accounts(tmp_path, "a"))
    with capture_logs() as logs:
        sched.start()
        _wait(lambda: len(results) == 1)
    assert results[0].outcome == "error"
    assert results[0].error == "RuntimeError: bug"
    assert sched.next_run("a") is not None
    assert any(e["event"] == "sync run crashed" for e in logs)


def test_heartbeat_and_bounded_shutdown(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """The heartbeat beats while workers are busy; shutdown gives up on a stuck job in time."""
    release = threading.Event()
    started = threading.Event()

    def run(account: Account) -> RunResult:
        started.set()
        release.wait(WAIT)
        return RunResult(account=account.name)

    sched = make_scheduler(run, max_workers=1, heartbeat_every=0.05)
    sched.set_accounts(_accounts(tmp_path, "a"))
    sched.start()
    assert started.wait(WAIT)
    time.sleep(0.3)
    assert sched.heartbeat_age() < 0.2
    begin = time.monotonic()
    assert sched.shutdown(0.3) is False
    assert time.monotonic() - begin < 1.0
    release.set()


def test_shutdown_is_clean_when_idle(
    tmp_path: Path, runs: FakeRuns, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """With no job running, shutdown reports a clean stop."""
    sched = make_scheduler(runs)
    sched.set_accounts(_accounts(tmp_path, "a"))
    sched.start()
    runs.wait_count("a", 1)
    time.sleep(0.05)
    assert sched.shutdown(5.0) is True
    assert not sched.running


def test_shutdown_is_not_blocked_by_a_job_that_reschedules_itself(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """A run finishing during shutdown with a backoff to apply lets shutdown finish cleanly."""
    release = threading.Event()
    started = threading.Event()

    def run(account: Account) -> RunResult:
        started.set()
        release.wait(WAIT)
        return RunResult(account=account.name, retry_after=900.0)  # wants a reschedule

    sched = make_scheduler(run)
    sched.set_accounts(_accounts(tmp_path, "a"))
    sched.start()
    assert started.wait(WAIT)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    begin = time.monotonic()
    assert sched.shutdown(3.0) is True
    assert time.monotonic() - begin < 1.5
    timer.join()


def test_a_poll_during_a_run_is_replayed_after_it(
    tmp_path: Path, runs: FakeRuns, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """SIGUSR1 while an account is mid-run makes it run again right after, not never."""
    release = threading.Event()
    in_run = threading.Event()

    def run(account: Account) -> RunResult:
        if not in_run.is_set():
            in_run.set()
            release.wait(WAIT)
        return runs(account)

    sched = make_scheduler(run)
    sched.set_accounts(_accounts(tmp_path, "a"))
    sched.start()
    assert in_run.wait(WAIT)
    sched.poll_now()
    release.set()
    runs.wait_count("a", 2)
