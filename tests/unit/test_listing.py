"""The compact listing and seen view: same plans as plain lists and dicts, bounded memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popsync.listing import Listing, SeenView
from popsync.plan import ListingItem, Plan, Policy, plan_sync
from popsync.pop3 import (
    NEED_DATA,
    ClientConnection,
    RemoteProtocolError,
    ScanListing,
    UidlListing,
)
from popsync.pop3 import commands as cmd
from popsync.seen import EntryRow, SeenEntry, SeenStore

__all__: list[str] = []

NOW = 1_700_000_000.0
DAY = 86400.0
CHUNK = 256 * 1024  # what Pop3Client reads at a time


def _rows(seen: dict[bytes, SeenEntry]) -> tuple[list[tuple[bytes, float]], list[EntryRow]]:
    """Split entries the way SeenStore.delivered_times / other_rows do."""

    def plain(e: SeenEntry) -> bool:
        return (
            e.state == "delivered"
            and e.delivered_at is not None
            and e.deleted_at is None
            and e.vanished_at is None
        )

    delivered = [(u, e.delivered_at) for u, e in seen.items() if plain(e) and e.delivered_at]
    others: list[EntryRow] = [
        (
            u,
            e.state,
            e.name,
            e.size,
            e.first_seen,
            e.delivered_at,
            e.deleted_at,
            e.vanished_at,
            e.absent_runs,
        )
        for u, e in seen.items()
        if not plain(e)
    ]
    return delivered, others


def _view(listing: Listing, seen: dict[bytes, SeenEntry]) -> SeenView:
    return SeenView(listing, *_rows(seen))


def _entry(
    uidl: bytes,
    state: str,
    at: float | None,
    deleted: float | None = None,
    vanished: float | None = None,
    absent: int = 0,
) -> SeenEntry:
    return SeenEntry(uidl, state, "name", 10, NOW - 50 * DAY, at, deleted, vanished, absent)  # type: ignore[arg-type]


uidls = st.binary(min_size=1, max_size=3)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[ListingItem], dict[bytes, SeenEntry], Policy]:
    """A listing with unique message numbers (maybe shuffled, maybe repeated UIDLs) and rows."""
    numbers = draw(st.lists(st.integers(1, 10_000), unique=True, max_size=40))
    listing = [
        (n, draw(uidls), draw(st.integers(0, 2000) | st.none()))
        for n in (sorted(numbers) if draw(st.booleans()) else numbers)
    ]
    listed = [u for _, u, _ in listing]
    keys = draw(st.lists((st.sampled_from(listed) | uidls) if listed else uidls, max_size=30))
    state = st.sampled_from(["pending", "delivered", "delivered", "too_large"])
    at = st.floats(NOW - 40 * DAY, NOW) | st.none()
    deleted = st.none() | st.just(NOW - DAY)
    vanished = st.none() | st.floats(NOW - 60 * DAY, NOW)
    seen = {
        k: _entry(k, draw(state), draw(at), draw(deleted), draw(vanished), draw(st.integers(0, 5)))
        for k in keys
    }
    policy = Policy(
        delete=draw(st.sampled_from(["never", "after_delivery", "after_days"])),
        delete_after_days=draw(st.integers(0, 30)),
        max_message_size=draw(st.none() | st.integers(1, 2000)),
        allow_uidl_reset=draw(st.booleans()),
    )
    return listing, seen, policy


@settings(max_examples=150, deadline=None)
@given(cases())
def test_compact_inputs_plan_exactly_like_lists_and_dicts(
    case: tuple[list[ListingItem], dict[bytes, SeenEntry], Policy],
) -> None:
    """Listing + SeenView give the same plan as a list of tuples and a dict of entries."""
    items, seen, policy = case
    listing = Listing.from_items(items)
    view = _view(listing, seen)
    assert dict(view.items()).keys() == seen.keys()
    assert len(view) == len(seen)
    expected = plan_sync(items, seen, policy, NOW)
    got = plan_sync(listing, view, policy, NOW)
    assert got.fetch == expected.fetch
    assert got.delete == expected.delete
    assert sorted(got.forget) == sorted(expected.forget)
    assert sorted(got.absent) == sorted(expected.absent)
    assert (got.reappeared, got.held) == (expected.reappeared, expected.held)
    assert got.shrink_suspected == expected.shrink_suspected
    assert (got.too_large, got.duplicates) == (expected.too_large, expected.duplicates)
    assert (got.reset_suspected, got.warnings) == (expected.reset_suspected, expected.warnings)


def test_listing_joins_list_sizes_by_number() -> None:
    """Sizes follow message numbers even when LIST is ordered differently or misses one."""
    conn = _logged_in()
    for command in (cmd.uidl(), cmd.list_()):
        conn.send(command)
    conn.receive_data(b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n+OK\r\n3 30\r\n1 10\r\n.\r\n")
    uidl, scan = conn.next_event(), conn.next_event()
    assert isinstance(uidl, UidlListing)
    assert isinstance(scan, ScanListing)
    listing = Listing(uidl.entries, scan.entries)
    assert list(listing) == [(1, b"a", 10), (2, b"b", None), (3, b"c", 30)]
    assert listing[1:] == [(2, b"b", None), (3, b"c", 30)]


def test_seen_view_shares_the_listings_uidl_objects_and_delivery_times() -> None:
    """A listed row keeps no UIDL copy of its own; rows delivered together share one entry."""
    listing = Listing.from_items([(1, b"x" * 40, 5), (2, b"y" * 40, 5)])
    rows = [(b"x" * 40, NOW), (b"y" * 40, NOW), (b"gone", NOW - DAY)]
    others: list[EntryRow] = [(b"pend", "pending", "n", 1, NOW, None, None, None, 0)]
    view = SeenView(listing, rows, others)
    keys = list(view)
    assert keys == [b"x" * 40, b"y" * 40, b"gone", b"pend"]
    assert keys[0] is listing.uids[0]
    assert view[b"x" * 40] is view[b"y" * 40]
    assert (view[b"x" * 40].state, view[b"x" * 40].delivered_at) == ("delivered", NOW)
    assert view.get(b"pend") == SeenEntry(b"pend", "pending", "n", 1, NOW, None, None)
    assert b"nope" not in view
    assert view.get(b"nope", 7) == 7
    with pytest.raises(KeyError):
        view[b"nope"]


def test_store_rows_for_the_view_cover_every_row_once(tmp_path: Path) -> None:
    """delivered_times and other_rows together are exactly the account's entries."""
    with SeenStore.open(tmp_path / "s.sqlite3") as store:
        store.add_pending("a", [(b"p", "tmp1", 3)], at=NOW)
        store.mark_delivered("a", [(b"d1", "n1"), (b"d2", "n2")], NOW)
        store.mark_delivered("b", [(b"other-account", "n3")], NOW)
        delivered = list(store.delivered_times("a"))
        others = list(store.other_rows("a"))
        assert sorted(delivered) == [(b"d1", NOW), (b"d2", NOW)]
        assert [SeenEntry(*row) for row in others] == [store.entries("a")[b"p"]]
        assert (store.count("a"), store.count("none")) == (3, 0)
        assert (store.has_rows("b"), store.has_rows("none")) == (True, False)
        listing = Listing.from_items([(1, b"d1", 1), (2, b"new", 1)])
        view = SeenView(listing, store.delivered_times("a"), store.other_rows("a"))
        assert sorted(view) == sorted(store.entries("a"))


# ------------------------------------------------------------------------- memory bounds
N = 100_000


def _uid(n: int) -> bytes:
    return b"%08X%08X-bounded-memory-%07d" % (n, n * 2654435761 % 2**32, n)


def _logged_in() -> ClientConnection:
    conn = ClientConnection()
    for command in (cmd.user("u"), cmd.pass_("p")):
        conn.send(command)
    conn.receive_data(b"+OK hi\r\n+OK\r\n+OK\r\n")
    for _ in range(3):
        conn.next_event()
    return conn


def _feed(conn: ClientConnection, wire: bytes) -> list[object]:
    events: list[object] = []
    for start in range(0, len(wire), CHUNK):
        conn.receive_data(wire[start : start + CHUNK])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def _traced_peak(run: Iterator[None]) -> int:
    """Peak traced allocation while ``run`` advances (set-up before its first yield)."""
    next(run)
    tracemalloc.start()
    try:
        next(run, None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_parsing_a_100k_uidl_listing_costs_a_small_multiple_of_its_size() -> None:
    """Parsing 100,000 UIDL lines peaks below 3x the listing's size (it was ~20x)."""
    wire = b"+OK\r\n" + b"".join(b"%d %s\r\n" % (n, _uid(n)) for n in range(1, N + 1)) + b".\r\n"
    got: list[object] = []

    def run() -> Iterator[None]:
        conn = _logged_in()
        conn.send(cmd.uidl())
        yield
        got.extend(_feed(conn, wire))

    peak = _traced_peak(run())
    (listing,) = got
    assert isinstance(listing, UidlListing)
    assert len(listing.entries) == N
    assert listing.entries[-1] == (N, _uid(N))
    # What stays is ~88 octets an entry (an id object and two array slots) against ~45 on
    # the wire; a list of lines plus tuples of parsed tuples was ~20 times the wire size.
    assert peak < 3 * len(wire), (peak, len(wire))


def test_diffing_100k_seen_uidls_costs_under_120_octets_an_entry() -> None:
    """SeenView plus plan over 100,000 seen and listed UIDLs: < 120 octets each (was ~300)."""
    items = [(n, _uid(n), 1000) for n in range(1, N + 1)]
    delivered = [(_uid(n), NOW - n // 256) for n in range(1, N - 9)]  # batches of 256
    plans: list[Plan] = []

    def run() -> Iterator[None]:
        listing = Listing.from_items(items)
        rows = iter(delivered)
        yield
        view = SeenView(listing, rows, [])
        plans.append(plan_sync(listing, view, Policy(), NOW))

    peak = _traced_peak(run())
    (plan,) = plans
    assert [uidl for _, uidl, _ in plan.fetch] == [_uid(n) for n in range(N - 9, N + 1)]
    # One dict of the listing's own UIDL objects (~40-80 octets an entry while it grows);
    # entries as SeenEntry objects in a dict of copied keys were ~400 octets.
    assert peak < 120 * N, peak


def test_capa_flood_before_login_is_refused_after_64_kib_in_bounded_memory() -> None:
    """A 19 MB CAPA before login raises after 64 KiB; memory never holds more than a read."""
    flood = b"+OK\r\n" + b"X-FLOOD " + b"y" * 100 + b"\r\n"
    conn = ClientConnection()
    conn.receive_data(b"+OK hi\r\n")
    conn.next_event()
    conn.send(cmd.capa())
    chunk = flood[5:] * (CHUNK // len(flood))
    tracemalloc.start()
    try:
        conn.receive_data(flood[:5])
        fed, error = 0, None
        while fed < 19_000_000 and error is None:
            conn.receive_data(chunk)
            fed += len(chunk)
            try:
                assert conn.next_event() is NEED_DATA
            except RemoteProtocolError as exc:
                error = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "CAPA reply is larger than 65536 octets" in str(error)
    assert fed <= 65536 + len(chunk)
    assert peak < 4 * CHUNK
