"""Start-up of short popsync runs in two checkouts, interleaved so load drift hits both alike.

``python -m bench.coldstart --config FILE BEFORE_DIR AFTER_DIR [--runs N]`` runs
``popsync --once``, ``popsync --help`` and ``popsync status`` from each checkout in turn
(``python -m popsync`` with the checkout as working directory), N times each, and prints
min and median wall and CPU time (user+sys from ``wait4``) and the peak RSS. The config
should point at a mailbox that was already fetched (scenario c's "nothing new").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _measure(checkout: Path, args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS in MiB of one ``popsync ARGS`` run.

    The RSS comes from GNU time's %M, as in the bench harness: ``wait4``'s ru_maxrss would
    also count the memory the child shared with this process between fork and exec.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.NamedTemporaryFile("r", prefix="coldstart-", suffix=".rss") as rss_file:
        started = time.perf_counter()
        timed = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, sys.executable]
        proc = subprocess.Popen(
            [*timed, "-m", "popsync", *args],
            cwd=checkout,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _pid, _status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        rss_kib = int(rss_file.read().split()[-1])
    return wall, usage.ru_utime + usage.ru_stime, rss_kib / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=10)
    opts = parser.parse_args(argv)
    commands = {
        "--once": ["--once", "-c", str(opts.config)],
        "--help": ["--help"],
        "status": ["status", "-c", str(opts.config)],
    }
    checkouts = {"before": opts.before, "after": opts.after}
    for checkout in checkouts.values():  # bytecode, as an installed package has it
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "popsync"], cwd=checkout, check=True
        )
        _measure(checkout, commands["--once"])  # warm-up: fills the config cache
    samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(opts.runs):
        for name, args in commands.items():
            for label, checkout in checkouts.items():
                samples.setdefault((name, label), []).append(_measure(checkout, args))
    columns = ["command", "checkout", "CPU s min", "CPU s median", "wall s min", "wall s median"]
    print("| " + " | ".join([*columns, "peak RSS MiB"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for (name, label), runs in samples.items():
        walls, cpus, rss = zip(*runs, strict=True)
        print(
            f"| `popsync {name}` | {label} | {min(cpus):.3f} | {statistics.median(cpus):.3f} "
            f"| {min(walls):.3f} | {statistics.median(walls):.3f} | {max(rss):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
