"""One APScheduler job per account; the only module that imports apscheduler.

Every account is an interval job with jitter, ``max_instances=1`` (a run never overlaps
itself) and coalescing (a daemon that was suspended runs once, not once per missed
interval). Jobs run on a bounded thread pool, so a stalled server costs one worker until
its timeout, never the whole schedule. After each run the job's next time is moved by
:func:`popsync.backoff.next_delay`, which honours the server's ``LOGIN-DELAY`` and backs
off on failures.

A separate one-thread executor runs a heartbeat job; the daemon only tells systemd's
watchdog that all is well while that heartbeat keeps beating, which proves the
scheduler's own thread is alive even when every worker is busy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
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

__all__ = ["HEARTBEAT_EVERY", "AccountScheduler"]

#: How often the heartbeat job beats (seconds).
HEARTBEAT_EVERY = 5.0
_HEARTBEAT_ID = "__heartbeat__"
#: Jitter is at most this share of the interval, and never more than a minute.
_JITTER_SHARE = 0.1
_MAX_JITTER = 60.0
#: A poll skipped in the instant a run was ending is tried again this much later (seconds).
_RETRY_SKIPPED = 0.05


def _jitter(interval: float) -> int:
    return int(min(interval * _JITTER_SHARE, _MAX_JITTER))


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
        self._scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(max_workers),
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
            self._run_and_reschedule(name, account)
        finally:
            with self._lock:
                self._running.discard(name)
                repoll = name in self._repoll
                self._repoll.discard(name)
                if repoll:
                    self._polled.add(name)
            if repoll:
                self._move(name, datetime.now(UTC))

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
