"""Account leases in PostgreSQL: the foundation of fleet mode (issue 13; not wired in yet).

Several popsync workers share one database. Each due account is claimed by exactly one worker
with ``SELECT … FOR UPDATE SKIP LOCKED``; the claim writes a fresh random lease token and an
expiry (default 30 s) that the holder renews while its run goes on (default every 10 s). A dead
worker's leases simply expire and another worker claims the accounts.

Fencing: a paused worker (SIGSTOP, GC, VM migration) may wake up after its lease was taken over.
It must call `LeaseStore.check` with its token inside every commit transaction (``conn=`` joins
the caller's transaction): the check locks the lease row ``FOR SHARE``, so a takeover either
happened before (the check fails and the transaction is rolled back) or waits until the commit
is done (a claim skips the locked row). Every time comparison uses the database clock
(``clock_timestamp()``), never the worker's, so skewed worker clocks cannot extend a lease.

Schema: `MIGRATIONS[i]` upgrades version ``i`` to ``i + 1``; `ensure_schema` applies the missing
ones in one transaction under a transaction-scoped advisory lock, so workers starting together
against an empty database serialise instead of racing on ``CREATE TABLE``. A database written
by a newer popsync is refused (`SchemaTooNew`).

psycopg (3) and psycopg_pool are imported only when a `LeaseStore` is opened, so commands that
never touch PostgreSQL do not pay for the import.
"""

from __future__ import annotations

import os
import platform
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from popsync.errors import NetworkError, PopsyncError

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_RENEW_SECONDS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Lease",
    "LeaseLost",
    "LeaseStore",
    "SchemaTooNew",
    "default_worker_id",
    "ensure_schema",
]

DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_RENEW_SECONDS = 10.0
# pg_advisory_xact_lock key for schema changes: "popsync" in ASCII, fits a bigint.
_SCHEMA_LOCK_KEY = 0x706F7073796E63

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: account leases keyed by mailbox identity.
    """
    CREATE TABLE accounts_lease (
        server      text        NOT NULL,
        username    text        NOT NULL,
        next_due    timestamptz NOT NULL DEFAULT clock_timestamp(),
        holder      text,
        token       uuid        UNIQUE,
        expires_at  timestamptz,
        claimed_at  timestamptz,
        generation  bigint      NOT NULL DEFAULT 0,
        PRIMARY KEY (server, username)
    );
    CREATE INDEX accounts_lease_due ON accounts_lease (next_due);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(PopsyncError):
    """The database schema was written by a newer popsync; refuse rather than guess."""


class LeaseLost(PopsyncError):
    """The lease token is no longer held (expired, taken over or released): stop the run."""


@dataclass(frozen=True)
class Lease:
    """One account held by one worker until ``expires_at`` (database clock)."""

    server: str
    username: str
    holder: str
    token: str
    expires_at: datetime
    #: How many times the account was claimed; grows by one per claim (a fencing counter).
    generation: int


def default_worker_id() -> str:
    """``host:pid``: unique among live workers, readable in ``popsync status``."""
    return f"{platform.node()}:{os.getpid()}"


def ensure_schema(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema to `SCHEMA_VERSION`; return how many migrations this call applied.

    Commits its own transaction; safe to call from many workers at once.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS popsync_schema ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM popsync_schema").fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database schema version {current} is newer than this popsync's"
                f" {SCHEMA_VERSION}; upgrade popsync"
            )
        for version in range(current, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[version].encode())
            conn.execute("INSERT INTO popsync_schema (version) VALUES (%s)", (version + 1,))
    return SCHEMA_VERSION - current


_CLAIM = """
WITH due AS (
    SELECT server, username FROM accounts_lease
    WHERE next_due <= clock_timestamp()
      AND (expires_at IS NULL OR expires_at <= clock_timestamp())
    ORDER BY next_due
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE accounts_lease AS a
SET holder = %(holder)s,
    token = gen_random_uuid(),
    claimed_at = clock_timestamp(),
    expires_at = clock_timestamp() + make_interval(secs => %(seconds)s),
    generation = a.generation + 1
FROM due
WHERE a.server = due.server AND a.username = due.username
RETURNING a.server, a.username, a.holder, a.token::text, a.expires_at, a.generation
"""
_RENEW = """
UPDATE accounts_lease
SET expires_at = clock_timestamp() + make_interval(secs => %(seconds)s)
WHERE token = %(token)s AND expires_at > clock_timestamp()
RETURNING server, username, holder, token::text, expires_at, generation
"""
_RELEASE = """
UPDATE accounts_lease
SET holder = NULL, token = NULL, expires_at = NULL, claimed_at = NULL,
    next_due = clock_timestamp() + make_interval(secs => %(next_due_in)s)
WHERE token = %(token)s AND expires_at > clock_timestamp()
"""
_CHECK = """
SELECT 1 FROM accounts_lease
WHERE token = %(token)s AND expires_at > clock_timestamp()
FOR SHARE
"""


def _token(token: str) -> uuid.UUID:
    """The token as a UUID; a malformed one was never issued, so it is not held."""
    try:
        return uuid.UUID(token)
    except (ValueError, TypeError) as exc:
        raise LeaseLost("not a lease token") from exc


def _lease(row: Sequence[Any]) -> Lease:
    return Lease(str(row[0]), str(row[1]), str(row[2]), str(row[3]), row[4], int(row[5]))


class LeaseStore:
    """Claims, renews, checks and releases account leases through a small connection pool."""

    def __init__(self, conninfo: str, *, max_connections: int = 4, timeout: float = 10.0) -> None:
        """Open the pool and bring the schema up to date; ``conninfo`` is a libpq URI."""
        import psycopg
        from psycopg_pool import ConnectionPool

        self._errors: tuple[type[Exception], ...] = (psycopg.OperationalError,)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_connections,
            timeout=timeout,
            kwargs={"connect_timeout": max(1, int(timeout))},
            open=False,
        )
        try:
            try:
                self._pool.open(wait=True, timeout=timeout)
            except self._errors as exc:
                raise NetworkError(f"PostgreSQL: {type(exc).__name__}") from exc
            with self.connection() as conn:
                ensure_schema(conn)
        except BaseException:
            self._pool.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; its transaction commits when the block ends without error.

        A lost database connection surfaces as `NetworkError` (temporary: retry later).
        """
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._errors as exc:
            raise NetworkError(f"PostgreSQL: {type(exc).__name__}") from exc

    def register(self, accounts: Sequence[tuple[str, str]]) -> int:
        """Add ``(server, username)`` mailboxes that have no lease row yet; return how many."""
        with self.connection() as conn, conn.cursor() as cur:
            added = 0
            for server, username in accounts:
                cur.execute(
                    "INSERT INTO accounts_lease (server, username) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING",
                    (server, username),
                )
                added += cur.rowcount
            return added

    def claim_due(
        self, worker_id: str, limit: int, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> list[Lease]:
        """Claim up to ``limit`` due, unleased (or expired) accounts for ``worker_id``."""
        params = {"limit": limit, "holder": worker_id, "seconds": lease_seconds}
        with self.connection() as conn:
            rows = conn.execute(_CLAIM, params).fetchall()
        return sorted((_lease(row) for row in rows), key=lambda lease: lease.expires_at)

    def renew(self, token: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Lease:
        """Extend a held lease by ``lease_seconds`` from now; `LeaseLost` if it is gone."""
        with self.connection() as conn:
            row = conn.execute(
                _RENEW, {"token": _token(token), "seconds": lease_seconds}
            ).fetchone()
        if row is None:
            raise LeaseLost("lease expired or taken over")
        return _lease(row)

    def release(self, token: str, next_due_in: float = 0.0) -> None:
        """Give the account back, due again in ``next_due_in`` seconds; `LeaseLost` if gone."""
        with self.connection() as conn:
            cur = conn.execute(_RELEASE, {"token": _token(token), "next_due_in": next_due_in})
            if cur.rowcount != 1:
                raise LeaseLost("lease expired or taken over before release")

    def check(self, token: str, conn: psycopg.Connection[Any] | None = None) -> None:
        """Raise `LeaseLost` unless ``token`` is still held; with ``conn``, fence its transaction.

        Called inside the caller's commit transaction, the lease row stays share-locked until
        that transaction ends, so the lease cannot be taken over between check and commit.
        """
        params = {"token": _token(token)}
        if conn is not None:
            held = conn.execute(_CHECK, params).fetchone() is not None
        else:
            with self.connection() as own:
                held = own.execute(_CHECK, params).fetchone() is not None
        if not held:
            raise LeaseLost("lease expired or taken over")
