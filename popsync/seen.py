"""The SQLite seen-store: which UIDLs each mailbox has pending or delivered, and its last run.

One file, ``state_dir/popsync.sqlite3``, mode 0600 in a 0700 directory. WAL journal with
``synchronous=FULL`` so a committed transaction survives power loss; every mutating method is
ONE ``BEGIN IMMEDIATE`` transaction over a whole batch (group commit, see `popsync.maildir`).

Threads: the daemon runs account jobs in a thread pool. A `SeenStore` holds ONE write
connection (``check_same_thread=False``) guarded by an internal `threading.RLock` held for each
whole transaction. SQLite admits one writer at a time anyway and our transactions are short
batches, so per-thread write connections would buy no write concurrency; they would add
SQLITE_BUSY waits between our own threads. Reads do not take that lock: they borrow a read-only
connection from a small pool (at most `MAX_IDLE_READERS` kept open, 1 MiB of cache each), so a
listing never waits for another run's commit and its fsync; WAL gives each read a committed
snapshot. Run records (`SeenStore.record_run`) commit with ``synchronous=NORMAL``: no fsync of
their own (the next durable commit syncs them along), because losing the last runs' summary on
power loss costs nothing, while one fsync per run was the daemon's limit at thousands of
accounts. Other processes (``popsync status``, a manual ``--once``) share the file through WAL
and ``busy_timeout``.

Rows are keyed by *mailbox* (`popsync.config.Account.mailbox`: ``username@host``), not by the
account's label in the config: renaming an account changes nothing here, and two configs naming
one mailbox share its rows and its lock. Schema version 1 keyed rows by label; migration 2 keeps
them under ``label:<name>`` (a label can contain neither ``:`` nor ``@``) until
`SeenStore.adopt_labels` moves them to their mailbox, which only the config can name.

A row's state is *pending* (in ``tmp/``, see `popsync.sync`), *delivered*, *too_large* (never
downloaded: bigger than the account's ``max_message_size``; ``size`` is its LIST size or, when
RETR outgrew LIST, at least that many octets) or *rejected* (a delivery target refused it for good;
``name`` holds the reason). ``vanished_at``/``absent_runs`` record since when and for how many
consecutive complete listings a UIDL has been missing from the server; `popsync.plan` forgets a
row only when both are large enough.

Schema: ``PRAGMA user_version`` is the schema version; `MIGRATIONS[i]` upgrades version ``i`` to
``i + 1`` inside one transaction. A file written by a newer popsync is refused (`SchemaTooNew`)
rather than guessed at.

Per-mailbox locks (`SeenStore.lock`) are ``flock`` on ``state_dir/locks/<mailbox>.lock``
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeAlias, cast
from urllib.parse import quote

from popsync.errors import LocalIOError, LockBusy

__all__ = [
    "DB_FILENAME",
    "FRESH_SCHEMA",
    "FRESH_VERSION",
    "LEGACY_PREFIX",
    "MAX_IDLE_READERS",
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
SeenState = Literal["pending", "delivered", "too_large", "rejected"]
#: Version-1 rows (keyed by account label) live under this prefix until adopt_labels() runs.
LEGACY_PREFIX = "label:"

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
#: Mailbox keys, *too_large*, and the vanish bookkeeping (see the module docstring).
MIGRATIONS += (
    (
        # v3: key by mailbox (labels kept as "label:<name>" until adopted), more states,
        # vanish bookkeeping. SQLite cannot alter a CHECK constraint, so both tables are rebuilt.
        """CREATE TABLE seen_v3 (
            mailbox TEXT NOT NULL,
            uidl BLOB NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'delivered', 'too_large', 'rejected')),
            name TEXT NOT NULL,
            size INTEGER,
            first_seen REAL NOT NULL,
            delivered_at REAL,
            deleted_at REAL,
            vanished_at REAL,
            absent_runs INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (mailbox, uidl)
        ) WITHOUT ROWID""",
        """INSERT INTO seen_v3 (mailbox, uidl, state, name, size, first_seen, delivered_at,
            deleted_at) SELECT 'label:' || account, uidl, state, name, size, first_seen,
            delivered_at, deleted_at FROM seen""",
        "DROP TABLE seen",
        "ALTER TABLE seen_v3 RENAME TO seen",
        """CREATE TABLE runs_v3 (
            mailbox TEXT PRIMARY KEY,
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
        """INSERT INTO runs_v3 SELECT 'label:' || account, started, finished, outcome, fetched,
            skipped, deleted, bytes, messages_on_server, error, consecutive_failures FROM runs""",
        "DROP TABLE runs",
        "ALTER TABLE runs_v3 RENAME TO runs",
    ),
)
#: v4: the digest of a mailbox's last settled listing (`SeenStore.listing_digest`). Any change to
#: the mailbox's seen rows, by any program or popsync version that writes this file, drops it
#: in the same transaction (the triggers), so a stale digest can never skip a needed plan.
MIGRATIONS += (
    (
        """CREATE TABLE listings (
            mailbox TEXT PRIMARY KEY,
            digest BLOB NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TRIGGER seen_insert_unsettles AFTER INSERT ON seen BEGIN
            DELETE FROM listings WHERE mailbox = NEW.mailbox; END""",
        """CREATE TRIGGER seen_update_unsettles AFTER UPDATE ON seen BEGIN
            DELETE FROM listings WHERE mailbox IN (OLD.mailbox, NEW.mailbox); END""",
        """CREATE TRIGGER seen_delete_unsettles AFTER DELETE ON seen BEGIN
            DELETE FROM listings WHERE mailbox = OLD.mailbox; END""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
#: A new file starts at this version with these tables (version 3's, created directly: replaying
#: versions 1-2 and their rebuilds would cost pages a nearly full disk may not have); later
#: migrations then apply as to any file.
FRESH_VERSION = 3
FRESH_SCHEMA = tuple(
    statement.replace("_v3 (", " (", 1)
    for statement in MIGRATIONS[2]
    if statement.startswith("CREATE TABLE")
)

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
    """One (mailbox, UIDL) row."""

    uidl: bytes
    state: SeenState
    name: str
    size: int | None
    first_seen: float
    delivered_at: float | None
    deleted_at: float | None
    vanished_at: float | None = None
    absent_runs: int = 0


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


def _lock_filename(mailbox: str) -> str:
    """A safe file name for any mailbox key (no '/', bounded length)."""
    safe = quote(mailbox, safe="@+")
    if len(safe) > 200:
        safe = safe[:100] + "-" + hashlib.sha256(mailbox.encode()).hexdigest()
    return f"{safe}.lock"


def _secure_file(path: Path) -> None:
    """Create `path` 0600 if missing and tighten it if present (SQLite copies its mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


_TABLES = ("seen", "runs")
_SELECT_ENTRIES = (
    "SELECT uidl, state, name, size, first_seen, delivered_at, deleted_at, vanished_at,"
    " absent_runs FROM seen WHERE mailbox = ?"
)
_SELECT_PENDING = _SELECT_ENTRIES + " AND state = 'pending'"
#: The planner's compact bulk: plain delivered rows (kept, listed, not vanished). Every other
#: row (pending, too_large, deleted or vanished) is read whole by other_rows().
_DELIVERED = (
    "state = 'delivered' AND delivered_at IS NOT NULL AND deleted_at IS NULL"
    " AND vanished_at IS NULL"
)
_SELECT_DELIVERED = f"SELECT uidl, delivered_at FROM seen WHERE mailbox = ? AND {_DELIVERED}"  # noqa: S608
_SELECT_OTHERS = f"{_SELECT_ENTRIES} AND NOT ({_DELIVERED})"
#: One seen row as SQLite returns it, in `SeenEntry` field order.
EntryRow: TypeAlias = tuple[
    bytes, SeenState, str, int | None, float, float | None, float | None, float | None, int
]


#: Idle read connections kept open; a burst of more readers opens (and then closes) extra ones.
MAX_IDLE_READERS = 16
#: Page cache of one read connection, KiB (each connection has its own cache).
_READER_CACHE_KIB = 1024


class SeenStore:
    """Seen UIDLs per account; open with `SeenStore.open(path)`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.lock_dir = path.parent / "locks"
        self._conn = conn
        self._lock = threading.RLock()
        self._readers: list[sqlite3.Connection] = []  # idle read connections
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

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
        if version == 0:
            for statement in FRESH_SCHEMA:
                conn.execute(statement)
            version = FRESH_VERSION
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) != target:
            conn.execute(f"PRAGMA user_version = {target}")

    @property
    def state_dir(self) -> Path:
        """The directory of the database file (spools, OAuth2 tokens and lock files live here)."""
        return self.path.parent

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _tx(self, action: str, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialized across our threads, mapped errors.

        ``durable=False`` commits without an fsync of its own (see the module docstring).
        """
        with self._lock:
            try:
                if not durable:
                    self._conn.execute("PRAGMA synchronous = NORMAL")
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._durable_again(durable)
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
            finally:
                self._durable_again(durable)

    def _durable_again(self, durable: bool) -> None:
        if not durable:
            self._conn.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _reader(self, action: str) -> Iterator[sqlite3.Connection]:
        """Borrow a read-only connection (opened on first need); errors mapped."""
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        try:
            if conn is None:
                conn = sqlite3.connect(
                    self.path,
                    timeout=_BUSY_TIMEOUT_MS / 1000,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.execute("PRAGMA query_only = 1")
                conn.execute(f"PRAGMA cache_size = -{_READER_CACHE_KIB}")
                with self._readers_lock:
                    self._all_readers.append(conn)
            yield conn
        except sqlite3.Error as exc:
            _raise_sqlite(exc, action)
        finally:
            if conn is not None:
                if conn.in_transaction:  # a stream abandoned half-way
                    conn.execute("ROLLBACK")
                self._give_back(conn)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        """Keep a read connection for the next read, or close it beyond MAX_IDLE_READERS."""
        with self._readers_lock:
            keep = len(self._readers) < MAX_IDLE_READERS
            if keep:
                self._readers.append(conn)
            else:
                self._all_readers.remove(conn)
        if not keep:
            conn.close()

    def _query(
        self, action: str, sql: str, args: Sequence[object] = ()
    ) -> list[tuple[object, ...]]:
        """A read in autocommit mode (a single statement is its own snapshot)."""
        with self._reader(action) as conn:
            return cast("list[_Row]", conn.execute(sql, args).fetchall())

    # --- seen rows ----------------------------------------------------------------------------

    def entries(self, mailbox: str) -> dict[bytes, SeenEntry]:
        """Every row of one mailbox, keyed by UIDL."""
        return self._entries(_SELECT_ENTRIES, mailbox)

    def has_rows(self, mailbox: str) -> bool:
        """Whether the mailbox has any row (without reading them all)."""
        sql = "SELECT 1 FROM seen WHERE mailbox = ? LIMIT 1"
        return bool(self._query("read entries", sql, (mailbox,)))

    def count(self, mailbox: str) -> int:
        """How many rows the mailbox has (without reading them)."""
        rows = self._query(
            "count entries", "SELECT count(*) FROM seen WHERE mailbox = ?", (mailbox,)
        )
        return int(cast("int", rows[0][0]))

    def delivered_times(self, mailbox: str) -> Iterator[tuple[bytes, float]]:
        """``(uidl, delivered_at)`` of every plain delivered row, streamed (the planner's bulk).

        Plain: not deleted and not vanished, so these fields need no storing. With
        `other_rows` this is every row of the mailbox, read for the planner's diff at a
        million rows without a list of rows or an entry object per row. Both hold the
        store's lock until exhausted or closed: consume them promptly, in the calling thread.
        """
        return self._stream(_SELECT_DELIVERED, mailbox)

    def other_rows(self, mailbox: str) -> Iterator[EntryRow]:
        """Every row not returned by `delivered_times`, as a tuple in `SeenEntry` order."""
        return self._stream(_SELECT_OTHERS, mailbox)

    def _stream(self, sql: str, mailbox: str, batch: int = 4096) -> Iterator[Any]:
        with self._reader("read entries") as conn:
            cursor = conn.execute(sql, (mailbox,))
            try:
                while rows := cursor.fetchmany(batch):
                    yield from rows
            finally:
                cursor.close()

    def pending(self, mailbox: str) -> dict[bytes, SeenEntry]:
        """The pending rows of one mailbox (what recovery looks at), keyed by UIDL."""
        return self._entries(_SELECT_PENDING, mailbox)

    def _entries(self, sql: str, mailbox: str) -> dict[bytes, SeenEntry]:
        rows = cast("list[EntryRow]", self._query("read entries", sql, (mailbox,)))
        # Positional construction: this runs once per message on every poll.
        return {bytes(row[0]): SeenEntry(bytes(row[0]), *row[1:]) for row in rows}

    def mailboxes(self) -> list[str]:
        """Every mailbox key with rows or a recorded run, sorted."""
        rows = self._query(
            "list mailboxes", "SELECT mailbox FROM seen UNION SELECT mailbox FROM runs ORDER BY 1"
        )
        return [cast("str", row[0]) for row in rows]

    def add_pending(
        self,
        mailbox: str,
        items: Sequence[tuple[bytes, str, int]],
        *,
        at: float | None = None,
    ) -> None:
        """Record (uidl, tmp name, size) as pending; a pending or too_large row is updated.

        Raises ValueError (and records nothing) if any UIDL is already delivered: re-fetching
        a delivered message would deliver it twice.
        """
        now = time.time() if at is None else at
        with self._tx("record pending messages") as conn:
            cur = conn.executemany(
                "INSERT INTO seen (mailbox, uidl, state, name, size, first_seen)"
                " VALUES (?, ?, 'pending', ?, ?, ?)"
                " ON CONFLICT (mailbox, uidl) DO UPDATE"
                " SET state = 'pending', name = excluded.name, size = excluded.size,"
                " vanished_at = NULL, absent_runs = 0"
                " WHERE state IN ('pending', 'too_large')",
                [(mailbox, bytes(u), name, size, now) for u, name, size in items],
            )
            if cur.rowcount != len(items):
                raise ValueError("add_pending: some UIDLs are already delivered")

    def mark_delivered(self, mailbox: str, items: Sequence[tuple[bytes, str]], at: float) -> None:
        """Mark (uidl, final name) delivered; inserts rows that are missing (never re-fetch)."""
        with self._tx("mark messages delivered") as conn:
            conn.executemany(
                "INSERT INTO seen (mailbox, uidl, state, name, first_seen, delivered_at)"
                " VALUES (?, ?, 'delivered', ?, ?, ?)"
                " ON CONFLICT (mailbox, uidl) DO UPDATE SET"
                " name = excluded.name,"
                " delivered_at = CASE WHEN state = 'delivered' THEN delivered_at"
                " ELSE excluded.delivered_at END,"
                " state = 'delivered'",
                [(mailbox, bytes(u), name, at, at) for u, name in items],
            )

    def mark_rejected(self, mailbox: str, items: Sequence[tuple[bytes, str]], at: float) -> None:
        """Record (uidl, reason) as rejected: never fetched again, never DELEd."""
        with self._tx("mark messages rejected") as conn:
            conn.executemany(
                "INSERT INTO seen (mailbox, uidl, state, name, first_seen)"
                " VALUES (?, ?, 'rejected', ?, ?)"
                " ON CONFLICT (mailbox, uidl) DO UPDATE SET"
                " name = excluded.name, state = 'rejected' WHERE state = 'pending'",
                [(mailbox, bytes(u), reason, at) for u, reason in items],
            )

    def mark_too_large(self, mailbox: str, items: Sequence[tuple[bytes, int]], at: float) -> int:
        """Record (uidl, size) as too large to fetch; pending or delivered rows are kept.

        Returns how many rows were inserted or changed.
        """
        with self._tx("record too large messages") as conn:
            cur = conn.executemany(
                "INSERT INTO seen (mailbox, uidl, state, name, size, first_seen)"
                " VALUES (?, ?, 'too_large', '', ?, ?)"
                " ON CONFLICT (mailbox, uidl) DO UPDATE SET size = excluded.size"
                " WHERE state = 'too_large' AND size IS NOT excluded.size",
                [(mailbox, bytes(u), size, at) for u, size in items],
            )
            return max(cur.rowcount, 0)

    def note_absent(self, mailbox: str, uidls: Iterable[bytes], at: float) -> int:
        """One more complete listing without these UIDLs: set vanished_at once, count up."""
        with self._tx("record vanished UIDLs") as conn:
            cur = conn.executemany(
                "UPDATE seen SET vanished_at = COALESCE(vanished_at, ?),"
                " absent_runs = absent_runs + 1 WHERE mailbox = ? AND uidl = ?",
                [(at, mailbox, bytes(u)) for u in uidls],
            )
            return max(cur.rowcount, 0)

    def note_present(self, mailbox: str, uidls: Iterable[bytes]) -> int:
        """These vanished UIDLs are listed again: clear their absence (they stay as they were)."""
        with self._tx("record reappeared UIDLs") as conn:
            cur = conn.executemany(
                "UPDATE seen SET vanished_at = NULL, absent_runs = 0"
                " WHERE mailbox = ? AND uidl = ?",
                [(mailbox, bytes(u)) for u in uidls],
            )
            return max(cur.rowcount, 0)

    def _delete_rows(self, mailbox: str, uidls: Iterable[bytes], extra: str, action: str) -> int:
        """DELETE rows by UIDL with an extra condition; returns the count."""
        with self._tx(action) as conn:
            cur = conn.executemany(
                f"DELETE FROM seen WHERE mailbox = ? AND uidl = ?{extra}",  # noqa: S608
                [(mailbox, bytes(u)) for u in uidls],
            )
            return max(cur.rowcount, 0)

    def remove(self, mailbox: str, uidls: Iterable[bytes]) -> int:
        """Drop PENDING rows (their file vanished) so they are fetched again; delivered stay."""
        return self._delete_rows(mailbox, uidls, " AND state = 'pending'", "remove pending rows")

    def forget(self, mailbox: str, uidls: Iterable[bytes]) -> int:
        """Drop rows of UIDLs the server no longer lists (the planner decides when)."""
        return self._delete_rows(mailbox, uidls, "", "forget UIDLs")

    def mark_deleted(self, mailbox: str, uidls: Iterable[bytes], at: float) -> int:
        """Note that DELE was sent and QUIT accepted (delivered rows only)."""
        with self._tx("mark messages deleted") as conn:
            cur = conn.executemany(
                "UPDATE seen SET deleted_at = ?"
                " WHERE mailbox = ? AND uidl = ? AND state = 'delivered'",
                [(at, mailbox, bytes(u)) for u in uidls],
            )
            return max(cur.rowcount, 0)

    def adopt_labels(self, mailboxes: Mapping[str, str]) -> int:
        """Move version-1 rows of account label -> mailbox key; return how many rows moved.

        Rows already kept under the mailbox win over legacy ones (they are newer). Cheap when
        there is nothing left to adopt, so callers run it on every open.
        """
        legacy = (LEGACY_PREFIX, LEGACY_PREFIX[:-1] + chr(ord(LEGACY_PREFIX[-1]) + 1))
        probe = "SELECT 1 FROM {} WHERE mailbox >= ? AND mailbox < ? LIMIT 1"
        if not any(self._query("find legacy rows", probe.format(t), legacy) for t in _TABLES):
            return 0
        moved = 0
        with self._tx("adopt rows of renamed accounts") as conn:
            for label, mailbox in mailboxes.items():
                old = LEGACY_PREFIX + label
                for table in _TABLES:
                    cur = conn.execute(
                        f"UPDATE OR IGNORE {table} SET mailbox = ? WHERE mailbox = ?",  # noqa: S608
                        (mailbox, old),
                    )
                    moved += max(cur.rowcount, 0)
                    conn.execute(f"DELETE FROM {table} WHERE mailbox = ?", (old,))  # noqa: S608
        return moved

    # --- settled listings ---------------------------------------------------------------------

    def listing_digest(self, mailbox: str) -> bytes | None:
        """The digest `set_listing_digest` stored, unless a seen row changed since."""
        rows = self._query(
            "read the listing digest", "SELECT digest FROM listings WHERE mailbox = ?", (mailbox,)
        )
        return bytes(cast("bytes", rows[0][0])) if rows else None

    def set_listing_digest(self, mailbox: str, digest: bytes) -> None:
        """Remember that planning a listing with this digest again would find nothing to do.

        Not durable on its own (like a run record): losing it costs one full plan.
        """
        with self._tx("record the listing digest", durable=False) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO listings (mailbox, digest) VALUES (?, ?)",
                (mailbox, digest),
            )

    # --- runs ---------------------------------------------------------------------------------

    def record_run(self, mailbox: str, record: RunRecord) -> RunRecord:
        """Store the mailbox's latest run; returns it with consecutive_failures updated."""
        with self._tx("record a run", durable=False) as conn:
            row = conn.execute(
                "SELECT consecutive_failures FROM runs WHERE mailbox = ?", (mailbox,)
            ).fetchone()
            failures = 0 if record.ok else (int(row[0]) if row else 0) + 1
            conn.execute(
                "INSERT OR REPLACE INTO runs (mailbox, started, finished, outcome, fetched,"
                " skipped, deleted, bytes, messages_on_server, error, consecutive_failures)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    mailbox,
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
        """The latest run of every mailbox that has run, keyed by mailbox."""
        rows = self._query(
            "read runs",
            "SELECT mailbox, started, finished, outcome, fetched, skipped, deleted, bytes,"
            " messages_on_server, error, consecutive_failures FROM runs ORDER BY mailbox",
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

    def lock(self, mailbox: str, label: str | None = None) -> AbstractContextManager[None]:
        """Exclusive, non-blocking per-mailbox lock across processes and threads.

        ``label`` (the account's name) is only used in the LockBusy message.
        """
        return self._account_lock(mailbox, label or mailbox)

    @contextmanager
    def _account_lock(self, mailbox: str, account: str) -> Iterator[None]:
        """flock the mailbox's lock file; LockBusy if another run holds it."""
        path = self.lock_dir / _lock_filename(mailbox)
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
            pid = f"{os.getpid()}\n".encode()
            if os.pread(fd, 32, 0) != pid:  # a daemon's next runs find it written already
                os.ftruncate(fd, 0)
                os.pwrite(fd, pid, 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def close(self) -> None:
        """Close the connections (the last one checkpoints the WAL)."""
        with self._readers_lock:
            readers, self._all_readers, self._readers = self._all_readers, [], []
        for conn in readers:
            conn.close()
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
