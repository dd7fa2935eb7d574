"""Account leases in PostgreSQL: the foundation of fleet mode (issue 13).

Several popsync workers share one database. Each due account is claimed by exactly one worker
with ``SELECT … FOR UPDATE SKIP LOCKED``; the claim writes a fresh random lease token and an
expiry (default 30 s) that the holder renews while its run goes on (default every 10 s). A dead
worker's leases simply expire and another worker claims the accounts.

Fencing: a paused worker (SIGSTOP, GC, VM migration) may wake up after its lease was taken over.
It must call `LeaseStore.check` with its token inside every commit transaction (``conn=`` joins
the caller's transaction): the check locks the lease row ``FOR SHARE``, so a takeover either
happened before (the check fails and the transaction is rolled back) or waits until the commit
is done (a claim skips the locked row). Every time comparison uses the database clock
(``clock_timestamp()``), never the worker's, so skewed worker clocks cannot extend a lease; the
claim's search compares with ``statement_timestamp()`` (the same clock, read once when the
statement starts) because a volatile ``clock_timestamp()`` keeps PostgreSQL from using the
``next_due`` index, and an idle worker's claim then read the whole table every second.

Schema: `MIGRATIONS[i]` upgrades version ``i`` to ``i + 1``; `ensure_schema` applies the missing
ones in one transaction under a transaction-scoped advisory lock, so workers starting together
against an empty database serialise instead of racing on ``CREATE TABLE``. A database written
by a newer popsync is refused (`SchemaTooNew`).

The lease key is ``(server, username)``, split from `popsync.config.Account.mailbox` by
`mailbox_key` (the one notion of an account's identity). `LeaseStore.claim` takes one named
account now (`popsync.pgstore.PgStore.lock` uses it); `Renewer` keeps a set of leases alive
from a daemon thread.

psycopg (3) and psycopg_pool are imported only when a `LeaseStore` is opened, so commands that
never touch PostgreSQL do not pay for the import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from popsync.errors import ExitCode, LockBusy, NetworkError, PopsyncError

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_RENEW_SECONDS",
    "LEASE_SECONDS_ENV",
    "MIGRATIONS",
    "RENEW_SECONDS_ENV",
    "SCHEMA_VERSION",
    "DatabaseAuthError",
    "Lease",
    "LeaseLost",
    "LeaseRow",
    "LeaseStore",
    "Renewer",
    "SchemaTooNew",
    "database_error",
    "default_worker_id",
    "ensure_schema",
    "lease_timing",
    "mailbox_key",
    "mailbox_of",
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
    # 1 -> 2: the seen-store and run records (popsync.pgstore), as in popsync.seen's SQLite
    # schema version 3+: times are epoch seconds (double precision) like SeenEntry's floats;
    # mailbox keys compare byte by byte (COLLATE "C", SQLite's BINARY), so prefix and range
    # probes use the primary key whatever the database's locale.
    """
    CREATE TABLE seen (
        mailbox      text COLLATE "C" NOT NULL,
        uidl         bytea            NOT NULL,
        state        text             NOT NULL
            CHECK (state IN ('pending', 'delivered', 'too_large', 'rejected')),
        name         text             NOT NULL,
        size         bigint,
        first_seen   double precision NOT NULL,
        delivered_at double precision,
        deleted_at   double precision,
        vanished_at  double precision,
        absent_runs  integer          NOT NULL DEFAULT 0,
        PRIMARY KEY (mailbox, uidl)
    );
    CREATE TABLE runs (
        mailbox              text COLLATE "C" PRIMARY KEY,
        started              double precision NOT NULL,
        finished             double precision,
        outcome              text NOT NULL,
        fetched              integer NOT NULL,
        skipped              integer NOT NULL,
        deleted              integer NOT NULL,
        bytes                bigint NOT NULL,
        messages_on_server   integer,
        error                text,
        consecutive_failures integer NOT NULL
    );
    """,
    # 2 -> 3: settled-listing digests (popsync.seen's version 4). Any statement that changes a
    # mailbox's seen rows drops its digest in the same transaction: statement-level triggers
    # with transition tables, one DELETE per statement however many rows a batch holds.
    """
    CREATE TABLE listings (
        mailbox text COLLATE "C" PRIMARY KEY,
        digest  bytea NOT NULL
    );
    CREATE FUNCTION popsync_unsettle() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM listings WHERE mailbox IN (SELECT mailbox FROM changed);
        RETURN NULL;
    END $$;
    CREATE FUNCTION popsync_unsettle_moved() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM listings
            WHERE mailbox IN (SELECT mailbox FROM changed UNION SELECT mailbox FROM moved);
        RETURN NULL;
    END $$;
    CREATE TRIGGER seen_insert_unsettles AFTER INSERT ON seen
        REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION popsync_unsettle();
    CREATE TRIGGER seen_delete_unsettles AFTER DELETE ON seen
        REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION popsync_unsettle();
    CREATE TRIGGER seen_update_unsettles AFTER UPDATE ON seen
        REFERENCING OLD TABLE AS changed NEW TABLE AS moved
        FOR EACH STATEMENT EXECUTE FUNCTION popsync_unsettle_moved();
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(PopsyncError):
    """The database schema was written by a newer popsync; refuse rather than guess."""


class LeaseLost(PopsyncError):
    """The lease token is no longer held (expired, taken over or released): stop the run.

    Temporary (exit 75): the account is someone else's now, or again due later.
    """

    exit_code = ExitCode.TEMPORARY


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


def mailbox_key(mailbox: str) -> tuple[str, str]:
    """The lease key ``(server, username)`` of a seen-store mailbox key.

    `popsync.config.Account.mailbox` (``username@host`` or ``username@host:port``) is the one
    notion of an account's identity; this splits it at the last ``@`` (a host has none).
    """
    username, sep, server = mailbox.rpartition("@")
    if not sep or not username or not server:
        raise ValueError(f"not a mailbox key: {mailbox!r}")
    return server, username


def mailbox_of(server: str, username: str) -> str:
    """The inverse of `mailbox_key`."""
    return f"{username}@{server}"


class DatabaseAuthError(PopsyncError):
    """PostgreSQL refused the login (wrong or missing password, no such role): exit 77."""

    exit_code = ExitCode.AUTH


def database_error(exc: BaseException, secret: str | None = None) -> PopsyncError:
    """A popsync error for a failed database connection: one safe, bounded line.

    A refused login is `DatabaseAuthError` (77: retrying will not help); anything else is a
    temporary `NetworkError` (75). libpq's messages name host, port and user, never the
    password; ``secret`` is removed anyway.
    """
    from popsync.textsafe import safe_text

    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if secret:
        text = text.replace(secret, "[redacted]")
    text = safe_text(text, 200)
    # A refused login at connect time carries no SQLSTATE in psycopg: match libpq's words.
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    refused = ("authentication failed", "no password supplied", "password is missing")
    if sqlstate.startswith("28") or any(words in text for words in refused):
        return DatabaseAuthError(f"PostgreSQL refused the login: {text}")
    return NetworkError(f"PostgreSQL unavailable: {text}")


@dataclass(frozen=True)
class LeaseRow:
    """One account's row as ``popsync status`` shows it; ``expires_at`` None when unheld."""

    server: str
    username: str
    holder: str | None
    expires_at: datetime | None
    next_due: datetime
    claimed_at: datetime | None


#: Tuning (and test) knobs: override the lease length and renewal period, in seconds.
LEASE_SECONDS_ENV = "POPSYNC_LEASE_SECONDS"
RENEW_SECONDS_ENV = "POPSYNC_LEASE_RENEW_SECONDS"


def lease_timing(env: Mapping[str, str] | None = None) -> tuple[float, float]:
    """``(lease_seconds, renew_seconds)``: the defaults, or the two environment knobs.

    Raises `popsync.errors.ConfigError` unless 0 < renew < lease: a lease renewed less
    often than it lasts would lapse under a healthy worker.
    """
    from popsync.errors import ConfigError

    source = os.environ if env is None else env
    values: list[float] = []
    for name, default in (
        (LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS),
        (RENEW_SECONDS_ENV, DEFAULT_RENEW_SECONDS),
    ):
        text = source.get(name, "").strip()
        try:
            values.append(float(text) if text else default)
        except ValueError:
            raise ConfigError([f"{name}: not a number of seconds"]) from None
    lease, renew = values
    if not 0 < renew < lease:
        raise ConfigError(
            [
                f"{RENEW_SECONDS_ENV} ({renew:g}) must be above 0 and below {LEASE_SECONDS_ENV}"
                f" ({lease:g})"
            ]
        )
    return lease, renew


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
    WHERE next_due <= statement_timestamp()
      AND (expires_at IS NULL OR expires_at <= statement_timestamp())
      AND (%(known)s::text[] IS NULL OR username || '@' || server = ANY(%(known)s::text[]))
      AND (%(exclude)s::text[] IS NULL
           OR NOT username || '@' || server = ANY(%(exclude)s::text[]))
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
    next_due = coalesce(
        clock_timestamp() + make_interval(secs => %(next_due_in)s::double precision), next_due)
WHERE token = %(token)s AND expires_at > clock_timestamp()
"""
#: Claim one named account now if nobody holds it (or its lease expired); due or not.
_CLAIM_ONE = """
INSERT INTO accounts_lease AS a (server, username, holder, token, claimed_at, expires_at,
                                 generation)
VALUES (%(server)s, %(username)s, %(holder)s, gen_random_uuid(), clock_timestamp(),
        clock_timestamp() + make_interval(secs => %(seconds)s), 1)
ON CONFLICT (server, username) DO UPDATE
SET holder = excluded.holder,
    token = excluded.token,
    claimed_at = excluded.claimed_at,
    expires_at = excluded.expires_at,
    generation = a.generation + 1
WHERE a.expires_at IS NULL OR a.expires_at <= clock_timestamp()
RETURNING a.server, a.username, a.holder, a.token::text, a.expires_at, a.generation
"""
_HOLDER = """
SELECT holder, greatest(0, extract(epoch FROM expires_at - clock_timestamp()))
FROM accounts_lease WHERE server = %(server)s AND username = %(username)s
"""
_RENEW_MANY = """
UPDATE accounts_lease
SET expires_at = clock_timestamp() + make_interval(secs => %(seconds)s)
WHERE token = ANY(%(tokens)s::uuid[]) AND expires_at > clock_timestamp()
RETURNING token::text
"""
_MAKE_DUE = """
UPDATE accounts_lease SET next_due = clock_timestamp()
WHERE next_due > clock_timestamp() AND username || '@' || server = ANY(%(known)s::text[])
"""
_OVERVIEW = """
SELECT server, username, holder,
       CASE WHEN expires_at > clock_timestamp() THEN expires_at END,
       next_due, claimed_at
FROM accounts_lease ORDER BY server, username
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


def _idle_limit(milliseconds: int) -> Callable[[psycopg.Connection[Any]], None]:
    """A pool ``configure`` hook: abort this session's transactions idle that long."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
            (str(milliseconds),),
        )
        conn.commit()

    return configure


class LeaseStore:
    """Claims, renews, checks and releases account leases through a small connection pool."""

    def __init__(
        self,
        conninfo: str,
        *,
        max_connections: int = 4,
        timeout: float = 10.0,
        password: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        """Open the pool and bring the schema up to date; ``conninfo`` is a libpq URI.

        ``password`` (when not in ``conninfo``, PGPASSWORD or PGPASSFILE) is passed to libpq
        as a separate parameter; it appears in no error message.

        ``lease_seconds`` (fleet mode) bounds how long a partitioned worker can pin rows:
        the server aborts a transaction left idle that long (a worker cut off between a
        statement and its COMMIT would otherwise hold the row lock, and `claim_due`'s
        ``SKIP LOCKED`` would skip the account until the server noticed the dead peer),
        and TCP keepalives let the worker itself notice within about that time.
        """
        import psycopg
        from psycopg_pool import ConnectionPool

        self._secret = password
        self._conninfo = conninfo
        # A transaction the server aborted for idling (see lease_seconds) is as temporary
        # as a dropped connection.
        self._errors: tuple[type[Exception], ...] = (
            psycopg.OperationalError,
            psycopg.errors.IdleInTransactionSessionTimeout,
        )
        kwargs: dict[str, Any] = {"connect_timeout": max(1, int(timeout))}
        if password is not None:
            kwargs["password"] = password
        configure = None
        if lease_seconds is not None:
            probe = max(1, int(lease_seconds / 3))
            kwargs.update(keepalives=1, keepalives_idle=probe, keepalives_interval=probe)
            kwargs["keepalives_count"] = 3
            configure = _idle_limit(int(lease_seconds * 1000))
        self._kwargs = kwargs
        # The pool logs every failed reconnection attempt as a multi-line warning; the
        # calls that fail say it once, as one line (see _reason).
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_connections,
            timeout=timeout,
            kwargs=kwargs,
            # A connection broken by a server restart is replaced at checkout, not handed out.
            check=ConnectionPool.check_connection,
            configure=configure,
            open=False,
        )
        try:
            # One direct connection first: when the database cannot be used, its error says
            # why (refused, wrong password); the pool's own would only say it timed out.
            try:
                with psycopg.connect(conninfo, **kwargs) as first:
                    ensure_schema(first)
                self._pool.open(wait=True, timeout=timeout)
            except self._errors as exc:
                raise database_error(exc, self._secret) from exc
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
    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; its transaction commits when the block ends without error.

        ``autocommit=True`` (the seen-store's way) saves a single statement the BEGIN and
        COMMIT round trips; atomic work then opens ``conn.transaction()`` itself.

        A lost database connection surfaces as `NetworkError` (temporary: retry later).
        """
        try:
            with self._pool.connection() as conn:
                if not autocommit:
                    yield conn
                    return
                conn.autocommit = True
                try:
                    yield conn
                finally:
                    # Back to the pool as it came (idle, so this costs no round trip).
                    with contextlib.suppress(Exception):
                        conn.autocommit = False
        except self._errors as exc:
            raise database_error(self._reason(exc), self._secret) from exc

    def _reason(self, exc: Exception) -> Exception:
        """For the pool's "timed out", the real reason when a direct connection fails too.

        The pool keeps its connection errors to its own log; one direct attempt (bounded
        by connect_timeout) recovers "connection refused" or "password authentication
        failed" for the message.
        """
        from psycopg_pool import PoolTimeout

        if not isinstance(exc, PoolTimeout):
            return exc
        import psycopg

        try:
            psycopg.connect(self._conninfo, **self._kwargs).close()
        except psycopg.Error as direct:
            return direct
        return exc

    def register(self, accounts: Sequence[tuple[str, str]]) -> int:
        """Add ``(server, username)`` mailboxes that have no lease row yet; return how many."""
        # One statement (one round trip) for any number of accounts.
        with self.connection(autocommit=True) as conn:
            cur = conn.execute(
                "INSERT INTO accounts_lease (server, username)"
                " SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING",
                ([server for server, _ in accounts], [username for _, username in accounts]),
            )
            return max(cur.rowcount, 0)

    def claim_due(
        self,
        worker_id: str,
        limit: int,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        *,
        known: Collection[str] | None = None,
        exclude: Collection[str] | None = None,
    ) -> list[Lease]:
        """Claim up to ``limit`` due, unleased (or expired) accounts for ``worker_id``.

        ``known`` (mailbox keys, ``username@server``) restricts the claim to those accounts;
        ``exclude`` leaves those out. The fleet scheduler sends ``exclude`` = the accounts of
        other configs (`foreign`), which is empty unless configs drift: sending every known
        account instead cost 12 ms per claim at 2,000 accounts and 330 ms at 100,000
        (bench/fleet_claim.py), once a second and after every run.
        """
        params = {
            "limit": limit,
            "holder": worker_id,
            "seconds": lease_seconds,
            "known": None if known is None else list(known),
            "exclude": list(exclude) if exclude else None,
        }
        with self.connection() as conn:
            rows = conn.execute(_CLAIM, params).fetchall()
        return sorted((_lease(row) for row in rows), key=lambda lease: lease.expires_at)

    def renew(self, token: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Lease:
        """Extend a held lease by ``lease_seconds`` from now; `LeaseLost` if it is gone."""
        with self.connection(autocommit=True) as conn:
            row = conn.execute(
                _RENEW, {"token": _token(token), "seconds": lease_seconds}
            ).fetchone()
        if row is None:
            raise LeaseLost("lease expired or taken over")
        return _lease(row)

    def claim(
        self, worker_id: str, key: tuple[str, str], lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> Lease:
        """Claim the account ``key`` (see `mailbox_key`) now, due or not, creating its row.

        Succeeds when nobody holds it or its lease expired; else raises
        `popsync.errors.LockBusy` naming the holder.
        """
        server, username = key
        params = {
            "server": server,
            "username": username,
            "holder": worker_id,
            "seconds": lease_seconds,
        }
        with self.connection(autocommit=True) as conn:
            row = conn.execute(_CLAIM_ONE, params).fetchone()
            if row is not None:
                return _lease(row)
            held = conn.execute(_HOLDER, params).fetchone()
        holder, left = (str(held[0]), float(held[1])) if held else ("another worker", 0.0)
        raise LockBusy(
            f"{mailbox_of(server, username)} is being synced by worker {holder}"
            f" (lease held for another {left:.0f} s)"
        )

    def renew_many(
        self, tokens: Collection[str], lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> set[str]:
        """Extend every still-held lease of ``tokens`` in one statement; return those held."""
        wanted: list[uuid.UUID] = []
        for token in tokens:
            try:
                wanted.append(uuid.UUID(token))
            except (ValueError, TypeError):
                continue  # never issued, so not held
        if not wanted:
            return set()
        with self.connection(autocommit=True) as conn:
            rows = conn.execute(_RENEW_MANY, {"tokens": wanted, "seconds": lease_seconds})
            return {str(row[0]) for row in rows.fetchall()}

    def release(self, token: str, next_due_in: float | None = 0.0) -> None:
        """Give the account back, due again in ``next_due_in`` seconds; `LeaseLost` if gone.

        ``next_due_in=None`` leaves the account's due time as it was.
        """
        with self.connection(autocommit=True) as conn:
            cur = conn.execute(_RELEASE, {"token": _token(token), "next_due_in": next_due_in})
            if cur.rowcount != 1:
                raise LeaseLost("lease expired or taken over before release")

    def foreign(self, known: Collection[str]) -> list[str]:
        """Registered accounts (``username@server``) that are not in ``known``."""
        with self.connection(autocommit=True) as conn:
            rows = conn.execute(
                "SELECT username || '@' || server FROM accounts_lease"
                " WHERE NOT username || '@' || server = ANY(%s::text[])",
                (list(known),),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def make_due(self, known: Collection[str]) -> int:
        """Make the accounts ``known`` (``username@server``) due now; return how many moved."""
        with self.connection() as conn:
            return conn.execute(_MAKE_DUE, {"known": list(known)}).rowcount

    def overview(self) -> list[LeaseRow]:
        """Every account's lease row, for ``popsync status`` (times from the database)."""
        with self.connection() as conn:
            rows = conn.execute(_OVERVIEW).fetchall()
        return [LeaseRow(*(row[:2]), *row[2:]) for row in rows]

    def check(self, token: str, conn: psycopg.Connection[Any] | None = None) -> None:
        """Raise `LeaseLost` unless ``token`` is still held; with ``conn``, fence its transaction.

        Called inside the caller's commit transaction, the lease row stays share-locked until
        that transaction ends, so the lease cannot be taken over between check and commit.
        """
        params = {"token": _token(token)}
        if conn is not None:
            held = conn.execute(_CHECK, params).fetchone() is not None
        else:
            with self.connection(autocommit=True) as own:
                held = own.execute(_CHECK, params).fetchone() is not None
        if not held:
            raise LeaseLost("lease expired or taken over")


class Renewer:
    """Renews a set of lease tokens from one daemon thread, every ``interval`` seconds.

    A token that could not be renewed because it is gone (expired, taken over) moves to
    `lost`; a database that cannot be reached is retried next tick (the lease may then
    expire: fencing catches that). Nothing ever raises into the caller's thread.
    ``on_lost`` is called from the renewer's thread with each lost token.
    """

    def __init__(
        self,
        leases: LeaseStore,
        *,
        interval: float = DEFAULT_RENEW_SECONDS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._leases = leases
        self._interval = interval
        self._lease_seconds = lease_seconds
        self._on_lost = on_lost
        self._tokens: set[str] = set()
        self._lost: set[str] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, token: str) -> None:
        """Renew ``token`` from now on (starts the thread on first use)."""
        with self._guard:
            self._tokens.add(token)
            self._lost.discard(token)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="popsync-lease-renewer", daemon=True
                )
                self._thread.start()

    def discard(self, token: str) -> None:
        """Stop renewing ``token`` and forget whether it was lost."""
        with self._guard:
            self._tokens.discard(token)
            self._lost.discard(token)

    def lost(self, token: str) -> bool:
        """Whether a renewal found ``token`` gone."""
        with self._guard:
            return token in self._lost

    @property
    def held(self) -> frozenset[str]:
        """The tokens being renewed (not known lost)."""
        with self._guard:
            return frozenset(self._tokens)

    def renew_now(self) -> None:
        """One renewal round in the calling thread (the thread's loop body); never raises."""
        with self._guard:
            tokens = set(self._tokens)
        if not tokens:
            return
        try:
            held = self._leases.renew_many(tokens, self._lease_seconds)
        except Exception:  # an unreachable database: retry next tick
            return
        gone = tokens - held
        with self._guard:
            gone &= self._tokens  # discarded meanwhile: not lost, just done
            self._tokens -= gone
            self._lost |= gone
        for token in gone:
            if self._on_lost is not None:
                with contextlib.suppress(Exception):  # a callback must not stop renewals
                    self._on_lost(token)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.renew_now()

    def stop(self) -> None:
        """Stop the thread (tokens are not released: their leases simply run out)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
