"""Account leases (popsync.lease) against a real PostgreSQL cluster started by the fixtures."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from devtools.dovecot import _free_ports
from devtools.postgres import Postgres
from popsync.errors import NetworkError
from popsync.lease import (
    SCHEMA_VERSION,
    LeaseLost,
    LeaseStore,
    SchemaTooNew,
    ensure_schema,
    mailbox_of,
)

T = TypeVar("T")
SERVER = "pop.example.test:995"


@pytest.fixture
def dsn(postgres: Postgres) -> str:
    """A fresh, empty schema (as the whole search_path) on the session's cluster."""
    return postgres.new_schema("lease")


@pytest.fixture
def store(dsn: str) -> Iterator[LeaseStore]:
    """A lease store on the fresh database."""
    with LeaseStore(dsn) as opened:
        yield opened


def _together(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` in ``count`` threads released at the same moment by a barrier."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T:
        barrier.wait(timeout=30)
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_schema_creation_applies_each_migration_once(dsn: str) -> None:
    """Eight workers creating the schema at once on an empty database all succeed, once."""

    def migrate(_index: int) -> int:
        with psycopg.connect(dsn) as conn:
            return ensure_schema(conn)

    applied = _together(8, migrate)
    assert sum(applied) == SCHEMA_VERSION
    assert sorted(applied, reverse=True)[0] == SCHEMA_VERSION
    with psycopg.connect(dsn) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM popsync_schema")]
    assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))


def test_concurrent_stores_open_on_an_empty_database(dsn: str) -> None:
    """Several lease stores opened at once on an empty database all end up usable."""

    def open_and_register(index: int) -> int:
        with LeaseStore(dsn) as opened:
            return opened.register([(SERVER, f"user{index}")])

    assert _together(6, open_and_register) == [1] * 6


def test_newer_schema_is_refused(dsn: str) -> None:
    """A database migrated by a newer popsync is refused instead of being used."""
    with psycopg.connect(dsn) as conn:
        ensure_schema(conn)
        conn.execute("INSERT INTO popsync_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
        conn.commit()
        with pytest.raises(SchemaTooNew):
            ensure_schema(conn)


def test_register_adds_each_mailbox_once(store: LeaseStore) -> None:
    """Registering the same mailbox twice keeps one lease row."""
    assert store.register([(SERVER, "alice"), (SERVER, "bob")]) == 2
    assert store.register([(SERVER, "alice"), ("other:110", "alice")]) == 1


def test_concurrent_claims_never_share_an_account(dsn: str, store: LeaseStore) -> None:
    """Four workers draining 200 due accounts at once get disjoint sets covering all of them."""
    names = [f"user{i:03d}" for i in range(200)]
    store.register([(SERVER, name) for name in names])

    workers = [LeaseStore(dsn) for _ in range(4)]  # connected before the race starts

    def drain(index: int) -> list[str]:
        got: list[str] = []
        while leases := workers[index].claim_due(f"w{index}", limit=7):
            assert all(lease.holder == f"w{index}" for lease in leases)
            got.extend(lease.username for lease in leases)
        return got

    try:
        per_worker = _together(4, drain)
    finally:
        for worker in workers:
            worker.close()
    claimed = [name for got in per_worker for name in got]
    assert sorted(claimed) == names  # every account once: no duplicates, none missed


def test_held_lease_is_not_claimed_again(store: LeaseStore) -> None:
    """While a lease is held, no other worker (nor the holder) can claim the account."""
    store.register([(SERVER, "alice")])
    [lease] = store.claim_due("a", limit=10)
    assert (lease.server, lease.username, lease.generation) == (SERVER, "alice", 1)
    assert store.claim_due("b", limit=10) == []
    assert store.claim_due("a", limit=10) == []
    store.check(lease.token)


def test_expired_lease_is_taken_over_and_old_token_fenced(store: LeaseStore) -> None:
    """After expiry another worker takes the account; the old token fails check, renew, release."""
    store.register([(SERVER, "alice")])
    [old] = store.claim_due("a", limit=1, lease_seconds=0.3)
    time.sleep(0.4)
    with pytest.raises(LeaseLost):
        store.check(old.token)
    [new] = store.claim_due("b", limit=1, lease_seconds=30)
    assert new.holder == "b"
    assert new.token != old.token
    assert new.generation == old.generation + 1
    with pytest.raises(LeaseLost):
        store.check(old.token)
    with pytest.raises(LeaseLost):
        store.renew(old.token)
    with pytest.raises(LeaseLost):
        store.release(old.token)
    store.check(new.token)


def test_renew_extends_the_lease(store: LeaseStore) -> None:
    """A renewed lease outlives its original expiry and stays with its holder."""
    store.register([(SERVER, "alice")])
    [lease] = store.claim_due("a", limit=1, lease_seconds=0.3)
    renewed = store.renew(lease.token, lease_seconds=30)
    assert renewed.expires_at > lease.expires_at
    assert renewed.token == lease.token
    time.sleep(0.4)
    store.check(lease.token)
    assert store.claim_due("b", limit=1) == []


def test_release_frees_the_account(store: LeaseStore) -> None:
    """A released account is claimable at once; the released token is no longer held."""
    store.register([(SERVER, "alice")])
    [lease] = store.claim_due("a", limit=1)
    store.release(lease.token)
    with pytest.raises(LeaseLost):
        store.check(lease.token)
    [again] = store.claim_due("b", limit=1)
    assert again.holder == "b"


def test_release_with_next_due_defers_the_account(store: LeaseStore) -> None:
    """An account released with next_due_in is not due (not claimable) until then."""
    store.register([(SERVER, "alice")])
    [lease] = store.claim_due("a", limit=1)
    store.release(lease.token, next_due_in=0.3)
    assert store.claim_due("b", limit=1) == []
    time.sleep(0.4)
    assert [lease.username for lease in store.claim_due("b", limit=1)] == ["alice"]


def test_check_in_commit_transaction_holds_off_takeover(store: LeaseStore) -> None:
    """A lease checked inside an open commit transaction cannot be taken over until it ends."""
    store.register([(SERVER, "alice")])
    [lease] = store.claim_due("a", limit=1, lease_seconds=0.3)
    with store.connection() as conn:
        store.check(lease.token, conn=conn)
        time.sleep(0.4)  # expired by the clock, but the row is share-locked by this transaction
        assert store.claim_due("b", limit=1) == []
    [taken] = store.claim_due("b", limit=1)
    assert taken.holder == "b"


def test_check_rejects_a_malformed_token(store: LeaseStore) -> None:
    """A string that was never issued as a token is reported as a lost lease."""
    with pytest.raises(LeaseLost):
        store.check("not-a-token")


def test_unreachable_database_is_a_network_error() -> None:
    """Opening a store on a port nobody listens on fails as a temporary network error."""
    (port,) = _free_ports(1)
    with pytest.raises(NetworkError):
        LeaseStore(f"postgresql://popsync@127.0.0.1:{port}/none", timeout=1)


def test_psycopg_is_imported_lazily() -> None:
    """Importing popsync.lease does not import psycopg (start-up cost of --once)."""
    code = "import sys, popsync.lease; print('psycopg' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "False"


def test_claim_due_takes_only_the_accounts_a_worker_knows(store: LeaseStore) -> None:
    """Config drift: a worker never claims an account missing from its own config."""
    store.register([(SERVER, "alice"), (SERVER, "bob")])
    [lease] = store.claim_due("a", limit=10, known=[mailbox_of(SERVER, "bob")])
    assert lease.username == "bob"
    assert store.claim_due("a", limit=10, known=[mailbox_of(SERVER, "carol")]) == []
    assert [x.username for x in store.claim_due("b", limit=10)] == ["alice"]


def test_claim_due_leaves_out_foreign_accounts(store: LeaseStore) -> None:
    """foreign() names the other configs' accounts; a claim excluding them never takes one."""
    store.register([(SERVER, "alice"), (SERVER, "bob"), (SERVER, "carol")])
    mine = [mailbox_of(SERVER, "bob")]
    foreign = store.foreign(mine)
    assert sorted(foreign) == sorted([mailbox_of(SERVER, "alice"), mailbox_of(SERVER, "carol")])
    [lease] = store.claim_due("a", limit=10, exclude=foreign)
    assert lease.username == "bob"
    assert store.claim_due("a", limit=10, exclude=foreign) == []
    assert sorted(x.username for x in store.claim_due("b", limit=10)) == ["alice", "carol"]


def test_make_due_and_overview(store: LeaseStore) -> None:
    """make_due moves only the named accounts; overview shows holder, expiry and due time."""
    store.register([(SERVER, "alice"), (SERVER, "bob")])
    for lease in store.claim_due("a", limit=10):
        store.release(lease.token, next_due_in=3600)
    assert store.claim_due("a", limit=10) == []
    assert store.make_due([mailbox_of(SERVER, "alice")]) == 1
    [held] = store.claim_due("b", limit=10)
    rows = {row.username: row for row in store.overview()}
    assert (rows["alice"].holder, rows["alice"].expires_at) == ("b", held.expires_at)
    assert (rows["bob"].holder, rows["bob"].expires_at) == (None, None)
    assert rows["bob"].next_due > rows["alice"].next_due


def test_a_partitioned_transaction_cannot_pin_a_lease_row(dsn: str) -> None:
    """With lease_seconds the server aborts a transaction idle that long: its row lock goes."""

    def go_quiet_in_a_transaction(leases: LeaseStore, token: str) -> None:
        with leases.connection() as conn:
            leases.check(token, conn=conn)  # row share-locked, then the client goes quiet
            time.sleep(0.8)
            assert leases.claim_due("b", limit=1) == []  # still locked within the limit
            time.sleep(1.0)
            conn.execute("SELECT 1")  # the server ended the transaction meanwhile

    with LeaseStore(dsn, lease_seconds=1.0) as leases:
        leases.register([(SERVER, "alice")])
        [lease] = leases.claim_due("a", limit=1, lease_seconds=0.5)
        with pytest.raises(NetworkError):
            go_quiet_in_a_transaction(leases, lease.token)
        assert [x.holder for x in leases.claim_due("b", limit=1)] == ["b"]
