"""Where an LMTP delivery run spends its time: scenario a through Dovecot's LMTP, in-process.

One command (as root; needs dovecot-lmtpd)::

    .venv/bin/python -m bench.lmtp_profile [--sessions 4] [--quick]

It starts a private POP3 Dovecot and a private LMTP Dovecot (``mail_fsync = optimized``)
as `bench.lmtp` does, then runs ``popsync --once`` *in this process* with timers wrapped
around the steps of a delivery (`sync._Batcher`, the target's ``seal``/``hand_over``/
``release``, the LMTP dialogue) and prints, per step, the summed time and the call count,
then the timeline of every batch: when it was sealed and recorded pending, and when its
hand-over ran. Times of steps that run in several threads at once (the sessions) add up
to more than the wall time. Nothing here is asserted; it is a measuring tool.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import mailgen
from bench.lmtp import _popsync_config
from devtools.dovecot import Dovecot, DovecotLmtp

__all__ = ["main"]


class _Timers:
    """Summed durations and counts per step, and a timeline of the logged steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.total: defaultdict[str, float] = defaultdict(float)
        self.count: Counter[str] = Counter()
        self.timeline: list[tuple[float, float, str, str]] = []
        self._lock = threading.Lock()

    def wrap(self, owner: Any, attr: str, key: str, *, log: bool = False) -> None:
        """Replace ``owner.attr`` by a timed wrapper (for the rest of this process).

        A step an older checkout does not have (profiling it from before a change) is left out.
        """
        if not hasattr(owner, attr):
            return
        real: Callable[..., Any] = getattr(owner, attr)

        @functools.wraps(real)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                with self._lock:
                    self.total[key] += ended - began
                    self.count[key] += 1
                    if log:
                        name = threading.current_thread().name
                        self.timeline.append((began - self.start, ended - self.start, key, name))

        setattr(owner, attr, timed)


def _instrument(timers: _Timers) -> None:
    from popsync import client, sync
    from popsync.deliver import lmtp

    timers.wrap(client.Pop3Client, "retr_many", "download (retr_many)", log=True)
    timers.wrap(sync._Batcher, "commit", "batch commit (download thread)", log=True)
    timers.wrap(sync._Batcher, "settle", "wait for the hand-over")
    timers.wrap(sync._Batcher, "_record_pending", "record pending (SQLite)")
    timers.wrap(sync._Batcher, "_finish", "commit outcomes (SQLite)")
    timers.wrap(lmtp.LmtpTarget, "seal", "spool seal (fsync)", log=True)
    timers.wrap(lmtp.LmtpTarget, "hand_over", "hand-over", log=True)
    timers.wrap(lmtp.LmtpTarget, "release", "spool release (unlink)")
    timers.wrap(lmtp.LmtpSession, "open", "LMTP connect + LHLO")
    timers.wrap(lmtp.LmtpSession, "reply", "LMTP reply wait")
    timers.wrap(lmtp.LmtpSession, "send", "LMTP send")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.lmtp_profile")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args(argv)
    box = mailgen.generate("a", quick=opts.quick)
    root = Path(tempfile.mkdtemp(prefix="popsync-lmtp-profile-"))
    root.chmod(0o711)
    try:
        with Dovecot(root / "pop3") as pop3, DovecotLmtp(root / "lmtp", fsync=True) as server:
            source = pop3.new_user("src")
            pop3.deliver_many(source, box.messages)
            rcpt = server.new_user("p")
            work = root / "work"
            work.mkdir()
            config = _popsync_config(
                work,
                pop3,
                source,
                f'deliver = "lmtp"\nlmtp = "unix:{server.socket_path}"\n'
                f'lmtp_recipient = "{rcpt.name}@example.org"\nlmtp_sessions = {opts.sessions}',
            )
            from popsync import cli

            timers = _Timers()
            _instrument(timers)
            timers.start = time.perf_counter()
            code = cli.main(["--once", "--no-progress", "-c", str(config)])
            wall = time.perf_counter() - timers.start
            delivered = len(server.folder_messages(rcpt))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"exit {code}, {delivered} of {len(box.messages)} delivered, {wall:.2f} s in all")
    print("| step | summed s | calls |")
    print("|---|---:|---:|")
    for key, seconds in sorted(timers.total.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {seconds:.3f} | {timers.count[key]} |")
    print("\ntimeline (s from the start of the run):")
    for began, ended, key, thread in sorted(timers.timeline):
        print(f"  {began:7.3f} -> {ended:7.3f} ({ended - began:6.3f})  {key}  [{thread}]")
    return 0 if code == 0 and delivered == len(box.messages) else 1


if __name__ == "__main__":
    sys.exit(main())
