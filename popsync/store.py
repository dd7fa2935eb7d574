"""The seen-store interface and where to open one: SQLite (the default) or PostgreSQL.

`Store` is exactly the surface callers (`popsync.sync`, `popsync.status`, `popsync.importer`,
the CLI and the daemon) use; `popsync.seen.SeenStore` (SQLite in ``state_dir``) and
`popsync.pgstore.PgStore` (``store = "postgresql://…"``, fleet mode) implement it.
`open_store` is the one place that turns a config into a store.

Only this module's light parts load on every run: psycopg is imported by `popsync.pgstore`,
which `open_store` imports only for a PostgreSQL URL, so ``popsync --once`` on SQLite never
pays for it.

The database password never appears in output: `redact_url` replaces it in every message
that shows a store URL; a password from ``store_password_env``/``store_password_command`` is
handed to libpq as a separate parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self
from urllib.parse import SplitResult, urlsplit

from popsync.errors import LocalIOError

if TYPE_CHECKING:
    from popsync.config import Config
    from popsync.seen import EntryRow, RunRecord, SeenEntry

__all__ = [
    "PG_SCHEMES",
    "Store",
    "check_store_url",
    "is_postgres_url",
    "open_store",
    "redact_url",
    "store_password",
    "url_password",
]

PG_SCHEMES = ("postgresql", "postgres")


class Store(Protocol):
    """Seen UIDLs, run records and per-mailbox locks; see `popsync.seen.SeenStore`."""

    @property
    def state_dir(self) -> Path:
        """The local directory for spools, OAuth2 tokens and lock files."""
        ...

    @property
    def path(self) -> Path | None:
        """The SQLite file a Maildir claim names; None for a database server."""
        ...

    def entries(self, mailbox: str) -> dict[bytes, SeenEntry]: ...
    def has_rows(self, mailbox: str) -> bool: ...
    def count(self, mailbox: str) -> int: ...
    def delivered_times(self, mailbox: str) -> Iterator[tuple[bytes, float]]: ...
    def other_rows(self, mailbox: str) -> Iterator[EntryRow]: ...
    def pending(self, mailbox: str) -> dict[bytes, SeenEntry]: ...
    def mailboxes(self) -> list[str]: ...
    def add_pending(
        self, mailbox: str, items: Sequence[tuple[bytes, str, int]], *, at: float | None = None
    ) -> None: ...
    def mark_delivered(
        self, mailbox: str, items: Sequence[tuple[bytes, str]], at: float
    ) -> None: ...
    def mark_rejected(
        self, mailbox: str, items: Sequence[tuple[bytes, str]], at: float
    ) -> None: ...
    def mark_too_large(
        self, mailbox: str, items: Sequence[tuple[bytes, int]], at: float
    ) -> int: ...
    def note_absent(self, mailbox: str, uidls: Iterable[bytes], at: float) -> int: ...
    def note_present(self, mailbox: str, uidls: Iterable[bytes]) -> int: ...
    def remove(self, mailbox: str, uidls: Iterable[bytes]) -> int: ...
    def forget(self, mailbox: str, uidls: Iterable[bytes]) -> int: ...
    def mark_deleted(self, mailbox: str, uidls: Iterable[bytes], at: float) -> int: ...
    def adopt_labels(self, mailboxes: Mapping[str, str]) -> int: ...
    def listing_digest(self, mailbox: str) -> bytes | None: ...
    def set_listing_digest(self, mailbox: str, digest: bytes) -> None: ...
    def record_run(self, mailbox: str, record: RunRecord) -> RunRecord: ...
    def last_runs(self) -> dict[str, RunRecord]: ...
    def lock(self, mailbox: str, label: str | None = None) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def is_postgres_url(url: str | None) -> bool:
    """Whether a ``store`` value selects PostgreSQL."""
    return url is not None and urlsplit(url).scheme.lower() in PG_SCHEMES


def _netloc_without_password(parts: SplitResult) -> str:
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if not at:
        return parts.netloc
    user = userinfo.partition(":")[0]
    return f"{user}:[redacted]@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"


def redact_url(url: str) -> str:
    """``url`` with any password (in the authority or a ``password=`` parameter) replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "[unparsable store URL]"
    query = "&".join(
        f"{key}=[redacted]" if key.lower() == "password" else f"{key}{sep}{value}"
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return parts._replace(netloc=_netloc_without_password(parts), query=query).geturl()


def check_store_url(url: str) -> None:
    """Raise ValueError, naming the URL without its password, unless it is a usable libpq URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {redact_url(url)!r}") from None
    if parts.scheme.lower() not in PG_SCHEMES:
        raise ValueError(
            'must be "sqlite" (the default: state_dir/popsync.sqlite3) or a PostgreSQL URL'
            f' "postgresql://user@host:port/database" (got {redact_url(url)!r})'
        )
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise ValueError(f"must not contain spaces or control characters: {redact_url(url)!r}")
    if not (parts.hostname or "host=" in parts.query):
        raise ValueError(
            f"names no host (postgresql://user@host:port/database): {redact_url(url)!r}"
        )


def url_password(url: str) -> str | None:
    """The password written into ``url`` itself, if any (to keep it out of messages)."""
    from urllib.parse import parse_qs, unquote

    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    values = parse_qs(parts.query).get("password")
    return values[-1] if values else None


def store_password(config: Config) -> str | None:
    """The database password from ``store_password_env``/``_command``, else None (libpq's)."""
    from popsync.secrets import resolve_store_password

    return resolve_store_password(config.store_password_env, config.store_password_command)


def _make_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` (0700) as SQLite's open does; LocalIOError when it cannot be."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalIOError(
            f"cannot create the state directory {state_dir}: {exc.strerror}"
        ) from None


def open_store(config: Config) -> Store:
    """Open the config's seen-store, adopting pre-v2 rows by label.

    SQLite: ``state_dir/popsync.sqlite3``, refused under systemd when the config names
    another state directory, and as root in a state directory another user owns (see
    `popsync.owner`). PostgreSQL: ``store = "postgresql://…"`` (see `popsync.pgstore`).
    """
    from popsync.owner import check_state_directory, refuse_foreign_root

    # Both stores keep files in state_dir (SQLite's database; spools, OAuth2 tokens, locks
    # and the daemon record in either mode), so both get its checks and its creation.
    check_state_directory(config.state_dir)
    refuse_foreign_root(config.state_dir, "state directory")
    store: Store
    if is_postgres_url(config.store):
        from popsync.lease import lease_timing
        from popsync.pgstore import PgStore

        assert config.store is not None  # is_postgres_url checked it
        _make_state_dir(config.state_dir)
        lease_seconds, renew_seconds = lease_timing()
        store = PgStore.open(
            config.store,
            state_dir=config.state_dir,
            password=store_password(config),
            worker_id=config.worker_id,
            max_connections=2 * config.max_workers + 2,
            lease_seconds=lease_seconds,
            renew_seconds=renew_seconds,
        )
    else:
        from popsync.seen import SeenStore

        store = SeenStore.open(config.state_dir / "popsync.sqlite3")
    try:
        store.adopt_labels({name: a.mailbox for name, a in config.accounts.items()})
    except BaseException:
        store.close()
        raise
    return store
