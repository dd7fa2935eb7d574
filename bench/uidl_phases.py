"""Where a huge listing's time and memory go: ``python -m bench.uidl_phases [COUNT ...]``.

In one process, against bench/bigbox.py (run as a child process, so its own memory is not
counted): log in, read UIDL+LIST (pipelined) into the compact
listing, read the seen-store into the planner's view (all but 10 messages already delivered),
plan. Prints wall and CPU seconds and the RSS after each phase, and the peak. This is the
"seen-store diff" of scenario scale-uidl measured on its own, without interpreter start-up,
imports or the fetch of the 10 new messages.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import SCALE_UIDL_NEW, _popsync_template

__all__ = ["main", "measure"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(count: int) -> list[tuple[str, float, float, float]]:
    """Return ``(phase, wall s, CPU s, RSS MiB after)`` for one mailbox of ``count``."""
    from popsync.client import Pop3Client
    from popsync.listing import Listing, SeenView
    from popsync.plan import Policy, plan_sync
    from popsync.seen import SeenStore

    phases: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "seen.sqlite3"
        _popsync_template(db, count - SCALE_UIDL_NEW, "bench")
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.bigbox", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None
        assert server.stdin is not None
        port = int(server.stdout.readline())
        with server, server.stdin, SeenStore.open(db) as store:
            client = Pop3Client.connect("127.0.0.1", port, tls="none")
            client.login("bench", "bench", mechanism="user", allow_plaintext=True)
            t, c = time.perf_counter(), time.process_time()

            def mark(name: str) -> None:
                nonlocal t, c
                now, cpu = time.perf_counter(), time.process_time()
                phases.append((name, now - t, cpu - c, _rss_mib()))
                t, c = now, cpu

            listing = Listing(*client.listing_entries())
            mark("UIDL+LIST read and parsed")
            view = SeenView(listing, store.delivered_times("bench"), store.other_rows("bench"))
            mark("seen-store read into the view")
            plan = plan_sync(listing, view, Policy(), time.time())
            mark("plan")
            assert len(plan.fetch) == SCALE_UIDL_NEW, plan
            client.quit()
    return phases


def main(argv: list[str]) -> int:
    """Measure each COUNT (default 100000 1000000) in a fresh process state."""
    for count in [int(a) for a in argv] or [100_000, 1_000_000]:
        print(f"{count:,} UIDLs ({SCALE_UIDL_NEW} new):")
        for name, wall, cpu, rss in measure(count):
            print(f"  {name:32} {wall:6.2f} s wall {cpu:6.2f} s CPU  RSS {rss:6.1f} MiB")
        print(f"  peak RSS so far {_peak_mib():.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
