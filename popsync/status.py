"""``popsync status`` and ``popsync healthcheck``: read-only views of the seen-store.

Both read only the SQLite store, never the network, so they answer instantly and work
while the daemon runs (WAL lets readers and the writer proceed together).

In fleet mode (``store = "postgresql://…"``) they read the database instead, and each row
also shows the account's lease: the worker holding it, until when, and when it is due next.
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from popsync.textsafe import safe_text

if TYPE_CHECKING:
    from popsync.config import Config
    from popsync.store import Store

__all__ = [
    "AccountStatus",
    "collect_status",
    "daemon_line",
    "healthcheck",
    "render_status",
    "state_dir_of",
]


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """One row of ``popsync status``."""

    account: str
    host: str
    enabled: bool
    last_run: float | None
    outcome: str | None
    on_server: int | None
    delivered: int
    pending: int
    #: Messages the delivery target refused for good (kept on the server, never retried).
    rejected: int
    deleted: int
    #: Messages left on the server because they exceed max_message_size.
    too_large: int
    last_fetched: int
    failures: int
    error: str | None
    #: Fleet mode only: the lease row (`popsync.lease.LeaseRow`) of the account.
    fleet: bool = False
    worker: str | None = None
    lease_expires: float | None = None
    next_due: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["last_run"] = _iso(self.last_run)
        if not data.pop("fleet"):
            for key in _FLEET_KEYS:
                del data[key]
        else:
            data["lease_expires"] = _iso(self.lease_expires)
            data["next_due"] = _iso(self.next_due)
        return data


_FLEET_KEYS = ("worker", "lease_expires", "next_due")


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _leases(store: Store) -> dict[str, tuple[str | None, float | None, float | None]] | None:
    """Fleet mode: mailbox -> (holder, lease expiry, next due); None for SQLite."""
    leases = getattr(store, "leases", None)
    if leases is None:
        return None
    from popsync.lease import LeaseStore, mailbox_of

    assert isinstance(leases, LeaseStore)
    return {
        mailbox_of(row.server, row.username): (
            row.holder if row.expires_at is not None else None,
            None if row.expires_at is None else row.expires_at.timestamp(),
            row.next_due.timestamp(),
        )
        for row in leases.overview()
    }


def collect_status(config: Config, store: Store) -> list[AccountStatus]:
    """One row per configured account, in config order."""
    runs = store.last_runs()
    leases = _leases(store)
    rows = []
    for name, account in config.accounts.items():
        entries = store.entries(account.mailbox).values()
        run = runs.get(account.mailbox)
        rows.append(
            AccountStatus(
                account=name,
                host=f"{account.host}:{account.port}",
                enabled=account.enabled,
                last_run=None if run is None else (run.finished or run.started),
                outcome=None if run is None else run.outcome,
                on_server=None if run is None else run.messages_on_server,
                delivered=sum(1 for e in entries if e.state == "delivered"),
                pending=sum(1 for e in entries if e.state == "pending"),
                rejected=sum(1 for e in entries if e.state == "rejected"),
                deleted=sum(1 for e in entries if e.deleted_at is not None),
                too_large=sum(1 for e in entries if e.state == "too_large"),
                last_fetched=0 if run is None else run.fetched,
                failures=0 if run is None else run.consecutive_failures,
                # Stored errors quote the server; older popsync stored them raw.
                error=None if run is None or run.error is None else safe_text(run.error),
                **_lease_fields(leases, account.mailbox),
            )
        )
    return rows


def _lease_fields(
    leases: dict[str, tuple[str | None, float | None, float | None]] | None, mailbox: str
) -> dict[str, Any]:
    if leases is None:
        return {}
    holder, expires, due = leases.get(mailbox, (None, None, None))
    worker = None if holder is None else safe_text(holder, 200)
    return {"fleet": True, "worker": worker, "lease_expires": expires, "next_due": due}


def state_dir_of(config_path: Path) -> Path:
    """The state directory a config file names, read leniently from a file that may be invalid.

    ``popsync status`` uses it to still find the daemon's record when the edited config is
    broken, which is exactly when a rejected reload matters.
    """
    from popsync.config import default_state_dir

    try:
        value = tomllib.loads(config_path.read_text(encoding="utf-8")).get("state_dir")
    except (OSError, ValueError):
        value = None
    if isinstance(value, str) and value.strip():
        path = Path(os.path.expanduser(value))
        if path.is_absolute():
            return path
    return default_state_dir()


def daemon_line(state_dir: Path, *, now: float | None = None) -> tuple[str, bool] | None:
    """A line about the running daemon and whether it is a problem; None when none runs.

    A rejected config reload is a problem: the daemon still runs the previous config, and
    whoever edited the file should know their change is not in effect.
    """
    from popsync.statefile import read_daemon_record

    record = read_daemon_record(state_dir)
    if record is None:
        return None
    now = time.time() if now is None else now
    rejected = record.get("reload_rejected")
    head = f"daemon: pid {record.get('pid')}"
    if not isinstance(rejected, dict):
        return head + ", config in effect", False
    problems = [str(p) for p in rejected.get("problems") or []]
    at = rejected.get("at")
    when = _ago(at if isinstance(at, int | float) else None, now)
    detail = "; ".join(problems) or "invalid config"
    return (
        f"{head}, config reload REJECTED {when}, still running the previous config: {detail}",
        True,
    )


def _ago(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "never"
    seconds = max(0, int(now - stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _until(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "-"
    left = stamp - now  # _ago() of the mirrored time spells the same span
    return "now" if left < 1 else "in " + _ago(now - left, now).removesuffix(" ago")


def _cells(row: AccountStatus, now: float, fleet: bool) -> list[str]:
    outcome = row.outcome or "-"
    if row.failures > 1:
        outcome += f" (x{row.failures})"
    lease = [row.worker or "-", _until(row.lease_expires, now), _until(row.next_due, now)]
    return [
        row.account + ("" if row.enabled else " (disabled)"),
        row.host,
        _ago(row.last_run, now),
        outcome,
        "-" if row.on_server is None else str(row.on_server),
        str(row.delivered),
        str(row.pending),
        str(row.rejected),
        str(row.too_large),
        str(row.last_fetched),
        *(lease if fleet else []),
        row.error or "",
    ]


_HEADERS = [
    "account",
    "server",
    "last run",
    "outcome",
    "on server",
    "delivered",
    "pending",
    "rejected",
    "too large",
    "last fetched",
    "last error",
]
_FLEET_HEADERS = ["worker", "lease until", "next due"]


def render_status(rows: list[AccountStatus], stream: TextIO, *, now: float | None = None) -> None:
    """A rich table on a terminal, aligned plain text otherwise (for scripts and logs)."""
    now = time.time() if now is None else now
    fleet = any(row.fleet for row in rows)
    cells = [_cells(row, now, fleet) for row in rows]
    headers = [*_HEADERS[:-1], *(_FLEET_HEADERS if fleet else []), _HEADERS[-1]]
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(*headers, title="popsync accounts")
        for row, line in zip(rows, cells, strict=True):
            style = None if row.outcome in (None, "ok") else "red"
            # Text, not str: rich would take "[AUTH]" or "[IN-USE]" in an error for markup.
            table.add_row(*(Text(cell) for cell in line), style=style)
        Console(file=stream).print(table)
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        stream.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        stream.write("\n")


def healthcheck(
    config: Config, store: Store, *, max_age: float | None = None, now: float | None = None
) -> tuple[bool, str]:
    """Healthy when some account ran within ``max_age`` and not every account is failing.

    The default age is three of the longest intervals plus a minute: a daemon that misses
    three polls in a row is stuck, whatever the cause.
    """
    now = time.time() if now is None else now
    accounts = [a for a in config.accounts.values() if a.enabled]
    if not accounts:
        return False, "unhealthy: no enabled accounts"
    limit = max_age if max_age is not None else 3 * max(a.interval for a in accounts) + 60
    runs = store.last_runs()
    mine = [runs[a.mailbox] for a in accounts if a.mailbox in runs]
    if not mine:
        return False, "unhealthy: no account has run yet"
    newest = max((r.finished or r.started) for r in mine)
    if now - newest > limit:
        return False, f"unhealthy: no run for {int(now - newest)}s (limit {int(limit)}s)"
    failing = [a.name for a in accounts if a.mailbox in runs and not runs[a.mailbox].ok]
    if len(failing) == len(accounts):
        return False, f"unhealthy: every account is failing ({', '.join(failing)})"
    return True, f"healthy: {len(mine)} account(s) ran, {len(failing)} failing"
