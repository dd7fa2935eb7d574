"""Run ``popsync.cli.main`` in this process and SIGKILL it at a chosen step of a sync run.

Usage (from the repository root)::

    python -m tests.crashwrap --at STEP [--nth N] [--batch-messages M] -- --once -c FILE

Steps (the durability order of ``popsync/sync.py``, each counted from 1 with ``--nth``):

``tmp-fsync``   after the Nth message file in tmp/ was written, fsynced and closed (for a
                spool shared by a batch, LMTP's: after the Nth message was appended)
``spool-fsync`` after the Nth fsync of a batch's shared spool file (LMTP), before the batch
                is recorded pending
``pending``     after the Nth ``add_pending`` transaction committed
``rename``      after the Nth single rename into new/ (before new/ is fsynced)
``new-fsync``   after the Nth fsync of new/ (before ``mark_delivered``)
``delivered``   after the Nth ``mark_delivered`` transaction committed
``dele``        after the Nth ``dele_many`` answered (before QUIT)
``handover``    after the Nth batch was handed to the delivery target (LMTP, MDA, mbox or
                the Maildir renames) and before its outcome is committed: the window in
                which LMTP and MDA deliveries can be duplicated
``retr``        in the middle of the Nth message's RETR: at its first write into tmp/, that
                partial data already on disk
``fence``       after the Nth fleet-mode lease check before a hand-over passed (the start of
                the residual window of `popsync.fleet`)
``random``      at the Nth hook event of any kind above, every write of a message included
``never``       no kill: a plain run, with the same ``--batch-messages``

Everything is done by monkeypatching popsync's functions from outside; production code
has no fault hooks. When the step is never reached the run finishes normally and the
process exits with popsync's own exit code, so a caller can tell "killed" (-9) from "done".
``--events FILE`` appends the name of every hook event to FILE (for choosing N).
``--trace FILE`` records every fsync, rename and seen-store commit (`tests.durability`),
``--disable-fsync KIND`` makes one kind of flush a no-op, to prove the order check notices.
``--signal STOP`` stops the process there instead of killing it (a paused fleet worker; the
test sends SIGCONT). The seen-store hooks cover SQLite and, in fleet mode, PostgreSQL.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from tests.durability import DISABLE, install_trace

__all__ = ["STEPS", "CrashPlan", "install", "main"]

STEPS = (
    "tmp-fsync",
    "spool-fsync",
    "pending",
    "rename",
    "new-fsync",
    "delivered",
    "dele",
    "handover",
    "fence",
    "retr",
    "random",
    "never",
)


class CrashPlan:
    """Counts hook events and kills the process at the chosen one."""

    def __init__(
        self,
        step: str,
        nth: int,
        events: TextIO | None = None,
        signum: signal.Signals = signal.SIGKILL,
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}")
        self.step = step
        self.nth = nth
        self.counts: dict[str, int] = {}
        self.total = 0
        self._events = events
        self._signal = signum
        self._lock = threading.Lock()

    def hit(self, kind: str, before_kill: Callable[[], None] | None = None) -> None:
        """Record one event of ``kind``; SIGKILL ourselves if it is the chosen one.

        Events come from several threads (tmp files are fsynced by a pool), so counting
        and choosing happen under one lock: two racing increments must not skip N.
        """
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.total += 1
            if self._events is not None:
                self._events.write(kind + "\n")
                self._events.flush()
            chosen = (self.step == kind and self.counts[kind] == self.nth) or (
                self.step == "random" and self.total == self.nth
            )
        if chosen:
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), self._signal)


def _after(plan: CrashPlan, kind: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``func`` so the event fires after it returned."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        plan.hit(kind)
        return result

    return wrapper


def install(plan: CrashPlan) -> None:
    """Patch popsync's Maildir, seen-store and client functions with the crash plan."""
    from popsync import client, maildir, seen

    tmp_cls = maildir.TmpMessage
    orig_write = tmp_cls.write
    orig_finish = tmp_cls.finish

    started: set[str] = set()

    def write(self: maildir.TmpMessage, data: bytes | bytearray | memoryview) -> int:
        written = orig_write(self, data)
        # "retr" is the first write of each message, so --nth counts messages whatever the
        # chunking; later writes are "write" events (for random kills). Flushing first
        # leaves a real partial file behind, the hardest case.
        kind = "write" if self.name in started else "retr"
        started.add(self.name)
        plan.hit(kind, before_kill=self._flush if self._fd is not None else None)
        return written

    def finish(self: maildir.TmpMessage, *, fsync: bool = True) -> None:
        was_open = not self.closed
        orig_finish(self, fsync=fsync)
        if was_open:
            plan.hit("tmp-fsync")

    tmp_cls.write = write  # type: ignore[method-assign]
    tmp_cls.finish = finish  # type: ignore[method-assign]

    orig_rename = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        orig_rename(src, dst, *args, **kwargs)
        if Path(dst).parent.name == "new":
            plan.hit("rename")

    maildir.os.rename = rename  # type: ignore[attr-defined]

    orig_fsync_dir = maildir._fsync_dir

    def fsync_dir(path: Path) -> None:
        orig_fsync_dir(path)
        if Path(path).name == "new":
            plan.hit("new-fsync")

    maildir._fsync_dir = fsync_dir

    store_cls = seen.SeenStore
    store_cls.add_pending = _after(plan, "pending", store_cls.add_pending)  # type: ignore[method-assign]
    store_cls.mark_delivered = _after(plan, "delivered", store_cls.mark_delivered)  # type: ignore[method-assign]
    from popsync.deliver import lmtp, mbox, mda, spool
    from popsync.deliver import maildir as maildir_target

    spool_cls = spool.BatchSpool
    spool_cls.seal = _after(plan, "spool-fsync", spool_cls.seal)  # type: ignore[method-assign]

    for target in (lmtp.LmtpTarget, mda.MdaTarget, mbox.MboxTarget, maildir_target.MaildirTarget):
        target.hand_over = _after(plan, "handover", target.hand_over)  # type: ignore[method-assign]
    _install_fleet(plan)
    client_cls = client.Pop3Client
    client_cls.dele_many = _after(plan, "dele", client_cls.dele_many)  # type: ignore[method-assign]


def _install_fleet(plan: CrashPlan) -> None:
    """The same seen-store hooks on the PostgreSQL store, and the fleet's lease fence."""
    try:
        from popsync import pgstore
    except ImportError:  # psycopg missing: no fleet mode to hook
        return
    pg_cls = pgstore.PgStore
    pg_cls.add_pending = _after(plan, "pending", pg_cls.add_pending)  # type: ignore[method-assign]
    pg_cls.mark_delivered = _after(plan, "delivered", pg_cls.mark_delivered)  # type: ignore[method-assign]
    view_cls = pgstore.FencedStore
    view_cls.fence = _after(plan, "fence", view_cls.fence)  # type: ignore[method-assign]


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="crashwrap")
    parser.add_argument("--at", choices=STEPS, required=True)
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--batch-messages", type=int, default=None)
    parser.add_argument("--events", type=Path, default=None)
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--disable-fsync", choices=DISABLE, default=None)
    parser.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Install the crash plan, then run popsync with the arguments after ``--``."""
    args, popsync_args = _parse(sys.argv[1:] if argv is None else argv)
    from popsync import cli, sync

    if args.batch_messages is not None:
        sync.BATCH_MESSAGES = args.batch_messages
    events = args.events.open("a", encoding="utf-8") if args.events is not None else None
    trace = args.trace.open("a", encoding="utf-8") if args.trace is not None else None
    if trace is not None:
        install_trace(trace, args.disable_fsync)  # first: the crash hooks call the traced os.*
    install(CrashPlan(args.at, args.nth, events, signal.Signals[f"SIG{args.signal}"]))
    try:
        return cli.main(popsync_args)
    finally:
        for handle in (events, trace):
            if handle is not None:
                handle.close()


if __name__ == "__main__":
    sys.exit(main())
