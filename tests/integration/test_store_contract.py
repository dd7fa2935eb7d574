"""The seen-store contract, run against both stores: SQLite (SeenStore) and PostgreSQL (PgStore).

Every test here gets each store in turn through the ``store`` fixture; store-specific
behaviour (files and pragmas, leases and fencing) is tested in tests/unit/test_seen.py and
tests/integration/test_pgstore.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from popsync.errors import LockBusy
from popsync.seen import RunRecord, SeenEntry, SeenStore
from popsync.store import Store

ODD_UIDL = b"a/b\x00\xff:..,"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An open, empty store of each kind (PostgreSQL: a fresh schema on the session cluster)."""
    opened: Store
    if request.param == "sqlite":
        opened = SeenStore.open(tmp_path / "state" / "popsync.sqlite3")
    else:
        from popsync.pgstore import PgStore

        server = request.getfixturevalue("postgres")
        opened = PgStore.open(server.new_schema("contract"), state_dir=tmp_path / "state")
    with opened:
        yield opened


def test_too_large_rows(store: Store) -> None:
    """too_large rows keep their size, never replace a delivered row, and may become pending."""
    store.mark_delivered("a", [(b"d", "f")], at=1.0)
    assert store.mark_too_large("a", [(b"big", 5000), (b"d", 5000)], at=2.0) == 1
    entries = store.entries("a")
    assert (entries[b"big"].state, entries[b"big"].size, entries[b"big"].name) == (
        "too_large",
        5000,
        "",
    )
    assert entries[b"d"].state == "delivered"
    assert store.mark_too_large("a", [(b"big", 5000)], at=3.0) == 0  # unchanged
    assert store.mark_too_large("a", [(b"big", 7000)], at=3.0) == 1
    store.add_pending("a", [(b"big", "tmpname", 7000)])  # the limit was raised
    assert store.entries("a")[b"big"].state == "pending"


def test_absence_is_counted_and_cleared(store: Store) -> None:
    """note_absent keeps the first vanish time and counts listings; note_present resets both."""
    store.mark_delivered("a", [(b"u", "f")], at=1.0)
    store.note_absent("a", [b"u"], at=10.0)
    store.note_absent("a", [b"u"], at=20.0)
    entry = store.entries("a")[b"u"]
    assert (entry.vanished_at, entry.absent_runs, entry.state) == (10.0, 2, "delivered")
    assert store.note_present("a", [b"u"]) == 1
    entry = store.entries("a")[b"u"]
    assert (entry.vanished_at, entry.absent_runs) == (None, 0)


def test_pending_then_delivered_lifecycle(store: Store) -> None:
    """add_pending then mark_delivered then mark_deleted fill in one row."""
    store.add_pending("acct", [(ODD_UIDL, "tmp1", 123), (b"two", "tmp2", 4)], at=100.0)
    assert store.entries("acct")[ODD_UIDL] == SeenEntry(
        ODD_UIDL, "pending", "tmp1", 123, 100.0, None, None
    )
    store.mark_delivered("acct", [(ODD_UIDL, "tmp1,S=123")], at=200.0)
    store.mark_deleted("acct", [ODD_UIDL, b"two"], at=300.0)
    entries = store.entries("acct")
    assert entries[ODD_UIDL] == SeenEntry(
        ODD_UIDL, "delivered", "tmp1,S=123", 123, 100.0, 200.0, 300.0
    )
    assert entries[b"two"].deleted_at is None  # pending rows are never marked deleted


def test_accounts_are_isolated(store: Store) -> None:
    """The same UIDL in two accounts is two rows."""
    store.add_pending("a", [(b"u", "na", 1)])
    store.add_pending("b", [(b"u", "nb", 2)])
    store.forget("a", [b"u"])
    assert store.entries("a") == {}
    assert store.entries("b")[b"u"].name == "nb"


def test_add_pending_refuses_delivered_atomically(store: Store) -> None:
    """A batch touching a delivered UIDL is rejected whole, so nothing is delivered twice."""
    store.mark_delivered("a", [(b"done", "final")], at=1.0)
    with pytest.raises(ValueError, match="already delivered"):
        store.add_pending("a", [(b"new", "n", 1), (b"done", "again", 1)])
    entries = store.entries("a")
    assert set(entries) == {b"done"}
    assert entries[b"done"].name == "final"


def test_add_pending_updates_a_pending_row(store: Store) -> None:
    """Re-adding a pending UIDL replaces its name and size but keeps first_seen."""
    store.add_pending("a", [(b"u", "old", 1)], at=1.0)
    store.add_pending("a", [(b"u", "new", 2)], at=2.0)
    entry = store.entries("a")[b"u"]
    assert (entry.name, entry.size, entry.first_seen) == ("new", 2, 1.0)


def test_mark_delivered_is_idempotent_and_inserts_missing(store: Store) -> None:
    """Delivering twice keeps the first delivered_at; an unknown UIDL is inserted delivered."""
    store.add_pending("a", [(b"u", "t", 1)], at=1.0)
    store.mark_delivered("a", [(b"u", "f")], at=2.0)
    store.mark_delivered("a", [(b"u", "f:2,S"), (b"x", "g")], at=3.0)
    entries = store.entries("a")
    assert (entries[b"u"].delivered_at, entries[b"u"].name) == (2.0, "f:2,S")
    assert entries[b"x"].state == "delivered"
    assert entries[b"x"].delivered_at == 3.0


def test_remove_only_drops_pending(store: Store) -> None:
    """remove() deletes pending rows and leaves delivered ones, returning the count."""
    store.add_pending("a", [(b"p", "t", 1), (b"d", "t2", 1)])
    store.mark_delivered("a", [(b"d", "f")], at=1.0)
    assert store.remove("a", [b"p", b"d", b"unknown"]) == 1
    assert set(store.entries("a")) == {b"d"}


def test_forget_drops_any_state(store: Store) -> None:
    """forget() deletes pending and delivered rows."""
    store.add_pending("a", [(b"p", "t", 1), (b"d", "t2", 1)])
    store.mark_delivered("a", [(b"d", "f")], at=1.0)
    assert store.forget("a", [b"p", b"d"]) == 2
    assert store.entries("a") == {}
    assert store.forget("a", []) == 0


def test_concurrent_threads_share_one_store(store: Store) -> None:
    """Eight threads writing batches through one store lose nothing."""

    def work(t: int) -> None:
        for b in range(20):
            items = [(f"{t}-{b}-{i}".encode(), "n", 1) for i in range(10)]
            store.add_pending(f"acct{t % 2}", items)
            store.mark_delivered(f"acct{t % 2}", [(u, "f") for u, _, _ in items], at=1.0)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = len(store.entries("acct0")) + len(store.entries("acct1"))
    assert total == 8 * 20 * 10


def test_runs_track_last_run_and_consecutive_failures(store: Store) -> None:
    """last_runs() keeps the latest run per account and counts failures until a success."""
    assert store.last_runs() == {}
    fail = RunRecord(started=1.0, finished=2.0, outcome="network", error="refused")
    assert store.record_run("a", fail).consecutive_failures == 1
    assert store.record_run("a", fail).consecutive_failures == 2
    ok = RunRecord(
        3.0, 4.0, "ok", fetched=5, skipped=1, deleted=2, bytes_fetched=999, messages_on_server=7
    )
    store.record_run("b", ok)
    runs = store.last_runs()
    assert runs["a"] == RunRecord(1.0, 2.0, "network", error="refused", consecutive_failures=2)
    assert runs["b"] == ok
    store.record_run("a", ok)
    assert store.last_runs()["a"].consecutive_failures == 0


# --- beyond the moved SQLite tests ------------------------------------------------------------


def test_rejected_rows_replace_only_pending(store: Store) -> None:
    """mark_rejected turns a pending row rejected with its reason; a delivered row stays."""
    store.add_pending("a", [(b"p", "t", 1)], at=1.0)
    store.mark_delivered("a", [(b"d", "f")], at=1.0)
    store.mark_rejected("a", [(b"p", "550 no"), (b"d", "550 no"), (b"n", "552 big")], at=2.0)
    entries = store.entries("a")
    assert (entries[b"p"].state, entries[b"p"].name) == ("rejected", "550 no")
    assert (entries[b"d"].state, entries[b"d"].name) == ("delivered", "f")
    assert (entries[b"n"].state, entries[b"n"].first_seen) == ("rejected", 2.0)


def test_planner_streams_split_every_row(store: Store) -> None:
    """delivered_times gives plain delivered rows, other_rows every other row, as tuples."""
    store.add_pending("a", [(b"p", "t", 5)], at=1.0)
    store.mark_delivered("a", [(b"d", "f"), (b"gone", "g"), (b"del", "h")], at=2.0)
    store.note_absent("a", [b"gone"], at=3.0)
    store.mark_deleted("a", [b"del"], at=4.0)
    store.mark_delivered("b", [(b"other", "f")], at=2.0)
    assert list(store.delivered_times("a")) == [(b"d", 2.0)]
    others = {row[0]: row for row in store.other_rows("a")}
    assert set(others) == {b"p", b"gone", b"del"}
    assert others[b"p"] == (b"p", "pending", "t", 5, 1.0, None, None, None, 0)
    assert others[b"gone"][7:] == (3.0, 1)
    assert SeenEntry(*others[b"del"]) == store.entries("a")[b"del"]


def test_counts_and_mailboxes(store: Store) -> None:
    """has_rows, count and mailboxes see rows and runs without reading them all."""
    assert not store.has_rows("a")
    assert store.count("a") == 0
    store.add_pending("a", [(b"1", "t", 1), (b"2", "t", 1)])
    store.record_run("z", RunRecord(1.0, 2.0, "ok"))
    assert store.has_rows("a")
    assert store.count("a") == 2
    assert store.mailboxes() == ["a", "z"]
    assert set(store.pending("a")) == {b"1", b"2"}


def test_streams_many_rows(store: Store) -> None:
    """25,000 delivered rows (more than one bulk chunk and one streamed batch) round-trip."""
    items = [(f"{i:08d}".encode(), f"n{i}") for i in range(25_000)]
    store.mark_delivered("big", items, at=7.0)
    times = dict(store.delivered_times("big"))
    assert len(times) == 25_000
    assert times[b"00024999"] == 7.0
    assert store.mark_deleted("big", [u for u, _ in items], at=8.0) == 25_000
    assert sum(1 for _ in store.other_rows("big")) == 25_000
    assert store.forget("big", [u for u, _ in items]) == 25_000
    assert store.count("big") == 0


def test_duplicate_uidls_in_one_batch(store: Store) -> None:
    """A batch naming one UIDL twice is applied (the last one wins) rather than refused."""
    store.add_pending("a", [(b"u", "first", 1), (b"u", "second", 2)], at=1.0)
    assert store.entries("a")[b"u"].name == "second"
    store.mark_delivered("a", [(b"u", "f1"), (b"u", "f2")], at=2.0)
    assert (store.entries("a")[b"u"].name, store.entries("a")[b"u"].state) == ("f2", "delivered")


def test_lock_is_exclusive_and_released(store: Store) -> None:
    """A held mailbox lock refuses a second holder (LockBusy) until it is released."""
    with store.lock("user@pop.example.test", "acct"):
        with pytest.raises(LockBusy), store.lock("user@pop.example.test", "acct"):
            pass
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                with store.lock("user@pop.example.test"):
                    pass
            except LockBusy as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1
        with store.lock("other@pop.example.test"):  # another mailbox is free
            pass
    with store.lock("user@pop.example.test"):
        pass


def test_adopt_labels_without_legacy_rows_is_a_no_op(store: Store) -> None:
    """adopt_labels on a store with only mailbox-keyed rows moves nothing."""
    store.add_pending("u@h", [(b"1", "t", 1)])
    assert store.adopt_labels({"acct": "u@h"}) == 0
    assert set(store.entries("u@h")) == {b"1"}


def test_state_dir_is_the_local_directory(store: Store, tmp_path: Path) -> None:
    """state_dir is where spools and tokens live; only SQLite has a file to claim Maildirs by."""
    assert store.state_dir == tmp_path / "state"
    assert (store.path is None) == (not isinstance(store, SeenStore))


def test_a_listing_digest_lasts_until_a_row_of_its_mailbox_changes(store: Store) -> None:
    """Every write to a mailbox's seen rows drops its digest; no other mailbox's, no run record."""
    store.mark_delivered("a", [(b"u1", "x")], at=1.0)
    writes: dict[str, Callable[[], object]] = {
        "pending": lambda: store.add_pending("a", [(b"n", "name", 1)], at=1.0),
        "delivered": lambda: store.mark_delivered("a", [(b"u2", "x")], 2.0),
        "rejected": lambda: store.mark_rejected("a", [(b"n", "refused")], 2.0),
        "too large": lambda: store.mark_too_large("a", [(b"big", 9)], 2.0),
        "absent": lambda: store.note_absent("a", [b"u1"], 2.0),
        "present": lambda: store.note_present("a", [b"u1"]),
        "deleted": lambda: store.mark_deleted("a", [b"u1"], 2.0),
        "forget": lambda: store.forget("a", [b"u2"]),
    }
    assert store.listing_digest("a") is None
    for what, write in writes.items():
        store.set_listing_digest("a", b"A" * 32)
        store.set_listing_digest("b", b"B" * 32)
        assert store.listing_digest("a") == b"A" * 32
        write()
        assert store.listing_digest("a") is None, what
        assert store.listing_digest("b") == b"B" * 32, what
    store.set_listing_digest("a", b"C" * 32)
    store.record_run("a", RunRecord(started=1.0, finished=2.0, outcome="ok"))
    assert store.listing_digest("a") == b"C" * 32
