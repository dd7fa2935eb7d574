"""One sync run of one account: the durability order lives here.

Where messages go is the delivery target's business (`popsync.deliver`: a Maildir, an
LMTP server, an MDA command, an mbox); this module only ever calls the target interface,
and the steps below read "spool" for the Maildir's tmp/ or the target's spool.

``sync_account`` is the only entry point; ``popsync --once`` and every scheduled job call
it. A run is: lock the account, recover what a crash left behind, connect and log in,
list UIDLs, plan, fetch in batches, DELE what the policy allows, QUIT, record the run.

The durability order (see ``docs/internals.md``), per *batch* of messages so that the
expensive flushes are shared (group commit):

1. RETR streams each message into ``Maildir/tmp/`` and the file is fsynced.
2. One SQLite transaction records every message of the batch as *pending*, with its
   tmp name.
3. Each file is renamed into ``new/``; ``new/`` is fsynced once.
4. One SQLite transaction marks the batch *delivered*.

A crash between any two steps is repaired by :func:`recover` at the start of the next
run without downloading again: a pending file still in ``tmp/`` is moved on, one found
in ``new/`` or ``cur/`` is marked delivered, one found nowhere is forgotten so it is
fetched again (a duplicate is better than a loss, and cannot happen here because the
rename is the commit point). Only *delivered* messages are ever DELEd, and the server
applies DELEs only when it answers QUIT, so a connection lost before QUIT deletes
nothing and the next run sends the DELEs again.

A message bigger than ``max_message_size`` (by LIST, or because RETR outgrew LIST and was cut
off) is recorded as *too_large* and never fetched or deleted until the limit allows it; a cut-off
RETR costs the connection, so the run logs in again and syncs the rest of the mailbox. UIDLs
the server stops listing are forgotten slowly (see `popsync.plan`). The seen-store is keyed by
the account's mailbox (user@host), not its label.

A run killed mid-RETR or mid-batch also leaves files in ``tmp/`` that no pending row
names; :func:`clean_debris` removes those of dead popsync processes at the next start,
and a failed run removes its own before it returns. ``tests/crashwrap.py`` kills a real
``popsync --once`` at each of these steps to prove it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import structlog

from popsync.deliver import Delivered, Rejected, Spooled, Target, open_target
from popsync.deliver import Outcome as DeliveryOutcome
from popsync.deliver.base import deferral
from popsync.errors import ExitCode, LocalIOError, PopsyncError
from popsync.listing import Listing, SeenView
from popsync.maildir import Maildir, TmpMessage, process_gone, sanitize_host
from popsync.owner import claim_maildir, refuse_foreign_root
from popsync.plan import Plan, plan_sync, settled, show_uidl
from popsync.pop3 import ScanEntries
from popsync.pop3 import errors as pop3_errors
from popsync.pop3.sasl import REVEALING
from popsync.prelogin import (
    PreLogin,
    hide_secret,
    pace,
    policy_of,
    read_listing,
    resolve_secret,
)
from popsync.textsafe import safe_text, scrub_scope
from popsync.trace import TraceHeaders
from popsync.units import human_bytes

if TYPE_CHECKING:
    from popsync.client import MessageTooLarge, Pop3Client, Sink
    from popsync.config import Account
    from popsync.deliver.budget import SessionBudget
    from popsync.seen import RunRecord
    from popsync.store import Store

__all__ = [
    "BATCH_BYTES",
    "BATCH_MESSAGES",
    "MAX_CUTOFFS",
    "Outcome",
    "Progress",
    "RunResult",
    "StopRequested",
    "classify_error",
    "clean_debris",
    "is_first_run",
    "mark_seen",
    "recover",
    "sync_account",
]

#: A batch is committed after this many messages or bytes, whichever comes first. Larger
#: batches share more fsyncs; smaller ones lose less work to a crash and let SIGTERM act
#: sooner. bench scenario a (2,000 x 4 KiB): 64 -> 0.90 s, 256 -> 0.85 s (8 fsync threads).
BATCH_MESSAGES = 256
BATCH_BYTES = 16 * 1024 * 1024

#: Threads that fsync finished tmp files while the next messages stream in. fsync
#: releases the GIL, and concurrent fsyncs on one filesystem share journal commits
#: (ext4/xfs group commit), so a batch costs about one flush instead of one per
#: message. Shared by all accounts of a process.
FSYNC_THREADS = 8
#: RETRs cut off by the size guard cost a new login each; after this many in one run the rest
#: waits for the next run (each cut-off message is remembered, so every run makes progress).
MAX_CUTOFFS = 8
_fsync_pool: ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


def _fsync_executor() -> ThreadPoolExecutor:
    global _fsync_pool  # noqa: PLW0603 - one lazily created pool per process
    with _fsync_pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="popsync-fsync")
        return _fsync_pool


Outcome = Literal["ok", "temporary", "auth", "protocol", "local_io", "config", "error"]

_OUTCOME_BY_CODE: dict[ExitCode, Outcome] = {
    ExitCode.OK: "ok",
    ExitCode.TEMPORARY: "temporary",
    ExitCode.AUTH: "auth",
    ExitCode.PROTOCOL: "protocol",
    ExitCode.LOCAL_IO: "local_io",
    ExitCode.CONFIG: "config",
    ExitCode.USAGE: "config",
}

_log = structlog.get_logger("popsync.sync")

#: Called as ``progress(account, done, total, bytes_done)`` after every delivered message.
Progress = Callable[[str, int, int, int], None]


class StopRequested(PopsyncError):
    """The daemon is shutting down; the run stopped between or inside messages."""

    exit_code = ExitCode.TEMPORARY


@dataclass
class RunResult:
    """What one run did; the CLI prints it, the scheduler backs off on it, status shows it."""

    account: str
    outcome: Outcome = "ok"
    exit_code: ExitCode = ExitCode.OK
    fetched: int = 0
    bytes: int = 0
    skipped: int = 0
    deleted: int = 0
    recovered: int = 0
    #: Messages the delivery target refused for good (5xx): recorded, never retried.
    rejected: int = 0
    forgotten: int = 0
    #: Messages recorded as delivered without fetching (first_run = "mark_seen").
    marked_seen: int = 0
    #: Messages left on the server because they exceed max_message_size (new and known).
    too_large: int = 0
    on_server: int = 0
    started: float = 0.0
    duration: float = 0.0
    error: str | None = None
    #: Seconds the server asked us to wait ([LOGIN-DELAY] or CAPA LOGIN-DELAY), if any.
    retry_after: float | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a person: what happened to this account."""
        if self.outcome != "ok":
            return f"{self.account}: FAILED ({self.outcome}) {self.error}"
        parts = [
            f"{self.fetched} fetched ({human_bytes(self.bytes)})",
            f"{self.skipped} skipped",
            f"{self.deleted} deleted",
        ]
        if self.recovered:
            parts.append(f"{self.recovered} recovered")
        if self.marked_seen:
            parts.append(f"{self.marked_seen} marked seen (first_run)")
        if self.rejected:
            parts.append(f"{self.rejected} rejected")
        if self.too_large:
            parts.append(f"{self.too_large} too large (left on server)")
        parts.append(f"{self.on_server} on server")
        line = f"{self.account}: ok, " + ", ".join(parts) + f" in {self.duration:.2f}s"
        if self.warnings:
            line += f" ({len(self.warnings)} warning(s))"
        return line


def classify_error(exc: BaseException, *, during_login: bool = False) -> ExitCode:
    """Map any error a run can meet to the sysexits code the CLI and scheduler act on."""
    if isinstance(exc, PopsyncError):
        return exc.exit_code
    if isinstance(exc, pop3_errors.ServerError):
        if exc.temporary:
            return ExitCode.TEMPORARY
        if isinstance(exc, pop3_errors.AuthFailed | pop3_errors.PermFailure) or during_login:
            return ExitCode.AUTH
        return ExitCode.PROTOCOL
    # A server that failed SCRAM's proof of its identity: an authentication failure.
    if isinstance(exc, pop3_errors.SaslAuthError):
        return ExitCode.AUTH
    # Malformed bytes, a message larger than its LIST size said, a refused plaintext login.
    if isinstance(exc, pop3_errors.Pop3Error):
        return ExitCode.PROTOCOL
    if isinstance(exc, OSError):
        return ExitCode.LOCAL_IO
    return ExitCode.SOFTWARE


# --------------------------------------------------------------------------- recovery
def recover(
    account: str,
    store: Store,
    target: Target,
    now: float,
    fence: Callable[[], None] | None = None,
) -> int:
    """Finish what a crash (or a deferred delivery) left pending; return how many completed.

    ``fence`` (fleet mode) is called before anything is handed over, like a batch's.

    The target decides per pending row (see each target's docstring): delivered (a Maildir
    file already moved on, or handed over now), rejected, still deferred (the run then
    ends 75 or 74 before it downloads more), or gone (the row is dropped, so the message
    is fetched again).
    """
    pending = [Spooled(e.uidl, e.name, e.size or 0) for e in store.pending(account).values()]
    if not pending:
        return 0
    if fence is not None:
        fence()
    outcomes = target.recover(pending)
    gone = [item.uidl for item, outcome in zip(pending, outcomes, strict=True) if outcome is None]
    if gone:
        store.remove(account, gone)
    done = [(i, o) for i, o in zip(pending, outcomes, strict=True) if o is not None]
    _commit_outcomes(account, store, target, done, now)
    problem = deferral([o for _, o in done])
    if problem is not None:
        raise problem
    return sum(isinstance(o, Delivered) for _, o in done)


def _commit_outcomes(
    account: str,
    store: Store,
    target: Target,
    done: list[tuple[Spooled, DeliveryOutcome]],
    now: float,
    *,
    release: bool = True,
) -> list[str]:
    """Record delivered and rejected messages, then let the target drop their spool files.

    Returns the names of the finished spool files; with ``release=False`` the caller drops
    them (a leftover is only debris: its row is committed, so nothing hands it over again).
    """
    delivered = [(i.uidl, o.name) for i, o in done if isinstance(o, Delivered)]
    rejected = [(i.uidl, o.reason) for i, o in done if isinstance(o, Rejected)]
    if delivered:
        store.mark_delivered(account, delivered, now)
    if rejected:
        store.mark_rejected(account, rejected, now)
    finished = [i.name for i, o in done if isinstance(o, Delivered | Rejected)]
    if finished and release:
        target.release(finished)
    return finished


# ------------------------------------------------------------------------------ debris
#: tmp/ names written by popsync (`popsync.maildir.new_unique_name`); other agents' differ.
_OWN_TMP = re.compile(r"\d+\.M\d+P(?P<pid>\d+)Q\d+R[0-9a-f]{16}\.(?P<host>.+)")
#: tmp/ files this process is writing or about to deliver, for every account's thread.
_inflight: set[str] = set()
_inflight_lock = threading.Lock()


def _open_tmp(target: Target) -> TmpMessage:
    """open() and register the name in one step, so clean_debris never sees it bare."""
    with _inflight_lock:
        tmp = target.open()
        _inflight.add(tmp.file_name)  # a batch's messages may share one file
    return tmp


def _release(names: list[str]) -> None:
    with _inflight_lock:
        _inflight.difference_update(names)


def clean_debris(maildir: Maildir, keep: set[str]) -> list[str]:
    """Remove tmp/ files a killed popsync run left behind; return their names.

    Only files named by popsync on this host are candidates: ones from a process that no
    longer exists, or from this process but not in flight (a container restarts with
    the same PID). Another delivery agent's files, and files of a live popsync, wait
    for the maildir spec's 36-hour rule. Even a wrong guess cannot lose mail: a file
    removed before its pending row is delivered is fetched again by the next run.
    """
    host = sanitize_host(maildir.hostname)
    removed: list[str] = []
    with _inflight_lock:
        try:
            names = [e.name for e in os.scandir(maildir.tmp) if e.is_file(follow_symlinks=False)]
        except OSError as exc:
            raise LocalIOError(f"cannot list {maildir.tmp}: {exc.strerror}") from exc
        for name in names:
            found = _OWN_TMP.fullmatch(name)
            if found is None or found["host"] != host or name in keep:
                continue
            pid = int(found["pid"])
            mine = pid == os.getpid()
            if (mine and name not in _inflight) or (not mine and process_gone(pid)):
                maildir.remove_tmp(name)
                removed.append(name)
    return removed


# ----------------------------------------------------------------------------- batches
class _Batcher:
    """Collects finished tmp messages and commits them in groups (steps 2-4).

    With a target whose hand-over is slow (``target.overlap``: LMTP, an MDA, mbox), batch N
    is handed over in a background thread while batch N+1 streams in. Every seen-store
    write stays on the calling thread, and batch N's outcomes are committed (as soon as its
    thread is done, checked after every message; at the latest before batch N+1 is recorded
    pending) before batch N+1 is handed over: at most one batch is ever accepted by the
    agent and not yet committed, so the duplicate window stays one batch.
    """

    def __init__(
        self,
        mailbox: str,
        store: Store,
        target: Target,
        clock: Callable[[], float],
        result: RunResult,
        on_delivered: Callable[[bytes], None],
        fence: Callable[[], None] | None = None,
    ) -> None:
        self._mailbox = mailbox
        self._fence = fence
        self._store = store
        self._target = target
        self._clock = clock
        self._result = result
        self._on_delivered = on_delivered
        self._items: list[tuple[bytes, TmpMessage]] = []
        self._wire: dict[str, int] = {}  # octets each message took on the wire
        self._flushes: list[Future[None]] = []
        self._failed = False
        self._bytes = 0
        self._overlap = target.overlap
        # The batch being handed over in the background, and the thread doing it.
        self._handing: tuple[list[Spooled], Future[list[DeliveryOutcome]]] | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Set once the target deferred or failed: later batches are only recorded pending.
        self._stalled = False
        self._releases: list[Future[None]] = []

    def add(self, uidl: bytes, tmp: TmpMessage, wire_size: int) -> None:
        if self._target.shared_spool:
            # The batch's messages share one spool file, fsynced once by commit().
            tmp.finish(fsync=False)
        else:
            # Step 1 runs in the background: write out, fsync and close the file while the
            # next messages arrive. commit() waits for every flush before step 2.
            flush = _fsync_executor().submit(tmp.finish, fsync=True)
            flush.add_done_callback(self._note_failure)
            self._flushes.append(flush)
        self._items.append((uidl, tmp))
        self._wire[tmp.name] = wire_size
        self._bytes += tmp.size
        # A failed flush (disk full) ends the batch early, so the run stops downloading.
        if self._failed or len(self._items) >= BATCH_MESSAGES or self._bytes >= BATCH_BYTES:
            self.commit(background=self._overlap)
        else:
            self.settle(wait=False)

    def _note_failure(self, flush: Future[None]) -> None:
        # Runs in the flush thread; a bool store is atomic and only ever set to True here.
        if flush.exception() is not None:
            self._failed = True

    def _wait_for_flushes(
        self, items: list[tuple[bytes, TmpMessage]]
    ) -> tuple[list[tuple[bytes, TmpMessage]], BaseException | None]:
        """Wait for the batch's flushes; return the durable items and the first failure.

        A file whose flush failed (disk full, say) was already removed by ``finish``; the
        others are durable and are still committed, so a full disk keeps what fits.
        """
        if self._target.shared_spool:
            try:
                self._target.seal()  # one fsync for the whole batch
            except BaseException as exc:  # the file is gone: nothing of the batch is durable
                for _, tmp in items:
                    self._wire.pop(tmp.name, None)
                return [], exc
            return items, None
        flushes, self._flushes = self._flushes, []
        self._failed = False
        durable: list[tuple[bytes, TmpMessage]] = []
        failure: BaseException | None = None
        for item, flush in zip(items, flushes, strict=True):
            try:
                flush.result()
            except BaseException as exc:  # raised by commit() once the rest is recorded
                failure = failure or exc
                item[1].discard()
                self._wire.pop(item[1].name, None)
            else:
                durable.append(item)
        return durable, failure

    def commit(self, *, background: bool = False) -> None:
        """Record and hand over what was collected; unless ``background``, finish everything."""
        items, self._items, self._bytes = self._items, [], 0
        items, failure = self._wait_for_flushes(items)
        try:
            self.settle()  # the previous batch's outcomes first: one batch in the window
        except BaseException:
            # Recorded nowhere yet, so nothing would deliver or remove them: no debris.
            for _, tmp in items:
                tmp.discard()
            raise
        if items:
            spooled = self._record_pending(items)
            if not self._stalled:
                self._hand_over(spooled, background=background)
        if failure is not None:
            raise failure

    def _record_pending(self, items: list[tuple[bytes, TmpMessage]]) -> list[Spooled]:
        """Step 2 for durable spool files."""
        try:
            self._store.add_pending(self._mailbox, [(u, t.name, t.size) for u, t in items])
        except BaseException:
            for _, tmp in items:
                tmp.discard()
            raise
        return [Spooled(u, t.name, t.size, t.vsize) for u, t in items]

    def _hand_over(self, spooled: list[Spooled], *, background: bool) -> None:
        """Step 3: the one place a recorded batch goes to the target."""
        if self._fence is not None:
            # Fleet mode: the lease must still be held right before the hand-over; if it is
            # gone the batch stays pending for the new owner (LeaseLost ends the run, 75).
            self._fence()
        if not background:
            self._finish(spooled, self._target.hand_over(spooled))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="popsync-handover")
        # The run's context travels along: its secrets are scrubbed from the agent's replies.
        run = contextvars.copy_context().run
        self._handing = (spooled, self._pool.submit(run, self._target.hand_over, spooled))

    def settle(self, *, wait: bool = True) -> None:
        """Commit the outcomes of the batch handed over in the background (if it is done)."""
        if self._handing is None or not (wait or self._handing[1].done()):
            return
        (spooled, future), self._handing = self._handing, None
        try:
            outcomes = future.result()
        except BaseException:
            self._stalled = True  # the batch stays pending; recover() hands it over again
            raise
        self._finish(spooled, outcomes)

    def _finish(self, spooled: list[Spooled], outcomes: list[DeliveryOutcome]) -> None:
        """Step 4: commit a handed-over batch's outcomes; raise if some were deferred."""
        done = list(zip(spooled, outcomes, strict=True))
        now = self._clock()
        finished = _commit_outcomes(
            self._mailbox, self._store, self._target, done, now, release=not self._overlap
        )
        if finished and self._overlap:
            # Unlinks cost milliseconds each on a busy disk: not on the download's path.
            self._releases.append(_fsync_executor().submit(self._target.release, finished))
        for item, outcome in done:
            wire = self._wire.pop(item.name, 0)
            if isinstance(outcome, Delivered):
                self._result.fetched += 1
                self._result.bytes += wire
                self._on_delivered(item.uidl)
            elif isinstance(outcome, Rejected):
                self._result.rejected += 1
                self._result.warnings.append(f"rejected by {self._target.kind}: {outcome.reason}")
                _log.warning(
                    "message rejected",
                    mailbox=self._mailbox,
                    uidl=item.uidl.hex(),
                    reason=outcome.reason,
                )
        # Deferred messages stay pending; the next run hands them over again.
        problem = deferral(outcomes)
        if problem is not None:
            self._stalled = True
            raise problem

    def close(self) -> None:
        """Wait for the background work: nothing of this run outlives the account's lock."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        releases, self._releases = self._releases, []
        for release in releases:
            try:
                release.result()
            except Exception as exc:  # debris only: clean_debris removes it at the next start
                _log.warning("could not remove a delivered spool file", error=safe_text(str(exc)))


class _StoppableSink:
    """A tmp message that gives up mid-RETR once a shutdown is requested.

    The message in flight is then abandoned cleanly: the client drops the connection
    (no QUIT, so the server deletes nothing) and the partial tmp file is discarded; the
    next run fetches it again.
    """

    __slots__ = ("stop", "tmp")

    def __init__(self, tmp: TmpMessage, stop: threading.Event) -> None:
        self.tmp = tmp
        self.stop = stop

    def write(self, data: bytes, /) -> int:
        if self.stop.is_set():
            raise StopRequested("stopping: shutdown requested during a message")
        return self.tmp.write(data)


def _fetch(
    client: Pop3Client,
    plan: Plan,
    batcher: _Batcher,
    target: Target,
    stop: threading.Event | None,
    progress: Callable[[int], None],
    max_size: int | None,
    trace: TraceHeaders,
    clock: Callable[[], float],
    inflight: list[int],
) -> None:
    """Stream every planned message into tmp/, committing in batches; clean up on failure.

    ``inflight[0]`` is set to the message number being received, so a RETR cut off by the
    size guard is blamed on the right message.

    Trace header fields (``add_headers``) are written into the file before the message's
    first octet arrives, so nothing is buffered for them.

    ``max_size`` guards against a server whose LIST understated a size (or gave none):
    the RETR is cut off instead of filling the disk. ``inflight[0]`` is set to the message
    number being received, so a cut-off can be blamed on the right message.
    """
    uidl_of = {msgnum: uidl for msgnum, uidl, _ in plan.fetch}
    current: list[TmpMessage] = []
    opened: list[str] = []

    def sink_factory(msgnum: int) -> Sink:
        if stop is not None and stop.is_set():
            raise StopRequested("stopping: shutdown requested")
        inflight[0] = msgnum
        tmp = _open_tmp(target)
        opened.append(tmp.file_name)
        current.append(tmp)
        if trace:
            tmp.write(trace.prefix(uidl_of[msgnum], clock()))
        return tmp if stop is None else _StoppableSink(tmp, stop)

    def on_done(msgnum: int, sink: Sink, size: int) -> None:
        tmp = sink.tmp if isinstance(sink, _StoppableSink) else sink
        assert isinstance(tmp, TmpMessage)
        current.remove(tmp)
        batcher.add(uidl_of[msgnum], tmp, size)
        progress(size)

    try:
        client.retr_many(
            [msgnum for msgnum, _, _ in plan.fetch], sink_factory, on_done, max_size=max_size
        )
    except BaseException:
        # A half-received message must not survive anywhere; complete ones are kept.
        for tmp in current:
            tmp.discard()
        batcher.commit()
        raise
    else:
        batcher.commit()
    finally:
        batcher.close()
        # Committed or discarded; a failed commit leaves pending rows for recover().
        _release(opened)


# ------------------------------------------------------------------------------ session
def _connect(
    account: Account, secret: str, on_activity: Callable[[], None] | None = None
) -> Pop3Client:
    """Connect, negotiate TLS and UTF8, and log in, in mpop's order (see popsync.session).

    All of it is one phase with one wall-clock budget, ``login_timeout``.
    """
    from popsync.session import open_session

    return open_session(account, secret, on_activity=on_activity)


def is_first_run(store: Store, account: str) -> bool:
    """True when the store knows nothing of ``account``: no message and no run."""
    return not store.has_rows(account) and account not in store.last_runs()


def mark_seen(
    store: Store, account: str, listing: Sequence[tuple[int, bytes, int | None]], now: float
) -> int:
    """Record every listed UIDL not yet known as delivered, without fetching; return how many.

    Pending rows are left for recovery: their message may already be in the Maildir.
    """
    known = store.entries(account)
    fresh = list(dict.fromkeys(uidl for _, uidl, _ in listing if uidl not in known))
    if fresh:
        store.mark_delivered(account, [(uidl, "") for uidl in fresh], now)
    return len(fresh)


def _login_delay(client: Pop3Client) -> float | None:
    """The CAPA ``LOGIN-DELAY n`` value (RFC 2449), if the server announces one."""
    values = client.capabilities().get("LOGIN-DELAY", ())
    if values and values[0].isdigit():
        return float(values[0])
    return None


def _retr_guard(account: Account) -> int | None:
    """The size at which a RETR is cut off: the limit plus slack for LIST's own inexactness.

    LIST sizes may differ a little from what RETR sends (Dovecot counts a message without a
    final newline 2 octets short), so the guard only catches a server that lied grossly.
    """
    limit = account.max_message_size
    return None if not limit else limit + limit // 10 + 65536


def _session(
    account: Account,
    client: Pop3Client,
    store: Store,
    target: Target,
    result: RunResult,
    *,
    clock: Callable[[], float],
    stop: threading.Event | None,
    progress: Progress | None,
    log: structlog.typing.FilteringBoundLogger,
    fence: Callable[[], None] | None = None,
    prelogin: PreLogin | None = None,
) -> bool:
    """One logged-in session; False when a RETR was cut off and the run must log in again.

    With ``prelogin``, the listing is the one it has read already.
    """
    from popsync.client import MessageTooLarge

    try:
        if prelogin is not None:
            uidl, scan, digest = prelogin.entries()
        else:
            client.set_pace(pace(account, "listing", account.listing_timeout, "listing_timeout"))
            # Also asks the post-login CAPA, pipelined.
            uidl, scan, digest = read_listing(
                client, account, store.listing_digest(account.mailbox)
            )
        # Logged only now: before the listing, reading capabilities would cost a round trip.
        log.debug(
            "logged in",
            tls=client.tls_version or "none",
            capabilities=sorted(client.capabilities()),
        )
        result.retry_after = _login_delay(client)
        result.on_server = len(uidl)
        if account.first_run == "mark_seen" and is_first_run(store, account.mailbox):
            # Only UIDLs are read: sizes may be unknown (LIST skipped) here.
            listing = Listing(uidl, ScanEntries() if scan is None else scan)
            result.marked_seen = mark_seen(store, account.mailbox, listing, clock())
            log.info("first run: marked every message as seen", count=result.marked_seen)
            client.quit()
            return True
        if scan is None:
            # The UIDL listing is the one the last complete run left settled and no seen row
            # changed since (plan.settled, read_listing): the plan would be empty.
            log.debug("listing unchanged since the last complete run: nothing to do")
            client.quit()
            return True
        listing = Listing(uidl, scan)
        policy = policy_of(account)
        # Both sides stay compact: a mailbox may list a million messages (see listing.py).
        seen = SeenView(
            listing, store.delivered_times(account.mailbox), store.other_rows(account.mailbox)
        )
        plan = plan_sync(listing, seen, policy, clock())
        _report_plan(account.name, plan, len(listing), result, log)
        _record_listing(account, store, plan, clock())
        result.too_large = result.skipped = len(plan.too_large) + plan.held
        deletable = _after_delivery(account, plan)
        total = len(plan.fetch)
        done = [0, 0]

        def tick(size: int) -> None:
            done[0] += 1
            done[1] += size
            if progress is not None:
                progress(account.name, done[0], total, done[1])

        batcher = _Batcher(account.mailbox, store, target, clock, result, deletable.add, fence)
        # No budget from here on (a big mailbox takes what it takes), only the minimum rate.
        client.set_pace(pace(account, "transfer"))
        trace = TraceHeaders(
            account.add_headers,
            pop3_host=account.host,
            user=account.username,
            recipient=account.lmtp_recipient,
        )
        inflight = [0]
        try:
            _fetch(
                client,
                plan,
                batcher,
                target,
                stop,
                tick,
                _retr_guard(account),
                trace,
                clock,
                inflight,
            )
        except MessageTooLarge as exc:
            _cut_off(account, store, plan, inflight[0], exc, result, clock(), log)
            return False
        _forget_slowly(account, store, plan, result, clock())
        _delete(account, client, store, plan, deletable, result, clock)
        if settled(plan, policy):  # every write of the run is in: the digest goes last
            store.set_listing_digest(account.mailbox, digest)
    finally:
        client.close()
    return True


def _report_plan(
    account: str,
    plan: Plan,
    on_server: int,
    result: RunResult,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Log the plan; its warnings only when new (the daemon repeats a plan every poll)."""
    log.debug(
        "planned",
        on_server=on_server,
        fetch=len(plan.fetch),
        delete=len(plan.delete),
        absent=len(plan.absent),
        forget=len(plan.forget),
        too_large=len(plan.too_large),
        held=plan.held,
    )
    for warning in plan.warnings:
        if warning in result.warnings:  # a second login re-plans the same mailbox
            continue
        if _warning_is_new(account, warning):
            log.warning("plan warning", detail=warning)
        else:
            log.debug("plan warning (unchanged since the last run)", detail=warning)
        result.warnings.append(warning)
    _forget_old_warnings(account, plan.warnings)


def _forget_slowly(
    account: Account, store: Store, plan: Plan, result: RunResult, now: float
) -> None:
    """After a complete session: forget UIDLs long gone, note the others still absent."""
    if plan.forget:
        store.forget(account.mailbox, plan.forget)
        result.forgotten = len(plan.forget)
    if plan.absent:
        store.note_absent(account.mailbox, plan.absent, now)


def _record_listing(account: Account, store: Store, plan: Plan, now: float) -> None:
    """Before fetching: remember new too-large messages and UIDLs that came back."""
    if plan.too_large:
        store.mark_too_large(account.mailbox, [(u, size) for _, u, size in plan.too_large], now)
    if plan.reappeared:
        store.note_present(account.mailbox, plan.reappeared)
        structlog.get_logger("popsync.sync").info(
            "vanished messages are listed again; not fetching them again",
            account=account.name,
            count=len(plan.reappeared),
        )


def _cut_off(
    account: Account,
    store: Store,
    plan: Plan,
    msgnum: int,
    exc: MessageTooLarge,
    result: RunResult,
    now: float,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """RETR outgrew the size guard: remember the message as too large (never retried)."""
    item = next((it for it in plan.fetch if it[0] == msgnum), None)
    if item is None:  # cannot happen: the guard only applies to planned RETRs
        raise exc
    _, uidl, listed = item
    size = max(exc.received, listed or 0)
    store.mark_too_large(account.mailbox, [(uidl, size)], now)
    warning = (
        f"message {show_uidl(uidl)} was cut off after {size} octets (LIST said"
        f" {listed if listed is not None else 'nothing'}); left on the server and remembered as"
        f" too large (max_message_size={account.max_message_size})"
    )
    log.warning("message too large", detail=warning)
    result.warnings.append(warning)


#: The plan warnings each account logged last run: a daemon repeats one only when it
#: changes (a new oversized message changes the text), not every poll.
_last_warnings: dict[str, frozenset[str]] = {}
_warnings_lock = threading.Lock()


def _warning_is_new(account: str, warning: str) -> bool:
    with _warnings_lock:
        return warning not in _last_warnings.get(account, frozenset())


def _forget_old_warnings(account: str, warnings: tuple[str, ...]) -> None:
    with _warnings_lock:
        _last_warnings[account] = frozenset(warnings)


class _Deletable:
    """Message numbers that may be DELEd: planned ones plus, with after_delivery, new ones."""

    def __init__(self, enabled: bool, by_uidl: dict[bytes, int]) -> None:
        self.enabled = enabled
        self._by_uidl = by_uidl
        self.fresh: list[tuple[int, bytes]] = []

    def add(self, uidl: bytes) -> None:
        # A duplicated UIDL is absent from _by_uidl: we cannot tell which copy DELE removes.
        msgnum = self._by_uidl.get(uidl)
        if self.enabled and msgnum is not None:
            self.fresh.append((msgnum, uidl))


def _after_delivery(account: Account, plan: Plan) -> _Deletable:
    dup = set(plan.duplicates)
    by_uidl = {uidl: msgnum for msgnum, uidl, _ in plan.fetch if uidl not in dup}
    return _Deletable(account.delete == "after_delivery", by_uidl)


def _delete(
    account: Account,
    client: Pop3Client,
    store: Store,
    plan: Plan,
    deletable: _Deletable,
    result: RunResult,
    clock: Callable[[], float],
) -> None:
    """DELE delivered messages and QUIT; the server commits the DELEs only on QUIT's +OK."""
    targets = sorted({*plan.delete, *deletable.fresh})
    refused: set[int] = set()
    if targets:
        # One refused DELE (a message another session removed, say) must not block the
        # account forever: the others are still sent and QUIT commits them; a message
        # still listed next time is planned for deletion again.
        for msgnum, exc in client.dele_many([n for n, _ in targets], keep_going=True):
            refused.add(msgnum)
            error = safe_text(str(exc))
            structlog.get_logger("popsync.sync").warning(
                "server refused a DELE", account=account.name, msgnum=msgnum, error=error
            )
            result.warnings.append(f"server refused DELE {msgnum}: {error}")
    client.quit()
    deleted = [uidl for msgnum, uidl in targets if msgnum not in refused]
    if deleted:
        store.mark_deleted(account.mailbox, deleted, clock())
        result.deleted = len(deleted)


def _prepare(
    account: Account,
    store: Store,
    result: RunResult,
    clock: Callable[[], float],
    fence: Callable[[], None] | None,
    log: structlog.typing.FilteringBoundLogger,
    cleanup: contextlib.ExitStack,
    lmtp_budget: SessionBudget | None,
) -> Target:
    """With the lock held, before the session: check the destination, recover, clean up."""
    for path, what in ((account.maildir, "Maildir"), (account.mbox, "mbox")):
        if path is not None:
            refuse_foreign_root(path, what)
    target = open_target(account, store.state_dir, lmtp_budget=lmtp_budget)
    cleanup.callback(target.close)  # an LMTP target's kept-open sessions, once the run ends
    if account.maildir is not None and store.path is not None:
        # A database server's store is shared by every worker: nothing to claim.
        claim_maildir(account.maildir, store.path)
    result.recovered = recover(account.mailbox, store, target, clock(), fence)
    if result.recovered:
        log.info("recovered interrupted deliveries", count=result.recovered)
    # Debris of a run killed mid-RETR or mid-batch; other agents' files get 36 hours.
    # recover() has just resolved every pending row, so no tmp file is still owed.
    debris = clean_debris(target.spool, set())
    if debris:
        log.info("removed tmp/ debris of an interrupted run", count=len(debris))
    target.spool.cleanup_tmp(())
    return target


@scrub_scope
def sync_account(
    account: Account,
    store: Store,
    *,
    clock: Callable[[], float] = time.time,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    secret_resolver: Callable[[Account], str] | None = None,
    on_activity: Callable[[], None] | None = None,
    fence: Callable[[], None] | None = None,
    prelogin: PreLogin | None = None,
    lmtp_budget: SessionBudget | None = None,
) -> RunResult:
    """Run one sync of ``account``; never raises for expected failures (see ``RunResult``).

    ``on_activity`` is called whenever data arrives from the server: the daemon tells a
    stuck run from a slow one by it. ``fence`` (fleet mode, `popsync.fleet`) raises
    `popsync.lease.LeaseLost` once this worker's lease is gone; it is called right before
    every hand-over, so a run that lost its lease delivers nothing more. ``prelogin``
    (``--once``, see `popsync.prelogin`) has taken the lock, resolved the secret, logged in
    and read the listing already; the run takes each over where it would have made it.

    Whatever the server says is shown only through :func:`popsync.textsafe.safe_text`, with
    the account's secret, in every form it is sent, scrubbed for the rest of the run.
    ``lmtp_budget`` is shared by the runs of one process (`popsync.deliver.budget`).
    """
    log = structlog.get_logger("popsync.sync").bind(account=account.name, host=account.host)
    result = RunResult(account=account.name, started=clock())
    started = time.monotonic()
    during_login = False
    try:
        lock: contextlib.AbstractContextManager[None] = (
            store.lock(account.mailbox, account.name) if prelogin is None else prelogin.held_lock()
        )
        with lock, contextlib.ExitStack() as cleanup:
            target = _prepare(account, store, result, clock, fence, log, cleanup, lmtp_budget)
            if prelogin is not None:
                secret = prelogin.secret()
            elif secret_resolver is not None:
                secret = secret_resolver(account)
            else:
                secret = resolve_secret(account, store.state_dir)
            hide_secret(account, secret)
            # sasl.REVEALING is config.CLEARTEXT_AUTH in upper case; importing popsync.config
            # here would import pydantic into every run that read a cached config.
            if account.tls == "none" and account.auth.upper() in REVEALING:
                log.warning(
                    "sending the password unencrypted",
                    auth=account.auth,
                    detail='tls = "none" with an auth that reveals the password: anyone on '
                    "the network path can read it",
                )
            for cutoffs in range(MAX_CUTOFFS + 1):
                during_login = True
                early = prelogin if cutoffs == 0 else None
                client = early.client() if early else _connect(account, secret, on_activity)
                during_login = False
                if _session(
                    account,
                    client,
                    store,
                    target,
                    result,
                    clock=clock,
                    stop=stop,
                    progress=progress,
                    log=log,
                    fence=fence,
                    prelogin=early,
                ):
                    break
                if cutoffs == MAX_CUTOFFS:
                    result.warnings.append(
                        f"{MAX_CUTOFFS + 1} oversized messages cut off in one run; the rest"
                        " of the mailbox is synced next run"
                    )
    except Exception as exc:  # every failure becomes a RunResult
        _fail(result, _lease_cause(exc, fence), during_login)
    finally:
        if prelogin is not None:
            prelogin.discard()
    result.duration = time.monotonic() - started
    _log_result(log, result)
    try:
        store.record_run(account.mailbox, _record(result, clock()))
    except Exception as exc:  # a full disk must not hide the outcome
        log.error("could not record run", error=str(exc))
    return result


def _lease_cause(exc: Exception, fence: Callable[[], None] | None) -> Exception:
    """In fleet mode, a run that failed after losing its lease failed because of that.

    A worker paused past its lease resumes mid-hand-over and finds, say, the tmp file it
    was about to deliver already recovered by the new owner; that error is a symptom, and
    the run must end as the lease loss it is (temporary), not as a local I/O error.
    """
    if fence is None:
        return exc
    try:
        fence()
    except PopsyncError as cause:  # LeaseLost, or the database unreachable: both temporary
        return cause
    except Exception:  # a fence that fails oddly must not crash the run
        return exc
    return exc


def _record(result: RunResult, finished: float) -> RunRecord:
    from popsync.seen import RunRecord

    return RunRecord(
        started=result.started,
        finished=finished,
        outcome=result.outcome,
        fetched=result.fetched,
        skipped=result.skipped,
        deleted=result.deleted,
        bytes_fetched=result.bytes,
        messages_on_server=result.on_server if result.outcome == "ok" else None,
        error=result.error,
    )


def _fail(result: RunResult, exc: Exception, during_login: bool) -> None:
    code = classify_error(exc, during_login=during_login)
    if isinstance(exc, OSError) and not isinstance(exc, PopsyncError):
        exc = LocalIOError(f"local I/O error: {exc}")
    result.exit_code = code
    result.outcome = _OUTCOME_BY_CODE.get(code, "error")
    result.error = _one_line(exc)
    if isinstance(exc, pop3_errors.LoginDelay) and result.retry_after is None:
        result.retry_after = 300.0


def _one_line(exc: BaseException) -> str:
    """The error as one safe line: it may quote the server (escaped, capped, scrubbed)."""
    text = str(exc).strip().replace("\n", "; ") or type(exc).__name__
    if not isinstance(exc, PopsyncError | pop3_errors.Pop3Error):
        text = f"{type(exc).__name__}: {text}"
    return safe_text(text)


def _log_result(log: structlog.typing.FilteringBoundLogger, result: RunResult) -> None:
    fields = {
        "outcome": result.outcome,
        "fetched": result.fetched,
        "bytes": result.bytes,
        "skipped": result.skipped,
        "deleted": result.deleted,
        "recovered": result.recovered,
        "on_server": result.on_server,
        "duration": round(result.duration, 3),
    }
    if result.outcome == "ok":
        log.info("sync finished", **fields)
    else:
        log.error("sync failed", error=result.error, **fields)
