"""The benchmark harness (bench/) cannot rot: its parts and a tiny end-to-end run are tested."""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import mailgen, peers
from bench.lmtp import box_busy
from bench.measure import Daemon
from bench.proxy import DelayProxy
from bench.run import Options, render, run_bench
from bench.verify import verify_maildir
from devtools.dovecot import dovecot_available
from tests.conftest import unavailable

__all__: list[str] = []


def _maildir(root: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True)
    return root


def test_mailgen_is_deterministic_and_exactly_sized() -> None:
    """The same seed gives the same CRLF messages of exactly 4 KiB, each with its Message-ID."""
    first = mailgen.generate("a", quick=True)
    assert first == mailgen.generate("a", quick=True)
    assert {len(m) for m in first.messages} == {4096}
    assert all(b"\n" not in m.replace(b"\r\n", b"") for m in first.messages)
    assert b"Message-ID: <bench-a-000007@popsync.bench>" in first.messages[7]
    for size in range(2048, 2100):
        assert len(mailgen.make_message(random.Random(size), "t", 0, size, False)) == size


def test_verify_accepts_prepended_headers_and_converted_eol(tmp_path: Path) -> None:
    """A Received header on top and LF line ends pass; the EOL conversion is counted."""
    box = mailgen.generate("a", quick=True)
    md = _maildir(tmp_path / "md")
    for i, msg in enumerate(box.messages):
        data = msg.replace(b"\r\n", b"\n") if i % 2 else msg
        (md / "new" / f"{i}.x").write_bytes(b"Received: by test\r\n\tfor <x>\r\n" + data)
    verdict = verify_maildir(md, box.messages)
    assert verdict.ok, verdict.problems
    assert verdict.converted_eol == len(box.messages) // 2
    assert verdict.summary() == "OK (converted EOL)"


def test_verify_counts_refolded_headers_separately(tmp_path: Path) -> None:
    """A long header re-folded (as getmail6 does) is equivalent after unfolding, and counted."""
    msg = mailgen.generate("a", quick=True).messages[0]
    folded = msg.replace(b"Subject: [a] ", b"Subject: [a]\r\n ", 1)
    assert folded != msg
    md = _maildir(tmp_path / "md")
    (md / "new" / "1.x").write_bytes(folded.replace(b"\r\n", b"\n"))
    verdict = verify_maildir(md, [msg])
    assert verdict.ok, verdict.problems
    assert verdict.summary() == "OK (converted EOL, refolded headers in 1 msgs)"
    (md / "new" / "1.x").write_bytes(folded.replace(b"Subject: [a]", b"Subject: [b]"))
    assert not verify_maildir(md, [msg]).ok


def test_verify_reports_duplicates_losses_and_corruption(tmp_path: Path) -> None:
    """A duplicate, a missing message, a changed byte and an unknown header each fail."""
    box = mailgen.generate("a", quick=True)
    md = _maildir(tmp_path / "md")
    msgs = list(box.messages)
    for i, msg in enumerate(msgs[:-1]):  # the last one is lost
        (md / "cur" / f"{i}.x:2,S").write_bytes(msg)
    (md / "new" / "dup").write_bytes(msgs[0])
    (md / "new" / "1.x").write_bytes(msgs[1].replace(b"MIME", b"MIMI"))
    (md / "cur" / "1.x:2,S").unlink()
    (md / "new" / "2.x").write_bytes(b"X-Spam: yes\r\n" + msgs[2])
    (md / "cur" / "2.x:2,S").unlink()
    verdict = verify_maildir(md, msgs)
    assert not verdict.ok
    text = " | ".join(verdict.problems)
    assert "duplicate <bench-a-000000@popsync.bench>" in text
    assert "<bench-a-000001@popsync.bench>: content differs" in text
    assert "unexpected header 'x-spam'" in text
    assert "1 missing" in text
    assert verdict.summary().startswith("FAILED: ")


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback echo server's port."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(srv.getsockname()[1])
    srv.close()


def test_proxy_adds_latency_but_keeps_pipelining(echo_port: int) -> None:
    """One round trip takes ~2 x delay; ten pipelined sends do not take ten round trips."""
    with DelayProxy("127.0.0.1", echo_port, delay=0.05) as proxy:
        conn = socket.create_connection(("127.0.0.1", proxy.port))
        with conn:
            t0 = time.perf_counter()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            rtt = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(10):
                conn.sendall(b"x")
                time.sleep(0.002)
            got = b""
            while len(got) < 10:
                got += conn.recv(16)
            pipelined = time.perf_counter() - t0
    assert 0.09 <= rtt < 0.3
    assert pipelined < 3 * rtt  # serialised it would be ~10 x rtt


def _smoke_tools() -> list[str]:
    tools = ["naive-poplib", "mpop"]
    if peers.popsync_available() is None:
        tools.append("popsync")
    return tools


@pytest.fixture
def bench_out() -> Iterator[Path]:
    """An output directory that Dovecot's mail user and the tool user can traverse."""
    out = Path(tempfile.mkdtemp(prefix="popsync-bench-"))
    out.chmod(0o755)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.dovecot
@pytest.mark.timeout(180)
def test_quick_bench_verifies_every_run(bench_out: Path) -> None:
    """The smoke benchmark fetches every scenario with each tool and every run verifies OK."""
    if not dovecot_available():
        unavailable("Dovecot is not installed (./dev setup installs it)")
    if shutil.which("mpop") is None:
        unavailable("mpop is not installed (./dev setup installs it)")
    tools = _smoke_tools()
    scenarios = ("a", "b", "c", "lat", *(("scale",) if "popsync" in tools else ()))
    opts = Options(
        scenarios=scenarios,
        tools=tuple(tools),
        runs=1,
        quick=True,
        out=bench_out,
        storage="dir",
        install=False,
        command="pytest tests/unit/test_bench_smoke.py",
    )
    report = run_bench(opts)
    text = render(report)
    assert report.all_ok, text
    rows = {(s.name, r.tool): r for s in report.scenarios for r in s.rows}
    for scenario in ("a", "b", "c", "lat"):
        for tool in tools:
            row = rows[(scenario, tool)]
            assert not row.unavailable
            assert len(row.runs) == 1
            assert row.verdicts[0].startswith("OK"), (scenario, tool, row.verdicts)
            assert row.runs[0].wall > 0
    assert rows[("a", "mpop")].verdicts == ["OK (converted EOL)"]
    assert rows[("a", "naive-poplib")].verdicts == ["OK"]
    assert 0 < rows[("a", "mpop")].runs[0].maxrss_kib < 30 * 1024  # not the harness's RSS
    assert "| mpop |" in text


@pytest.mark.dovecot
@pytest.mark.timeout(180)
def test_quick_scale_uidl_primes_both_tools_and_each_fetches_only_the_new(
    bench_out: Path,
) -> None:
    """scale-uidl (quick): mpop and popsync start primed and fetch exactly the 10 new messages."""
    if not dovecot_available():
        unavailable("Dovecot is not installed (./dev setup installs it)")
    if shutil.which("mpop") is None:
        unavailable("mpop is not installed (./dev setup installs it)")
    opts = Options(
        scenarios=("scale-uidl",),
        tools=("mpop", "popsync"),
        runs=1,
        quick=True,
        out=bench_out,
        storage="dir",
        install=False,
        command="pytest tests/unit/test_bench_smoke.py",
    )
    report = run_bench(opts)
    assert report.all_ok, render(report)
    assert [s.name for s in report.scenarios] == ["scale-uidl-100k", "scale-uidl-1m"]
    for scenario in report.scenarios:
        rows = {r.tool: r for r in scenario.rows}
        assert set(rows) == {"mpop", "popsync"}
        for row in rows.values():
            assert row.messages == 10
            assert row.verdicts[0].startswith("OK"), row.verdicts
            assert 0 < row.runs[0].maxrss_kib < 200 * 1024


_FAKE_DAEMON = """
import json, signal, sys, time
def log(**kw):
    print(json.dumps(kw), flush=True)
def poll(*_):
    for name in ("x", "y"):
        log(event="sync finished" if name == "x" else "sync failed", account=name, error="boom")
signal.signal(signal.SIGUSR1, poll)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
log(event="daemon started")
while True:
    time.sleep(0.05)
"""


def test_daemon_probe_times_polls_and_collects_failures(tmp_path: Path) -> None:
    """SIGUSR1 polls end at the last per-account log line; "sync failed" lines are reported."""
    env = {"PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-c", _FAKE_DAEMON]
    daemon = Daemon(argv, env, tmp_path, tmp_path / "daemon.log")
    try:
        assert daemon.settle({"x", "y"}, cycle_timeout=1) is None  # no start-up cycle
        wall, cpu, failures = daemon.poll({"x", "y"}, timeout=10)
        assert 0 < wall < 5
        assert cpu >= 0
        assert failures == ["y: boom"]
        assert daemon.rss_kib()[1] > 0
    finally:
        life = daemon.stop()
    assert life.exit_code == 0
    assert '"daemon started"' in (tmp_path / "daemon.log").read_text()


def test_coldstart_measures_a_run() -> None:
    """bench.coldstart times one popsync run from a checkout: wall, CPU and peak RSS."""
    from bench.coldstart import _measure

    wall, cpu, rss = _measure(Path(__file__).resolve().parents[2], ["--help"])
    assert 0 < cpu <= wall + 0.5
    assert 5 < rss < 200


def test_box_busy_counts_the_cpu_this_process_burns() -> None:
    """The LMTP bench's "machine busy" column: a busy loop of 0.3 s shows as >= 0.2 CPU-s,
    and no more than the cores could have done in the elapsed time. Stolen time is what the
    hypervisor took while we wanted to run: never negative, never more than the busy loop's
    wall time on every core."""
    (busy0, stolen0), wall = box_busy(), time.monotonic()
    while time.monotonic() - wall < 0.3:
        pass
    (busy1, stolen1), wall = box_busy(), time.monotonic() - wall
    cores = os.cpu_count() or 1
    # The busy loop's own time can be stolen; what it did get is counted as busy.
    assert 0.2 <= busy1 - busy0 + (stolen1 - stolen0) <= wall * cores + 0.05
    assert 0 <= stolen1 - stolen0 <= wall * cores + 0.05
