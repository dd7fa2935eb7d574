"""The seen-store on PostgreSQL (``store = "postgresql://…"``): fleet mode's shared state.

`PgStore` implements `popsync.store.Store` with the semantics of the SQLite
`popsync.seen.SeenStore`, method by method (states, vanish bookkeeping, run records and
consecutive failures). Its tables (``seen``, ``runs``) are migration 2 of `popsync.lease`'s
one schema history, so leases, seen rows and runs migrate together under one advisory lock.

Transactions: every mutating method is ONE transaction over the whole batch, sent as a few
statements over arrays (``unnest``/``= ANY``) in chunks of `CHUNK` rows, never one statement
per row: a 1M-row mailbox or 10,000 accounts cost round trips per chunk, not per UIDL. The
planner's bulk reads (`PgStore.delivered_times`, `PgStore.other_rows`) stream in chunks in
one round trip (libpq's chunked-rows mode), like SQLite's cursor.

Locks are leases. `PgStore.lock` claims the mailbox's lease in ``accounts_lease`` (LockBusy
naming the holder if someone else's lease is live), renews it from a `popsync.lease.Renewer`
thread and releases it on exit, leaving the account's due time alone. A session advisory
lock would not do: a SIGSTOPped worker keeps its TCP connection and so the lock, forever.
While this store holds a mailbox's lease, every mutating transaction on that mailbox is
fenced with its token (`popsync.lease.LeaseStore.check` inside the transaction: a lease
taken over makes the transaction raise `popsync.lease.LeaseLost` and roll back), so
``--once``, ``mark-seen`` and ``import-state`` are fenced with no extra code.

`PgStore.fenced` returns a view for a lease claimed elsewhere (the fleet scheduler's
``claim_due``): EVERY mutating transaction of the view checks that token first, `fence`
checks it on demand (before a batch's hand-over), and the view's `lock` only verifies the
lease instead of claiming it again.

A lost database connection (PostgreSQL restarted, network down) raises
`popsync.errors.NetworkError` (exit 75): the run fails temporarily and is retried.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from popsync.lease import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_RENEW_SECONDS,
    LeaseLost,
    LeaseStore,
    Renewer,
    default_worker_id,
    mailbox_key,
)
from popsync.seen import LEGACY_PREFIX, EntryRow, RunRecord, SeenEntry

if TYPE_CHECKING:
    import psycopg

__all__ = ["CHUNK", "FencedStore", "PgStore"]

#: Rows per statement in a bulk write (one transaction covers all chunks).
CHUNK = 20_000
#: Rows per round trip of a streamed read.
STREAM_BATCH = 10_000

_T = TypeVar("_T")
_COLUMNS = "uidl, state, name, size, first_seen, delivered_at, deleted_at, vanished_at, absent_runs"
_SELECT_ENTRIES = f"SELECT {_COLUMNS} FROM seen WHERE mailbox = %s"  # noqa: S608
_SELECT_PENDING = _SELECT_ENTRIES + " AND state = 'pending'"
_DELIVERED = (
    "state = 'delivered' AND delivered_at IS NOT NULL AND deleted_at IS NULL"
    " AND vanished_at IS NULL"
)
_SELECT_DELIVERED = f"SELECT uidl, delivered_at FROM seen WHERE mailbox = %s AND {_DELIVERED}"  # noqa: S608
_SELECT_OTHERS = f"{_SELECT_ENTRIES} AND NOT ({_DELIVERED})"

_ADD_PENDING = """
INSERT INTO seen AS s (mailbox, uidl, state, name, size, first_seen)
SELECT %(mailbox)s, u, 'pending', n, z, %(at)s
FROM unnest(%(uidls)b::bytea[], %(names)b::text[], %(sizes)b::bigint[]) AS t(u, n, z)
ON CONFLICT (mailbox, uidl) DO UPDATE
SET state = 'pending', name = excluded.name, size = excluded.size,
    vanished_at = NULL, absent_runs = 0
WHERE s.state IN ('pending', 'too_large')
"""
_MARK_DELIVERED = """
INSERT INTO seen AS s (mailbox, uidl, state, name, first_seen, delivered_at)
SELECT %(mailbox)s, u, 'delivered', n, %(at)s, %(at)s
FROM unnest(%(uidls)b::bytea[], %(names)b::text[]) AS t(u, n)
ON CONFLICT (mailbox, uidl) DO UPDATE
SET name = excluded.name,
    delivered_at = CASE WHEN s.state = 'delivered' THEN s.delivered_at
                        ELSE excluded.delivered_at END,
    state = 'delivered'
"""
_MARK_REJECTED = """
INSERT INTO seen AS s (mailbox, uidl, state, name, first_seen)
SELECT %(mailbox)s, u, 'rejected', n, %(at)s
FROM unnest(%(uidls)b::bytea[], %(names)b::text[]) AS t(u, n)
ON CONFLICT (mailbox, uidl) DO UPDATE
SET name = excluded.name, state = 'rejected' WHERE s.state = 'pending'
"""
_MARK_TOO_LARGE = """
INSERT INTO seen AS s (mailbox, uidl, state, name, size, first_seen)
SELECT %(mailbox)s, u, 'too_large', '', z, %(at)s
FROM unnest(%(uidls)b::bytea[], %(sizes)b::bigint[]) AS t(u, z)
ON CONFLICT (mailbox, uidl) DO UPDATE SET size = excluded.size
WHERE s.state = 'too_large' AND s.size IS DISTINCT FROM excluded.size
"""
_NOTE_ABSENT = """
UPDATE seen SET vanished_at = coalesce(vanished_at, %(at)s), absent_runs = absent_runs + 1
WHERE mailbox = %(mailbox)s AND uidl = ANY(%(uidls)b::bytea[])
"""
_NOTE_PRESENT = """
UPDATE seen SET vanished_at = NULL, absent_runs = 0
WHERE mailbox = %(mailbox)s AND uidl = ANY(%(uidls)b::bytea[])
"""
_MARK_DELETED = """
UPDATE seen SET deleted_at = %(at)s
WHERE mailbox = %(mailbox)s AND uidl = ANY(%(uidls)b::bytea[]) AND state = 'delivered'
"""
_RECORD_RUN = """
INSERT INTO runs AS r (mailbox, started, finished, outcome, fetched, skipped, deleted, bytes,
                       messages_on_server, error, consecutive_failures)
VALUES (%(mailbox)s, %(started)s, %(finished)s, %(outcome)s, %(fetched)s, %(skipped)s,
        %(deleted)s, %(bytes)s, %(messages_on_server)s, %(error)s,
        CASE WHEN %(ok)s THEN 0 ELSE 1 END)
ON CONFLICT (mailbox) DO UPDATE
SET started = excluded.started, finished = excluded.finished, outcome = excluded.outcome,
    fetched = excluded.fetched, skipped = excluded.skipped, deleted = excluded.deleted,
    bytes = excluded.bytes, messages_on_server = excluded.messages_on_server,
    error = excluded.error,
    consecutive_failures = CASE WHEN %(ok)s THEN 0 ELSE r.consecutive_failures + 1 END
RETURNING consecutive_failures
"""
_LAST_RUNS = (
    "SELECT mailbox, started, finished, outcome, fetched, skipped, deleted, bytes,"
    " messages_on_server, error, consecutive_failures FROM runs ORDER BY mailbox"
)


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _last_wins(pairs: Iterable[tuple[bytes, _T]]) -> dict[bytes, _T]:
    """UIDL -> value, the last of duplicates winning (as SQLite's row-by-row statements do).

    PostgreSQL refuses to update one row twice in one INSERT … ON CONFLICT.
    """
    return {bytes(uidl): value for uidl, value in pairs}


def _unique(uidls: Iterable[bytes]) -> list[bytes]:
    return list(dict.fromkeys(bytes(u) for u in uidls))


def _entry(row: Sequence[Any]) -> SeenEntry:
    return SeenEntry(bytes(row[0]), *row[1:])


class PgStore:
    """Seen UIDLs, runs and lease-based locks in PostgreSQL; open with `PgStore.open`."""

    def __init__(
        self,
        leases: LeaseStore,
        *,
        state_dir: Path,
        worker_id: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        renew_seconds: float = DEFAULT_RENEW_SECONDS,
    ) -> None:
        self.leases = leases
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._state_dir = Path(state_dir)
        self.renewer = Renewer(leases, interval=renew_seconds, lease_seconds=lease_seconds)
        self._held: dict[str, str] = {}  # mailbox -> token of a lease lock() holds
        # Mailboxes whose lock() found its lease gone at the end: the run that follows
        # must not record itself over the new holder's (see record_run).
        self._lost_runs: set[str] = set()
        self._guard = threading.Lock()

    @classmethod
    def open(
        cls,
        conninfo: str,
        *,
        state_dir: Path,
        password: str | None = None,
        worker_id: str | None = None,
        max_connections: int = 10,
        timeout: float = 10.0,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        renew_seconds: float = DEFAULT_RENEW_SECONDS,
    ) -> PgStore:
        """Connect (a pool of up to ``max_connections``) and bring the schema up to date."""
        leases = LeaseStore(
            conninfo,
            max_connections=max_connections,
            timeout=timeout,
            password=password,
            lease_seconds=lease_seconds,
        )
        return cls(
            leases,
            state_dir=state_dir,
            worker_id=worker_id or default_worker_id(),
            lease_seconds=lease_seconds,
            renew_seconds=renew_seconds,
        )

    # --- the Store surface that is not about rows ----------------------------------------------

    @property
    def state_dir(self) -> Path:
        """The local directory for spools, OAuth2 tokens and lock files."""
        return self._state_dir

    @property
    def path(self) -> Path | None:
        """No SQLite file: Maildirs are not claimed by a database server's store."""
        return None

    def fenced(self, token: str) -> FencedStore:
        """A view whose every write first checks that lease ``token`` is still held."""
        return FencedStore(self, token)

    # --- transactions ---------------------------------------------------------------------------

    def _token_for(self, mailbox: str | None) -> str | None:
        if mailbox is None:
            return None
        with self._guard:
            return self._held.get(mailbox)

    @contextmanager
    def _tx(
        self, mailbox: str | None, fence: str | None = None
    ) -> Iterator[psycopg.Connection[Any]]:
        """One transaction; fenced by ``fence`` or by the lease `lock` holds for ``mailbox``."""
        token = fence or self._token_for(mailbox)
        if token is not None and self.renewer.lost(token):
            raise LeaseLost("lease expired or taken over (a renewal found it gone)")
        with self.leases.connection(autocommit=True) as conn, conn.transaction():
            if token is not None:
                self.leases.check(token, conn=conn)
            yield conn

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self.leases.connection(autocommit=True) as conn:
            return conn.execute(sql.encode(), args).fetchall()

    # --- seen rows ------------------------------------------------------------------------------

    def entries(self, mailbox: str) -> dict[bytes, SeenEntry]:
        """Every row of one mailbox, keyed by UIDL."""
        return {bytes(r[0]): _entry(r) for r in self._read(_SELECT_ENTRIES, (mailbox,))}

    def pending(self, mailbox: str) -> dict[bytes, SeenEntry]:
        """The pending rows of one mailbox (what recovery looks at), keyed by UIDL."""
        return {bytes(r[0]): _entry(r) for r in self._read(_SELECT_PENDING, (mailbox,))}

    def has_rows(self, mailbox: str) -> bool:
        """Whether the mailbox has any row (without reading them all)."""
        return bool(self._read("SELECT 1 FROM seen WHERE mailbox = %s LIMIT 1", (mailbox,)))

    def count(self, mailbox: str) -> int:
        """How many rows the mailbox has (without reading them)."""
        return int(self._read("SELECT count(*) FROM seen WHERE mailbox = %s", (mailbox,))[0][0])

    def delivered_times(self, mailbox: str) -> Iterator[tuple[bytes, float]]:
        """``(uidl, delivered_at)`` of every plain delivered row, streamed (see SeenStore)."""
        for row in self._stream(_SELECT_DELIVERED, mailbox):
            yield bytes(row[0]), float(row[1])

    def other_rows(self, mailbox: str) -> Iterator[EntryRow]:
        """Every row not returned by `delivered_times`, as a tuple in `SeenEntry` order."""
        for row in self._stream(_SELECT_OTHERS, mailbox):
            yield cast("EntryRow", (bytes(row[0]), *row[1:]))

    def _stream(self, sql: str, mailbox: str) -> Iterator[tuple[Any, ...]]:
        """Rows in chunks of `STREAM_BATCH` as the server sends them (libpq's chunked-rows
        mode): one round trip, no cursor or transaction to declare; holds one pooled
        connection until exhausted or closed."""
        with self.leases.connection(autocommit=True) as conn, conn.cursor(binary=True) as cur:
            yield from cur.stream(sql.encode(), (mailbox,), size=STREAM_BATCH)

    def mailboxes(self) -> list[str]:
        """Every mailbox key with rows or a recorded run, sorted."""
        rows = self._read("SELECT mailbox FROM seen UNION SELECT mailbox FROM runs ORDER BY 1")
        return [str(row[0]) for row in rows]

    def add_pending(
        self,
        mailbox: str,
        items: Sequence[tuple[bytes, str, int]],
        *,
        at: float | None = None,
        fence: str | None = None,
    ) -> None:
        """Record (uidl, tmp name, size) as pending; a pending or too_large row is updated.

        Raises ValueError (and records nothing) if any UIDL is already delivered.
        """
        now = time.time() if at is None else at
        rows = list(_last_wins((u, (name, size)) for u, name, size in items).items())
        with self._tx(mailbox, fence) as conn:
            changed = 0
            for chunk in _chunks(rows):
                cur = conn.execute(
                    _ADD_PENDING.encode(),
                    {
                        "mailbox": mailbox,
                        "at": now,
                        "uidls": [u for u, _ in chunk],
                        "names": [v[0] for _, v in chunk],
                        "sizes": [v[1] for _, v in chunk],
                    },
                )
                changed += cur.rowcount
            if changed != len(rows):
                raise ValueError("add_pending: some UIDLs are already delivered")

    def _pairs(
        self,
        sql: str,
        mailbox: str,
        items: Iterable[tuple[bytes, Any]],
        at: float,
        field: str,
        fence: str | None,
    ) -> int:
        rows = list(_last_wins(items).items())
        with self._tx(mailbox, fence) as conn:
            changed = 0
            for chunk in _chunks(rows):
                params = {
                    "mailbox": mailbox,
                    "at": at,
                    "uidls": [u for u, _ in chunk],
                    field: [v for _, v in chunk],
                }
                changed += conn.execute(sql.encode(), params).rowcount
            return changed

    def mark_delivered(
        self,
        mailbox: str,
        items: Sequence[tuple[bytes, str]],
        at: float,
        *,
        fence: str | None = None,
    ) -> None:
        """Mark (uidl, final name) delivered; inserts rows that are missing (never re-fetch)."""
        self._pairs(_MARK_DELIVERED, mailbox, items, at, "names", fence)

    def mark_rejected(
        self,
        mailbox: str,
        items: Sequence[tuple[bytes, str]],
        at: float,
        *,
        fence: str | None = None,
    ) -> None:
        """Record (uidl, reason) as rejected: never fetched again, never DELEd."""
        self._pairs(_MARK_REJECTED, mailbox, items, at, "names", fence)

    def mark_too_large(
        self,
        mailbox: str,
        items: Sequence[tuple[bytes, int]],
        at: float,
        *,
        fence: str | None = None,
    ) -> int:
        """Record (uidl, size) as too large to fetch; returns how many rows changed."""
        return self._pairs(_MARK_TOO_LARGE, mailbox, items, at, "sizes", fence)

    def _uidls(
        self, sql: str, mailbox: str, uidls: Iterable[bytes], fence: str | None, **extra: object
    ) -> int:
        unique = _unique(uidls)
        with self._tx(mailbox, fence) as conn:
            changed = 0
            for chunk in _chunks(unique):
                params = {"mailbox": mailbox, "uidls": list(chunk), **extra}
                changed += conn.execute(sql.encode(), params).rowcount
            return changed

    def note_absent(
        self, mailbox: str, uidls: Iterable[bytes], at: float, *, fence: str | None = None
    ) -> int:
        """One more complete listing without these UIDLs: set vanished_at once, count up."""
        return self._uidls(_NOTE_ABSENT, mailbox, uidls, fence, at=at)

    def note_present(
        self, mailbox: str, uidls: Iterable[bytes], *, fence: str | None = None
    ) -> int:
        """These vanished UIDLs are listed again: clear their absence."""
        return self._uidls(_NOTE_PRESENT, mailbox, uidls, fence)

    def remove(self, mailbox: str, uidls: Iterable[bytes], *, fence: str | None = None) -> int:
        """Drop PENDING rows (their file vanished) so they are fetched again; delivered stay."""
        sql = "DELETE FROM seen WHERE mailbox = %(mailbox)s AND uidl = ANY(%(uidls)b::bytea[])"
        return self._uidls(sql + " AND state = 'pending'", mailbox, uidls, fence)

    def forget(self, mailbox: str, uidls: Iterable[bytes], *, fence: str | None = None) -> int:
        """Drop rows of UIDLs the server no longer lists (the planner decides when)."""
        sql = "DELETE FROM seen WHERE mailbox = %(mailbox)s AND uidl = ANY(%(uidls)b::bytea[])"
        return self._uidls(sql, mailbox, uidls, fence)

    def mark_deleted(
        self, mailbox: str, uidls: Iterable[bytes], at: float, *, fence: str | None = None
    ) -> int:
        """Note that DELE was sent and QUIT accepted (delivered rows only)."""
        return self._uidls(_MARK_DELETED, mailbox, uidls, fence, at=at)

    def adopt_labels(self, mailboxes: Mapping[str, str], *, fence: str | None = None) -> int:
        """Move rows kept under ``label:<name>`` to their mailbox (see `SeenStore.adopt_labels`).

        A PostgreSQL store starts at the mailbox-keyed schema, so there is normally nothing
        to adopt; the check is one indexed probe.
        """
        legacy = "SELECT 1 FROM {} WHERE mailbox >= 'label:' AND mailbox < 'label;'"
        probe = f"SELECT EXISTS ({legacy.format('seen')}) OR EXISTS ({legacy.format('runs')})"
        if not self._read(probe)[0][0]:
            return 0
        moved = 0
        with self._tx(None, fence) as conn:
            for label, mailbox in mailboxes.items():
                old = LEGACY_PREFIX + label
                for table, same_row in (("seen", " AND n.uidl = o.uidl"), ("runs", "")):
                    # Rows already kept under the mailbox win (they are newer), as in SQLite.
                    cur = conn.execute(
                        f"UPDATE {table} AS o SET mailbox = %s WHERE o.mailbox = %s"  # noqa: S608
                        f" AND NOT EXISTS (SELECT 1 FROM {table} AS n"
                        f" WHERE n.mailbox = %s{same_row})",
                        (mailbox, old, mailbox),
                    )
                    moved += cur.rowcount
                    conn.execute(f"DELETE FROM {table} WHERE mailbox = %s", (old,))  # noqa: S608
        return moved

    # --- settled listings -------------------------------------------------------------------

    def listing_digest(self, mailbox: str) -> bytes | None:
        """See `SeenStore.listing_digest` (triggers in `popsync.lease` migration 3 drop it)."""
        rows = self._read("SELECT digest FROM listings WHERE mailbox = %s", (mailbox,))
        return bytes(rows[0][0]) if rows else None

    def set_listing_digest(self, mailbox: str, digest: bytes, *, fence: str | None = None) -> None:
        """See `SeenStore.set_listing_digest`; fenced like every write."""
        with self._tx(mailbox, fence) as conn:
            conn.execute(
                b"INSERT INTO listings (mailbox, digest) VALUES (%s, %s)"
                b" ON CONFLICT (mailbox) DO UPDATE SET digest = EXCLUDED.digest",
                (mailbox, digest),
            )

    # --- runs -----------------------------------------------------------------------------------

    def record_run(self, mailbox: str, record: RunRecord, *, fence: str | None = None) -> RunRecord:
        """Store the mailbox's latest run; returns it with consecutive_failures updated.

        Refused (`LeaseLost`) once, right after a `lock` of this mailbox ended with its lease
        taken over: the run's record belongs to the worker that holds the account now.
        """
        if fence is None:
            with self._guard:
                lost = mailbox in self._lost_runs
                self._lost_runs.discard(mailbox)
            if lost:
                raise LeaseLost("run not recorded: the lease was taken over during the run")
        params = {
            "mailbox": mailbox,
            "started": record.started,
            "finished": record.finished,
            "outcome": record.outcome,
            "fetched": record.fetched,
            "skipped": record.skipped,
            "deleted": record.deleted,
            "bytes": record.bytes_fetched,
            "messages_on_server": record.messages_on_server,
            "error": record.error,
            "ok": record.ok,
        }
        with self._tx(mailbox, fence) as conn:
            row = conn.execute(_RECORD_RUN.encode(), params).fetchone()
        failures = int(row[0]) if row else 0
        return replace(record, consecutive_failures=failures)

    def last_runs(self) -> dict[str, RunRecord]:
        """The latest run of every mailbox that has run, keyed by mailbox."""
        return {
            str(r[0]): RunRecord(
                started=r[1],
                finished=r[2],
                outcome=r[3],
                fetched=r[4],
                skipped=r[5],
                deleted=r[6],
                bytes_fetched=r[7],
                messages_on_server=r[8],
                error=r[9],
                consecutive_failures=r[10],
            )
            for r in self._read(_LAST_RUNS)
        }

    # --- locking and lifecycle ------------------------------------------------------------------

    def lock(self, mailbox: str, label: str | None = None) -> AbstractContextManager[None]:
        """Hold the mailbox's lease for the block (LockBusy naming the holder if it is held).

        The lease is renewed in the background and every write to the mailbox inside the
        block is fenced with it; on exit it is released with the account's due time kept.
        """
        return self._lease_lock(mailbox, label or mailbox)

    @contextmanager
    def _lease_lock(self, mailbox: str, label: str) -> Iterator[None]:
        with self._guard:
            if mailbox in self._held:
                from popsync.errors import LockBusy

                raise LockBusy(f"account {label!r} is already running in this process")
            self._held[mailbox] = ""  # reserved while claiming
        try:
            lease = self.leases.claim(self.worker_id, mailbox_key(mailbox), self.lease_seconds)
        except BaseException:
            with self._guard:
                del self._held[mailbox]
            raise
        with self._guard:
            self._held[mailbox] = lease.token
            self._lost_runs.discard(mailbox)
        self.renewer.add(lease.token)
        try:
            yield
        finally:
            self.renewer.discard(lease.token)
            with self._guard:
                del self._held[mailbox]
            if not self._release(lease.token):
                with self._guard:
                    self._lost_runs.add(mailbox)

    def _release(self, token: str) -> bool:
        """Give the lease back; False when it was already gone (taken over or expired).

        An unreachable database counts as released: the lease simply runs out.
        """
        from popsync.errors import NetworkError

        try:
            self.leases.release(token, next_due_in=None)
        except LeaseLost:
            return False
        except NetworkError:
            pass
        return True

    def close(self) -> None:
        """Stop renewing and close every pooled connection."""
        self.renewer.stop()
        self.leases.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FencedStore:
    """`PgStore` seen through one lease token: every write checks it in its transaction.

    For a lease claimed elsewhere (``LeaseStore.claim_due``) and renewed by the caller. Reads
    are not fenced (they change nothing). `lock` verifies the lease instead of claiming it.
    """

    def __init__(self, store: PgStore, token: str) -> None:
        self.store = store
        self.token = token

    @property
    def state_dir(self) -> Path:
        """The underlying store's state directory."""
        return self.store.state_dir

    @property
    def path(self) -> Path | None:
        """None, as for `PgStore`."""
        return None

    def fence(self) -> None:
        """Raise `LeaseLost` unless the lease is still held (call before each hand-over)."""
        if self.store.renewer.lost(self.token):
            raise LeaseLost("lease expired or taken over (a renewal found it gone)")
        self.store.leases.check(self.token)

    def fenced(self, token: str) -> FencedStore:
        """A view with another token."""
        return FencedStore(self.store, token)

    # reads: straight through
    def entries(self, mailbox: str) -> dict[bytes, SeenEntry]:
        """See `PgStore.entries`."""
        return self.store.entries(mailbox)

    def pending(self, mailbox: str) -> dict[bytes, SeenEntry]:
        """See `PgStore.pending`."""
        return self.store.pending(mailbox)

    def has_rows(self, mailbox: str) -> bool:
        """See `PgStore.has_rows`."""
        return self.store.has_rows(mailbox)

    def count(self, mailbox: str) -> int:
        """See `PgStore.count`."""
        return self.store.count(mailbox)

    def delivered_times(self, mailbox: str) -> Iterator[tuple[bytes, float]]:
        """See `PgStore.delivered_times`."""
        return self.store.delivered_times(mailbox)

    def other_rows(self, mailbox: str) -> Iterator[EntryRow]:
        """See `PgStore.other_rows`."""
        return self.store.other_rows(mailbox)

    def mailboxes(self) -> list[str]:
        """See `PgStore.mailboxes`."""
        return self.store.mailboxes()

    def last_runs(self) -> dict[str, RunRecord]:
        """See `PgStore.last_runs`."""
        return self.store.last_runs()

    # writes: fenced
    def add_pending(
        self, mailbox: str, items: Sequence[tuple[bytes, str, int]], *, at: float | None = None
    ) -> None:
        """See `PgStore.add_pending`; fenced."""
        self.store.add_pending(mailbox, items, at=at, fence=self.token)

    def mark_delivered(self, mailbox: str, items: Sequence[tuple[bytes, str]], at: float) -> None:
        """See `PgStore.mark_delivered`; fenced."""
        self.store.mark_delivered(mailbox, items, at, fence=self.token)

    def mark_rejected(self, mailbox: str, items: Sequence[tuple[bytes, str]], at: float) -> None:
        """See `PgStore.mark_rejected`; fenced."""
        self.store.mark_rejected(mailbox, items, at, fence=self.token)

    def mark_too_large(self, mailbox: str, items: Sequence[tuple[bytes, int]], at: float) -> int:
        """See `PgStore.mark_too_large`; fenced."""
        return self.store.mark_too_large(mailbox, items, at, fence=self.token)

    def note_absent(self, mailbox: str, uidls: Iterable[bytes], at: float) -> int:
        """See `PgStore.note_absent`; fenced."""
        return self.store.note_absent(mailbox, uidls, at, fence=self.token)

    def note_present(self, mailbox: str, uidls: Iterable[bytes]) -> int:
        """See `PgStore.note_present`; fenced."""
        return self.store.note_present(mailbox, uidls, fence=self.token)

    def remove(self, mailbox: str, uidls: Iterable[bytes]) -> int:
        """See `PgStore.remove`; fenced."""
        return self.store.remove(mailbox, uidls, fence=self.token)

    def forget(self, mailbox: str, uidls: Iterable[bytes]) -> int:
        """See `PgStore.forget`; fenced."""
        return self.store.forget(mailbox, uidls, fence=self.token)

    def mark_deleted(self, mailbox: str, uidls: Iterable[bytes], at: float) -> int:
        """See `PgStore.mark_deleted`; fenced."""
        return self.store.mark_deleted(mailbox, uidls, at, fence=self.token)

    def adopt_labels(self, mailboxes: Mapping[str, str]) -> int:
        """See `PgStore.adopt_labels`; fenced."""
        return self.store.adopt_labels(mailboxes, fence=self.token)

    def listing_digest(self, mailbox: str) -> bytes | None:
        """See `PgStore.listing_digest`."""
        return self.store.listing_digest(mailbox)

    def set_listing_digest(self, mailbox: str, digest: bytes) -> None:
        """See `PgStore.set_listing_digest`; fenced."""
        self.store.set_listing_digest(mailbox, digest, fence=self.token)

    def record_run(self, mailbox: str, record: RunRecord) -> RunRecord:
        """See `PgStore.record_run`; fenced."""
        return self.store.record_run(mailbox, record, fence=self.token)

    def lock(self, mailbox: str, label: str | None = None) -> AbstractContextManager[None]:
        """Verify this view's lease is held and is ``mailbox``'s (it is not claimed again)."""
        return self._verified(mailbox, label or mailbox)

    @contextmanager
    def _verified(self, mailbox: str, label: str) -> Iterator[None]:
        server, username = mailbox_key(mailbox)
        try:
            uuid.UUID(self.token)
        except ValueError:
            raise LeaseLost("not a lease token") from None
        rows = self.store._read(  # same module: the view shares its store's pool
            "SELECT 1 FROM accounts_lease WHERE token = %s::uuid AND server = %s"
            " AND username = %s AND expires_at > clock_timestamp()",
            (self.token, server, username),
        )
        if not rows:
            raise LeaseLost(f"account {label!r}: the lease is not held (expired or taken over)")
        yield

    def close(self) -> None:
        """Views own nothing: closing is the underlying store's business."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: Both satisfy the protocol (mypy checks these assignments).
if TYPE_CHECKING:
    from popsync.store import Store

    _check_pg: Callable[[PgStore], Store] = lambda s: s  # noqa: E731
    _check_view: Callable[[FencedStore], Store] = lambda s: s  # noqa: E731
