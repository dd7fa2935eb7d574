"""The fleet benchmark's parts: merged worker logs, cycle accounting and the database probe."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.fleet import (
    Cycle,
    Fleet,
    PerPoll,
    PgLoad,
    PgProbe,
    _PeakSampler,
    _start_postgres,
    capacity,
)
from devtools.postgres import postgres_available
from tests.conftest import unavailable

__all__: list[str] = []

# A fake worker: "ready", then one "sync finished" line per argument (a "!" prefix: "sync
# failed"). "+PATH" creates that file; "?PATH" waits until it exists (to order two workers).
_FAKE_WORKER = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(json.dumps({"event": "daemon started"}), flush=True)
for item in sys.argv[1:]:
    if item.startswith("+"):
        open(item[1:], "w").close()
        continue
    if item.startswith("?"):
        while not os.path.exists(item[1:]):
            time.sleep(0.05)
        time.sleep(0.3)
        continue
    event = "sync failed" if item.startswith("!") else "sync finished"
    print(json.dumps({"event": event, "account": item.lstrip("!"), "error": "boom"}),
          flush=True)
while True:
    time.sleep(0.05)
"""


class _Scripted(Fleet):
    """A Fleet whose worker i runs the fake worker with the i-th list of arguments."""

    def __init__(self, tmp_path: Path, scripts: list[list[str]]) -> None:
        super().__init__([sys.executable, "-c", "pass"], {}, tmp_path, 0)
        from bench.measure import Daemon

        env = {"PATH": "/usr/bin:/bin"}
        self.daemons = [
            Daemon(
                [sys.executable, "-c", _FAKE_WORKER, *args],
                env,
                tmp_path,
                tmp_path / f"w{i}.log",
                lines=self.lines,
                label=f"w{i}",
            )
            for i, args in enumerate(scripts)
        ]


def test_wait_cycle_merges_workers_and_counts_each_workers_share(tmp_path: Path) -> None:
    """Finished lines from every worker complete one cycle; the per-worker split is counted."""
    fleet = _Scripted(tmp_path, [["a", "b"], ["c", "!d"]])
    try:
        fleet.wait_ready(timeout=20)
        t0 = time.perf_counter()
        last, failures, per_worker = fleet.wait_cycle({"a", "b", "c", "d"}, timeout=20)
        assert last > t0
        assert per_worker == {"w0": 2, "w1": 2}
        assert failures == ["d: boom"]
        assert fleet.cpu() > 0
        assert fleet.rss_kib() > 0
    finally:
        life = fleet.stop()
    assert life.exit_code == 0


def test_wait_cycle_reports_an_account_synced_twice(tmp_path: Path) -> None:
    """Two workers finishing the same account in one cycle is a failure, named by account."""
    first, second = tmp_path / "w0-did-a", tmp_path / "w1-did-a"
    # w0 syncs a; then w1 syncs a too; then w0 syncs b: the cycle is still open for w1's a.
    fleet = _Scripted(
        tmp_path, [["a", f"+{first}", f"?{second}", "b"], [f"?{first}", "a", f"+{second}"]]
    )
    try:
        fleet.wait_ready(timeout=20)
        _, failures, per_worker = fleet.wait_cycle({"a", "b"}, timeout=20)
    finally:
        fleet.stop()
    assert failures == ["a: synced twice in one cycle"]
    assert per_worker == {"w0": 2}


def test_wait_cycle_fails_when_a_worker_dies(tmp_path: Path) -> None:
    """A worker that exits mid-cycle ends the wait with an error instead of a hang."""
    fleet = _Scripted(tmp_path, [["a"], []])
    try:
        fleet.wait_ready(timeout=20)
        fleet.daemons[1].proc.kill()
        with pytest.raises(TimeoutError, match="w1 exited"):
            fleet.wait_cycle({"a", "b"}, timeout=20)
    finally:
        fleet.stop()


def test_pg_load_difference() -> None:
    """Subtracting two snapshots subtracts every counter."""
    later = PgLoad(10, 2, 30, 400, 50, 1.5)
    assert later - PgLoad(4, 1, 10, 100, 20, 0.5) == PgLoad(6, 1, 20, 300, 30, 1.0)


def test_per_poll_costs_divide_a_cycle_by_its_polls() -> None:
    """Per-poll costs: the cycle over its accounts; idle load per worker and second."""
    cycle = Cycle(4.0, 20.0, [], {}, PgLoad(20_000, 0, 40_000, 1e6, 10_000, 8.0), 32)
    idle = Cycle(20.0, 0.1, [], {}, PgLoad(160, 0, 240, 4000, 0, 0.16), 16)
    costs = PerPoll.measure(cycle, idle, 2000, 4, Cycle(3.0, 10.0, [], {}))
    assert costs.cpu == pytest.approx(0.01)
    assert costs.sqlite_cpu == pytest.approx(0.005)
    assert costs.db == PgLoad(10, 0, 20, 500, 5, 0.004)
    assert costs.idle == PgLoad(2, 0, 3, 50, 0, 0.002)
    assert costs.connections == pytest.approx(1.0)  # 32 connections / (4 workers x 8 slots)
    assert "popsync CPU 10.0 ms (SQLite, one daemon: 5.0 ms)" in costs.describe()[0]


def test_capacity_model_arithmetic() -> None:
    """100,000 accounts at 5 min with known per-poll costs give the hand-computed sizing."""
    costs = PerPoll(0.01, PgLoad(10, 0, 20, 500, 5, 0.004), PgLoad(2, 0, 3, 100, 0, 0.001), 1.0)
    lines = capacity(costs, 100_000)
    # 333 polls/s x 10 ms = 3.3 cores -> 4 two-core machines at 50 %, 8 processes
    assert "= 333 polls/s; x 10.0 ms CPU = 3.3 cores -> 4 machine(s)" in lines[0]
    assert "(8 worker processes)" in lines[0]
    # 333 runs in flight over 8 processes: 42 slots each, 336 connections (ceiling 8 x 86)
    assert "max_workers = 42 per process; connections 8 x 42 x 1.00 = 336" in lines[1]
    assert "= 688)" in lines[1]
    # 333 x 10 + 8 x 2 commits/s; 333 x 4 ms + 8 x 1 ms of PostgreSQL CPU
    assert "= 3,349 commits/s, 6,691 statements/s" in lines[2]
    assert lines[2].endswith("= 1.3 cores")
    big = capacity(costs, 1_000_000)
    assert "= 3,333 polls/s; x 10.0 ms CPU = 33.3 cores -> 34 machine(s)" in big[0]


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_pg_probe_sees_a_known_load() -> None:
    """500 committed inserts show up as >= 500 commits, statements and written tuples."""
    if not postgres_available():
        unavailable("PostgreSQL is not installed (./dev setup installs it)")
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="popsync-bench-pg-"))
    try:
        pg, dsn = _start_postgres(root)
        try:
            probe = PgProbe(pg, dsn.rsplit("/", 1)[1])
            before = probe.snapshot()
            with _PeakSampler(probe) as sampler, psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (n integer)")
                for n in range(500):
                    conn.execute("INSERT INTO t VALUES (%s)", (n,))
                time.sleep(0.5)
            # A backend flushes its counters when it exits (else up to 10 s later).
            time.sleep(1.0)
            load = probe.snapshot() - before
            probe.close()
        finally:
            pg.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert load.commits >= 500
    assert load.statements >= 500
    assert load.tuples_written >= 500
    assert load.rollbacks == 0
    assert load.cpu > 0
    assert sampler.peak >= 1
