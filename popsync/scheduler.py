"""One APScheduler job per account, run by bounded pools; the only module that imports apscheduler.

Every account is an interval job with jitter, ``max_instances=1`` (a run never overlaps
itself) and coalescing (a daemon that was suspended runs once, not once per missed
interval). After each run the job's next time is moved by
:func:`popsync.backoff.next_delay`, which honours the server's ``LOGIN-DELAY`` and backs
off on failures.

**Polls are spread.** At start-up and after a reload, the accounts added or changed do
not all connect at once: each first runs at an offset fixed by a hash of its name within
a window of :data:`START_SPACING` seconds per such account, at most its interval
(:func:`start_offset`). One account starts at once, 200 within 20 s, 10,000 over a
5-minute interval; the offset is also the phase of every later interval, so the steady
state stays spread. SIGUSR1 (:meth:`AccountScheduler.poll_now`) asks for every account
now: only the pool below limits that burst.

**A slow or stuck account never delays another by more than its slot.** Due runs go to
a :class:`_Pool` of run threads, first come first served, which has ``max_workers``
*slots*. A run holds its slot for at most its account's ``login_timeout``: by then it has
logged in or failed (the login phase has that budget, see :mod:`popsync.net`); how long
the rest takes depends on the mailbox and the link, and no other account should wait
for that. A run past its slot time goes on in its thread without the slot, and the pool
starts the next queued run in another thread. So:

* at most ``max_workers`` runs start together (the burst of TLS handshakes and logins),
  and a queued run waits at most one ``login_timeout`` per slot-holder ahead of it;
* threads are bounded by ``max_workers``, plus the runs past their slot time (each is
  bounded on its own by the phase budgets and the minimum transfer rate of
  :mod:`popsync.net`, so it ends), plus one thread that watches the queue; idle threads
  end after :data:`IDLE_THREAD_EXIT` seconds. The number of accounts does not matter: a
  network-bound poll of a few hundred milliseconds frees its thread for the next one, so
  10,000 accounts at a 5-minute interval keep about a dozen runs going.
* An account whose previous run failed (timeouts, refused connections, wrong
  password...) queues in a second pool of the same size, so however it behaves this
  time it cannot delay a healthy account; failing accounts delay each other by at most
  one slot each, as above.

A separate one-thread executor runs a heartbeat job, which proves the scheduler's own
thread is alive. Runs also report signs of life (:meth:`AccountScheduler.note_activity`:
data from the server); a run silent for longer than its own timeouts allow is
*stalled*, and the daemon stops feeding systemd's watchdog when every running run is
stalled (:meth:`AccountScheduler.making_progress`), so a daemon that makes no progress
at all gets restarted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from popsync import stall
from popsync.backoff import next_delay
from popsync.errors import ExitCode
from popsync.logconfig import HEARTBEAT_JOB
from popsync.stall import stall_limit

if TYPE_CHECKING:
    from apscheduler.job import Job

    from popsync.config import Account
    from popsync.sync import RunResult

__all__ = [
    "HEARTBEAT_EVERY",
    "IDLE_THREAD_EXIT",
    "START_SPACING",
    "AccountScheduler",
    "stall_limit",
    "start_offset",
]

#: How often the heartbeat job beats (seconds).
HEARTBEAT_EVERY = 5.0
_HEARTBEAT_ID = "__heartbeat__"
#: Jitter is at most this share of the interval, and never more than a minute.
_JITTER_SHARE = 0.1
_MAX_JITTER = 60.0
#: A poll skipped in the instant a run was ending is tried again this much later (seconds).
_RETRY_SKIPPED = 0.05
#: A run thread with nothing to do ends after this many seconds.
IDLE_THREAD_EXIT = 30.0
#: Start-up spread: this many seconds of window per account started (at most the interval).
START_SPACING = 0.1


def _jitter(interval: float) -> int:
    return int(min(interval * _JITTER_SHARE, _MAX_JITTER))


def start_offset(name: str, interval: float, starting: int) -> float:
    """Seconds after start-up (or a reload) at which account ``name`` first runs.

    A fixed point, from a hash of the name, of a window of :data:`START_SPACING` seconds
    per account among the ``starting`` ones, and never longer than ``interval``: the same
    accounts always get the same offsets, and they are spread evenly.
    """
    window = min(interval, starting * START_SPACING)
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return window * int.from_bytes(digest, "big") / 2**64


class _Pool:
    """Run threads with ``size`` slots, granted in arrival order; see the module docstring.

    A task holds its slot until it ends or its ``hold`` seconds lapse, whichever is first;
    then the next queued task starts (in an idle thread, or a new one).
    """

    def __init__(self, name: str, size: int) -> None:
        self._name = name
        self._size = size
        self._cond = threading.Condition()
        self._queue: deque[tuple[Callable[[], None], float]] = deque()
        self._slots: dict[int, float] = {}  # ticket -> monotonic time its slot lapses
        self._tickets = itertools.count()
        self._threads = 0
        self._idle = 0  # threads waiting in _take
        self._starting = 0  # threads spawned that have not reached _take yet
        self._busy = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads alive now (running, idle or watching the queue)."""
        return self._threads

    def submit(self, task: Callable[[], None], hold: float) -> None:
        """Queue ``task``; it starts once a slot is free (at once, if one is)."""
        with self._cond:
            if self._closed:
                return
            self._queue.append((task, hold))
            if self._idle:
                self._cond.notify()
            elif not self._starting:
                self._spawn()

    def close(self) -> None:
        """Drop queued tasks and refuse new ones; running tasks go on (shutdown)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no task runs; True when none does."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def _spawn(self) -> None:
        self._threads += 1
        self._starting += 1
        name = f"popsync-{self._name}-{next(self._tickets)}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _take(self) -> tuple[Callable[[], None], int] | None:
        """The next task and its slot ticket, waiting as needed; None: end this thread."""
        while not self._closed:
            now = time.monotonic()
            for ticket in [t for t, lapse in self._slots.items() if lapse <= now]:
                del self._slots[ticket]  # past its slot time: the run goes on without it
            if self._queue and len(self._slots) < self._size:
                task, hold = self._queue.popleft()
                ticket = next(self._tickets)
                self._slots[ticket] = now + hold
                if self._queue and not self._idle and not self._starting:
                    self._spawn()  # someone must watch the queue for the next free slot
                return task, ticket
            # Full: wake at the first lapse (or a release); idle: retire after a while.
            wait = min(self._slots.values()) - now if self._queue else IDLE_THREAD_EXIT
            self._idle += 1
            try:
                woken = self._cond.wait(wait)
            finally:
                self._idle -= 1
            if not woken and not self._queue:
                return None
        return None

    def _work(self) -> None:
        with self._cond:
            self._starting -= 1
            try:
                while (taken := self._take()) is not None:
                    task, ticket = taken
                    self._busy += 1
                    self._cond.release()
                    try:
                        task()
                    finally:
                        self._cond.acquire()
                        self._busy -= 1
                        self._slots.pop(ticket, None)
                        # This thread takes the next queued task itself: no one to wake,
                        # except shutdown waiting for the last run.
                        if not self._busy:
                            self._cond.notify_all()
            finally:
                self._threads -= 1


class _PoolExecutor(BaseExecutor):  # type: ignore[misc]
    """An APScheduler executor that hands each run to the pool ``route(job)`` picks.

    The job counts as running (``max_instances``) from submission until it ends, so
    a queued run is never queued twice.
    """

    def __init__(self, route: Callable[[Job], tuple[_Pool, float]], pools: list[_Pool]) -> None:
        super().__init__()
        self._route = route
        self._pools = pools

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        pool, hold = self._route(job)

        def task() -> None:
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as exc:  # run_job catches the job's own errors
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events)

        pool.submit(task, hold)

    def shutdown(self, wait: bool = True) -> None:
        for pool in self._pools:
            pool.close()
        if wait:
            for pool in self._pools:
                pool.wait_idle()


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
        # whose poll is not served yet, retried if APScheduler skips it anyway; _queued those
        # submitted to a pool and not started yet (their run will serve a poll made now).
        self._queued: set[str] = set()
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
        self._healthy = _Pool("run", max_workers)
        self._failing = _Pool("retry", max_workers)
        self._runs: dict[str, _Run] = {}
        self._scheduler = BackgroundScheduler(
            executors={
                "default": _PoolExecutor(self._route, [self._healthy, self._failing]),
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

    def note_activity(self, name: str) -> None:
        """A sign of life from ``name``'s run (data arrived); cheap, called per read."""
        stall.note_activity(self._runs, name)

    def stalled(self) -> list[str]:
        """Accounts whose run has been silent for longer than :func:`stall_limit`."""
        return stall.stalled(self._runs)

    def making_progress(self) -> bool:
        """False only when runs are in progress and every one of them is stalled."""
        return stall.making_progress(self._runs)

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
        starting = added + changed
        for name in starting:
            account = accounts[name]
            # Spread first runs (see the module docstring); the offset is the job's phase.
            first = now + timedelta(seconds=start_offset(name, account.interval, len(starting)))
            self._scheduler.add_job(
                self._job,
                IntervalTrigger(
                    seconds=account.interval,
                    jitter=_jitter(account.interval),
                    start_date=first,
                    timezone=UTC,
                ),
                args=(name,),
                id=name,
                name=f"sync {name}",
                replace_existing=True,
                next_run_time=first,
            )
        return added, removed, changed

    def poll_now(self) -> None:
        """Run every account as soon as a slot is free (SIGUSR1).

        An account that is running right now runs again as soon as it finishes, so mail
        that arrived after its listing is not left waiting for a whole interval.
        """
        now = datetime.now(UTC)
        for name in self.accounts:
            with self._lock:
                if name in self._queued:
                    continue  # about to start: its listing comes after this poll
                running = name in self._running
                (self._repoll if running else self._polled).add(name)
            if not running:
                self._move(name, now)

    def _on_skipped(self, event: JobSubmissionEvent) -> None:
        """APScheduler skipped a due run because the previous one had not quite ended."""
        name = event.job_id
        with self._lock:
            if name not in self._polled or name in self._queued:
                return  # coalesced: a run in progress, or one queued that serves the poll
            if name in self._running:
                self._repoll.add(name)
                return
        # The run had left our code but APScheduler had not counted it out yet.
        self._move(name, datetime.now(UTC) + timedelta(seconds=_RETRY_SKIPPED))

    def next_run(self, name: str) -> datetime | None:
        job = self._scheduler.get_job(name)
        return None if job is None else job.next_run_time

    # -------------------------------------------------------------------------- job
    def account(self, name: str) -> Account | None:
        """One scheduled account (cheap: :attr:`accounts` copies them all)."""
        with self._lock:
            return self._accounts.get(name)

    def _route(self, job: Job) -> tuple[_Pool, float]:
        """The pool for a due run (see the module docstring) and how long it may keep a slot."""
        name = job.args[0]
        account = self.account(name)
        hold = account.login_timeout if account is not None else 0.0
        with self._lock:
            self._queued.add(name)
        return (self._failing if self._failures.get(name) else self._healthy), hold

    def _job(self, name: str) -> None:
        with self._lock:
            self._queued.discard(name)
        account = self.account(name)
        if account is None:  # removed by a reload while queued
            return
        with self._lock:
            self._running.add(name)
            self._polled.discard(name)  # this run serves any earlier poll
        try:
            self._runs[name] = _Run(time.monotonic(), stall_limit(account))
            self._run_and_reschedule(name, account)
        finally:
            self._runs.pop(name, None)
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
        if self.account(name) is None:  # removed by a reload while running
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
