"""The scale-10k harness cannot rot: a tiny run measures every figure and verifies the mail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import peers, scale10k
from devtools.dovecot import dovecot_available
from tests.conftest import unavailable

__all__: list[str] = []


@pytest.fixture
def bench_out() -> Iterator[Path]:
    """An output directory that Dovecot's mail user and the tool user can traverse."""
    out = Path(tempfile.mkdtemp(prefix="popsync-scale10k-"))
    out.chmod(0o755)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.dovecot
@pytest.mark.timeout(120)
def test_a_tiny_scale_run_measures_every_cycle(bench_out: Path) -> None:
    """Six accounts: a first fetch and a nothing-new cycle, each with every figure, and mpop's."""
    if not dovecot_available():
        unavailable("Dovecot is not installed (./dev setup installs it)")
    if shutil.which("mpop") is None:
        unavailable("mpop is not installed (./dev setup installs it)")
    owner = peers.ensure_user()
    figures = scale10k.run_scale10k(
        bench_out / "dovecot", bench_out / "popsync", owner, peers.tool_python(owner),
        accounts=6, cycles=1, max_workers=4, mpop_polls=2,
    )  # fmt: skip
    assert [c.label for c in figures.cycles] == ["first fetch", "nothing new 1"]
    for cycle in figures.cycles:
        assert cycle.failures == []
        assert cycle.runs >= 6
        assert cycle.cpu > 0
        assert cycle.wall > 0.05  # several round trips of 50 ms
        assert cycle.rss_kib > 10 * 1024
        # /proc counts CPU in 10 ms ticks, and six settled polls cost Dovecot 10-20 ms: a
        # cycle can read 0 (CI saw it once); the exact reading is tested below.
        assert 0 <= cycle.dovecot_cpu <= cycle.wall * (os.cpu_count() or 1) + 0.02
    assert sum(c.dovecot_cpu for c in figures.cycles) > 0
    assert len(figures.mpop_cpu_ms) == 2
    assert all(ms > 0 for ms in figures.mpop_cpu_ms)
    text = scale10k.render([figures], "pytest")
    assert "| 6 | nothing new 1 |" in text


def test_group_cpu_counts_live_members_and_reaped_children() -> None:
    """The Dovecot column: a group leader that burns 0.2 s itself and reaps a child that
    burned 0.3 s reads as >= 0.45 CPU-s (its cutime), as Dovecot's master reaps its pop3
    processes; nothing outside the group is counted."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\n"
    leader = (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, '-c', {burn.format(0.3)!r}], check=True)\n"
        + burn.format(0.2)
        + "print('done', flush=True)\nsys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", leader],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"done\n"
        used = scale10k.group_cpu(proc.pid)
        # Two interpreter start-ups on top of the 0.5 s; this test's own process is outside.
        assert 0.45 <= used < 1.5
    finally:
        proc.communicate(b"")
