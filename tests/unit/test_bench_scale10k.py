"""The scale-10k harness cannot rot: a tiny run measures every figure and verifies the mail."""

from __future__ import annotations

import shutil
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
        assert cycle.dovecot_cpu > 0
    assert len(figures.mpop_cpu_ms) == 2
    assert all(ms > 0 for ms in figures.mpop_cpu_ms)
    text = scale10k.render([figures], "pytest")
    assert "| 6 | nothing new 1 |" in text
