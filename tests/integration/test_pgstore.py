"""PgStore beyond the shared contract: leases as locks, fencing, renewal, lost connections."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.dovecot import _free_ports
from devtools.postgres import Postgres
from popsync.errors import ExitCode, LockBusy, NetworkError
from popsync.lease import LeaseLost, LeaseStore, Renewer, mailbox_key, mailbox_of
from popsync.pgstore import FencedStore, PgStore
from popsync.seen import RunRecord
from tests.pghelp import private_postgres

MAILBOX = "alice@pop.example.test:1995"
KEY = mailbox_key(MAILBOX)


@pytest.fixture
def dsn(postgres: Postgres) -> str:
    """A fresh, empty schema on the session's cluster."""
    return postgres.new_schema("pgstore")


@pytest.fixture
def opener(dsn: str, tmp_path: Path) -> Iterator[Callable[..., PgStore]]:
    """Opens PgStores (one per simulated worker) on the test's schema; closes them after."""
    opened: list[PgStore] = []

    def open_store(
        worker_id: str = "w1", lease_seconds: float = 30.0, renew_seconds: float = 10.0
    ) -> PgStore:
        store = PgStore.open(
            dsn,
            state_dir=tmp_path / worker_id,
            worker_id=worker_id,
            lease_seconds=lease_seconds,
            renew_seconds=renew_seconds,
        )
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def expire(dsn: str) -> None:
    """Make every lease run out now (as if its holder had stopped renewing long ago)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE accounts_lease SET expires_at = clock_timestamp() - interval '1 s'")


def seen_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM seen").fetchone()
        return int(row[0]) if row else -1


def test_mailbox_key_round_trips() -> None:
    """The lease key is split from Account.mailbox at the last '@' and joins back."""
    assert mailbox_key("a@b@pop.example.test:1995") == ("pop.example.test:1995", "a@b")
    assert mailbox_of(*mailbox_key(MAILBOX)) == MAILBOX
    with pytest.raises(ValueError, match="not a mailbox key"):
        mailbox_key("no-at-sign")


def test_lock_is_a_lease_naming_its_holder(opener: Callable[..., PgStore], dsn: str) -> None:
    """lock() claims the lease; another worker gets LockBusy naming the holder, then gets it."""
    one, two = opener("mx1:11"), opener("mx2:22")
    with one.lock(MAILBOX, "alice"):
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT holder, expires_at > now() FROM accounts_lease").fetchone()
        assert row == ("mx1:11", True)
        with (
            pytest.raises(LockBusy, match=r"being synced by worker mx1:11") as busy,
            two.lock(MAILBOX, "alice"),
        ):
            pass
        assert busy.value.exit_code == ExitCode.TEMPORARY
    with two.lock(MAILBOX):
        pass
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT holder, token FROM accounts_lease").fetchone() == (None, None)


def test_release_keeps_the_due_time(opener: Callable[..., PgStore], dsn: str) -> None:
    """A lock's release leaves next_due as the scheduler set it."""
    store = opener()
    with store.lock(MAILBOX):
        pass
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE accounts_lease SET next_due = '2030-01-01'")
    with store.lock(MAILBOX):
        pass
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT next_due = '2030-01-01' FROM accounts_lease").fetchone()
    assert row == (True,)


def test_writes_under_a_lock_that_was_taken_over_are_refused(
    opener: Callable[..., PgStore], dsn: str
) -> None:
    """Inside lock(), once the lease is taken over every write raises LeaseLost, commits nothing."""
    one, two = opener("w1"), opener("w2")
    with one.lock(MAILBOX):
        one.add_pending(MAILBOX, [(b"1", "t1", 10)], at=1.0)  # held: fine
        one.add_pending("someone@else", [(b"x", "t", 1)], at=1.0)  # not under this lock
        expire(dsn)
        with two.lock(MAILBOX):
            with pytest.raises(LeaseLost):
                one.mark_delivered(MAILBOX, [(b"1", "final")], at=2.0)
            with pytest.raises(LeaseLost):
                one.add_pending(MAILBOX, [(b"2", "t2", 10)], at=2.0)
            with pytest.raises(LeaseLost):
                one.record_run(MAILBOX, RunRecord(1.0, 2.0, "ok"))
            two.mark_delivered(MAILBOX, [(b"1", "by-two")], at=3.0)
    with pytest.raises(LeaseLost, match="run not recorded"):
        one.record_run(MAILBOX, RunRecord(1.0, 2.0, "network"))  # the run that lost it
    assert one.last_runs() == {}
    one.record_run(MAILBOX, RunRecord(4.0, 5.0, "ok"))  # refused once, not for ever
    entries = one.entries(MAILBOX)
    assert set(entries) == {b"1"}
    assert (entries[b"1"].name, entries[b"1"].delivered_at) == ("by-two", 3.0)


FENCED_WRITES: list[tuple[str, Callable[[FencedStore], object]]] = [
    ("add_pending", lambda s: s.add_pending(MAILBOX, [(b"n", "t", 1)], at=5.0)),
    ("mark_delivered", lambda s: s.mark_delivered(MAILBOX, [(b"p", "f")], 5.0)),
    ("mark_rejected", lambda s: s.mark_rejected(MAILBOX, [(b"p", "550")], 5.0)),
    ("mark_too_large", lambda s: s.mark_too_large(MAILBOX, [(b"big", 9)], 5.0)),
    ("note_absent", lambda s: s.note_absent(MAILBOX, [b"d"], 5.0)),
    ("note_present", lambda s: s.note_present(MAILBOX, [b"v"])),
    ("remove", lambda s: s.remove(MAILBOX, [b"p"])),
    ("forget", lambda s: s.forget(MAILBOX, [b"d"])),
    ("mark_deleted", lambda s: s.mark_deleted(MAILBOX, [b"d"], 5.0)),
    ("record_run", lambda s: s.record_run(MAILBOX, RunRecord(5.0, 6.0, "ok"))),
    ("adopt_labels", lambda s: s.adopt_labels({"old": MAILBOX})),
]


def test_a_fenced_view_refuses_every_write_after_takeover(
    opener: Callable[..., PgStore], dsn: str
) -> None:
    """Every mutating method of a view whose lease was taken over raises; nothing changes."""
    store = opener("w1")
    leases = store.leases
    lease = leases.claim("w1", KEY)
    view = store.fenced(lease.token)
    view.add_pending(MAILBOX, [(b"p", "t", 1), (b"v", "t", 1)], at=1.0)
    view.mark_delivered(MAILBOX, [(b"d", "f")], at=1.0)
    view.note_absent(MAILBOX, [b"v"], at=1.0)
    view.fence()  # still held
    with psycopg.connect(dsn, autocommit=True) as conn:  # a legacy row to adopt
        conn.execute("INSERT INTO runs VALUES ('label:old', 1, 2, 'ok', 0, 0, 0, 0, 0, NULL, 0)")
    before = (store.entries(MAILBOX), store.last_runs())
    expire(dsn)
    thief = leases.claim("w2", KEY)
    assert thief.generation == lease.generation + 1
    refused = []
    for name, write in FENCED_WRITES:
        try:
            write(view)
        except LeaseLost:
            refused.append(name)
    assert refused == [name for name, _ in FENCED_WRITES]
    with pytest.raises(LeaseLost):
        view.fence()
    with pytest.raises(LeaseLost), view.lock(MAILBOX):
        pass
    assert (store.entries(MAILBOX), store.last_runs()) == before


def test_a_fenced_view_lock_verifies_instead_of_claiming(opener: Callable[..., PgStore]) -> None:
    """The view's lock() passes for its own held lease and refuses another mailbox's."""
    store = opener()
    lease = store.leases.claim("w1", KEY)
    view = store.fenced(lease.token)
    with view.lock(MAILBOX):
        view.add_pending(MAILBOX, [(b"1", "t", 1)], at=1.0)
    with pytest.raises(LeaseLost), view.lock("bob@pop.example.test"):
        pass
    with pytest.raises(LeaseLost):
        store.fenced("not-a-token").fence()


def test_the_renewer_keeps_a_lock_alive_past_its_lease(opener: Callable[..., PgStore]) -> None:
    """With 1 s leases renewed every 0.2 s, a lock held for 2.5 s is never taken over."""
    one = opener("w1", lease_seconds=1.0, renew_seconds=0.2)
    two = opener("w2")
    with one.lock(MAILBOX):
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            with pytest.raises(LockBusy), two.lock(MAILBOX):
                pass
            time.sleep(0.25)
        one.add_pending(MAILBOX, [(b"1", "t", 1)], at=1.0)


def test_the_renewer_records_lost_tokens_and_never_raises(dsn: str) -> None:
    """A taken-over token moves to lost (callback called); an unreachable database is retried."""
    with LeaseStore(dsn) as leases:
        lost: list[str] = []
        renewer = Renewer(leases, interval=3600, lease_seconds=30, on_lost=lost.append)
        held = leases.claim("w1", KEY)
        other = leases.claim("w1", ("pop.example.test", "bob"))
        renewer.add(held.token)
        renewer.add(other.token)
        renewer.add("garbage")
        expire(dsn)
        leases.claim("w2", KEY)
        renewer.renew_now()
        assert renewer.lost(held.token)
        assert held.token in lost
        assert "garbage" in lost
        renewer.discard(held.token)
        assert not renewer.lost(held.token)
        renewer.stop()
    renewer.add("x")  # closed pool: renew_now must swallow the error
    renewer.renew_now()


def test_unreachable_database_is_temporary() -> None:
    """Opening a store where nothing listens is NetworkError (75) with one clean line."""
    (port,) = _free_ports(1)
    url = f"postgresql://popsync:hunter2pw@127.0.0.1:{port}/none"
    with pytest.raises(NetworkError) as info:
        PgStore.open(url, state_dir=Path("/nonexistent"), timeout=1)
    assert info.value.exit_code == ExitCode.TEMPORARY
    text = str(info.value)
    assert text.startswith("PostgreSQL unavailable: ")
    assert "\n" not in text
    assert "hunter2pw" not in text


def test_a_stopped_server_makes_calls_temporary_then_recovers(tmp_path: Path) -> None:
    """Stopping PostgreSQL makes store calls NetworkError (75); once it is back they work."""
    with private_postgres() as server:
        store = PgStore.open(server.dsn(), state_dir=tmp_path / "state", timeout=2)
        try:
            store.add_pending(MAILBOX, [(b"1", "t", 1)], at=1.0)
            server.stop()
            with pytest.raises(NetworkError) as info:
                store.mark_delivered(MAILBOX, [(b"1", "f")], at=2.0)
            assert info.value.exit_code == ExitCode.TEMPORARY
            with pytest.raises(NetworkError):
                store.entries(MAILBOX)
            server.start()
            # The pool reconnects in the background with a backoff of about the outage.
            deadline = time.monotonic() + 30
            while True:
                try:
                    store.mark_delivered(MAILBOX, [(b"1", "f")], at=2.0)
                    break
                except NetworkError:
                    assert time.monotonic() < deadline, "no reconnect within 30 s"
            assert store.entries(MAILBOX)[b"1"].state == "delivered"
        finally:
            store.close()


def test_an_abandoned_stream_leaves_the_store_usable(opener: Callable[..., PgStore]) -> None:
    """Closing a streamed read after one row of many returns a clean connection to the pool."""
    store = opener()
    store.mark_delivered(MAILBOX, [(f"{i:06d}".encode(), "f") for i in range(30_000)], at=1.0)
    for _ in range(3):
        stream = store.delivered_times(MAILBOX)
        assert next(stream)[1] == 1.0
        assert isinstance(stream, Generator)
        stream.close()
    assert store.count(MAILBOX) == 30_000
    assert sum(1 for _ in store.delivered_times(MAILBOX)) == 30_000
