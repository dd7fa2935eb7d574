"""Fleet mode's residual window, measured: from a passed lease fence to the end of a hand-over.

One command (as root or a user that can run Dovecot and PostgreSQL)::

    .venv/bin/python -m bench.fleet_window [--messages 2000] [--batches 256,16,1] [--runs 3]

A fenced run (`popsync.fleet`) checks its lease in PostgreSQL right before each batch is
handed to the target; a worker paused *after* that check and resumed after its lease expired
still completes that one hand-over. This bench runs real fenced syncs (`sync_account` with a
`popsync.pgstore.FencedStore` and its ``fence``) of 4 KiB messages from a private Dovecot over
POP3 into a Maildir and into Dovecot's LMTP, and times, per batch, the fence (its database
round trip) and the exposed span from the fence's return to the end of the hand-over.

Reported per target and batch size: batches, mean fence cost, mean and max exposed span per
batch, and the share of the run's wall time that is exposed: the chance that a pause striking
at a random moment of a run leaves a batch to be handed over after the lease is gone. What
that costs: for LMTP/MDA/mbox one batch delivered twice at most (the new owner fetches it
again); for a Maildir on shared storage nothing (the rename finds the file already moved).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devtools.dovecot import Dovecot, DovecotLmtp, MailUser
from devtools.postgres import Postgres

__all__ = ["main"]


def _message(index: int, size: int = 4096) -> bytes:
    head = f"From: a@example.org\r\nTo: b@example.org\r\nSubject: window {index}\r\n\r\n"
    line = b"x" * 70 + b"\r\n"
    return head.encode() + line * (size // len(line))


def _account(dovecot: Dovecot, user: MailUser, work: Path, target: str, lmtp: DovecotLmtp) -> Any:
    from popsync.config import parse_config

    if target == "maildir":
        where = f'maildir = "{work / "Maildir"}"'
    else:
        rcpt = lmtp.new_user("w")
        where = (
            f'deliver = "lmtp"\nlmtp = "unix:{lmtp.socket_path}"\n'
            f'lmtp_recipient = "{rcpt.name}@example.org"'
        )
    text = (
        f'state_dir = "{work / "state"}"\n[accounts.bench]\nhost = "{dovecot.host}"\n'
        f'port = {dovecot.pop3_port}\ntls = "none"\nallow_plaintext = true\n'
        f'username = "{user.name}"\npassword = "{user.password}"\n{where}\n'
    )
    return parse_config(text, "bench").accounts["bench"]


def _timed(func: Callable[..., Any], log: list[tuple[str, float]], name: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        log.append((name + "-start", time.perf_counter()))
        try:
            return func(*args, **kwargs)
        finally:
            log.append((name + "-end", time.perf_counter()))

    return wrapper


def _one_run(
    dsn: str, account: Any, work: Path, batch: int
) -> tuple[float, list[float], list[float], int]:
    """One fenced first fetch: (wall, fence costs, exposed spans, messages delivered)."""
    from popsync import sync
    from popsync.deliver import lmtp, maildir
    from popsync.lease import mailbox_key
    from popsync.pgstore import FencedStore, PgStore

    log: list[tuple[str, float]] = []
    sync.BATCH_MESSAGES = batch
    patched = [
        (FencedStore, "fence"),
        (lmtp.LmtpTarget, "hand_over"),
        (maildir.MaildirTarget, "hand_over"),
    ]
    originals = [getattr(cls, attr) for cls, attr in patched]
    for (cls, attr), original in zip(patched, originals, strict=True):
        setattr(cls, attr, _timed(original, log, "fence" if attr == "fence" else "handover"))
    try:
        (work / "state").mkdir(parents=True, exist_ok=True)
        with PgStore.open(dsn, state_dir=work / "state", worker_id="bench") as store:
            store.leases.register([mailbox_key(account.mailbox)])
            [lease] = store.leases.claim_due("bench", 1, 600)
            view = store.fenced(lease.token)
            started = time.perf_counter()
            result = sync.sync_account(account, view, fence=view.fence)
            wall = time.perf_counter() - started
    finally:
        for (cls, attr), original in zip(patched, originals, strict=True):
            setattr(cls, attr, original)
    if result.outcome != "ok":
        raise RuntimeError(f"run failed: {result.error}")
    fences: list[float] = []
    spans: list[float] = []
    fence_start = fence_end = 0.0
    for name, stamp in log:
        if name == "fence-start":
            fence_start = stamp
        elif name == "fence-end":
            fence_end = stamp
            fences.append(fence_end - fence_start)
        elif name == "handover-end" and fence_end:
            spans.append(stamp - fence_end)
            fence_end = 0.0
    return wall, fences, spans, result.fetched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fleet_window")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batches", default="256,16,1")
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args(argv)
    batches = [int(b) for b in opts.batches.split(",")]
    from popsync.logconfig import configure_logging

    configure_logging("json", "warning")
    root = Path(tempfile.mkdtemp(prefix="popsync-bench-window-"))
    root.chmod(0o711)
    print(
        "| target | batch | batches/run | fence (ms, mean) | exposed per batch (ms, mean / max)"
        " | exposed share of run time | run wall (s, median) |"
    )
    print("|---|---|---|---|---|---|---|")
    try:
        with (
            Dovecot(root / "pop") as dovecot,
            DovecotLmtp(root / "lmtp", sieve=False) as lmtp_server,
            Postgres(root / "pg") as postgres,
        ):
            user = dovecot.new_user("w")
            dovecot.deliver_many(user, [_message(i) for i in range(opts.messages)])
            for target in ("maildir", "lmtp"):
                for batch in batches:
                    walls: list[float] = []
                    fences: list[float] = []
                    spans: list[float] = []
                    for run in range(opts.runs):
                        work = root / f"{target}-{batch}-{run}"
                        account = _account(dovecot, user, work, target, lmtp_server)
                        wall, fence, span, fetched = _one_run(
                            postgres.new_database("w"), account, work, batch
                        )
                        if fetched != opts.messages:
                            raise RuntimeError(f"fetched {fetched} of {opts.messages}")
                        walls.append(wall)
                        fences += fence
                        spans += span
                        shutil.rmtree(work, ignore_errors=True)
                    share = sum(spans) / sum(walls)
                    print(
                        f"| {target} | {batch} | {len(spans) // opts.runs} |"
                        f" {1000 * statistics.mean(fences):.2f} |"
                        f" {1000 * statistics.mean(spans):.2f} / {1000 * max(spans):.2f} |"
                        f" {100 * share:.1f} % | {statistics.median(walls):.2f} |",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
