"""Tests for the SQLite seen-store (the shared contract: test_store_contract.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

import popsync.seen
from popsync.errors import ExitCode, LockBusy
from popsync.seen import (
    MIGRATIONS,
    SCHEMA_VERSION,
    RunRecord,
    SchemaTooNew,
    SeenStore,
    SeenStoreError,
)

CTX = multiprocessing.get_context("fork")
ODD_UIDL = b"a/b\x00\xff:..,"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the store lives, in a state directory that does not exist yet."""
    return tmp_path / "state" / "popsync.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SeenStore]:
    """An open store."""
    s = SeenStore.open(db_path)
    yield s
    s.close()


def mode(path: Path) -> int:
    """Permission bits of a path."""
    return stat.S_IMODE(path.stat().st_mode)


# --- files, pragmas, schema -------------------------------------------------------------------


def test_creates_private_files(store: SeenStore, db_path: Path) -> None:
    """The state dir is 0700; the database and its WAL side files are 0600."""
    store.add_pending("a", [(b"u", "n", 1)])
    assert mode(db_path.parent) == 0o700
    assert mode(db_path) == 0o600
    for suffix in ("-wal", "-shm"):
        side = db_path.with_name(db_path.name + suffix)
        assert side.exists()
        assert mode(side) == 0o600


def test_tightens_an_existing_world_readable_file(db_path: Path) -> None:
    """A pre-existing 0644 database is made 0600 on open."""
    db_path.parent.mkdir()
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    SeenStore.open(db_path).close()
    assert mode(db_path) == 0o600


def test_pragmas(store: SeenStore, db_path: Path) -> None:
    """WAL, synchronous=FULL and a busy timeout are set."""
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_schema_version_and_reopen_keeps_data(db_path: Path) -> None:
    """A new file gets the current schema version; data survives a reopen."""
    with SeenStore.open(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION >= 1
        s.add_pending("a", [(b"u1", "tmpname", 10)], at=5.0)
    with SeenStore.open(db_path) as s:
        assert s.entries("a")[b"u1"].name == "tmpname"


def test_newer_schema_is_refused(db_path: Path) -> None:
    """A database from a newer popsync raises SchemaTooNew (a local I/O error)."""
    SeenStore.open(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}") as info:
        SeenStore.open(db_path)
    assert info.value.exit_code == ExitCode.LOCAL_IO
    with sqlite3.connect(db_path) as raw:  # and it was left alone
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_migrations_run_in_order(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening an older file applies only the missing migration steps."""
    with SeenStore.open(db_path) as s:
        s.add_pending("a", [(b"u", "n", 1)])
    step = ("ALTER TABLE seen ADD COLUMN note TEXT", "UPDATE seen SET note = 'migrated'")
    monkeypatch.setattr(popsync.seen, "MIGRATIONS", (*popsync.seen.MIGRATIONS, step))
    with SeenStore.open(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION + 1
        assert s._conn.execute("SELECT note FROM seen").fetchall() == [("migrated",)]
    with SeenStore.open(db_path) as s:  # not applied twice
        assert s.schema_version == SCHEMA_VERSION + 1


def _v1_store(db_path: Path) -> None:
    """Write a schema-version-1 file as popsync 0.1 did: rows keyed by account label."""
    db_path.parent.mkdir(mode=0o700, exist_ok=True)
    with sqlite3.connect(db_path) as raw:
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        raw.executemany(
            "INSERT INTO seen (account, uidl, state, name, size, first_seen, delivered_at)"
            " VALUES (?, ?, 'delivered', ?, 10, 1.0, 2.0)",
            [("work", b"u1", "n1"), ("work", b"u2", "n2"), ("home", b"h1", "n3")],
        )
        raw.execute("INSERT INTO runs VALUES ('work', 1.0, 2.0, 'ok', 2, 0, 0, 20, 2, NULL, 0)")
    raw.close()


def test_v1_store_migrates_and_rows_are_adopted_by_mailbox(db_path: Path) -> None:
    """A version-1 file keeps every row (as label:NAME) until adopt_labels moves it."""
    _v1_store(db_path)
    with SeenStore.open(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        assert set(s.entries("label:work")) == {b"u1", b"u2"}
        moved = s.adopt_labels({"work": "me@pop.example.com", "new": "x@y"})
        assert moved == 3  # two seen rows and the run
        entries = s.entries("me@pop.example.com")
        assert {u: e.state for u, e in entries.items()} == {b"u1": "delivered", b"u2": "delivered"}
        assert entries[b"u1"].delivered_at == 2.0
        assert s.last_runs()["me@pop.example.com"].fetched == 2
        assert s.entries("label:work") == {}
        # An account no longer configured keeps its legacy rows for a later config.
        assert set(s.entries("label:home")) == {b"h1"}
        assert s.adopt_labels({"work": "me@pop.example.com"}) == 0


def _columns(db: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(db) as raw:
        tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        info = {t: raw.execute(f"PRAGMA table_info({t})").fetchall() for t in sorted(tables)}
    raw.close()
    return info


def test_a_new_file_has_exactly_the_migrated_schema(tmp_path: Path) -> None:
    """Creating version 2 directly gives the same tables as migrating a version-1 file."""
    fresh, old = tmp_path / "fresh" / "s.sqlite3", tmp_path / "old" / "s.sqlite3"
    SeenStore.open(fresh).close()
    _v1_store(old)
    SeenStore.open(old).close()
    assert _columns(fresh) == _columns(old)
    assert set(_columns(fresh)) == {"seen", "runs", "listings"}
    assert _triggers(fresh) == _triggers(old) == 3


def _triggers(db: Path) -> int:
    with sqlite3.connect(db) as raw:
        found = raw.execute("SELECT count(*) FROM sqlite_master WHERE type='trigger'").fetchone()
    raw.close()
    return int(found[0])


def test_a_listing_digest_lasts_until_a_seen_row_of_its_mailbox_changes(db_path: Path) -> None:
    """Every kind of write to a mailbox's rows drops its digest; other mailboxes keep theirs."""
    writes: dict[str, Callable[[SeenStore], object]] = {
        "pending": lambda s: s.add_pending("a@h", [(b"n", "name", 1)], at=1.0),
        "delivered": lambda s: s.mark_delivered("a@h", [(b"u1", "x")], 2.0),
        "too large": lambda s: s.mark_too_large("a@h", [(b"big", 9)], 2.0),
        "absent": lambda s: s.note_absent("a@h", [b"u1"], 2.0),
        "forget": lambda s: s.forget("a@h", [b"u1"]),
        "deleted": lambda s: s.mark_deleted("a@h", [b"u1"], 2.0),
    }
    with SeenStore.open(db_path) as s:
        s.mark_delivered("a@h", [(b"u1", "x")], 1.0)
        for what, write in writes.items():
            s.set_listing_digest("a@h", b"A")
            s.set_listing_digest("b@h", b"B")
            assert s.listing_digest("a@h") == b"A"
            write(s)
            assert s.listing_digest("a@h") is None, what
            assert s.listing_digest("b@h") == b"B", what
            s.mark_delivered("a@h", [(b"u1", "x")], 1.0)  # u1 back for the next write
        s.set_listing_digest("a@h", b"A")
        s.record_run("a@h", RunRecord(started=1.0, finished=2.0, outcome="ok"))
        assert s.listing_digest("a@h") == b"A"  # a run record is not a seen row


def test_a_v3_file_migrates_to_the_digest_table(db_path: Path) -> None:
    """A version-3 file gets the listings table and its triggers, rows kept."""
    with SeenStore.open(db_path) as s:
        s.mark_delivered("a@h", [(b"u1", "x")], 1.0)
    with sqlite3.connect(db_path) as raw:
        raw.executescript(
            "DROP TABLE listings; DROP TRIGGER seen_insert_unsettles;"
            " DROP TRIGGER seen_update_unsettles; DROP TRIGGER seen_delete_unsettles;"
            " PRAGMA user_version = 3;"
        )
    raw.close()
    with SeenStore.open(db_path) as s:
        assert s.schema_version == 4
        assert set(s.entries("a@h")) == {b"u1"}
        s.set_listing_digest("a@h", b"A")
        s.forget("a@h", [b"u1"])
        assert s.listing_digest("a@h") is None


def test_adopting_never_overwrites_rows_of_the_mailbox(db_path: Path) -> None:
    """Rows already kept under the mailbox win over legacy rows of the same UIDL."""
    _v1_store(db_path)
    with SeenStore.open(db_path) as s:
        s.mark_too_large("me@h", [(b"u1", 99)], at=3.0)
        s.adopt_labels({"work": "me@h"})
        entries = s.entries("me@h")
        assert (entries[b"u1"].state, entries[b"u2"].state) == ("too_large", "delivered")
        assert s.mailboxes() == ["label:home", "me@h"]


def test_garbage_file_is_a_store_error(db_path: Path) -> None:
    """A file that is not SQLite raises SeenStoreError, not a raw sqlite3 error."""
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SeenStoreError):
        SeenStore.open(db_path)


def test_unusable_state_dir_is_a_store_error(tmp_path: Path) -> None:
    """A state_dir that is a regular file raises SeenStoreError."""
    (tmp_path / "state").write_text("")
    with pytest.raises(SeenStoreError):
        SeenStore.open(tmp_path / "state" / "popsync.sqlite3")


def test_busy_database_raises_lock_busy(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer blocked past busy_timeout gets LockBusy (temporary), not a crash."""
    monkeypatch.setattr(popsync.seen, "_BUSY_TIMEOUT_MS", 50)
    with SeenStore.open(db_path) as s:
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(LockBusy):
                s.add_pending("a", [(b"u", "n", 1)])
        finally:
            other.execute("ROLLBACK")
            other.close()
        s.add_pending("a", [(b"u", "n", 1)])  # the failed transaction left nothing open
        assert list(s.entries("a")) == [b"u"]


# --- seen rows --------------------------------------------------------------------------------


def test_large_batch_is_one_transaction(store: SeenStore) -> None:
    """A 5000-item batch is committed by one BEGIN/COMMIT."""
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    items = [(f"u{i}".encode(), f"n{i}", i) for i in range(5000)]
    store.add_pending("a", items)
    store.mark_delivered("a", [(u, n + ",S=1") for u, n, _ in items], at=1.0)
    store._conn.set_trace_callback(None)
    assert statements.count("BEGIN IMMEDIATE") == 2
    assert statements.count("COMMIT") == 2
    assert len(store.entries("a")) == 5000


def _write_from_child(path: Path, tag: str) -> None:
    """Child: write 50 small batches through its own store."""
    with SeenStore.open(path) as s:
        for b in range(50):
            s.add_pending("shared", [(f"{tag}{b}".encode(), "n", 1)])


def test_concurrent_processes_share_the_file(db_path: Path) -> None:
    """Three processes writing at once all succeed (WAL + busy_timeout)."""
    SeenStore.open(db_path).close()
    procs = [CTX.Process(target=_write_from_child, args=(db_path, t)) for t in "xyz"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with SeenStore.open(db_path) as s:
        assert len(s.entries("shared")) == 150


# --- locks ------------------------------------------------------------------------------------


def test_lock_is_exclusive_within_a_process(store: SeenStore, db_path: Path) -> None:
    """A held account lock refuses the same thread, another thread and another store object."""
    other_store = SeenStore.open(db_path)
    errors: list[BaseException] = []

    def try_lock() -> None:
        try:
            with store.lock("acct"):
                pass
        except LockBusy as exc:
            errors.append(exc)

    with store.lock("acct"):
        with pytest.raises(LockBusy):
            store.lock("acct").__enter__()
        with pytest.raises(LockBusy), other_store.lock("acct"):
            pass
        th = threading.Thread(target=try_lock)
        th.start()
        th.join()
        with store.lock("other-account"):  # other accounts are independent
            pass
    assert len(errors) == 1
    with other_store.lock("acct"):  # released
        pass
    other_store.close()


def test_flock_alone_excludes_threads(store: SeenStore) -> None:
    """Without the in-process registry, flock on separate descriptors still excludes."""
    path = store.lock_dir / "x.lock"
    with store._flock("x", path), pytest.raises(LockBusy), store._flock("x", path):
        pass


def _hold_lock(path: Path, ready: Connection) -> None:
    """Child: take the lock, say so, and sleep until killed."""
    with SeenStore.open(path) as s, s.lock("acct"):
        ready.send("locked")
        threading.Event().wait(60)


def test_lock_across_processes_and_release_on_kill(store: SeenStore, db_path: Path) -> None:
    """A lock held by another process raises LockBusy; kill -9 of the holder releases it."""
    parent, child = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_hold_lock, args=(db_path, child))
    proc.start()
    try:
        assert parent.poll(30)
        assert parent.recv() == "locked"
        with pytest.raises(LockBusy, match="another process"), store.lock("acct"):
            pass
        lockfile = store.lock_dir / "acct.lock"
        assert lockfile.read_text().strip() == str(proc.pid)
        assert mode(lockfile) == 0o600
        assert mode(store.lock_dir) == 0o700
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    with store.lock("acct"):
        pass


@pytest.mark.parametrize("account", ["../evil", "a/b", "..", "x" * 500, "ünïcode"])
def test_lock_files_stay_in_lock_dir(store: SeenStore, account: str) -> None:
    """Any account name maps to one file directly inside locks/."""
    with store.lock(account):
        files = list(store.lock_dir.iterdir())
    assert len(files) == 1
    assert files[0].parent == store.lock_dir
    assert len(files[0].name) < 256
