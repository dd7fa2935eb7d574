"""The SQLite seen-store: which UIDLs each account has pending or delivered, and its last run.

One file, ``state_dir/popsync.sqlite3``, mode 0600 in a 0700 directory. WAL journal with
``synchronous=FULL`` so a committed transaction survives power loss; every mutating method is
ONE ``BEGIN IMMEDIATE`` transaction over a whole batch (group commit, see `popsync.maildir`).

Threads: the daemon runs account jobs in a thread pool. A `SeenStore` holds ONE connection
(``check_same_thread=False``) guarded by an internal `threading.RLock` held for each whole
transaction. SQLite admits one writer at a time anyway and our transactions are short batches,
so per-thread connections would buy no write concurrency; they would add SQLITE_BUSY waits
between our own threads and connections leaking with pool threads. Other processes
(``popsync status``, a manual ``--once``) share the file through WAL and ``busy_timeout``.

Schema: ``PRAGMA user_version`` is the schema version; `MIGRATIONS[i]` upgrades version ``i`` to
``i + 1`` inside one transaction. A file written by a newer popsync is refused (`SchemaTooNew`)
rather than guessed at.

Per-account locks (`SeenStore.lock`) are ``flock`` on ``state_dir/locks/<account>.lock``
(non-blocking; `popsync.errors.LockBusy` when held) plus an in-process registry, because flock
is emulated with per-process POSIX locks on some filesystems (NFS) where threads would not
exclude each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeAlias, cast
from urllib.parse import quote

from popsync.errors import LocalIOError, LockBusy

__all__ = [
    "DB_FILENAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "EntryRow",
    "RunRecord",
    "SchemaTooNew",
    "SeenEntry",
    "SeenState",
    "SeenStore",
    "SeenStoreError",
]

DB_FILENAME = "popsync.sqlite3"
SeenState = Literal["pending", "delivered", "rejected"]

#: MIGRATIONS[i] takes a database from user_version i to i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE seen (
            account TEXT NOT NULL,
            uidl BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'delivered')),
            name TEXT NOT NULL,
            size INTEGER,
            first_seen REAL NOT NULL,
            delivered_at REAL,
            deleted_at REAL,
            PRIMARY KEY (account, uidl)
        ) WITHOUT ROWID""",
        """CREATE TABLE runs (
            account TEXT PRIMARY KEY,
            started REAL NOT NULL,
            finished REAL,
            outcome TEXT NOT NULL,
            fetched INTEGER NOT NULL,
            skipped INTEGER NOT NULL,
            deleted INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            messages_on_server INTEGER,
            error TEXT,
            consecutive_failures INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ),
)
#: *rejected* (a delivery target refused the message for good; ``name`` holds its reason):
#: SQLite cannot alter a CHECK constraint, so the table is rebuilt.
MIGRATIONS += (
    (
        """CREATE TABLE seen_rejected (
            account TEXT NOT NULL,
            uidl BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'rejected')),
            name TEXT NOT NULL,
            size INTEGER,
            first_seen REAL NOT NULL,
            delivered_at REAL,
            deleted_at REAL,
            PRIMARY KEY (account, uidl)
        ) WITHOUT ROWID""",
        "INSERT INTO seen_rejected SELECT * FROM seen",
        "DROP TABLE seen",
        "ALTER TABLE seen_rejected RENAME TO seen",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_BUSY_TIMEOUT_MS = 10_000
# Primary SQLite result codes that mean "the disk or file is the problem", not a bug.
_SQLITE_BUSY = frozenset({5, 6})  # BUSY, LOCKED
_SQLITE_LOCAL = frozenset({3, 8, 10, 11, 13, 14, 26})  # PERM READONLY IOERR CORRUPT FULL ...
_held_locks: set[str] = set()
_Row = tuple[object, ...]
_held_guard = threading.Lock()


class SeenStoreError(LocalIOError):
    """The state database cannot be used (unreadable, corrupt, or from the future)."""


class SchemaTooNew(SeenStoreError):
    """The database was written by a newer popsync; refusing to touch it."""


@dataclass(frozen=True, slots=True)
class SeenEntry:
    """One (account, UIDL) row."""

    uidl: bytes
    state: SeenState
    name: str
    size: int | None
    first_seen: float
    delivered_at: float | None
    deleted_at: float | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One account run, for ``popsync status``; outcome "ok" is success, anything else not."""

    started: float
    finished: float | None
    outcome: str
    fetched: int = 0
    skipped: int = 0
    deleted: int = 0
    bytes_fetched: int = 0
    messages_on_server: int | None = None
    error: str | None = None
    consecutive_failures: int = 0  # maintained by the store; ignored by record_run()

    @property
    def ok(self) -> bool:
        """True for a successful run."""
        return self.outcome == "ok"


def _raise_sqlite(exc: sqlite3.Error, action: str) -> NoReturn:
    """Map SQLite's environmental failures to popsync errors; re-raise bugs unchanged."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _SQLITE_BUSY:
        raise LockBusy(f"state database busy while trying to {action}: {exc}") from exc
    if primary in _SQLITE_LOCAL:
        raise SeenStoreError(f"cannot {action} in the state database: {exc}") from exc
    raise exc


def _lock_filename(account: str) -> str:
    """A safe file name for any account name (no '/', bounded length)."""
    safe = quote(account, safe="@+")
    if len(safe) > 200:
        safe = safe[:100] + "-" + hashlib.sha256(account.encode()).hexdigest()
    return f"{safe}.lock"


def _secure_file(path: Path) -> None:
    """Create `path` 0600 if missing and tighten it if present (SQLite copies its mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


_SELECT_ENTRIES = (
    "SELECT uidl, state, name, size, first_seen, delivered_at, deleted_at"
    " FROM seen WHERE account = ?"
)
_SELECT_PENDING = _SELECT_ENTRIES + " AND state = 'pending'"
_DELIVERED = "state = 'delivered' AND delivered_at IS NOT NULL"
_SELECT_DELIVERED = f"SELECT uidl, delivered_at FROM seen WHERE account = ? AND {_DELIVERED}"  # noqa: S608
_SELECT_OTHERS = f"{_SELECT_ENTRIES} AND NOT ({_DELIVERED})"
#: One seen row as SQLite returns it, in `SeenEntry` field order.
EntryRow: TypeAlias = tuple[bytes, SeenState, str, int | None, float, float | None, float | None]


class SeenStore:
    """Seen UIDLs per account; open with `SeenStore.open(path)`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.lock_dir = path.parent / "locks"
        self._conn = conn
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> SeenStore:
        """Open or create the store; migrates an older schema, refuses a newer one."""
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The file exists 0600 before SQLite opens it, so no umask games are needed, and
            # SQLite creates -wal/-shm with the database file's mode.
            _secure_file(path)
        except OSError as exc:
            raise SeenStoreError(f"cannot create the state database {path}: {exc}") from exc
        try:
            conn = sqlite3.connect(
                path,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            _raise_sqlite(exc, f"open {path}")
        store = cls(path, conn)
        try:
            store._setup()
        except BaseException:
            conn.close()
            raise
        return store

    def _setup(self) -> None:
        """Pragmas, then migrations, then tighten the WAL side files."""
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            _raise_sqlite(exc, "configure")
        if str(mode).lower() != "wal":
            raise SeenStoreError(f"{self.path}: cannot enable WAL (journal_mode={mode})")
        with self._tx("migrate") as conn:
            self._migrate(conn)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.chmod(0o600)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION (inside the caller's transaction)."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        target = len(MIGRATIONS)
        if version > target:
            raise SchemaTooNew(
                f"{self.path} has schema version {version}, but this popsync understands up to"
                f" {target}; upgrade popsync or point state_dir elsewhere"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if version != target:
            conn.execute(f"PRAGMA user_version = {target}")

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _tx(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialized across our threads, mapped errors."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                _raise_sqlite(exc, action)
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    _raise_sqlite(exc, action)
                raise

    def _query(
        self, action: str, sql: str, args: Sequence[object] = ()
    ) -> list[tuple[object, ...]]:
        """A read in autocommit mode (a single statement is its own snapshot)."""
        with self._lock:
            try:
                return cast("list[_Row]", self._conn.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                _raise_sqlite(exc, action)

    # --- seen rows ----------------------------------------------------------------------------

    def entries(self, account: str) -> dict[bytes, SeenEntry]:
        """Every row of one account, keyed by UIDL."""
        return self._entries(_SELECT_ENTRIES, account)

    def has_rows(self, account: str) -> bool:
        """Whether the account has any row (without reading them all)."""
        sql = "SELECT 1 FROM seen WHERE account = ? LIMIT 1"
        return bool(self._query("read entries", sql, (account,)))

    def count(self, account: str) -> int:
        """How many rows the account has (without reading them)."""
        rows = self._query(
            "count entries", "SELECT count(*) FROM seen WHERE account = ?", (account,)
        )
        return int(cast("int", rows[0][0]))

    def delivered_times(self, account: str) -> Iterator[tuple[bytes, float]]:
        """``(uidl, delivered_at)`` of every delivered row, streamed (the planner's bulk).

        With `other_rows` this is every row of the account, read for the planner's diff
        at a million rows without a list of rows or an entry object per row. Both hold the
        store's lock until exhausted or closed: consume them promptly, in the calling thread.
        """
        return self._stream(_SELECT_DELIVERED, account)

    def other_rows(self, account: str) -> Iterator[EntryRow]:
        """Every row not returned by `delivered_times`, as a tuple in `SeenEntry` order."""
        return self._stream(_SELECT_OTHERS, account)

    def _stream(self, sql: str, account: str, batch: int = 4096) -> Iterator[Any]:
        with self._lock:
            try:
                cursor = self._conn.execute(sql, (account,))
                while rows := cursor.fetchmany(batch):
                    yield from rows
            except sqlite3.Error as exc:
                _raise_sqlite(exc, "read entries")

    def pending(self, account: str) -> dict[bytes, SeenEntry]:
        """The pending rows of one account (what recovery looks at), keyed by UIDL."""
        return self._entries(_SELECT_PENDING, account)

    def _entries(self, sql: str, account: str) -> dict[bytes, SeenEntry]:
        rows = cast("list[EntryRow]", self._query("read entries", sql, (account,)))
        # Positional construction: this runs once per message on every poll.
        return {bytes(row[0]): SeenEntry(bytes(row[0]), *row[1:]) for row in rows}

    def add_pending(
        self,
        account: str,
        items: Sequence[tuple[bytes, str, int]],
        *,
        at: float | None = None,
    ) -> None:
        """Record (uidl, tmp name, size) as pending; a pending row is updated in place.

        Raises ValueError (and records nothing) if any UIDL is already delivered: re-fetching
        a delivered message would deliver it twice.
        """
        now = time.time() if at is None else at
        with self._tx("record pending messages") as conn:
            cur = conn.executemany(
                "INSERT INTO seen (account, uidl, state, name, size, first_seen)"
                " VALUES (?, ?, 'pending', ?, ?, ?)"
                " ON CONFLICT (account, uidl) DO UPDATE"
                " SET name = excluded.name, size = excluded.size WHERE state = 'pending'",
                [(account, bytes(u), name, size, now) for u, name, size in items],
            )
            if cur.rowcount != len(items):
                raise ValueError("add_pending: some UIDLs are already delivered")

    def mark_delivered(self, account: str, items: Sequence[tuple[bytes, str]], at: float) -> None:
        """Mark (uidl, final name) delivered; inserts rows that are missing (never re-fetch)."""
        with self._tx("mark messages delivered") as conn:
            conn.executemany(
                "INSERT INTO seen (account, uidl, state, name, first_seen, delivered_at)"
                " VALUES (?, ?, 'delivered', ?, ?, ?)"
                " ON CONFLICT (account, uidl) DO UPDATE SET"
                " name = excluded.name,"
                " delivered_at = CASE WHEN state = 'delivered' THEN delivered_at"
                " ELSE excluded.delivered_at END,"
                " state = 'delivered'",
                [(account, bytes(u), name, at, at) for u, name in items],
            )

    def mark_rejected(self, account: str, items: Sequence[tuple[bytes, str]], at: float) -> None:
        """Record (uidl, reason) as rejected: never fetched again, never DELEd."""
        with self._tx("mark messages rejected") as conn:
            conn.executemany(
                "INSERT INTO seen (account, uidl, state, name, first_seen)"
                " VALUES (?, ?, 'rejected', ?, ?)"
                " ON CONFLICT (account, uidl) DO UPDATE SET"
                " name = excluded.name, state = 'rejected' WHERE state = 'pending'",
                [(account, bytes(u), reason, at) for u, reason in items],
            )

    def _delete_rows(self, account: str, uidls: Iterable[bytes], extra: str, action: str) -> int:
        """DELETE rows by UIDL with an extra condition; returns the count."""
        with self._tx(action) as conn:
            cur = conn.executemany(
                f"DELETE FROM seen WHERE account = ? AND uidl = ?{extra}",  # noqa: S608
                [(account, bytes(u)) for u in uidls],
            )
            return max(cur.rowcount, 0)

    def remove(self, account: str, uidls: Iterable[bytes]) -> int:
        """Drop PENDING rows (their file vanished) so they are fetched again; delivered stay."""
        return self._delete_rows(account, uidls, " AND state = 'pending'", "remove pending rows")

    def forget(self, account: str, uidls: Iterable[bytes]) -> int:
        """Drop rows of UIDLs the server no longer lists."""
        return self._delete_rows(account, uidls, "", "forget UIDLs")

    def mark_deleted(self, account: str, uidls: Iterable[bytes], at: float) -> int:
        """Note that DELE was sent and QUIT accepted (delivered rows only)."""
        with self._tx("mark messages deleted") as conn:
            cur = conn.executemany(
                "UPDATE seen SET deleted_at = ?"
                " WHERE account = ? AND uidl = ? AND state = 'delivered'",
                [(at, account, bytes(u)) for u in uidls],
            )
            return max(cur.rowcount, 0)

    # --- runs ---------------------------------------------------------------------------------

    def record_run(self, account: str, record: RunRecord) -> RunRecord:
        """Store the account's latest run; returns it with consecutive_failures updated."""
        with self._tx("record a run") as conn:
            row = conn.execute(
                "SELECT consecutive_failures FROM runs WHERE account = ?", (account,)
            ).fetchone()
            failures = 0 if record.ok else (int(row[0]) if row else 0) + 1
            conn.execute(
                "INSERT OR REPLACE INTO runs (account, started, finished, outcome, fetched,"
                " skipped, deleted, bytes, messages_on_server, error, consecutive_failures)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    account,
                    record.started,
                    record.finished,
                    record.outcome,
                    record.fetched,
                    record.skipped,
                    record.deleted,
                    record.bytes_fetched,
                    record.messages_on_server,
                    record.error,
                    failures,
                ),
            )
        return replace(record, consecutive_failures=failures)

    def last_runs(self) -> dict[str, RunRecord]:
        """The latest run of every account that has run."""
        rows = self._query(
            "read runs",
            "SELECT account, started, finished, outcome, fetched, skipped, deleted, bytes,"
            " messages_on_server, error, consecutive_failures FROM runs ORDER BY account",
        )
        return {
            cast("str", r[0]): RunRecord(
                started=cast("float", r[1]),
                finished=cast("float | None", r[2]),
                outcome=cast("str", r[3]),
                fetched=cast("int", r[4]),
                skipped=cast("int", r[5]),
                deleted=cast("int", r[6]),
                bytes_fetched=cast("int", r[7]),
                messages_on_server=cast("int | None", r[8]),
                error=cast("str | None", r[9]),
                consecutive_failures=cast("int", r[10]),
            )
            for r in rows
        }

    # --- locking and lifecycle ----------------------------------------------------------------

    def lock(self, account: str) -> AbstractContextManager[None]:
        """Exclusive, non-blocking per-account lock across processes and threads."""
        return self._account_lock(account)

    @contextmanager
    def _account_lock(self, account: str) -> Iterator[None]:
        """flock the account's lock file; LockBusy if another run holds it."""
        path = self.lock_dir / _lock_filename(account)
        key = str(path.resolve())
        with _held_guard:
            if key in _held_locks:
                raise LockBusy(f"account {account!r} is already running in this process")
            _held_locks.add(key)
        try:
            with self._flock(account, path):
                yield
        finally:
            with _held_guard:
                _held_locks.discard(key)

    @contextmanager
    def _flock(self, account: str, path: Path) -> Iterator[None]:
        """The cross-process half of lock(); the file keeps the holder's PID for humans."""
        try:
            self.lock_dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SeenStoreError(f"cannot create lock file {path}: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusy(
                    f"account {account!r} is already being synced by another process ({path})"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
