"""Tests for the pure sync planner."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import popsync.plan
from popsync.plan import ListingItem, Plan, Policy, plan_sync

NOW = 1_700_000_000.0
DAY = 86400.0


@dataclass(frozen=True)
class Entry:
    """A minimal seen-store entry."""

    state: str
    delivered_at: float | None = None


def delivered(at: float = NOW - DAY) -> Entry:
    """A delivered entry."""
    return Entry("delivered", at)


PENDING = Entry("pending")
KEEP = Policy()
DELETE = Policy(delete="after_delivery")


def test_new_messages_are_fetched_in_message_number_order() -> None:
    """Unknown UIDLs are fetched, sorted by message number, with their sizes."""
    plan = plan_sync([(2, b"b", 20), (1, b"a", 10), (3, b"c", None)], {}, KEEP, NOW)
    assert plan.fetch == ((1, b"a", 10), (2, b"b", 20), (3, b"c", None))
    assert plan.delete == ()
    assert plan.forget == ()
    assert plan.duplicates == ()
    assert not plan.reset_suspected
    assert plan.warnings == ()


def test_delivered_is_not_fetched_and_kept_by_default() -> None:
    """A delivered UIDL is neither fetched nor deleted under the keep policy."""
    plan = plan_sync([(1, b"a", 10)], {b"a": delivered()}, KEEP, NOW)
    assert plan == Plan()


def test_delivered_is_deleted_after_delivery() -> None:
    """after_delivery DELEs delivered messages only."""
    seen = {b"a": delivered(), b"b": PENDING}
    plan = plan_sync([(1, b"a", 1), (2, b"b", 1), (3, b"c", 1)], seen, DELETE, NOW)
    assert plan.delete == ((1, b"a"),)
    assert plan.fetch == ((3, b"c", 1),)


def test_pending_is_neither_fetched_nor_deleted() -> None:
    """A pending entry left after recovery is skipped entirely."""
    plan = plan_sync([(1, b"p", 5)], {b"p": PENDING}, DELETE, NOW)
    assert plan.fetch == ()
    assert plan.delete == ()
    assert plan.forget == ()


@pytest.mark.parametrize(
    ("age_days", "deleted"), [(0.0, False), (6.99, False), (7.0, True), (30.0, True)]
)
def test_after_days_measures_from_delivered_at(age_days: float, deleted: bool) -> None:
    """after_days DELEs once delivered_at is at least N days old."""
    policy = Policy(delete="after_days", delete_after_days=7)
    seen = {b"a": delivered(NOW - age_days * DAY)}
    plan = plan_sync([(1, b"a", 1)], seen, policy, NOW)
    assert plan.delete == (((1, b"a"),) if deleted else ())


def test_after_days_without_timestamp_keeps() -> None:
    """A delivered entry lacking delivered_at is never deleted by age."""
    policy = Policy(delete="after_days", delete_after_days=0)
    plan = plan_sync([(1, b"a", 1)], {b"a": Entry("delivered", None)}, policy, NOW)
    assert plan.delete == ()


def test_absent_seen_uidls_are_forgotten() -> None:
    """Seen UIDLs missing from the listing, pending or delivered, are forgotten."""
    seen = {b"gone": delivered(), b"lost": PENDING, b"here": delivered()}
    plan = plan_sync([(1, b"here", 1)], seen, KEEP, NOW)
    assert set(plan.forget) == {b"gone", b"lost"}


def test_duplicates_fetched_once_and_never_deleted() -> None:
    """A UIDL listed twice is fetched from its first number, never DELEd, and warned about."""
    plan = plan_sync([(3, b"d", 30), (1, b"d", 10), (2, b"x", 1)], {b"x": delivered()}, DELETE, NOW)
    assert plan.fetch == ((1, b"d", 10),)
    assert plan.duplicates == (b"d",)
    assert plan.delete == ((2, b"x"),)
    assert len(plan.warnings) == 1
    assert "more than once" in plan.warnings[0]

    plan = plan_sync([(1, b"d", 1), (2, b"d", 1)], {b"d": delivered()}, DELETE, NOW)
    assert plan.fetch == ()
    assert plan.delete == ()
    assert plan.duplicates == (b"d",)


def test_too_large_is_skipped_with_one_warning() -> None:
    """Messages over max_message_size stay on the server; one warning names them."""
    policy = Policy(max_message_size=100)
    listing: list[ListingItem] = [(1, b"big", 101), (2, b"ok", 100), (3, b"huge", 10**9)]
    listing.append((4, b"unknown-size", None))
    plan = plan_sync(listing, {}, policy, NOW)
    assert plan.fetch == ((2, b"ok", 100), (4, b"unknown-size", None))
    assert plan.too_large == ((1, b"big", 101), (3, b"huge", 10**9))
    assert len(plan.warnings) == 1
    assert "max_message_size=100" in plan.warnings[0]


def _reset_case(n: int, kept: int) -> tuple[dict[bytes, Entry], list[ListingItem]]:
    """n delivered UIDLs of which `kept` are still listed, plus n fresh UIDLs."""
    seen = {f"old{i}".encode(): delivered() for i in range(n)}
    listing: list[ListingItem] = [(i + 1, f"old{i}".encode(), 1) for i in range(kept)]
    listing += [(kept + i + 1, f"new{i}".encode(), 1) for i in range(n)]
    return seen, listing


def test_reset_suspected_blocks_everything() -> None:
    """A UIDL reset fetches, deletes and forgets nothing unless allowed."""
    seen, listing = _reset_case(60, 0)
    plan = plan_sync(listing, seen, DELETE, NOW)
    assert plan.reset_suspected
    assert plan.fetch == ()
    assert plan.delete == ()
    assert plan.forget == ()
    assert any("reset" in w for w in plan.warnings)


def test_reset_allowed_proceeds() -> None:
    """With allow_uidl_reset the run proceeds and still warns."""
    seen, listing = _reset_case(60, 0)
    policy = Policy(delete="after_delivery", allow_uidl_reset=True)
    plan = plan_sync(listing, seen, policy, NOW)
    assert plan.reset_suspected
    assert len(plan.fetch) == 60
    assert len(plan.forget) == 60
    assert any("allowed" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("n", "kept", "fresh", "expected"),
    [
        (49, 0, 49, False),  # too few delivered entries to judge
        (50, 0, 50, True),
        (50, 5, 50, True),  # exactly 90% missing
        (50, 6, 50, False),  # 88% missing
        (60, 0, 0, False),  # mailbox emptied (e.g. by webmail): not a reset
    ],
)
def test_reset_thresholds(n: int, kept: int, fresh: int, expected: bool) -> None:
    """Reset detection needs >= 50 delivered, >= 90% missing and mostly unknown listing."""
    seen = {f"old{i}".encode(): delivered() for i in range(n)}
    listing: list[ListingItem] = [(i + 1, f"old{i}".encode(), 1) for i in range(kept)]
    listing += [(kept + i + 1, f"new{i}".encode(), 1) for i in range(fresh)]
    assert plan_sync(listing, seen, KEEP, NOW).reset_suspected is expected


def test_reset_needs_mostly_unknown_listing() -> None:
    """Many vanished UIDLs with a listing of mostly known ones is not a reset."""
    seen = {f"old{i}".encode(): delivered() for i in range(100)}
    seen.update({f"p{i}".encode(): PENDING for i in range(10)})
    listing: list[ListingItem] = [(i + 1, f"p{i}".encode(), 1) for i in range(10)]
    listing.append((11, b"fresh", 1))
    assert not plan_sync(listing, seen, KEEP, NOW).reset_suspected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delete": "sometimes"},
        {"delete": "after_days"},
        {"delete": "after_days", "delete_after_days": -1},
        {"max_message_size": 0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    """Policy validates its fields."""
    with pytest.raises(ValueError):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_plan_is_pure() -> None:
    """plan.py imports only the standard library and nothing that does I/O."""
    tree = ast.parse(Path(popsync.plan.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names)
    assert not imported & {"os", "io", "time", "socket", "sqlite3", "pathlib", "random"}


# --- properties -------------------------------------------------------------------------------

uidls = st.binary(min_size=1, max_size=3)
entries = st.one_of(
    st.just(PENDING),
    st.builds(Entry, st.just("delivered"), st.floats(NOW - 40 * DAY, NOW) | st.none()),
)
listings = st.lists(
    st.tuples(st.integers(1, 10_000), uidls, st.integers(0, 2000) | st.none()), max_size=40
).map(lambda items: [(i + 1, u, s) for i, (_, u, s) in enumerate(items)])
policies = st.builds(
    Policy,
    delete=st.sampled_from(["never", "after_delivery", "after_days"]),
    delete_after_days=st.integers(0, 30),
    max_message_size=st.none() | st.integers(1, 2000),
    allow_uidl_reset=st.booleans(),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[ListingItem], dict[bytes, Entry], Policy]:
    """A listing, a seen mapping overlapping it, and a policy."""
    listing = draw(listings)
    listed = [u for _, u, _ in listing]
    extra = draw(st.lists(uidls, max_size=20))
    keys = draw(st.lists(st.sampled_from(listed + extra), max_size=30)) if listed + extra else []
    seen = {k: draw(entries) for k in keys}
    return listing, seen, draw(policies)


@settings(max_examples=400)
@given(cases())
def test_properties(case: tuple[list[ListingItem], dict[bytes, Entry], Policy]) -> None:
    """The planner's safety invariants hold for arbitrary listings and seen states."""
    listing, seen, policy = case
    plan = plan_sync(listing, seen, policy, NOW)
    listed = {u for _, u, _ in listing}
    fetched = [u for _, u, _ in plan.fetch]

    for _, uidl in plan.delete:  # never deletes anything not delivered, nor a duplicate
        assert seen[uidl].state == "delivered"
        assert uidl not in plan.duplicates
    assert not any(u in seen and seen[u].state == "delivered" for u in fetched)
    assert not any(u in seen and seen[u].state == "pending" for u in fetched)
    assert len(fetched) == len(set(fetched))
    assert not set(plan.forget) & listed
    assert set(plan.forget) <= set(seen)
    for seq in ([m for m, _, _ in plan.fetch], [m for m, _ in plan.delete]):
        assert seq == sorted(seq)
        assert len(seq) == len(set(seq))
    if policy.delete == "never":
        assert plan.delete == ()
    if plan.reset_suspected and not policy.allow_uidl_reset:
        assert plan.fetch == ()
        assert plan.delete == ()
        assert plan.forget == ()
    if policy.max_message_size is not None:
        assert all(s is None or s <= policy.max_message_size for _, _, s in plan.fetch)


@given(listings)
def test_empty_seen_fetches_every_unique_uidl(listing: list[ListingItem]) -> None:
    """With nothing seen and no size limit, every distinct listed UIDL is fetched once."""
    plan = plan_sync(listing, {}, KEEP, NOW)
    assert {u for _, u, _ in plan.fetch} == {u for _, u, _ in listing}


def test_warnings_show_uidls_as_text() -> None:
    """UIDLs in warnings read as text (000a), never as Python bytes (b'000a')."""
    plan = plan_sync([(1, b"000a", 500), (2, b"x\xff", 500)], {}, Policy(max_message_size=100), 0.0)
    assert plan.warnings[0].endswith("left on the server: 000a, x\\xff")
    assert "b'" not in plan.warnings[0]
