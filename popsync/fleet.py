"""Fleet mode: the daemon's scheduler when the store is PostgreSQL (``store = "postgresql://…"``).

Any number of daemons share one config and one database; `FleetScheduler` replaces the
single-process `popsync.scheduler.AccountScheduler` and offers the same surface to
`popsync.daemon.Daemon`. No thread per account: one claim loop and a bounded pool.

* **Register.** The configured accounts get a row in ``accounts_lease`` (at start and on
  every SIGHUP; retried by the loop while the database is unreachable).
* **Claim.** The loop claims due accounts (``claim_due``: ``FOR UPDATE SKIP LOCKED``) up to
  its free run slots (``max_workers``) and only among the accounts in ITS config (config
  drift: a worker never runs an account it does not know, so an account removed from one
  worker's config is still run by the others, and one removed from every config is never
  claimed again).
* **Renew.** The store's `popsync.lease.Renewer` renews every held lease (default every
  10 s for 30 s). A lease the renewer finds gone stops the run at its next message.
* **Fence.** The run gets the store seen through its token (`popsync.pgstore.FencedStore`:
  every write transaction checks the lease) and a ``fence`` that `popsync.sync` calls right
  before each batch's hand-over; `popsync.lease.LeaseLost` ends the run as temporary (75),
  logged as one ``lease lost`` line.
* **Release.** The lease is released with ``next_due`` = the account's interval or backoff
  (`popsync.backoff.next_delay`, LOGIN-DELAY), plus jitter so polls stay spread. A run
  stopped by shutdown is released due now, so another worker takes it over at once. A
  release that cannot reach the database leaves the lease to expire (then due at once).
* **SIGUSR1** makes this worker's accounts due now; one running now is due again when it
  ends.

Consecutive failures (for backoff) are counted by the worker that ran the account; another
worker starts counting afresh, which only shortens a backoff.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from popsync import stall
from popsync.backoff import next_delay
from popsync.errors import ExitCode, PopsyncError
from popsync.lease import (
    DEFAULT_LEASE_SECONDS,
    Lease,
    LeaseLost,
    LeaseStore,
    Renewer,
    mailbox_key,
    mailbox_of,
)
from popsync.scheduler import HEARTBEAT_EVERY
from popsync.stall import stall_limit

if TYPE_CHECKING:
    from popsync.config import Account
    from popsync.store import Store
    from popsync.sync import RunResult

__all__ = ["CLAIM_EVERY", "FencedView", "FleetRun", "FleetScheduler", "FleetStore"]

#: How often an idle worker looks for due accounts (seconds); a finished run wakes it early.
CLAIM_EVERY = 1.0
#: Jitter added to each next due time: this share of the delay, at most a minute.
_JITTER_SHARE = 0.1
_MAX_JITTER = 60.0
#: "database unavailable" is logged once per this many seconds while it lasts.
_DB_WARN_EVERY = 30.0


class FencedView(Protocol):
    """The store seen through one lease token (`popsync.pgstore.FencedStore`)."""

    def fence(self) -> None:
        """Raise `LeaseLost` unless the lease is still held."""


class FleetStore(Protocol):
    """What fleet mode needs of the store (`popsync.pgstore.PgStore`)."""

    leases: LeaseStore
    worker_id: str
    lease_seconds: float
    renewer: Renewer

    def fenced(self, token: str) -> Any:
        """The store seen through ``token``: a `FencedView` and a `popsync.store.Store`."""


#: ``run(account, store, fence, stop)``: one sync run with the fenced store.
FleetRun = Callable[["Account", "Store", Callable[[], None], threading.Event], "RunResult"]


@dataclass
class _Active:
    """A run in progress on this worker."""

    name: str
    lease: Lease
    stop: threading.Event
    last: float  # monotonic time of its last sign of life
    limit: float  # seconds of silence after which it counts as stalled
    lost: bool = False
    repoll: bool = False


def _short(exc: BaseException) -> str:
    """One bounded, safe line for a database error (it may quote the server)."""
    from popsync.textsafe import safe_text

    lines = str(exc).strip().splitlines()
    return safe_text(lines[0] if lines else type(exc).__name__, 300)


def _jitter(delay: float) -> float:
    return random.uniform(0.0, min(delay * _JITTER_SHARE, _MAX_JITTER))  # noqa: S311


class FleetScheduler:
    """Claims due accounts from PostgreSQL and runs them in a bounded pool; see the module."""

    def __init__(
        self,
        run: FleetRun,
        store: FleetStore,
        *,
        max_workers: int,
        on_result: Callable[[RunResult], None] | None = None,
        heartbeat_every: float = HEARTBEAT_EVERY,
        on_delay: Callable[[RunResult, float], None] | None = None,
        claim_every: float = CLAIM_EVERY,
    ) -> None:
        self._run = run
        self._store = store
        self._leases = store.leases
        self.worker_id = store.worker_id
        self._lease_seconds = getattr(store, "lease_seconds", DEFAULT_LEASE_SECONDS)
        self._renewer = store.renewer
        self._max_workers = max_workers
        self._on_result = on_result
        self._on_delay = on_delay
        self._claim_every = min(claim_every, heartbeat_every)
        self._accounts: dict[str, Account] = {}
        self._by_mailbox: dict[str, str] = {}
        self._foreign: set[str] = set()  # other configs' accounts: never claimed
        self._failures: dict[str, int] = {}
        self._next: dict[str, datetime] = {}
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._register = False
        self._poll = False
        self._beat = time.monotonic()
        self._db_warned = -_DB_WARN_EVERY
        self._db_down = False
        self._log = structlog.get_logger("popsync.fleet").bind(worker=self.worker_id)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="popsync-fleet-run")
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="popsync-fleet", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float) -> bool:
        """Stop claiming, stop running runs, wait up to ``timeout`` seconds; True if done.

        Runs that end release their leases due now; one still stuck after ``timeout`` keeps
        its lease until it expires (the renewer is stopped).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            for active in self._active.values():
                active.stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            done = not self._active
        self._pool.shutdown(wait=False)
        return done

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def heartbeat_age(self) -> float:
        """Seconds since the claim loop last went round."""
        return time.monotonic() - self._beat

    def note_activity(self, name: str) -> None:
        """A sign of life from ``name``'s run; cheap, called per read."""
        stall.note_activity(self._active, name)

    def stalled(self) -> list[str]:
        """Accounts whose run has been silent for longer than its stall limit."""
        return stall.stalled(self._active)

    def making_progress(self) -> bool:
        """False only when runs are in progress and every one of them is stalled."""
        return stall.making_progress(self._active)

    # --------------------------------------------------------------------- accounts
    @property
    def accounts(self) -> Mapping[str, Account]:
        with self._lock:
            return dict(self._accounts)

    def set_accounts(
        self, accounts: Mapping[str, Account]
    ) -> tuple[list[str], list[str], list[str]]:
        """Adopt ``accounts`` and register them (by the loop); return (added, removed, changed)."""
        with self._lock:
            old = self._accounts
            self._accounts = dict(accounts)
            self._by_mailbox = {}
            for name, account in accounts.items():
                self._by_mailbox.setdefault(account.mailbox, name)
            added = [n for n in accounts if n not in old]
            removed = [n for n in old if n not in accounts]
            changed = [n for n in accounts if n in old and old[n] != accounts[n]]
            for name in removed + changed:
                self._failures.pop(name, None)
                self._next.pop(name, None)
            self._register = True
        self._wake.set()
        return added, removed, changed

    def poll_now(self) -> None:
        """Make this worker's accounts due now (SIGUSR1); running ones again when they end."""
        with self._lock:
            self._poll = True
            for active in self._active.values():
                active.repoll = True
        self._wake.set()

    def next_run(self, name: str) -> datetime | None:
        """When this worker last set ``name`` due (another worker may have run it since)."""
        with self._lock:
            return self._next.get(name)

    def describe(self) -> dict[str, Any]:
        """Failures, next run and whether this worker runs it, per account."""
        with self._lock:
            return {
                name: {
                    "failures": self._failures.get(name, 0),
                    "next_run": self._next.get(name),
                    "running": name in self._active,
                }
                for name in self._accounts
            }

    # --------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            self._beat = time.monotonic()
            with self._lock:
                if self._stopping:
                    return
            self._wake.clear()
            full = self._round()
            self._watch_lost()
            if not full:
                self._wake.wait(self._claim_every)

    def _round(self) -> bool:
        """Register, serve a poll, claim; True when every free slot was filled."""
        try:
            self._sync_registration()
            claimed, free = self._claim()
        except PopsyncError as exc:  # NetworkError: the database is unreachable
            self._database_down(exc)
            return False
        except Exception as exc:  # a bug or an unexpected database error: keep the loop alive
            self._database_down(exc, unexpected=True)
            return False
        if self._db_down:
            self._db_down = False
            self._log.info("database reachable again")
        for lease in claimed:
            self._start(lease)
        return free > 0 and len(claimed) == free

    def _sync_registration(self) -> None:
        with self._lock:
            register, poll = self._register, self._poll
            keys = [mailbox_key(m) for m in self._by_mailbox]
            known = list(self._by_mailbox)
        if register:
            added = self._leases.register(keys)
            # Other configs' accounts, left out of every claim (see LeaseStore.claim_due).
            foreign = set(self._leases.foreign(known))
            with self._lock:
                self._register = False
                self._foreign = foreign
            self._log.info(
                "registered accounts", accounts=len(keys), new=added, foreign=len(foreign)
            )
        if poll:
            moved = self._leases.make_due(known)
            with self._lock:
                self._poll = False
            self._log.info("polling this worker's accounts now", made_due=moved)

    def _claim(self) -> tuple[list[Lease], int]:
        with self._lock:
            free = self._max_workers - len(self._active)
            anything = bool(self._by_mailbox)
            foreign = list(self._foreign)
        if free <= 0 or not anything:
            return [], free
        leases = self._leases.claim_due(self.worker_id, free, self._lease_seconds, exclude=foreign)
        return leases, free

    def _database_down(self, exc: BaseException, *, unexpected: bool = False) -> None:
        self._db_down = True
        now = time.monotonic()
        if now - self._db_warned >= _DB_WARN_EVERY:
            self._db_warned = now
            if unexpected:
                self._log.exception("claim loop failed; retrying", error=_short(exc))
            else:
                self._log.warning("database unavailable; retrying", error=_short(exc))

    def _watch_lost(self) -> None:
        """Stop every run whose lease the renewer found gone (it stops at the next message)."""
        with self._lock:
            for active in self._active.values():
                if not active.lost and self._renewer.lost(active.lease.token):
                    active.lost = True
                    active.stop.set()

    # -------------------------------------------------------------------------- runs
    def _start(self, lease: Lease) -> None:
        mailbox = mailbox_of(lease.server, lease.username)
        with self._lock:
            name = self._by_mailbox.get(mailbox)
            account = None if name is None else self._accounts[name]
            if account is None or name is None or self._stopping or name in self._active:
                account = None
            else:
                active = _Active(
                    name, lease, threading.Event(), time.monotonic(), stall_limit(account)
                )
                self._active[name] = active
        if account is None:  # another config's, or removed by a reload: give it back untouched
            if name is None:
                with self._lock:  # registered by another worker since our registration
                    self._foreign.add(mailbox)
            self._give_back(lease.token, None)
            return
        self._renewer.add(lease.token)
        self._pool.submit(self._execute, account, active)

    def _execute(self, account: Account, active: _Active) -> None:
        token = active.lease.token
        try:
            result = self._run_safely(account, active)
        finally:
            self._renewer.discard(token)
        self._finish(account, active, result)

    def _run_safely(self, account: Account, active: _Active) -> RunResult:
        """One run with the fenced store; a bug counts as a failed run."""
        token = active.lease.token

        def fence() -> None:
            try:
                view.fence()
            except LeaseLost:
                active.lost = True
                raise

        try:
            view = self._store.fenced(token)
            return self._run(account, view, fence, active.stop)
        except Exception as exc:
            from popsync.sync import RunResult

            if isinstance(exc, LeaseLost):
                active.lost = True
            else:
                self._log.exception("sync run crashed", account=account.name)
            return RunResult(
                account=account.name,
                outcome="temporary" if isinstance(exc, PopsyncError) else "error",
                exit_code=exc.exit_code if isinstance(exc, PopsyncError) else ExitCode.SOFTWARE,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _finish(self, account: Account, active: _Active, result: RunResult) -> None:
        """Back off, release the lease with the next due time, report."""
        name = account.name
        with self._lock:
            stopping = self._stopping
            known = self._accounts.get(name) == account
        failures = 0 if result.outcome == "ok" else self._failures.get(name, 0) + 1
        delay = next_delay(
            result.outcome, failures, account.interval, retry_after=result.retry_after
        )
        due_in = 0.0 if stopping or active.repoll else delay + _jitter(delay)
        # The release is the last word: it fails exactly when the lease is gone.
        released = not active.lost and self._give_back(active.lease.token, due_in)
        if not released and result.outcome != "ok":
            result.outcome, result.exit_code = "temporary", ExitCode.TEMPORARY
            result.error = "lease lost (expired or taken over); the run stopped"
            self._log.warning(
                "lease lost",
                account=name,
                detail="the account was taken over or its lease expired; this run stopped"
                " before handing over or committing more",
            )
        elif not released:
            self._log.info("lease expired after the run's last commit", account=name)
        with self._lock:
            if known:
                self._failures[name] = failures
                self._next[name] = datetime.now(UTC) + timedelta(seconds=due_in)
        if failures:
            self._log.info(
                "next run delayed",
                account=name,
                outcome=result.outcome,
                failures=failures,
                delay=round(due_in, 3),
            )
        try:
            if known and self._on_delay is not None:
                self._on_delay(result, delay)
            if self._on_result is not None:
                self._on_result(result)
        finally:
            # Only now: shutdown() waits for this, so results are reported before it returns.
            with self._lock:
                del self._active[name]
                self._idle.notify_all()
            self._wake.set()

    def _give_back(self, token: str, next_due_in: float | None) -> bool:
        """Release a lease; False when it was already gone (lost). Unreachable: it expires."""
        try:
            self._leases.release(token, next_due_in)
        except LeaseLost:
            return False
        except Exception as exc:  # NetworkError, or anything else: the lease runs out by itself
            self._log.warning("cannot release a lease; it expires by itself", error=_short(exc))
        return True
