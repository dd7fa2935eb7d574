"""Worker slots and stall detection: a slow or stuck account never delays another."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from popsync.config import Account, parse_config
from popsync.errors import ExitCode
from popsync.scheduler import AccountScheduler, stall_limit
from popsync.sync import RunResult
from tests.unit.conftest import WAIT, wait_until

FAST = {"timeout": "1s", "login_timeout": "1s", "low_speed_time": "1s"}


def _accounts(tmp_path: Path, *names: str, **keys: str) -> dict[str, Account]:
    extra = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    text = "\n".join(
        f'[accounts.{n}]\nhost = "{n}.invalid"\nusername = "u"\npassword = "pw"\n'
        f'maildir = "{tmp_path / n}"\ninterval = "60s"\n{extra}'
        for n in names
    )
    return dict(parse_config(text).accounts)


class Runs:
    """A run function whose runs of chosen accounts block until released."""

    def __init__(self, blocking: set[str]) -> None:
        self.blocking = blocking
        self.release = threading.Event()
        self.started: dict[str, list[float]] = {}
        self.finished: dict[str, int] = {}
        self.outcomes: dict[str, list[RunResult]] = {}

    def __call__(self, account: Account) -> RunResult:
        name = account.name
        self.started.setdefault(name, []).append(time.monotonic())
        script = self.outcomes.get(name)
        if script:
            result = script.pop(0)
        else:
            if name in self.blocking:
                self.release.wait(WAIT * 2)
            result = RunResult(account=name)
        self.finished[name] = self.finished.get(name, 0) + 1
        return result

    def count(self, name: str) -> int:
        return self.finished.get(name, 0)


def test_a_stuck_run_gives_its_only_worker_back_after_login_timeout(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """With max_workers=1, a run stuck past login_timeout no longer keeps the next one waiting."""
    runs = Runs(blocking={"stuck"})
    sched = make_scheduler(runs, max_workers=1)
    both = _accounts(tmp_path, "stuck", "fast", **FAST)
    sched.set_accounts({"stuck": both["stuck"]})
    sched.start()
    wait_until(lambda: "stuck" in runs.started)
    sched.set_accounts(both)  # "fast" is due now, but the only worker is taken
    wait_until(lambda: runs.count("fast") == 1)
    assert runs.count("stuck") == 0, "the stuck run is still running"
    waited = runs.started["fast"][0] - runs.started["stuck"][0]
    assert waited > 0.9  # max_workers still counts: it waited for the slot to lapse
    runs.release.set()


def test_an_account_that_failed_last_time_does_not_take_a_worker(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """A failing account's next run, stuck, leaves the only worker to the healthy account."""
    runs = Runs(blocking={"bad"})
    runs.outcomes["bad"] = [
        RunResult(account="bad", outcome="temporary", exit_code=ExitCode.TEMPORARY)
    ]
    sched = make_scheduler(runs, max_workers=1)
    sched.set_accounts(_accounts(tmp_path, "bad", "good"))  # login_timeout 60 s: long slots
    sched.start()
    wait_until(lambda: runs.count("bad") == 1 and runs.count("good") == 1)
    wait_until(lambda: sched.describe()["bad"]["failures"] == 1)
    sched.poll_now()
    wait_until(lambda: len(runs.started["bad"]) == 2)  # stuck now
    sched.poll_now()
    wait_until(lambda: runs.count("good") >= 2, timeout=2.0)
    assert runs.count("bad") == 1
    runs.release.set()


def test_progress_is_judged_by_signs_of_life(
    tmp_path: Path, make_scheduler: Callable[..., AccountScheduler]
) -> None:
    """A run that stops showing life past its stall limit makes the scheduler report no progress."""
    lively = threading.Event()
    release = threading.Event()
    holder: list[AccountScheduler] = []

    def run(account: Account) -> RunResult:
        while not lively.wait(0.05):
            holder[0].note_activity(account.name)
        release.wait(WAIT * 2)
        return RunResult(account=account.name)

    sched = make_scheduler(run, max_workers=1)
    holder.append(sched)
    accounts = _accounts(tmp_path, "a", **FAST)
    assert stall_limit(accounts["a"]) == 2.0
    assert sched.making_progress()  # nothing runs: nothing is stuck
    sched.set_accounts(accounts)
    sched.start()
    time.sleep(2.5)  # longer than the stall limit, but the run keeps showing life
    assert sched.making_progress()
    assert sched.stalled() == []
    lively.set()
    wait_until(lambda: not sched.making_progress())
    assert sched.stalled() == ["a"]
    release.set()
    wait_until(sched.making_progress)
