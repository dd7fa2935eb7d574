"""`popsync.fleet.FleetScheduler` in-process on a real PostgreSQL, with scripted runs.

The runs here never touch a POP3 server: each test decides what a run does (succeed, fail,
block, lose its lease), so the scheduler's claiming, bounding, releasing and fencing are
checked exactly. The daemon processes with real Dovecot are in test_fleet_faults.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from devtools.postgres import Postgres
from popsync.config import Account, parse_config
from popsync.fleet import FleetScheduler
from popsync.lease import LeaseLost
from popsync.pgstore import PgStore
from popsync.store import Store
from popsync.sync import RunResult

Run = Callable[[Account, Store, Callable[[], None], threading.Event], RunResult]


def _accounts(tmp_path: Path, count: int) -> dict[str, Account]:
    text = f'state_dir = "{tmp_path}"\n' + "".join(
        f'[accounts.a{i}]\nhost = "pop{i}.invalid"\nusername = "u"\npassword = "p"\n'
        f'maildir = "{tmp_path / f"m{i}"}"\ninterval = "10s"\n'
        for i in range(count)
    )
    return dict(parse_config(text).accounts)


@pytest.fixture
def dsn(postgres: Postgres) -> str:
    """A fresh database."""
    return postgres.new_database("sched")


@pytest.fixture
def store(dsn: str, tmp_path: Path) -> Iterator[PgStore]:
    """A PostgreSQL store with short leases on the fresh database."""
    with PgStore.open(
        dsn,
        state_dir=tmp_path,
        worker_id="w-test",
        lease_seconds=2.0,
        renew_seconds=0.5,
    ) as opened:
        yield opened


def _scheduler(store: PgStore, run: Run, results: list[RunResult], workers: int) -> FleetScheduler:
    return FleetScheduler(
        run, store, max_workers=workers, on_result=results.append, claim_every=0.1
    )


def _wait(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _due_in(store: PgStore) -> dict[str, float]:
    now = datetime.now(UTC).timestamp()
    return {row.server: row.next_due.timestamp() - now for row in store.leases.overview()}


def test_runs_are_bounded_and_released_with_interval_or_backoff(
    store: PgStore, tmp_path: Path
) -> None:
    """At most max_workers runs at once; ok is due after the interval, auth much later."""
    accounts = _accounts(tmp_path, 5)
    results: list[RunResult] = []
    running: set[str] = set()
    peak = [0]
    guard = threading.Lock()

    def run(account: Account, view: Store, fence: Callable[[], None], stop: Any) -> RunResult:
        with guard:
            running.add(account.name)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.2)
        fence()
        with guard:
            running.discard(account.name)
        return RunResult(account.name, outcome="auth" if account.name == "a0" else "ok")

    scheduler = _scheduler(store, run, results, workers=2)
    scheduler.set_accounts(accounts)
    scheduler.start()
    try:
        _wait(lambda: len(results) == 5)
    finally:
        assert scheduler.shutdown(5)
    assert peak[0] == 2
    due = _due_in(store)
    assert due.pop("pop0.invalid") > 1700  # auth: SLOW_START, not the interval
    assert all(9 < left <= 11.1 for left in due.values()), due  # interval + <= 10 % jitter
    assert {row.holder for row in store.leases.overview()} == {None}


def test_a_stolen_lease_stops_the_run_with_one_lease_lost_line(
    store: PgStore, tmp_path: Path, dsn: str
) -> None:
    """The fence raises once the lease is taken over: the run ends temporary, logged once."""
    accounts = _accounts(tmp_path, 1)
    results: list[RunResult] = []
    stolen = threading.Event()

    def run(account: Account, view: Store, fence: Callable[[], None], stop: Any) -> RunResult:
        stolen.wait(10)
        try:
            fence()
        except LeaseLost as exc:
            return RunResult(account.name, outcome="temporary", error=str(exc))
        return RunResult(account.name)

    scheduler = _scheduler(store, run, results, workers=1)
    scheduler.set_accounts(accounts)
    with capture_logs() as logs:
        scheduler.start()
        try:
            _wait(lambda: any(r.holder for r in store.leases.overview()))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE accounts_lease SET token = gen_random_uuid(), holder = 'x'")
            stolen.set()
            _wait(lambda: len(results) == 1)
        finally:
            assert scheduler.shutdown(5)
    (result,) = results
    assert (result.outcome, result.exit_code) == ("temporary", 75)
    assert [e for e in logs if e["event"] == "lease lost"] == [
        {
            "event": "lease lost",
            "log_level": "warning",
            "worker": "w-test",
            "account": "a0",
            "detail": "the account was taken over or its lease expired; this run stopped"
            " before handing over or committing more",
        }
    ]
    assert [r.holder for r in store.leases.overview()] == ["x"]  # not released by the loser


def test_shutdown_stops_runs_and_releases_their_accounts_due_now(
    store: PgStore, tmp_path: Path
) -> None:
    """SIGTERM: running runs see their stop flag; their accounts are due at once for others."""
    accounts = _accounts(tmp_path, 2)
    results: list[RunResult] = []

    def run(account: Account, view: Store, fence: Callable[[], None], stop: Any) -> RunResult:
        stop.wait(10)
        return RunResult(account.name, outcome="temporary", error="stopping")

    scheduler = _scheduler(store, run, results, workers=2)
    scheduler.set_accounts(accounts)
    scheduler.start()
    _wait(
        lambda: (
            len(scheduler.describe()) == 2
            and all(d["running"] for d in scheduler.describe().values())
        )
    )
    assert scheduler.making_progress()
    assert scheduler.shutdown(5)
    assert len(results) == 2
    assert all(left <= 0.5 for left in _due_in(store).values())
