"""Run the benchmark: ``python -m bench.run [--scenarios a,b,c,lat,scale,scale-uidl] [--runs N]``.

``--scenarios scale-10k [--accounts 1000,2000,5000,10000]`` is the many-accounts scenario
(bench/scale10k.py); it is not in the default set.

One private Dovecot serves one generated mailbox per scenario; every tool fetches it in turn
(tools interleaved A B C D, A B C D, ...), its state and Maildir wiped before each first-fetch run,
and every run is verified (bench/verify.py). Results: a Markdown report printed and written to
bench/out/results-<timestamp>.md (``--write-results`` also copies it to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime as dt
import json
import os
import platform
import poplib
import shlex
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import bigbox, fleet, mailgen, peers
from bench.measure import DISK_MODES, Daemon, Measurement, disk_limit, run_measured
from bench.proxy import DelayProxy
from bench.storage import Storage, setup_storage
from bench.verify import Verdict, verify_maildir

if TYPE_CHECKING:
    from devtools.dovecot import Dovecot, MailUser

__all__ = ["Options", "Report", "Row", "ScenarioResult", "main", "render", "run_bench"]

BENCH = Path(__file__).resolve().parent
TITLES = {
    "a": "a: 2,000 x 4 KiB, first fetch into an empty Maildir",
    "b": "b: 1,100 mixed messages (~291 MB), first fetch",
    "c": "c: 10,000 x 4 KiB, second run with nothing new",
    "lat": "lat: 500 x 4 KiB through a 25 ms-each-way proxy (RTT ~50 ms), first fetch",
    "scale": "scale: 200 accounts on one popsync daemon, one full cycle",
    "fleet": "fleet: 2,000 accounts, 4 popsync workers on one PostgreSQL vs 1 daemon on SQLite",
    "scale-10k": "scale-10k: N accounts, implicit TLS at RTT 50 ms, one daemon, SIGUSR1 cycles",
    "scale-uidl-100k": "scale-uidl: 100,000 UIDLs listed, all but 10 seen (synthetic server)",
    "scale-uidl-1m": "scale-uidl: 1,000,000 UIDLs listed, all but 10 seen (synthetic server)",
}
#: Scenarios that produce one table per mailbox size.
MULTI = {"scale-uidl": ("scale-uidl-100k", "scale-uidl-1m")}
#: Messages in a scale-uidl mailbox that no tool has seen yet (each run fetches them).
SCALE_UIDL_NEW = 10


@dataclass
class Options:
    """Everything the command line can set."""

    scenarios: tuple[str, ...] = ("a", "b", "c", "lat", "scale", "scale-uidl")
    tools: tuple[str, ...] = peers.TOOLS
    runs: int = 3
    quick: bool = False
    out: Path = BENCH / "out"
    storage: str = "auto"
    install: bool = True
    delay: float = 0.025
    finished_event: str = "sync finished"
    account_key: str = "account"
    daemon_polls: int = 3
    command: str = ""
    write_results: bool = False
    accounts: tuple[int, ...] = (10_000,)


@dataclass
class Row:
    """One tool (or disk-limit mode) in one scenario, over all runs."""

    tool: str
    messages: int = 0
    nbytes: int = 0
    runs: list[Measurement] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    oks: list[bool] = field(default_factory=list)
    failed: bool = False
    unavailable: str = ""
    measured_rss: bool = True

    def add(self, m: Measurement, verdict: str, ok: bool) -> None:
        """Record one run; a failed verification marks the whole row FAILED."""
        self.runs.append(m)
        self.verdicts.append(verdict)
        self.oks.append(ok)
        self.failed = self.failed or not ok

    def good_runs(self) -> list[Measurement]:
        """The runs that verified OK (all runs when none did, so a failure still shows)."""
        good = [m for m, ok in zip(self.runs, self.oks, strict=True) if ok]
        return good or self.runs


@dataclass
class ScenarioResult:
    """One scenario's table plus free-form notes."""

    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, tool: str, messages: int, nbytes: int) -> Row:
        """Return the row for ``tool``, creating it on first use."""
        for r in self.rows:
            if r.tool == tool:
                return r
        r = Row(tool, messages, nbytes)
        self.rows.append(r)
        return r


@dataclass
class Report:
    """All scenario results plus what is needed to reproduce them."""

    options: Options
    scenarios: list[ScenarioResult] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    storage: str = ""
    started: str = ""
    elapsed: float = 0.0

    @property
    def all_ok(self) -> bool:
        """True when no measured run failed verification."""
        return not any(r.failed for s in self.scenarios for r in s.rows)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """State shared by the scenarios of one benchmark invocation."""

    def __init__(self, opts: Options, dovecot: Dovecot, storage: Storage) -> None:
        self.opts = opts
        self.dv = dovecot
        self.storage = storage
        self.owner = peers.ensure_user()
        self.py = peers.tool_python(self.owner)
        self.available: dict[str, str | None] = {t: self._why_unavailable(t) for t in opts.tools}

    @staticmethod
    def _why_unavailable(tool: str) -> str | None:
        need = {"mpop": ["mpop"], "getmail6": ["getmail"], "fetchmail": ["fetchmail", "maildrop"]}
        for exe in need.get(tool, []):
            if shutil.which(exe) is None:
                return f"{exe} not installed"
        if tool == "popsync":
            return peers.popsync_available()
        return None

    def tools(self) -> list[str]:
        """The requested tools that can run, in interleaving order."""
        return [t for t in self.opts.tools if self.available[t] is None]

    def mark_unavailable(self, result: ScenarioResult, tools: Sequence[str]) -> None:
        """Add an "unavailable" row for every requested tool that cannot run."""
        for t in tools:
            why = self.available.get(t)
            if why is not None:
                result.row(t, 0, 0).unavailable = why

    def mailbox(self, box: mailgen.Mailbox) -> tuple[peers.Server, MailUser]:
        """Create a server user holding ``box`` and warm Dovecot's index for it."""
        user = self.dv.new_user(box.name)
        self.dv.deliver_many(user, box.messages)
        stored = self.dv.messages(user)
        norm = sorted(m.replace(b"\r\n", b"\n") for m in stored)
        if norm != sorted(m.replace(b"\r\n", b"\n") for m in box.messages):
            _log(f"WARNING: Dovecot's copy of mailbox {box.name} differs from the generated one")
        srv = peers.Server(self.dv.host, self.dv.pop3_port, user.name, user.password)
        _warm(srv, len(box.messages))
        return srv, user

    def run_tool(self, run: peers.ToolRun, label: str) -> Measurement:
        """Run ``run``'s command once as the unprivileged user, output into a log file."""
        log = run.work / f"{label}.log"
        m = run_measured([*run.owner.prefix, *run.argv], run.env, run.work, log)
        self.owner.chown(log)
        return m


def _warm(srv: peers.Server, count: int) -> None:
    """One UIDL+LIST session so Dovecot's index and uidlist exist before anything is timed."""
    pop = poplib.POP3(srv.host, srv.port, timeout=120)
    try:
        pop.user(srv.username)
        pop.pass_(srv.password)
        _, lines, _ = pop.uidl()
        assert len(lines) == count, f"server has {len(lines)} messages, expected {count}"
        pop.list()
    finally:
        pop.quit()


def _verdict(run: peers.ToolRun, m: Measurement, box: mailgen.Mailbox) -> tuple[str, bool]:
    v: Verdict = verify_maildir(run.maildir, box.messages)
    ok_codes = {0, 1} if run.tool == "fetchmail" else {0}  # fetchmail: 1 = "no new mail"
    if m.exit_code not in ok_codes:
        v.problems.insert(0, f"exit code {m.exit_code} (see {run.work}/*.log)")
    return v.summary(), v.ok


def _first_fetch(bench: Bench, name: str, *, proxy: bool = False) -> ScenarioResult:
    """Scenarios a, b, lat: every run fetches the whole mailbox into an empty Maildir."""
    opts = bench.opts
    result = ScenarioResult(name)
    box = mailgen.generate(name, quick=opts.quick)
    srv, _ = bench.mailbox(box)
    delayer: DelayProxy | None = None
    if proxy:
        delayer = DelayProxy(srv.host, srv.port, delay=opts.delay)
        delayer.start()
        srv = peers.Server(srv.host, delayer.port, srv.username, srv.password)
        result.notes.append(f"proxy: {opts.delay * 1000:.0f} ms each way, pipelining preserved")
    base = bench.storage.path / name
    runs = {t: peers.setup_tool(t, base / t, srv, bench.owner, bench.py) for t in bench.tools()}
    disk = base / "disk-limit"
    try:
        for i in range(opts.runs):
            for tool, run in runs.items():
                peers.reset(run)
                m = bench.run_tool(run, f"run{i}")
                verdict, ok = _verdict(run, m, box)
                result.row(tool, len(box.messages), box.total_bytes).add(m, verdict, ok)
                _log(f"[{name}] run {i + 1}/{opts.runs} {tool}: {m.wall:.3f} s, {verdict}")
                peers.reset(run)  # free the space (b is ~290 MB per tool)
            if not proxy:
                for mode in DISK_MODES:
                    shutil.rmtree(disk, ignore_errors=True)
                    for sub in ("tmp", "new", "cur"):
                        (disk / sub).mkdir(parents=True)
                    m = disk_limit(disk, box.messages, mode)
                    row = result.row(f"disk limit: {mode}", len(box.messages), box.total_bytes)
                    row.measured_rss = False
                    v = verify_maildir(disk, box.messages)
                    row.add(m, v.summary(), v.ok)
                shutil.rmtree(disk, ignore_errors=True)
    finally:
        if delayer is not None:
            delayer.stop()
    bench.mark_unavailable(result, opts.tools)
    return result


def _nothing_new(bench: Bench) -> ScenarioResult:
    """Scenario c: prime each tool with one full fetch, then time runs that find nothing new."""
    opts = bench.opts
    result = ScenarioResult("c")
    box = mailgen.generate("c", quick=opts.quick)
    srv, _ = bench.mailbox(box)
    base = bench.storage.path / "c"
    runs = {t: peers.setup_tool(t, base / t, srv, bench.owner, bench.py) for t in bench.tools()}
    for tool, run in runs.items():
        m = bench.run_tool(run, "prime")
        verdict, ok = _verdict(run, m, box)
        prime = result.row(f"({tool}: priming first fetch)", len(box.messages), box.total_bytes)
        prime.add(m, verdict, ok)
        _log(f"[c] prime {tool}: {m.wall:.3f} s, {verdict}")
    for i in range(opts.runs):
        for tool, run in runs.items():
            m = bench.run_tool(run, f"run{i}")
            verdict, ok = _verdict(run, m, box)
            result.row(tool, len(box.messages), 0).add(m, verdict, ok)
            _log(f"[c] run {i + 1}/{opts.runs} {tool}: {m.wall:.3f} s, {verdict}")
    if "popsync" in runs:
        _daemon_polls(bench, runs["popsync"], box, result)
    bench.mark_unavailable(result, opts.tools)
    return result


def _daemon(bench: Bench, argv: list[str], run: peers.ToolRun, cwd: Path) -> Daemon:
    opts = bench.opts
    return Daemon(
        [*run.owner.prefix, *argv], run.env, cwd, cwd / "daemon.log",
        finished_event=opts.finished_event, account_key=opts.account_key,
    )  # fmt: skip


def _failed(failures: list[str]) -> str:
    return "FAILED: " + "; ".join(failures[:3]) if failures else ""


def _daemon_polls(
    bench: Bench, run: peers.ToolRun, box: mailgen.Mailbox, result: ScenarioResult
) -> None:
    """Scenario c inside the daemon: SIGUSR1 polls of an already primed account."""
    assert run.daemon_argv is not None
    row = result.row("popsync (one poll in the daemon)", len(box.messages), 0)
    row.measured_rss = False
    daemon = _daemon(bench, run.daemon_argv, run, run.work)
    try:
        daemon.settle({"bench"}, cycle_timeout=60)
        for i in range(bench.opts.daemon_polls):
            wall, cpu, failures = daemon.poll({"bench"})
            v = verify_maildir(run.maildir, box.messages)
            verdict = _failed(failures) or v.summary()
            row.add(Measurement(wall, cpu, 0, 0), verdict, v.ok and not failures)
            _log(f"[c] daemon poll {i + 1}: {wall:.3f} s, {verdict}")
    except (TimeoutError, OSError) as exc:
        row.add(Measurement(0, 0, 0, -1), f"FAILED: {exc} (see {run.work}/daemon.log)", False)
    finally:
        life = daemon.stop()
        if daemon.skipped_polls:
            result.notes.append(f"{daemon.skipped_polls} SIGUSR1 poll(s) dropped by the "
                                "daemon's scheduler and re-sent")  # fmt: skip
        result.notes.append(
            f"popsync daemon: whole life CPU {life.cpu:.2f} s, peak RSS "
            f"{life.maxrss_kib / 1024:.1f} MiB (VmHWM); polls triggered by SIGUSR1, timed to "
            f"the last {bench.opts.finished_event!r} log line"
        )


def _scale(bench: Bench) -> ScenarioResult:
    """Scenario scale: 200 accounts on one popsync daemon; cycle time, CPU and RSS."""
    opts = bench.opts
    result = ScenarioResult("scale")
    if "popsync" not in bench.tools():
        bench.mark_unavailable(result, ["popsync"] if "popsync" in opts.tools else [])
        result.notes.append("popsync only; skipped: popsync is not available or not selected")
        return result
    sset = mailgen.generate_scale(accounts=5 if opts.quick else 200)
    base = bench.storage.path / "scale"
    accounts: dict[str, tuple[peers.Server, Path]] = {}
    users: list[MailUser] = []
    for box in sset.initial:
        srv, user = bench.mailbox(box)
        users.append(user)
        accounts[box.name] = (srv, base / box.name / "Maildir")
        for sub in ("tmp", "new", "cur"):
            (base / box.name / "Maildir" / sub).mkdir(parents=True)
    first_srv = next(iter(accounts.values()))[0]
    run = peers.setup_tool("popsync", base / "_tool", first_srv, bench.owner, bench.py)
    cfg = base / "popsync-daemon.toml"
    cfg.write_text(peers.popsync_config(base / "state", accounts, interval=86400))
    (base / "state").mkdir()
    bench.owner.chown(base)
    assert run.daemon_argv is not None
    names = set(accounts)
    daemon = _daemon(bench, [*run.daemon_argv[:-1], str(cfg)], run, base)
    n = len(names)
    try:
        startup = daemon.settle(names, cycle_timeout=300)
        if startup is None:  # no cycle at start-up: the first SIGUSR1 fetches
            startup, cpu, failures = daemon.poll(names)
        else:
            cpu, failures = 0.0, []
        first = result.row(f"cycle: first fetch, {len(sset.initial[0].messages)} each", 0, 0)
        first.messages = sum(len(b.messages) for b in sset.initial)
        first.nbytes = sum(b.total_bytes for b in sset.initial)
        first.add(Measurement(startup, cpu, daemon.rss_kib()[1], 0), _failed(failures) or "-",
                  not failures)  # fmt: skip
        for _ in range(opts.runs):
            wall, cpu, failures = daemon.poll(names)
            result.row("cycle: nothing new", n, 0).add(
                Measurement(wall, cpu, daemon.rss_kib()[1], 0), _failed(failures) or "-",
                not failures,
            )  # fmt: skip
        for box, user in zip(sset.new, users, strict=True):
            bench.dv.deliver_many(user, box.messages)
        wall, cpu, failures = daemon.poll(names)
        news = len(sset.new[0].messages)
        row = result.row(f"cycle: {news} new each", news * n, sum(b.total_bytes for b in sset.new))
        bad = failures + [
            f"{b.name}: {v.summary()}"
            for b, nb in zip(sset.initial, sset.new, strict=True)
            if not (v := verify_maildir(accounts[b.name][1], b.messages + nb.messages)).ok
        ]
        row.add(Measurement(wall, cpu, daemon.rss_kib()[1], 0), _failed(bad) or "OK", not bad)
    except (TimeoutError, OSError) as exc:
        result.row("cycle", 0, 0).add(
            Measurement(0, 0, 0, -1), f"FAILED: {exc} (see {base}/daemon.log)", False
        )
    finally:
        life = daemon.stop()
        if daemon.skipped_polls:
            result.notes.append(f"{daemon.skipped_polls} SIGUSR1 poll(s) dropped by the "
                                "daemon's scheduler and re-sent")  # fmt: skip
        result.notes.append(
            f"{n} accounts on one daemon; CPU and peak RSS columns: the daemon during that cycle "
            f"(/proc); whole life: CPU {life.cpu:.2f} s, peak RSS "
            f"{life.maxrss_kib / 1024:.1f} MiB (VmHWM)"
        )
    return result


def _scale_10k(bench: Bench) -> ScenarioResult:
    """Scenario scale-10k (bench/scale10k.py) for each ``--accounts`` count."""
    from bench import scale10k

    opts = bench.opts
    result = ScenarioResult("scale-10k")
    figures = []
    for n in opts.accounts:
        root = bench.storage.path / f"scale10k-{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        root.chmod(0o711)
        f = scale10k.run_scale10k(root / "dovecot", root / "popsync", bench.owner, bench.py,
                                  accounts=n, cycles=max(1, opts.runs - 1))  # fmt: skip
        figures.append(f)
        for c in f.cycles:
            row = result.row(f"popsync, {n:,} accounts: {c.label}", c.runs, 0)
            row.add(scale10k.as_measurement(c), _failed(c.failures) or "-", not c.failures)
        shutil.rmtree(root, ignore_errors=True)
    result.notes.append("per-cycle figures:\n\n" + scale10k.render(figures, opts.command))
    return result


def _prime(run: peers.ToolRun, srv: peers.Server, seen: int, template: Path) -> None:
    """Give the tool a state in which messages 1..seen are already delivered."""
    if run.tool == "popsync":
        from popsync.seen import DB_FILENAME

        shutil.copyfile(template, run.state / DB_FILENAME)
    else:  # mpop: one UID list per (host, user), UIDs in ascending order
        uids = b"".join(bigbox.uidl(n) + b"\n" for n in range(1, seen + 1))
        head = b"# mpop uidls\n %d %s %s\n" % (seen, srv.host.encode(), srv.username.encode())
        (run.state / "mpop_uidls").write_bytes(head + uids)
    run.owner.chown(run.state)


def _popsync_template(path: Path, seen: int, mailbox: str) -> None:
    """A seen-store in which messages 1..seen of ``mailbox`` (its store key) are delivered."""
    from popsync.seen import SeenStore

    path.unlink(missing_ok=True)
    with SeenStore.open(path) as store:
        for start in range(1, seen + 1, 50_000):
            batch = range(start, min(start + 50_000, seen + 1))
            store.mark_delivered(mailbox, [(bigbox.uidl(n), f"primed.{n}") for n in batch], 1e9)


def _scale_uidl(bench: Bench) -> list[ScenarioResult]:
    """Scenario scale-uidl: a huge listing, all but a few messages already seen.

    The server is bench/bigbox.py (see its docstring); popsync and mpop start from a primed
    state, so each run lists every message, diffs against its seen-store and fetches 10.
    """
    opts = bench.opts
    sizes = (2_000, 5_000) if opts.quick else (100_000, 1_000_000)
    tools = [t for t in bench.tools() if t in ("mpop", "popsync")]
    results = []
    for name, count in zip(MULTI["scale-uidl"], sizes, strict=True):
        result = ScenarioResult(name)
        seen = count - SCALE_UIDL_NEW
        expected = [bigbox.message(n) for n in range(seen + 1, count + 1)]
        base = bench.storage.path / name
        base.mkdir(parents=True, exist_ok=True)
        template = base / "popsync-primed.sqlite3"
        with bigbox.BigBox(count) as box:
            srv = peers.Server(box.host, box.port, "bench", "bench")
            if "popsync" in tools:
                # The store's key is popsync.config.Account.mailbox: user@host:port on a port
                # other than 110/995, which bigbox's ephemeral port always is.
                _popsync_template(template, seen, f"{srv.username}@{srv.host}:{srv.port}")
            runs = {t: peers.setup_tool(t, base / t, srv, bench.owner, bench.py) for t in tools}
            for i in range(opts.runs):
                for tool, run in runs.items():
                    peers.reset(run)
                    _prime(run, srv, seen, template)
                    m = bench.run_tool(run, f"run{i}")
                    verdict, ok = _verdict_of(run, m, expected)
                    row = result.row(tool, len(expected), sum(map(len, expected)))
                    row.add(m, verdict, ok)
                    _log(f"[{name}] run {i + 1}/{opts.runs} {tool}: {m.wall:.3f} s, "
                         f"{m.maxrss_kib / 1024:.1f} MiB, {verdict}")  # fmt: skip
            result.notes.append(
                f"{count:,} messages listed ({box.listing_octets / 1e6:.1f} MB of UIDL listing, "
                f"~{box.listing_octets // count} octets a line), {seen:,} already in the tool's "
                f"state, {SCALE_UIDL_NEW} fetched per run; server: bench/bigbox.py (synthetic, "
                "not Dovecot: what is measured is the client's listing and diff)"
            )
        template.unlink(missing_ok=True)
        bench.mark_unavailable(result, [t for t in opts.tools if t in ("mpop", "popsync")])
        results.append(result)
    return results


def _verdict_of(run: peers.ToolRun, m: Measurement, expected: list[bytes]) -> tuple[str, bool]:
    v: Verdict = verify_maildir(run.maildir, expected)
    if m.exit_code != 0:
        v.problems.insert(0, f"exit code {m.exit_code} (see {run.work}/*.log)")
    return v.summary(), v.ok


def _machine(bench: Bench) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    info = {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{int(mem) / 1024**2:.1f} GiB",
        "kernel": platform.release(),
        "OS": platform.freedesktop_os_release().get("PRETTY_NAME", "?"),
        "harness Python": sys.version.split()[0],
    }
    info.update(peers.tool_versions(bench.py[0]))
    return info


def run_bench(opts: Options) -> Report:
    """Run the selected scenarios and return the report (nothing is written)."""
    from devtools.dovecot import Dovecot

    t0 = time.monotonic()
    report = Report(opts, started=dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    missing = peers.ensure_peers_installed(install=opts.install)
    if missing:
        _log(f"missing peer packages: {', '.join(missing)} (those tools are skipped)")
    # popsync runs from bytecode, as an installed package does: the tools' unprivileged user
    # cannot write __pycache__ into the checkout, so every run would compile every module.
    compileall.compile_dir(peers.REPO / "popsync", quiet=1)
    storage = setup_storage(opts.out, opts.storage)
    report.storage = storage.description
    _log(f"Maildirs on: {storage.description}")
    dv_root = opts.out / "dovecot"
    shutil.rmtree(dv_root, ignore_errors=True)
    try:
        with Dovecot(dv_root, extra_config="pop3_no_flag_updates = yes\n") as dv:
            bench = Bench(opts, dv, storage)
            report.machine = _machine(bench)
            scenario: dict[str, Callable[[], ScenarioResult | list[ScenarioResult]]] = {
                "a": lambda: _first_fetch(bench, "a"),
                "b": lambda: _first_fetch(bench, "b"),
                "c": lambda: _nothing_new(bench),
                "lat": lambda: _first_fetch(bench, "lat", proxy=True),
                "scale": lambda: _scale(bench),
                "scale-uidl": lambda: _scale_uidl(bench),
                "fleet": lambda: fleet.run_fleet(bench),
                "scale-10k": lambda: _scale_10k(bench),
            }
            for name in opts.scenarios:
                got = scenario[name]()
                report.scenarios.extend(got if isinstance(got, list) else [got])
    finally:
        storage.teardown()
        shutil.rmtree(dv_root, ignore_errors=True)
    report.elapsed = time.monotonic() - t0
    return report


# ---------------------------------------------------------------------------------- rendering


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _order(row: Row) -> tuple[int, int]:
    """Tools in the usual order, then the daemon row, disk limits, and context rows last."""
    if row.tool in peers.TOOLS:
        return 0, peers.TOOLS.index(row.tool)
    if row.tool.startswith("popsync"):
        return 1, 0
    if row.tool.startswith("disk"):
        return 2, 0
    return (4, 0) if row.tool.startswith("(") else (3, 0)


def _verdict_cell(r: Row) -> str:
    """ "OK (n runs)", or "FAILED k/n runs: why" (then the numbers are from the OK runs)."""
    if not r.failed:
        return f"{' / '.join(sorted(set(r.verdicts)))} ({len(r.runs)} runs)"
    bad = sorted({v.removeprefix("FAILED: ") for v, ok in zip(r.verdicts, r.oks, strict=True)
                  if not ok})  # fmt: skip
    good = len(r.runs) - r.oks.count(False)
    note = f"; stats from the {good} OK run(s)" if good else ""
    return f"FAILED {r.oks.count(False)}/{len(r.runs)} runs: {' / '.join(bad)}{note}"


def _table(result: ScenarioResult) -> list[str]:
    lines = [
        "| tool | wall s, median (min-max) | x mpop | CPU s (user+sys) | peak RSS MiB "
        "| msg/s | MB/s | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mpop = next((r for r in result.rows if r.tool == "mpop" and r.runs), None)
    mpop_wall = statistics.median(m.wall for m in mpop.good_runs()) if mpop else None
    for r in sorted(result.rows, key=_order):
        if r.unavailable:
            lines.append(f"| {r.tool} | unavailable: {r.unavailable} | | | | | | |")
            continue
        runs = r.good_runs()
        walls = [m.wall for m in runs]
        wall = statistics.median(walls) if walls else 0.0
        ratio = f"{wall / mpop_wall:.2f}" if mpop_wall and not r.tool.startswith("(") else ""
        rss = _spread([m.maxrss_kib / 1024 for m in runs], ".1f") if r.measured_rss else "-"
        # nothing transferred (scenario c, idle cycles): a rate would be meaningless
        rate = f"{r.messages / wall:,.0f}" if wall and r.nbytes else "-"
        mbs = f"{r.nbytes / wall / 1e6:.1f}" if wall and r.nbytes else "-"
        lines.append(
            f"| {r.tool} | {_spread(walls, '.3f')} | {ratio} | "
            f"{_spread([m.cpu for m in runs], '.2f')} | {rss} | {rate} | {mbs} "
            f"| {_verdict_cell(r)} |"
        )
    return lines


def render(report: Report) -> str:
    """Return the Markdown report."""
    o = report.options
    out = [
        f"# popsync benchmark ({report.started})",
        "",
        f"Command: `{o.command}`",
        "",
        f"Runs per tool: {o.runs}{' (quick smoke mode: tiny mailboxes)' if o.quick else ''}; "
        f"total time {report.elapsed:.0f} s.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in report.machine.items()],
        f"- Maildirs: {report.storage}",
        "",
        "## Method",
        "",
        "- One private Dovecot on 127.0.0.1 (`pop3_no_flag_updates = yes` so no run renames "
        "files on the server), one generated mailbox per scenario, warmed by one UIDL session.",
        "- Plain POP3 with USER/PASS, TLS off for every tool; mail kept on the server; delivery "
        "into a Maildir; tools run as the unprivileged user `popbench` (via setpriv) when the "
        "harness is root. Tools interleaved A B C D, A B C D, ...; state and Maildir wiped "
        "before every first-fetch run.",
        "- Wall time from spawn to exit; CPU (user+sys) from `wait4` (covers the tool and "
        "every child it reaped, e.g. fetchmail's maildrop); peak RSS via GNU time's %M (the "
        "largest process of the tool's tree; the harness's own wait4 would report the Python "
        "parent's RSS, inherited at exec). Medians and (min-max) over the runs that verified "
        "OK. Python tools run under the interpreter listed above.",
        "- Every run verified: each message exactly once, byte-identical after stripping the "
        "header fields the tool prepends (Received, Return-Path, Delivered-To). "
        '"converted EOL": the tool stores LF instead of the server\'s CRLF (mpop, getmail6, '
        'fetchmail+maildrop do); "refolded headers": equal after RFC 5322 unfolding '
        "(getmail6 re-wraps headers over 78 columns); anything else is FAILED.",
        "- Disk limit: the same files written in-process (tmp/ -> new/) with fsync of file and "
        "directory per message, fsync of the file only, and no fsync; no network.",
        "",
    ]
    for s in report.scenarios:
        out += [f"## {TITLES.get(s.name, s.name)}", "", *_table(s), ""]
        out += [f"- {n}" for n in s.notes]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _raw(report: Report) -> str:
    """Every measurement as JSON, for re-rendering or other statistics later."""
    data = {
        "command": report.options.command,
        "started": report.started,
        "machine": report.machine,
        "storage": report.storage,
        "scenarios": {
            s.name: {
                "notes": s.notes,
                "rows": [
                    {
                        "tool": r.tool, "messages": r.messages, "bytes": r.nbytes,
                        "unavailable": r.unavailable, "verdicts": r.verdicts, "ok": r.oks,
                        "runs": [dataclasses.asdict(m) for m in r.runs],
                    }
                    for r in s.rows
                ],
            }
            for s in report.scenarios
        },
    }  # fmt: skip
    return json.dumps(data, indent=1)


def _parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="a,b,c,lat,scale,scale-uidl")
    p.add_argument("--tools", default=",".join(peers.TOOLS))
    p.add_argument("--runs", type=int, default=None, help="runs per tool (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny mailboxes, 1 run")
    p.add_argument("--out", type=Path, default=BENCH / "out")
    p.add_argument("--storage", choices=("auto", "loop", "dir"), default="auto")
    p.add_argument("--no-install", action="store_true", help="do not apt-get missing peers")
    p.add_argument("--finished-event", default="sync finished", help="daemon log event")
    p.add_argument("--account-key", default="account", help="daemon log field naming the account")
    p.add_argument("--write-results", action="store_true", help="also write bench/RESULTS.md")
    p.add_argument("--accounts", default="10000", help="scale-10k: comma-separated counts")
    args = p.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    tools = tuple(t for t in args.tools.split(",") if t)
    bad = [s for s in scenarios if s not in (*mailgen.SCENARIOS, *MULTI, "scale-10k")]
    bad += [t for t in tools if t not in peers.TOOLS]
    if bad:
        p.error(f"unknown scenario/tool: {', '.join(bad)}")
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    cmd = "python -m bench.run " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    return Options(
        scenarios=scenarios, tools=tools, runs=runs, quick=args.quick, out=args.out,
        storage=args.storage, install=not args.no_install, finished_event=args.finished_event,
        account_key=args.account_key, command=cmd.strip(), write_results=args.write_results,
        accounts=tuple(int(a) for a in args.accounts.split(",") if a),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 when any run failed verification."""
    opts = _parse(argv)
    # SIGTERM -> SystemExit, so the finally blocks unmount the image and stop Dovecot/daemons
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = run_bench(opts)
    text = render(report)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"results-{stamp}.md"
    path.write_text(text)
    path.with_suffix(".json").write_text(_raw(report))
    print(text)
    _log(f"written to {path}")
    if opts.write_results:
        shutil.copyfile(path, BENCH / "RESULTS.md")
        _log(f"copied to {BENCH / 'RESULTS.md'}")
    return 0 if report.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
