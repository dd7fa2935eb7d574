"""The seen-store under many runs: reads beside a write, run records without their own fsync."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from popsync.seen import RunRecord, SeenStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """An open store."""
    s = SeenStore.open(tmp_path / "popsync.sqlite3")
    yield s
    s.close()


def test_a_read_does_not_wait_for_another_threads_write(store: SeenStore) -> None:
    """While one thread holds a write transaction, another reads the last committed rows."""
    store.mark_delivered("box", [(b"u1", "n1")], 1.0)
    in_tx, done = threading.Event(), threading.Event()

    def writer() -> None:
        with store._tx("test write") as conn:
            conn.execute(
                "INSERT INTO seen (mailbox, uidl, state, name, first_seen) VALUES (?, ?, ?, ?, ?)",
                ("box", b"u2", "delivered", "n2", 2.0),
            )
            in_tx.set()
            done.wait(5)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert in_tx.wait(5)
        assert set(store.entries("box")) == {b"u1"}  # not the uncommitted row, and no wait
        assert store.count("box") == 1
    finally:
        done.set()
        thread.join()
    assert set(store.entries("box")) == {b"u1", b"u2"}


def test_a_half_read_stream_gives_its_connection_back(store: SeenStore) -> None:
    """A stream closed before its end returns its read connection, which is then reused."""
    store.mark_delivered("box", [(b"u%d" % i, "n") for i in range(10)], 1.0)
    stream = store.delivered_times("box")
    next(stream)
    assert isinstance(stream, Generator)
    stream.close()
    assert len(store._readers) == 1
    assert store.count("box") == 10
    assert len(store._all_readers) == 1


def test_run_records_commit_without_their_own_sync(store: SeenStore) -> None:
    """record_run is not fsynced on its own; the connection is back to synchronous=FULL after."""
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    record = store.record_run("box", RunRecord(started=1.0, finished=2.0, outcome="ok"))
    store._conn.set_trace_callback(None)
    assert record.consecutive_failures == 0
    assert seen[0] == "PRAGMA synchronous = NORMAL"
    assert seen[-1] == "PRAGMA synchronous = FULL"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.last_runs()["box"].outcome == "ok"


def test_close_closes_the_read_connections(store: SeenStore) -> None:
    """After close, no read connection is left open."""
    store.count("box")
    readers = list(store._all_readers)
    store.close()
    assert readers
    for conn in readers:
        with pytest.raises(Exception, match="closed"):
            conn.execute("SELECT 1")


def test_the_lock_file_is_written_only_when_its_pid_differs(store: SeenStore) -> None:
    """The PID is written on the first lock; later locks by the same process write nothing."""
    with store.lock("box@host"):
        pass
    (path,) = store.lock_dir.iterdir()
    assert path.read_text() == f"{os.getpid()}\n"
    before = path.stat().st_mtime_ns
    time.sleep(0.02)
    with store.lock("box@host"):
        pass
    assert path.stat().st_mtime_ns == before
    path.write_text("999999999\n")  # left by another process
    with store.lock("box@host"):
        pass
    assert path.read_text() == f"{os.getpid()}\n"


def test_idle_read_connections_are_bounded(
    store: SeenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More readers at once than MAX_IDLE_READERS open extra connections, closed on return."""
    monkeypatch.setattr("popsync.seen.MAX_IDLE_READERS", 2)
    store.mark_delivered("box", [(b"u1", "n1")], 1.0)
    streams = [store.delivered_times("box") for _ in range(4)]
    for stream in streams:
        assert next(stream)[0] == b"u1"  # four connections open together
    assert len(store._all_readers) == 4
    for stream in streams:
        assert isinstance(stream, Generator)
        stream.close()
    assert len(store._readers) == 2
    assert len(store._all_readers) == 2
