"""Scenario fleet: several popsync workers sharing one PostgreSQL against one daemon on SQLite.

The same accounts (Dovecot users of ``INITIAL`` 4 KiB messages, made by
:func:`bench.mailgen.generate_scale`) are synced twice, each time into fresh Maildirs: first by
one daemon with its SQLite seen-store, then by ``WORKERS`` daemons sharing one config with
``store = "postgresql://…"`` (a private server from devtools/postgres.py with
pg_stat_statements loaded). Each mode runs a first fetch, ``runs`` cycles with nothing new
and one cycle with one new message per account.

A cycle is one SIGUSR1 to one worker (in fleet mode it makes every account due in the
database and all workers claim them) and ends at the last account's ``sync finished`` line,
from whichever worker. Measured per cycle: wall time; CPU of every popsync process (/proc);
the database's transactions committed and rolled back, statements (pg_stat_statements),
tuples read and written (pg_stat_database), CPU of every PostgreSQL process (the postmaster
and its live backends from /proc, plus the reaped ones through the postmaster's cutime) and
peak connections (pg_stat_activity, sampled every 0.2 s). Also an idle window with nothing
due (the workers' claim loop alone). Each account must finish exactly once per cycle, and
every Maildir is verified at the end of each mode.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from bench import mailgen, peers
from bench.measure import WORKER_KEY, Daemon, Measurement
from bench.verify import verify_maildir

if TYPE_CHECKING:
    from bench.run import Bench, ScenarioResult
    from devtools.dovecot import MailUser
    from devtools.postgres import Postgres

__all__ = ["Cycle", "Fleet", "PerPoll", "PgLoad", "PgProbe", "capacity", "run_fleet"]

ACCOUNTS = 2_000
QUICK_ACCOUNTS = 12
WORKERS = 4
#: Concurrent runs per popsync process, in both modes (the default is 4).
MAX_WORKERS = 8
INITIAL = 5
#: Seconds PostgreSQL may publish a backend's counters late: at most once a second, and a
#: backend that went idle within that second only after PGSTAT_IDLE_INTERVAL (10 s).
_STATS_LAG = 11.0
_IDLE_WINDOW = 20.0
_DB = "popsync_bench"


@dataclass(frozen=True)
class PgLoad:
    """Database counters at one moment, or their change over a window (or per second)."""

    commits: float = 0
    rollbacks: float = 0
    statements: float = 0
    tuples_read: float = 0
    tuples_written: float = 0
    cpu: float = 0.0

    def __sub__(self, other: PgLoad) -> PgLoad:
        return PgLoad(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> PgLoad:
        """Every counter times ``factor`` (a rate from a total, a total from a rate)."""
        return PgLoad(*(getattr(self, f.name) * factor for f in fields(self)))


class PgProbe:
    """Reads a database's load counters; its own queries go to another database."""

    def __init__(self, pg: Postgres, dbname: str) -> None:
        import psycopg

        self.pg = pg
        self.dbname = dbname
        self._conn = psycopg.connect(pg.dsn("postgres"), autocommit=True, connect_timeout=10)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the probe's own connection."""
        self._conn.close()

    def _one(self, sql: str) -> tuple[int, ...]:
        with self._lock:
            row = self._conn.execute(sql.encode(), (self.dbname,)).fetchone()
        assert row is not None
        return tuple(int(v or 0) for v in row)

    def snapshot(self) -> PgLoad:
        """The counters now (wait :data:`_STATS_LAG` after the load for them to be complete)."""
        commits, rollbacks, read, written = self._one(
            "SELECT xact_commit, xact_rollback, tup_returned + tup_fetched,"
            " tup_inserted + tup_updated + tup_deleted"
            " FROM pg_stat_database WHERE datname = %s"
        )
        (statements,) = self._one(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"
        )
        return PgLoad(commits, rollbacks, statements, read, written, self.cpu())

    def connections(self) -> int:
        """Client backends connected to the database now."""
        return self._one("SELECT count(*) FROM pg_stat_activity WHERE datname = %s")[0]

    def cpu(self) -> float:
        """CPU seconds of the postmaster, its live children and every child it reaped."""
        pid = int((self.pg.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile: counted in the postmaster's cutime
            if int(entry.name) == pid:
                total += sum(int(v) for v in stat[11:15])  # utime stime cutime cstime
            elif int(stat[1]) == pid:
                total += int(stat[11]) + int(stat[12])
        return total / tick


class _PeakSampler:
    """Samples the database's connection count in a thread; ``peak`` is the highest seen."""

    def __init__(self, probe: PgProbe | None) -> None:
        self.probe = probe
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _PeakSampler:
        if self.probe is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        assert self.probe is not None
        while not self._stop.wait(0.2):
            with contextlib.suppress(Exception):  # a failed sample just does not count
                self.peak = max(self.peak, self.probe.connections())


@dataclass
class Cycle:
    """One measured cycle of every account."""

    wall: float
    cpu: float
    failures: list[str]
    per_worker: dict[str, int]
    db: PgLoad = field(default_factory=PgLoad)
    peak_connections: int = 0


class Fleet:
    """One or more ``popsync`` daemons on one config whose log lines share one queue."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        n: int,
        *,
        finished_event: str = "sync finished",
        account_key: str = "account",
    ) -> None:
        self.lines: queue.Queue[dict[str, object]] = queue.Queue()
        self.daemons = [
            Daemon(
                argv, env, cwd, cwd / f"daemon-{i}.log", finished_event=finished_event,
                account_key=account_key, lines=self.lines, label=f"w{i}",
            )
            for i in range(n)
        ]  # fmt: skip
        self.finished_event = finished_event
        self.account_key = account_key
        #: The database's load per second with nothing due (set by :meth:`idle`).
        self.idle_rate = PgLoad()
        self._held: list[dict[str, object]] = []
        self.ready_at = 0.0

    def cpu(self) -> float:
        """CPU seconds every daemon used so far."""
        return sum(d.cpu_seconds() for d in self.daemons)

    def rss_kib(self) -> int:
        """The largest peak RSS of any daemon, in KiB."""
        return max(d.rss_kib()[1] for d in self.daemons)

    def _check_alive(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is not None:
                raise TimeoutError(f"daemon {d.label} exited with {d.proc.returncode}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait for every daemon's ready line; :attr:`ready_at` is when the first came.

        Other lines that arrive meanwhile (a worker that is ready first starts syncing) are
        kept for :meth:`wait_cycle`.
        """
        waiting = {d.label for d in self.daemons}
        deadline = time.monotonic() + timeout
        while waiting:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemons {sorted(waiting)} not ready within {timeout} s")
            with contextlib.suppress(queue.Empty):
                obj = self.lines.get(timeout=0.5)
                if obj.get("event") != self.daemons[0].ready_event:
                    self._held.append(obj)
                    continue
                if len(waiting) == len(self.daemons):
                    self.ready_at = time.perf_counter()
                waiting.discard(str(obj.get(WORKER_KEY)))

    def _next(self, timeout: float) -> dict[str, object]:
        """The next log line: first those held back by :meth:`wait_ready`; queue.Empty if none."""
        if self._held:
            return self._held.pop(0)
        return self.lines.get(timeout=timeout)

    def wait_cycle(
        self, accounts: set[str], timeout: float, first_timeout: float | None = None
    ) -> tuple[float, list[str], dict[str, int]]:
        """Wait until every account finished (or failed) once; a second finish is a failure.

        Return (perf_counter time of the last one, failures, accounts run per worker).
        """
        pending = set(accounts)
        failures: list[str] = []
        per_worker: Counter[str] = Counter()
        start = time.monotonic()
        first_deadline = start + (first_timeout or timeout)
        last = time.perf_counter()
        while pending:
            limit = start + timeout if len(pending) < len(accounts) else first_deadline
            if time.monotonic() > limit:
                raise TimeoutError(f"no {self.finished_event!r} for {len(pending)} account(s)")
            self._check_alive()
            try:
                obj = self._next(0.5)
            except queue.Empty:
                continue
            event, account = obj.get("event"), str(obj.get(self.account_key))
            if event not in (self.finished_event, self.daemons[0].failed_event):
                continue
            if account not in pending:
                failures.append(f"{account}: synced twice in one cycle")
                continue
            pending.discard(account)
            per_worker[str(obj.get(WORKER_KEY))] += 1
            last = time.perf_counter()
            if event != self.finished_event:
                failures.append(f"{account}: {obj.get('error', 'failed')}")
        return last, failures, dict(per_worker)

    def _drain(self) -> None:
        self._held.clear()
        while not self.lines.empty():
            self.lines.get_nowait()

    def cycle(self, accounts: set[str], probe: PgProbe | None, timeout: float = 900) -> Cycle:
        """One SIGUSR1-triggered cycle of every account, with the database's load.

        The database counters are read :data:`_STATS_LAG` after the cycle (PostgreSQL
        publishes a busy backend's counters up to 10 s late), and the idle load measured by
        :meth:`idle` over that extra time is subtracted.
        """
        if probe is not None:
            time.sleep(_STATS_LAG)  # everything before this cycle is published
        else:
            time.sleep(0.2)  # the previous cycle's jobs return
        self._drain()
        before = probe.snapshot() if probe is not None else PgLoad()
        w0, cpu0 = time.perf_counter(), self.cpu()
        with _PeakSampler(probe) as sampler:
            t0 = time.perf_counter()
            self.daemons[0].proc.send_signal(signal.SIGUSR1)
            t1, failures, per_worker = self.wait_cycle(accounts, timeout)
        wall, cpu = t1 - t0, self.cpu() - cpu0
        db = PgLoad()
        if probe is not None:
            time.sleep(_STATS_LAG)
            db = probe.snapshot() - before
            db -= self.idle_rate.scaled(time.perf_counter() - w0 - wall)
        return Cycle(wall, cpu, failures, per_worker, db, sampler.peak)

    def idle(self, probe: PgProbe, seconds: float = _IDLE_WINDOW) -> Cycle:
        """Load while nothing is due (the workers' claim loops alone); sets :attr:`idle_rate`.

        The counters' window is ``seconds`` plus :data:`_STATS_LAG`: a steady load's late
        publication at the start and at the end of the window cancel out.
        """
        time.sleep(_STATS_LAG)
        self._drain()
        before, cpu0, w0 = probe.snapshot(), self.cpu(), time.perf_counter()
        with _PeakSampler(probe) as sampler:
            time.sleep(seconds)
        cpu = self.cpu() - cpu0
        time.sleep(_STATS_LAG)
        db = probe.snapshot() - before
        self.idle_rate = db.scaled(1 / (time.perf_counter() - w0))
        # Any run now would be a poll nobody asked for.
        extra = [str(o.get(self.account_key)) for o in self._lines_now()
                 if o.get("event") == self.finished_event]  # fmt: skip
        failures = [f"{a}: synced while nothing was due" for a in extra]
        return Cycle(seconds, cpu, failures, {}, self.idle_rate.scaled(seconds), sampler.peak)

    def _lines_now(self) -> list[dict[str, object]]:
        out = []
        while not self.lines.empty():
            out.append(self.lines.get_nowait())
        return out

    def stop(self) -> Measurement:
        """Stop every daemon; the sum of their whole-life CPU and the largest peak RSS."""
        lives = [d.stop() for d in self.daemons]
        return Measurement(
            wall=max(m.wall for m in lives),
            cpu=sum(m.cpu for m in lives),
            maxrss_kib=max(m.maxrss_kib for m in lives),
            exit_code=max((m.exit_code for m in lives), key=abs),
        )


# ---------------------------------------------------------------------------------- scenario


@dataclass
class _Accounts:
    """The scenario's server accounts and the mail each must end up with."""

    sset: mailgen.ScaleSet
    servers: dict[str, peers.Server]
    users: dict[str, MailUser]
    expected: dict[str, list[bytes]]

    @property
    def names(self) -> set[str]:
        return set(self.servers)

    def add_new(self, bench: Bench, index: int) -> None:
        """Deliver new message number ``index`` of every account to the server."""
        for box in self.sset.new:
            msg = box.messages[index]
            bench.dv.deliver_many(self.users[box.name], [msg])
            self.expected[box.name].append(msg)


def _make_accounts(bench: Bench, n: int) -> _Accounts:
    sset = mailgen.generate_scale(accounts=n, initial=INITIAL, new=2)
    servers: dict[str, peers.Server] = {}
    users: dict[str, MailUser] = {}
    for box in sset.initial:
        srv, user = bench.mailbox(box)
        servers[box.name], users[box.name] = srv, user
    expected = {b.name: list(b.messages) for b in sset.initial}
    return _Accounts(sset, servers, users, expected)


def _maildirs(base: Path, names: set[str]) -> dict[str, Path]:
    dirs = {}
    for name in sorted(names):
        dirs[name] = base / name / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (dirs[name] / sub).mkdir(parents=True)
    return dirs


def _verify(acc: _Accounts, maildirs: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in maildirs.items():
        v = verify_maildir(path, acc.expected[name])
        if not v.ok:
            bad.append(f"{name}: {v.summary()}")
    return bad


def _failed(failures: list[str]) -> str:
    return "FAILED: " + "; ".join(failures[:3]) if failures else ""


def _start_postgres(root: Path) -> tuple[Postgres, str]:
    """A private PostgreSQL with pg_stat_statements and an empty bench database."""
    from devtools.postgres import Postgres

    pg = Postgres(root)
    pg.start()
    pg.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    pg.restart()
    pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    pg.execute(f"CREATE DATABASE {_DB}")
    return pg, pg.dsn(_DB)


def _mode(
    bench: Bench,
    result: ScenarioResult,
    acc: _Accounts,
    *,
    label: str,
    workers: int,
    store: str | None,
    probe: PgProbe | None,
    new_index: int,
) -> tuple[Cycle | None, Cycle | None]:
    """Run one mode (first fetch, nothing-new cycles, one new-mail cycle) into fresh Maildirs.

    Return the median nothing-new cycle (by wall time) and the idle window (fleet mode), or
    None for what failed or did not run.
    """
    opts = bench.opts
    base = bench.storage.path / "fleet" / label.partition(",")[0]
    shutil.rmtree(base, ignore_errors=True)
    maildirs = _maildirs(base, acc.names)
    cfg = base / "popsync.toml"
    top = f"max_workers = {MAX_WORKERS}\n" + (f'store = "{store}"\n' if store else "")
    accounts = {name: (acc.servers[name], maildirs[name]) for name in sorted(acc.names)}
    cfg.write_text(top + peers.popsync_config(base / "state", accounts, interval=86400))
    (base / "state").mkdir()
    run = peers.setup_tool("popsync", base / "_tool", next(iter(acc.servers.values())),
                           bench.owner, bench.py)  # fmt: skip
    bench.owner.chown(base)
    assert run.daemon_argv is not None
    argv = [*run.owner.prefix, *run.daemon_argv[:-1], str(cfg)]
    fleet = Fleet(argv, run.env, base, workers, finished_event=opts.finished_event,
                  account_key=opts.account_key)  # fmt: skip
    n = len(acc.names)
    spread: list[str] = []
    quiet: list[Cycle] = []
    idle: Cycle | None = None
    try:
        fleet.wait_ready()
        t0, cpu0 = fleet.ready_at, fleet.cpu()
        try:  # the start-up cycle: every account is new, hence due
            t1, failures, per_worker = fleet.wait_cycle(acc.names, 900, first_timeout=5)
            first = Cycle(t1 - t0, fleet.cpu() - cpu0, failures, per_worker)
        except TimeoutError:  # no cycle at start-up: the first SIGUSR1 fetches
            first = fleet.cycle(acc.names, probe)
        _add(result, f"{label}: first fetch, {INITIAL} each", first, n * INITIAL, fleet)
        if probe is not None:  # first: the cycles below subtract this idle load
            idle = fleet.idle(probe)
            _add(result, f"{label}: idle {_IDLE_WINDOW:.0f} s, nothing due", idle, 0, fleet)
        for _ in range(opts.runs):
            c = fleet.cycle(acc.names, probe)
            _add(result, f"{label}: nothing new", c, 0, fleet)
            if not c.failures:
                quiet.append(c)
            spread.append("/".join(str(c.per_worker.get(d.label, 0)) for d in fleet.daemons))
        acc.add_new(bench, new_index)
        c = fleet.cycle(acc.names, probe)
        c.failures += _verify(acc, maildirs)
        _add(result, f"{label}: 1 new each", c, n, fleet)
    except (TimeoutError, OSError) as exc:
        result.row(f"{label}: cycle", 0, 0).add(
            Measurement(0, 0, 0, -1), f"FAILED: {exc} (see {base}/daemon-*.log)", False
        )
    finally:
        life = fleet.stop()
        result.notes.append(
            f"{label}: {workers} daemon(s), max_workers = {MAX_WORKERS} each; whole life CPU "
            f"{life.cpu:.2f} s, largest peak RSS {life.maxrss_kib / 1024:.1f} MiB"
            + (f"; accounts per worker in the nothing-new cycles: {', '.join(spread)}"
               if workers > 1 and spread else "")
        )  # fmt: skip
    quiet.sort(key=lambda c: c.wall)
    return (quiet[len(quiet) // 2] if quiet else None), idle


def _add(result: ScenarioResult, name: str, c: Cycle, messages: int, fleet: Fleet) -> None:
    """Record one cycle as a table row, its database load in the row's verdict column."""
    row = result.row(name, messages, messages * 4096)
    row.measured_rss = True
    m = Measurement(c.wall, c.cpu, fleet.rss_kib(), 0)
    verdict = _failed(c.failures) or "OK"
    if c.db != PgLoad():
        d = c.db
        verdict += (
            f"; db: {d.commits:.0f} commits, {d.rollbacks:.0f} rollbacks, {d.statements:.0f} "
            f"statements, {d.tuples_read:.0f} tuples read, {d.tuples_written:.0f} written, "
            f"CPU {d.cpu:.2f} s, peak {c.peak_connections} connections"
        )
    row.add(m, verdict, not c.failures)


def run_fleet(bench: Bench) -> ScenarioResult:
    """Scenario fleet (see the module docstring)."""
    from bench.run import ScenarioResult

    opts = bench.opts
    result = ScenarioResult("fleet")
    if "popsync" not in bench.tools():
        bench.mark_unavailable(result, ["popsync"] if "popsync" in opts.tools else [])
        result.notes.append("popsync only; skipped: popsync is not available or not selected")
        return result
    from devtools.postgres import postgres_available

    if not postgres_available():
        result.row("popsync fleet", 0, 0).unavailable = "PostgreSQL (initdb, pg_ctl) missing"
        return result
    acc = _make_accounts(bench, QUICK_ACCOUNTS if opts.quick else ACCOUNTS)
    load = os.getloadavg()
    single, _ = _mode(bench, result, acc, label="sqlite, 1 daemon", workers=1, store=None,
                      probe=None, new_index=0)  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="popsync-bench-pg-"))
    pg, dsn = _start_postgres(root)
    probe = PgProbe(pg, _DB)
    try:
        pooled, idle = _mode(bench, result, acc, label=f"postgresql, {WORKERS} workers",
                             workers=WORKERS, store=dsn, probe=probe, new_index=1)  # fmt: skip
    finally:
        probe.close()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    result.notes.append(
        f"{len(acc.names)} accounts of {INITIAL} x 4 KiB (Dovecot, plain POP3 on loopback, no "
        "latency), interval 1 day so only SIGUSR1 starts a cycle; CPU column: every popsync "
        "process of the mode; RSS column: the largest daemon's peak so far; PostgreSQL "
        "(fsync off, as in the tests) on the same 2 cores; load average at the start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    if pooled is not None and idle is not None:
        costs = PerPoll.measure(pooled, idle, len(acc.names), WORKERS, single)
        result.notes += costs.describe()
        for accounts in (100_000, 1_000_000):
            result.notes += capacity(costs, accounts)
    return result


# ---------------------------------------------------------------------------- capacity model

#: The polling interval the model sizes for, seconds.
INTERVAL = 300.0
#: Assumed wall time of one poll of a real remote server (TLS handshake and about six round
#: trips at 50-100 ms RTT): what sets how many runs are in flight at once.
POLL_SECONDS = 1.0
#: Cores per machine, and the share of them the model plans to use (headroom for takeovers).
CORES, UTILISATION = 2, 0.5
#: Run slots per worker process in the model.
SLOTS = 64


@dataclass(frozen=True)
class PerPoll:
    """What one account poll with nothing new costs in fleet mode, from one measured cycle."""

    cpu: float  # popsync CPU seconds
    db: PgLoad  # database work (commits, statements, tuples, PostgreSQL CPU seconds)
    idle: PgLoad  # database work per second per idle worker (its claim loop)
    connections: float  # database connections per run slot at the cycle's peak
    sqlite_cpu: float | None = None  # the same poll on one daemon with SQLite

    @classmethod
    def measure(
        cls, cycle: Cycle, idle: Cycle, accounts: int, workers: int, single: Cycle | None
    ) -> PerPoll:
        """Divide a nothing-new cycle of ``accounts`` polls by ``workers`` workers."""
        return cls(
            cpu=cycle.cpu / accounts,
            db=cycle.db.scaled(1 / accounts),
            idle=idle.db.scaled(1 / (idle.wall * workers)),
            connections=cycle.peak_connections / (workers * MAX_WORKERS),
            sqlite_cpu=single.cpu / accounts if single is not None else None,
        )

    def describe(self) -> list[str]:
        """The per-poll costs as report lines."""
        d, i = self.db, self.idle
        base = f" (SQLite, one daemon: {self.sqlite_cpu * 1e3:.1f} ms)" if self.sqlite_cpu else ""
        return [
            f"per poll, nothing new, fleet mode: popsync CPU {self.cpu * 1e3:.1f} ms{base}; "
            f"database {d.commits:.1f} commits, {d.statements:.1f} statements, "
            f"{d.tuples_read:.0f} tuples read, {d.tuples_written:.1f} written, PostgreSQL CPU "
            f"{d.cpu * 1e3:.1f} ms; {self.connections:.2f} connections per run slot at peak",
            f"per idle worker and second (claim loop, nothing due): {i.commits:.1f} commits, "
            f"{i.statements:.1f} statements, {i.tuples_read:.0f} tuples read, PostgreSQL CPU "
            f"{i.cpu * 1e3:.1f} ms",
        ]


def capacity(c: PerPoll, accounts: int) -> list[str]:
    """Machines and database connections for ``accounts`` at :data:`INTERVAL`, arithmetic shown."""
    polls = accounts / INTERVAL
    cores = polls * c.cpu
    machines = max(1, math.ceil(cores / (CORES * UTILISATION)))
    in_flight = polls * POLL_SECONDS
    processes = max(machines * CORES, math.ceil(in_flight / SLOTS))
    slots = math.ceil(in_flight / processes)
    connections = math.ceil(processes * slots * c.connections)
    ceiling = processes * (2 * slots + 2)
    commits = polls * c.db.commits + processes * c.idle.commits
    statements = polls * c.db.statements + processes * c.idle.statements
    pg_cores = polls * c.db.cpu + processes * c.idle.cpu
    n = f"{accounts:,}"
    return [
        f"{n} accounts / {INTERVAL:.0f} s = {polls:,.0f} polls/s; x {c.cpu * 1e3:.1f} ms CPU = "
        f"{cores:.1f} cores -> {machines} machine(s) of {CORES} cores at "
        f"{UTILISATION:.0%} ({processes} worker processes)",
        f"{n}: in flight {polls:,.0f} polls/s x {POLL_SECONDS:.1f} s = {in_flight:,.0f} runs -> "
        f"max_workers = {slots} per process; connections {processes} x {slots} x "
        f"{c.connections:.2f} = {connections:,} (pool ceiling {processes} x (2 x {slots} + 2) "
        f"= {ceiling:,})",
        f"{n}: database {polls:,.0f} x {c.db.commits:.1f} + {processes} x "
        f"{c.idle.commits:.1f} = {commits:,.0f} commits/s, {statements:,.0f} statements/s, "
        f"PostgreSQL CPU {polls:,.0f} x {c.db.cpu * 1e3:.1f} ms + {processes} x "
        f"{c.idle.cpu * 1e3:.1f} ms = {pg_cores:.1f} cores",
    ]
