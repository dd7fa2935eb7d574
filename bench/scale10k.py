"""Scenario scale-10k: N accounts (default 10,000) over implicit TLS at RTT 50 ms, one daemon.

Every account is a Dovecot passwd-file user holding a few small messages, written straight into
its Maildir (no LDA: 30,000 files in seconds). The daemon (interval 5 min) reaches Dovecot's
POP3S port through :class:`bench.proxy.DelayProxy` (25 ms each way), run in a process of its own
so its CPU is counted apart. Cycles are triggered with SIGUSR1: the first one fetches everything,
the following ones find nothing new. For each cycle: wall time until every account logged its
result, the daemon's CPU divided by the runs it made, peak RSS (VmHWM), the most open file
descriptors and threads seen (sampled from /proc every 0.2 s), and the CPU Dovecot and the proxy
used meanwhile. The yardstick is mpop's whole-process CPU for the same poll (TLS through the
proxy, nothing new), measured with wait4.

Dovecot is set up for the load (see :data:`_TUNING`): long-lived login and pop3 processes, a
client limit per login process, an auth cache, and enough descriptors.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import peers
from bench.measure import Daemon, Measurement, run_measured

if TYPE_CHECKING:
    from devtools.dovecot import Dovecot

__all__ = ["ScaleFigures", "make_dovecot", "run_scale10k"]

#: Messages per account, and their size.
PER_ACCOUNT = 3
_MSG_SIZE = 2048
#: Dovecot settings for thousands of TLS logins a minute on two cores.
_TUNING = """\
auth_cache_size = 32M
auth_cache_ttl = 1 hour
mail_max_userip_connections = 100000
default_client_limit = 4000
default_vsz_limit = 512M
ssl_min_protocol = TLSv1.2
service auth {{
  client_limit = 4000
}}
service pop3 {{
  # Reuse pop3 processes (every user maps to one uid here): no fork+exec per session.
  service_count = 0
  client_limit = 1
  process_limit = 512
  process_min_avail = {pop3_spare}
}}
"""
_LOGIN = """\
service pop3-login {
  chroot =
  service_count = 0
  client_limit = 2000
  process_min_avail = 2
  process_limit = 8
"""


def make_dovecot(root: Path, passwd: Path, accounts: int = 10_000) -> Dovecot:
    """A Dovecot with a passwd-file user database and the tuning above."""
    from devtools.dovecot import Dovecot

    class ScaleDovecot(Dovecot):
        def _config(self) -> str:
            text = super()._config()
            static = f"passdb {{\n  driver = static\n  args = password={self.password}\n}}"
            assert static in text
            assert "service pop3-login {\n  chroot =\n" in text
            text = text.replace(
                static, f"passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {passwd}\n}}"
            )
            text = text.replace("mail_max_userip_connections = 1000\n", "")
            text = text.replace("service pop3-login {\n  chroot =\n", _LOGIN, 1)
            return text.replace("  # One long-lived login process", "  # (tuned)", 1)

    spare = min(16, max(1, accounts // 100))  # idle pop3 processes kept ready
    tuning = _TUNING.format(pop3_spare=spare)
    return ScaleDovecot(root, extra_config="pop3_no_flag_updates = yes\n" + tuning)


def _message(k: int, i: int) -> bytes:
    rnd = random.Random(f"scale10k:{k}:{i}")
    body = "".join(rnd.choice("abcdefghij klmnopqrstuvwxyz\n") for _ in range(_MSG_SIZE))
    head = (
        f"From: sender{i}@example.org\nTo: user{k}@example.net\n"
        f"Subject: scale {k} {i}\nMessage-ID: <{k}.{i}@scale10k.example>\n\n"
    )
    return (head + body + "\n").replace("\n", "\r\n").encode()


def populate(dv: Dovecot, count: int) -> tuple[Path, list[str]]:
    """Write ``count`` users' Maildirs and the passwd-file; return it and the user names."""
    names = [f"z{k:05d}" for k in range(count)]
    lines = []
    ident = dv._identity
    for k, name in enumerate(names):
        lines.append(f"{name}:{{PLAIN}}pw{k}::::::\n")
        box = dv.mail_dir / name
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        for i in range(PER_ACCOUNT):
            path = box / "new" / f"1700000000.M{i:06d}P1.scale10k"
            path.write_bytes(_message(k, i))
            if ident.as_root:
                os.chown(path, ident.uid, ident.gid)
        if ident.as_root:
            for d in (box, box / "tmp", box / "new", box / "cur"):
                os.chown(d, ident.uid, ident.gid)
    passwd = dv.root / "users.passwd"
    passwd.write_text("".join(lines))
    return passwd, names


def expected(k: int) -> list[bytes]:
    """The messages account number ``k`` holds."""
    return [_message(k, i) for i in range(PER_ACCOUNT)]


# ------------------------------------------------------------------------------- proxy process
_PROXY_MAIN = """\
import sys, time
from bench.proxy import DelayProxy
p = DelayProxy(sys.argv[1], int(sys.argv[2]), delay=float(sys.argv[3]))
p.start()
print(p.port, flush=True)
sys.stdin.read()
"""


class ProxyProcess:
    """:class:`bench.proxy.DelayProxy` in a child process (its CPU is not the daemon's)."""

    def __init__(self, host: str, port: int, delay: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(peers.REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROXY_MAIN, host, str(port), str(delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            preexec_fn=_more_fds,  # noqa: PLW1509 - the harness's threads hold no locks here
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def cpu(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _more_fds() -> None:
    """Raise the soft descriptor limit to the hard one (inherited by what is started next)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------------------- /proc helpers
_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_cpu(pid: int) -> float:
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / _TCK


def group_cpu(pgid: int) -> float:
    """CPU of a process group: its live members plus what the leader reaped (cutime+cstime)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            f = _stat(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(f[2]) != pgid:
            continue
        total += int(f[11]) + int(f[12])
        if int(entry.name) == pgid:
            total += int(f[13]) + int(f[14])
    return total / _TCK


def count_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def count_threads(pid: int) -> int:
    return int(_stat(pid)[17])


class Sampler:
    """Samples a process's open descriptors and threads every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        self.pid = pid
        self.period = period
        self.max_fds = 0
        self.max_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.max_fds = max(self.max_fds, count_fds(self.pid))
                self.max_threads = max(self.max_threads, count_threads(self.pid))
            except (OSError, IndexError):
                return


# ------------------------------------------------------------------------------- the scenario
@dataclass
class Cycle:
    """One SIGUSR1 cycle of the daemon."""

    label: str
    wall: float
    runs: int
    cpu: float
    rss_kib: int
    fds: int
    threads: int
    dovecot_cpu: float
    proxy_cpu: float
    failures: list[str] = field(default_factory=list)

    @property
    def cpu_per_poll_ms(self) -> float:
        return 1000 * self.cpu / max(self.runs, 1)


@dataclass
class ScaleFigures:
    """Everything scale-10k measured for one N."""

    accounts: int
    cycles: list[Cycle] = field(default_factory=list)
    mpop_cpu_ms: list[float] = field(default_factory=list)
    mpop_wall_ms: list[float] = field(default_factory=list)
    life_cpu: float = 0.0
    peak_rss_kib: int = 0
    startup_s: float = 0.0
    loadavg: str = ""
    notes: list[str] = field(default_factory=list)


def _daemon_config(
    state: Path, base: Path, port: int, ca: Path, names: list[str], max_workers: int
) -> str:
    lines = [
        f'state_dir = "{state}"',
        f"max_workers = {max_workers}",
        'log_format = "json"',
        "",
        "[defaults]",
        'host = "127.0.0.1"',
        f"port = {port}",
        'tls = "implicit"',
        f'tls_ca_file = ["{ca}"]',
        'auth = "plain"',
        "interval = 300",
        "",
    ]
    for k, name in enumerate(names):
        lines += [
            f"[accounts.{name}]",
            f'username = "{name}"',
            f'password = "pw{k}"',
            f'maildir = "{base / "mail" / name}"',
            "",
        ]
    return "\n".join(lines)


def _mpop_rc(work: Path, port: int, ca: Path, name: str, k: int) -> Path:
    rc = work / "mpoprc"
    rc.write_text(
        f"""defaults
tls on
tls_starttls off
tls_trust_file {ca}
auth plain
pipelining auto
keep on

account bench
host 127.0.0.1
port {port}
user {name}
password pw{k}
delivery maildir {work / "Maildir"}
uidls_file {work / "mpop_uidls"}
"""
    )
    rc.chmod(0o600)
    for sub in ("tmp", "new", "cur"):
        (work / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
    return rc


def _mpop_polls(
    owner: peers.Owner, work: Path, port: int, ca: Path, names: list[str], polls: int
) -> tuple[list[float], list[float]]:
    """mpop's whole-process CPU and wall (ms) per nothing-new poll of the same accounts."""
    work.mkdir(parents=True, exist_ok=True)
    k = len(names) - 1  # the daemon's last account: its mailbox is primed on the server
    rc = _mpop_rc(work, port, ca, names[k], k)
    owner.chown(work)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
    argv = [*owner.prefix, "mpop", f"--file={rc}", "--quiet", "bench"]
    first = run_measured(argv, env, work, work / "prime.log")
    if first.exit_code != 0:
        raise RuntimeError(f"mpop failed ({first.exit_code}): see {work}/prime.log")
    cpu, wall = [], []
    for i in range(polls):
        m = run_measured(argv, env, work, work / f"poll{i}.log")
        if m.exit_code != 0:
            raise RuntimeError(f"mpop failed ({m.exit_code}): see {work}/poll{i}.log")
        cpu.append(1000 * m.cpu)
        wall.append(1000 * m.wall)
    return cpu, wall


class _Watch:
    """The daemon plus the CPU counters of everything around it."""

    def __init__(self, daemon: Daemon, dv: Dovecot, proxy: ProxyProcess) -> None:
        self.daemon = daemon
        self.dv = dv
        self.proxy = proxy

    def dovecot_cpu(self) -> float:
        pid = self.dv._proc.pid if self.dv._proc else 0
        return group_cpu(pid) if pid else 0.0

    def cycle(self, label: str, names: set[str], timeout: float) -> Cycle:
        d = self.daemon
        d._drain()
        dv0, px0, cpu0 = self.dovecot_cpu(), self.proxy.cpu(), d._ticks()
        with Sampler(d.proc.pid) as sampler:
            t0 = time.perf_counter()
            d.proc.send_signal(signal.SIGUSR1)
            runs, failures = _wait_all(d, names, timeout)
            wall = time.perf_counter() - t0
        return Cycle(
            label, wall, runs, d._ticks() - cpu0, d.rss_kib()[1],
            sampler.max_fds, sampler.max_threads, self.dovecot_cpu() - dv0,
            self.proxy.cpu() - px0, failures,
        )  # fmt: skip


def _wait_all(d: Daemon, names: set[str], timeout: float) -> tuple[int, list[str]]:
    """Wait for a result line from every account; return (result lines seen, failures)."""
    import queue

    pending = set(names)
    failures: list[str] = []
    runs = 0
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline or d.proc.poll() is not None:
            raise TimeoutError(f"no result from {len(pending)} account(s)")
        try:
            obj = d._lines.get(timeout=0.5)
        except queue.Empty:
            continue
        event = obj.get("event")
        if event in (d.finished_event, d.failed_event):
            runs += 1
            account = str(obj.get(d.account_key))
            pending.discard(account)
            if event == d.failed_event:
                failures.append(f"{account}: {obj.get('error', 'failed')}")
    return runs, failures


def run_scale10k(
    dv_root: Path,
    work: Path,
    owner: peers.Owner,
    py: tuple[str, dict[str, str]],
    *,
    accounts: int,
    cycles: int = 2,
    max_workers: int = 128,
    delay: float = 0.025,
    mpop_polls: int = 10,
    profile: Path | None = None,
) -> ScaleFigures:
    """Run scale-10k for ``accounts`` accounts; see the module docstring."""
    from bench.verify import verify_maildir

    figures = ScaleFigures(accounts)
    dv = make_dovecot(dv_root, dv_root / "users.passwd", accounts)
    dv._prepare_root()
    t0 = time.perf_counter()
    _, names = populate(dv, accounts)
    figures.notes.append(f"{accounts} Maildirs written in {time.perf_counter() - t0:.1f} s")
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    _more_fds()  # Dovecot inherits it
    try:
        dv.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    proxy = ProxyProcess(dv.host, dv.pop3s_port, delay)
    daemon: Daemon | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        base = work
        (base / "state").mkdir(parents=True, exist_ok=True)
        for name in names:
            for sub in ("tmp", "new", "cur"):
                (base / "mail" / name / sub).mkdir(parents=True, exist_ok=True)
        cfg = base / "popsync.toml"
        cfg.write_text(
            _daemon_config(base / "state", base, proxy.port, dv.ca_file, names, max_workers)
        )
        cfg.chmod(0o600)
        owner.chown(base)
        argv = [py[0], "-c", peers._POPSYNC_MAIN, "-c", str(cfg)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(base), "LANG": "C.UTF-8",
               **py[1]}  # fmt: skip
        daemon = Daemon([*owner.prefix, *argv], env, base, base / "daemon.log")
        t1 = time.perf_counter()
        daemon.settle(set(), cycle_timeout=1)
        figures.startup_s = time.perf_counter() - t1
        watch = _Watch(daemon, dv, proxy)
        everyone = set(names)
        limit = max(300.0, accounts * 0.1)
        figures.cycles.append(watch.cycle("first fetch", everyone, limit))
        bad = [n for k, n in enumerate(names)
               if k % max(1, accounts // 50) == 0
               and not verify_maildir(base / "mail" / n, expected(k)).ok]  # fmt: skip
        if bad:
            figures.cycles[-1].failures.append(f"Maildir check failed for {bad[:3]}")
        if profile is not None:  # the nothing-new cycles only, CPU only (who holds the GIL)
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "50", "--gil",
                 "-o", str(profile), "-f", "raw", "--pid", str(daemon.proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for i in range(cycles):
            time.sleep(0.5)
            figures.cycles.append(watch.cycle(f"nothing new {i + 1}", everyone, limit))
        figures.mpop_cpu_ms, figures.mpop_wall_ms = _mpop_polls(
            owner, base / "mpop", proxy.port, dv.ca_file, names, mpop_polls
        )
        figures.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        if daemon is not None:
            life = daemon.stop()
            figures.life_cpu = life.cpu
            figures.peak_rss_kib = life.maxrss_kib
        proxy.stop()
        dv.stop()
    return figures


def render(all_figures: list[ScaleFigures], command: str) -> str:
    """The Markdown table (one row per cycle and N) and the notes."""
    out = [
        f"Command: `{command}`",
        "",
        "| accounts | cycle | wall s | runs | CPU ms/poll | x mpop CPU | peak RSS MiB | max fds "
        "| max threads | Dovecot CPU s | proxy CPU s | failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in all_figures:
        mpop = statistics.median(f.mpop_cpu_ms) if f.mpop_cpu_ms else 0.0
        for c in f.cycles:
            ratio = f"{c.cpu_per_poll_ms / mpop:.2f}" if mpop else "-"
            out.append(
                f"| {f.accounts:,} | {c.label} | {c.wall:.1f} | {c.runs} "
                f"| {c.cpu_per_poll_ms:.2f} | {ratio} | {c.rss_kib / 1024:.0f} | {c.fds} "
                f"| {c.threads} | {c.dovecot_cpu:.1f} | {c.proxy_cpu:.1f} "
                f"| {len(c.failures)}{': ' + c.failures[0][:80] if c.failures else ''} |"
            )
    out.append("")
    for f in all_figures:
        if f.mpop_cpu_ms:
            out.append(
                f"- N={f.accounts:,}: mpop nothing-new poll, TLS through the proxy: CPU "
                f"{statistics.median(f.mpop_cpu_ms):.2f} ms (median of {len(f.mpop_cpu_ms)}; "
                f"{min(f.mpop_cpu_ms):.2f}-{max(f.mpop_cpu_ms):.2f}), wall "
                f"{statistics.median(f.mpop_wall_ms):.0f} ms; daemon whole life CPU "
                f"{f.life_cpu:.1f} s, VmHWM {f.peak_rss_kib / 1024:.0f} MiB; start-up "
                f"{f.startup_s:.1f} s; load average at the end {f.loadavg}"
            )
        out += [f"- N={f.accounts:,}: {n}" for n in f.notes]
    return "\n".join(out) + "\n"


def as_measurement(c: Cycle) -> Measurement:
    """A cycle as the generic measurement row type of bench.run."""
    return Measurement(c.wall, c.cpu, c.rss_kib, 0 if not c.failures else 1)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scale10k --accounts 1000,2000``: scale-10k alone (as bench.run does)."""
    import argparse
    import shlex
    import shutil

    p = argparse.ArgumentParser(prog="python -m bench.scale10k")
    p.add_argument("--accounts", default="10000", help="comma-separated account counts")
    p.add_argument("--cycles", type=int, default=2, help="nothing-new cycles per count")
    p.add_argument("--max-workers", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--profile", action="store_true", help="record the daemon with py-spy")
    args = p.parse_args(argv)
    owner = peers.ensure_user()
    py = peers.tool_python(owner)
    figures = []
    for n in (int(x) for x in args.accounts.split(",") if x):
        root = args.out / f"scale10k-{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        root.chmod(0o711)
        prof = root / "profile.speedscope.json" if args.profile else None
        figures.append(run_scale10k(
            root / "dovecot", root / "popsync", owner, py, accounts=n, cycles=args.cycles,
            max_workers=args.max_workers, profile=prof,
        ))  # fmt: skip
        print(render(figures[-1:], ""), flush=True)
    cmd = "python -m bench.scale10k " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(render(figures, cmd))
    return 0 if all(not c.failures for f in figures for c in f.cycles) else 1


if __name__ == "__main__":
    sys.exit(main())
