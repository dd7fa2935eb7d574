"""Look before acting: ``popsync ls`` and ``popsync --once --dry-run``.

Both log in, list the mailbox and compare it with the seen-store, and change nothing: no
RETR, no DELE (QUIT with nothing marked deletes nothing), no Maildir, no store write. The
store is read only if it already exists, so a dry run before the first real one does not
even create it.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from popsync.plan import Plan, plan_sync, show_uidl
from popsync.session import clean_text, open_session

if TYPE_CHECKING:
    from popsync.client import Pop3Client
    from popsync.config import Account, Config
    from popsync.seen import SeenEntry
    from popsync.store import Store

__all__ = ["HEADER_FIELDS", "Listed", "dry_run", "list_mailbox", "read_entries", "read_state"]

#: Header fields ``ls --headers`` shows.
HEADER_FIELDS = ("From", "Date", "Subject")
_HEADER_LIMIT = 64 * 1024  # TOP n 0 of a hostile server is cut off here


@dataclass
class Listed:
    """One message on the server and what the seen-store says about it."""

    msgnum: int
    uidl: str
    size: int | None
    state: str
    headers: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "number": self.msgnum,
            "size": self.size,
            "uidl": self.uidl,
            "state": self.state,
            **({"headers": self.headers} if self.headers else {}),
        }


def read_entries(config: Config, mailbox: str) -> Mapping[bytes, SeenEntry]:
    """The mailbox's seen rows, or none when the store does not exist yet.

    A SQLite store is never created here; a PostgreSQL one is opened as for a run.
    """
    return read_state(config, mailbox)[0]


def read_state(config: Config, mailbox: str) -> tuple[Mapping[bytes, SeenEntry], bool]:
    """The mailbox's seen rows and whether this would be its first run (see sync)."""
    from popsync.store import is_postgres_url

    store: Store
    if is_postgres_url(config.store):
        from popsync.store import open_store

        store = open_store(config)
    else:
        db = config.state_dir / "popsync.sqlite3"
        if not db.exists():
            return {}, True
        from popsync.seen import SeenStore

        store = SeenStore.open(db)
    from popsync.sync import is_first_run

    with store:
        return store.entries(mailbox), is_first_run(store, mailbox)


def _state(entry: SeenEntry | None, too_large: bool) -> str:
    """new, delivered, pending, too large, rejected, or vanished (listed again after it was
    missing from earlier listings)."""
    if entry is None:
        return "too large" if too_large else "new"
    if entry.vanished_at is not None:
        return "vanished"
    return str(entry.state).replace("_", " ")


def _uidl_text(uidl: bytes) -> str:
    return show_uidl(uidl)


def list_mailbox(
    account: Account,
    secret: str,
    entries: Mapping[bytes, SeenEntry],
    *,
    headers: bool = False,
) -> list[Listed]:
    """What is on the server, read-only: UIDL, LIST and, with ``headers``, TOP n 0."""
    client = open_session(account, secret)
    try:
        uidls, sizes = client.listings()
        limit = account.max_message_size or None
        rows = [
            Listed(
                msgnum,
                _uidl_text(uidl),
                sizes.get(msgnum),
                _state(entries.get(uidl), limit is not None and sizes.get(msgnum, 0) > limit),
            )
            for msgnum, uidl in uidls
        ]
        if headers and rows:
            _fetch_headers(client, rows)
        client.quit()
    finally:
        client.close()
    return rows


class _Capped:
    """A sink that keeps at most _HEADER_LIMIT bytes of a TOP reply."""

    def __init__(self) -> None:
        self.buffer = BytesIO()

    def write(self, data: bytes, /) -> int:
        room = _HEADER_LIMIT - self.buffer.tell()
        if room > 0:
            self.buffer.write(data[:room])
        return len(data)


def _fetch_headers(client: Pop3Client, rows: list[Listed]) -> None:
    by_number = {row.msgnum: row for row in rows}

    def done(msgnum: int, sink: object, size: int) -> None:
        assert isinstance(sink, _Capped)
        by_number[msgnum].headers = decode_headers(sink.buffer.getvalue())

    client.top_many(list(by_number), 0, lambda _: _Capped(), done)


def decode_headers(raw: bytes) -> dict[str, str]:
    """From, Date and Subject of a message head, MIME-decoded and made safe to print."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    message = parser.parsebytes(raw)
    shown: dict[str, str] = {}
    for name in HEADER_FIELDS:
        value = message.get(name)
        if value is None:
            continue
        try:
            text = str(email.header.make_header(email.header.decode_header(str(value))))
        except (ValueError, LookupError, UnicodeError):
            text = str(value)
        shown[name.lower()] = clean_text(" ".join(text.split()), 200)
    return shown


def dry_run(account: Account, secret: str, entries: Mapping[bytes, SeenEntry], now: float) -> Plan:
    """The plan a sync would carry out now; nothing is fetched, deleted or recorded."""
    from popsync.prelogin import policy_of

    client = open_session(account, secret)
    try:
        uidls, sizes = client.listings()
        listing = [(msgnum, uidl, sizes.get(msgnum)) for msgnum, uidl in uidls]
        plan = plan_sync(listing, entries, policy_of(account), now)
        client.quit()
    finally:
        client.close()
    return plan
