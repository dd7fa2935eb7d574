"""One APScheduler job per account; the only module that imports apscheduler.

Every account is an interval job with jitter, ``max_instances=1`` (a run never overlaps
itself) and coalescing (a daemon that was suspended runs once, not once per missed
interval). After each run the job's next time is moved by
:func:`popsync.backoff.next_delay`, which honours the server's ``LOGIN-DELAY`` and backs
off on failures.

**A slow or stuck account never delays another.** A shared FIFO pool of ``max_workers``
threads cannot promise that: two accounts whose servers drip one byte a second would
hold both workers while every other account waits in the queue behind them. So:

* Every job has a thread of its own (at most one per account, by ``max_instances=1``);
  no job ever queues behind another job's thread.
* ``max_workers`` is enforced by :class:`_Slots`, handed out in arrival order, which a
  run holds for at most its account's ``login_timeout``. By then a run has either
  logged in or failed (the login phase has that budget, see :mod:`popsync.net`); how
  long the rest takes depends on the mailbox and the link, and no other account
  should wait for that. A run past its slot time goes on without the slot. So
  ``max_workers`` bounds how many runs start together (the burst of connections and
  logins at each tick), and a new run waits at most one ``login_timeout`` per run
  queued ahead of it.
* An account whose previous run failed (timeouts, refused connections, wrong
  password...) does not queue for a slot at all: it cannot delay healthy accounts
  again, however it behaves this time.
* Every run is bounded on its own by the phase budgets and the minimum transfer rate
  (:mod:`popsync.net`), so even an unslotted run ends.

Threads are thus bounded by the number of accounts, which is the natural bound anyway
since an account never runs twice at once.

A separate one-thread executor runs a heartbeat job, which proves the scheduler's own
thread is alive. Runs also report signs of life (:meth:`AccountScheduler.note_activity`:
data from the server); a run silent for longer than its own timeouts allow is
*stalled*, and the daemon stops feeding systemd's watchdog when every running run is
stalled (:meth:`AccountScheduler.making_progress`), so a daemon that makes no progress
at all gets restarted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from popsync.backoff import next_delay
from popsync.errors import ExitCode
from popsync.logconfig import HEARTBEAT_JOB

if TYPE_CHECKING:
    from popsync.config import Account
    from popsync.sync import RunResult

__all__ = ["HEARTBEAT_EVERY", "RUN_THREADS", "AccountScheduler", "stall_limit"]

#: How often the heartbeat job beats (seconds).
HEARTBEAT_EVERY = 5.0
_HEARTBEAT_ID = "__heartbeat__"
#: Jitter is at most this share of the interval, and never more than a minute.
_JITTER_SHARE = 0.1
_MAX_JITTER = 60.0
#: A poll skipped in the instant a run was ending is tried again this much later (seconds).
_RETRY_SKIPPED = 0.05
#: Threads for jobs: one per account at most; created only as jobs need them.
RUN_THREADS = 1024


def _jitter(interval: float) -> int:
    return int(min(interval * _JITTER_SHARE, _MAX_JITTER))


def stall_limit(account: Account) -> float:
    """Seconds a run may show no sign of life before it counts as stalled.

    Twice the longest wait popsync's own limits allow (the timeout of one read, the login
    budget, the minimum-rate window): a run silent for longer is not waiting for a slow
    server, it is stuck somewhere no timeout reaches (a hung file system, a bug).
    """
    return 2 * max(account.timeout, account.login_timeout, account.low_speed_time)


class _Slots:
    """``size`` run slots, granted in arrival order; a slot counts only until it expires."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._cond = threading.Condition()
        self._expiry: dict[str, float] = {}  # holder -> monotonic time its slot lapses
        self._queue: deque[str] = deque()
        self._closed = False

    def acquire(self, name: str, hold: float) -> bool:
        """Wait for a slot held for at most ``hold`` seconds; False once closed."""
        with self._cond:
            self._queue.append(name)
            try:
                while not self._closed:
                    now = time.monotonic()
                    busy = sorted(t for t in self._expiry.values() if t > now)
                    if len(busy) < self._size and self._queue[0] == name:
                        self._expiry[name] = now + hold
                        return True
                    # Full: wake when the oldest slot lapses (or on a release); else wait
                    # for the runs queued ahead to take theirs.
                    full = len(busy) >= self._size
                    self._cond.wait(busy[0] - now if full else None)
                return False
            finally:
                self._queue.remove(name)
                self._cond.notify_all()

    def release(self, name: str) -> None:
        with self._cond:
            self._expiry.pop(name, None)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter and refuse new slots (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class _Run:
    """A run in progress: when it last showed a sign of life, and how long it may not."""

    last: float
    limit: float


class AccountScheduler:
    """Runs ``run(account)`` for every account on its interval, with backoff."""

    def __init__(
        self,
        run: Callable[[Account], RunResult],
        *,
        max_workers: int,
        on_result: Callable[[RunResult], None] | None = None,
        heartbeat_every: float = HEARTBEAT_EVERY,
        on_delay: Callable[[RunResult, float], None] | None = None,
    ) -> None:
        """``on_delay(result, seconds)`` learns each next run's delay (metrics use it)."""
        # APScheduler's own chatter is held at WARNING (DEBUG with -v) by popsync.logconfig,
        # which also routes it through the structlog pipeline; nothing to set up here.
        self._run = run
        self._on_result = on_result
        self._on_delay = on_delay
        self._heartbeat_every = heartbeat_every
        self._accounts: dict[str, Account] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        # APScheduler drops a run that is due while the account still runs (max_instances=1).
        # For the interval that is right (coalescing), but a SIGUSR1 poll must not be lost:
        # _repoll holds accounts polled mid-run, replayed when the run ends; _polled those
        # whose poll is not served yet, retried if APScheduler skips it anyway.
        self._running: set[str] = set()
        self._repoll: set[str] = set()
        self._polled: set[str] = set()
        # APScheduler's shutdown(wait=True) holds its job-store lock while it waits for
        # running jobs, so a job that reschedules itself then would deadlock it until the
        # shutdown timeout. Jobs reschedule under _move_lock and only while not stopping.
        self._move_lock = threading.Lock()
        self._stopping = False
        self._beat = time.monotonic()
        self._log = structlog.get_logger("popsync.scheduler")
        self._slots = _Slots(max_workers)
        self._runs: dict[str, _Run] = {}
        self._scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(RUN_THREADS),
                "heartbeat": ThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self._scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES)

    # ------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._scheduler.add_job(
            self._heartbeat,
            IntervalTrigger(seconds=self._heartbeat_every, timezone=UTC),
            id=_HEARTBEAT_ID,
            # popsync.logconfig drops APScheduler's lines about this job by this name.
            name=HEARTBEAT_JOB,
            executor="heartbeat",
        )
        self._scheduler.start()

    def shutdown(self, timeout: float) -> bool:
        """Stop scheduling and wait up to ``timeout`` seconds for running jobs; True if done."""
        done = threading.Event()

        def wait() -> None:
            self._scheduler.shutdown(wait=True)
            done.set()

        with self._move_lock:
            self._stopping = True
        self._slots.close()
        if self._scheduler.running:
            self._scheduler.pause()
            threading.Thread(target=wait, name="popsync-shutdown", daemon=True).start()
            return done.wait(timeout)
        return True

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def heartbeat_age(self) -> float:
        """Seconds since the heartbeat job last ran."""
        return time.monotonic() - self._beat

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()

    def note_activity(self, name: str) -> None:
        """A sign of life from ``name``'s run (data arrived); cheap, called per read."""
        run = self._runs.get(name)
        if run is not None:
            run.last = time.monotonic()

    def stalled(self) -> list[str]:
        """Accounts whose run has been silent for longer than :func:`stall_limit`."""
        now = time.monotonic()
        return sorted(n for n, r in list(self._runs.items()) if now - r.last > r.limit)

    def making_progress(self) -> bool:
        """False only when runs are in progress and every one of them is stalled."""
        runs = len(self._runs)
        return runs == 0 or len(self.stalled()) < runs

    # --------------------------------------------------------------------- accounts
    @property
    def accounts(self) -> Mapping[str, Account]:
        with self._lock:
            return dict(self._accounts)

    def set_accounts(
        self, accounts: Mapping[str, Account]
    ) -> tuple[list[str], list[str], list[str]]:
        """Add, remove and change jobs to match ``accounts``; return (added, removed, changed)."""
        with self._lock:
            old = self._accounts
            self._accounts = dict(accounts)
        added = [n for n in accounts if n not in old]
        removed = [n for n in old if n not in accounts]
        changed = [n for n in accounts if n in old and old[n] != accounts[n]]
        for name in removed:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(name)
        for name in removed + changed:
            # A changed account (say, a fixed password) starts without its old backoff.
            self._failures.pop(name, None)
        now = datetime.now(UTC)
        for name in added + changed:
            account = accounts[name]
            self._scheduler.add_job(
                self._job,
                IntervalTrigger(
                    seconds=account.interval, jitter=_jitter(account.interval), timezone=UTC
                ),
                args=(name,),
                id=name,
                name=f"sync {name}",
                replace_existing=True,
                next_run_time=now,
            )
        return added, removed, changed

    def poll_now(self) -> None:
        """Run every account as soon as a worker is free (SIGUSR1).

        An account that is running right now runs again as soon as it finishes, so mail
        that arrived after its listing is not left waiting for a whole interval.
        """
        now = datetime.now(UTC)
        for name in self.accounts:
            with self._lock:
                running = name in self._running
                (self._repoll if running else self._polled).add(name)
            if not running:
                self._move(name, now)

    def _on_skipped(self, event: JobSubmissionEvent) -> None:
        """APScheduler skipped a due run because the previous one had not quite ended."""
        name = event.job_id
        with self._lock:
            if name not in self._polled:
                return  # an interval tick during a long run: coalesced, as intended
            if name in self._running:
                self._repoll.add(name)
                return
        # The run had left our code but APScheduler had not counted it out yet.
        self._move(name, datetime.now(UTC) + timedelta(seconds=_RETRY_SKIPPED))

    def next_run(self, name: str) -> datetime | None:
        job = self._scheduler.get_job(name)
        return None if job is None else job.next_run_time

    # -------------------------------------------------------------------------- job
    def _job(self, name: str) -> None:
        account = self.accounts.get(name)
        if account is None:  # removed by a reload while queued
            return
        with self._lock:
            self._running.add(name)
            self._polled.discard(name)  # this run serves any earlier poll
        try:
            self._run_in_slot(name, account)
        finally:
            with self._lock:
                self._running.discard(name)
                repoll = name in self._repoll
                self._repoll.discard(name)
                if repoll:
                    self._polled.add(name)
            if repoll:
                self._move(name, datetime.now(UTC))

    def _run_in_slot(self, name: str, account: Account) -> None:
        """Take a slot (unless the last run failed), run, give the slot back."""
        slotted = not self._failures.get(name)
        if slotted and not self._slots.acquire(name, account.login_timeout):
            return  # shutting down
        self._runs[name] = _Run(time.monotonic(), stall_limit(account))
        try:
            self._run_and_reschedule(name, account)
        finally:
            self._runs.pop(name, None)
            if slotted:
                self._slots.release(name)

    def _run_and_reschedule(self, name: str, account: Account) -> None:
        """One run, then the next run time by the backoff rules, then the result callback."""
        result = self._run_safely(account)
        if name not in self.accounts:  # removed by a reload while running
            return
        failures = 0 if result.outcome == "ok" else self._failures.get(name, 0) + 1
        self._failures[name] = failures
        delay = next_delay(
            result.outcome, failures, account.interval, retry_after=result.retry_after
        )
        if delay != account.interval:
            self._move(name, datetime.now(UTC) + timedelta(seconds=delay))
        if failures or delay != account.interval:
            self._log.info(
                "next run delayed" if delay != account.interval else "next run on schedule",
                account=name,
                outcome=result.outcome,
                failures=failures,
                delay=round(delay, 3),
            )
        if self._on_delay is not None:
            self._on_delay(result, delay)
        if self._on_result is not None:
            self._on_result(result)

    def _run_safely(self, account: Account) -> RunResult:
        """Run one account; a bug in the run counts as a failed run, not a dead job."""
        try:
            return self._run(account)
        except Exception as exc:
            from popsync.sync import RunResult

            self._log.exception("sync run crashed", account=account.name)
            return RunResult(
                account=account.name,
                outcome="error",
                exit_code=ExitCode.SOFTWARE,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _move(self, name: str, when: datetime) -> None:
        """Set the job's next run time, unless a reload removed it or shutdown began."""
        with self._move_lock, contextlib.suppress(JobLookupError):
            if not self._stopping:
                self._scheduler.modify_job(name, next_run_time=when)

    def describe(self) -> dict[str, Any]:
        """Failures and next run per account, for status lines and tests."""
        return {
            name: {"failures": self._failures.get(name, 0), "next_run": self.next_run(name)}
            for name in self.accounts
        }
