"""Tests for the pure sync planner."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import popsync.plan
from popsync.plan import (
    FORGET_AFTER,
    FORGET_MIN_LISTINGS,
    ListingItem,
    Plan,
    Policy,
    plan_sync,
    show_uidl,
)

NOW = 1_700_000_000.0
DAY = 86400.0


@dataclass(frozen=True)
class Entry:
    """A minimal seen-store entry."""

    state: str
    delivered_at: float | None = None
    size: int | None = None
    deleted_at: float | None = None
    vanished_at: float | None = None
    absent_runs: int = 0


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


def test_absent_seen_uidls_are_only_noted_absent() -> None:
    """Seen UIDLs missing from one listing, pending or delivered, are noted, not forgotten."""
    seen = {b"gone": delivered(), b"lost": PENDING, b"here": delivered()}
    plan = plan_sync([(1, b"here", 1)], seen, KEEP, NOW)
    assert plan.forget == ()
    assert set(plan.absent) == {b"gone", b"lost"}


@pytest.mark.parametrize(
    ("absent_for", "runs_before", "forgotten"),
    [
        (FORGET_AFTER, FORGET_MIN_LISTINGS - 1, True),
        (FORGET_AFTER * 3, FORGET_MIN_LISTINGS + 5, True),
        (FORGET_AFTER - 1, FORGET_MIN_LISTINGS + 5, False),  # many listings, too little time
        (FORGET_AFTER * 3, FORGET_MIN_LISTINGS - 2, False),  # long ago, too few listings
    ],
)
def test_forgotten_only_after_time_and_listings(
    absent_for: float, runs_before: int, forgotten: bool
) -> None:
    """A vanished UIDL is forgotten only after forget_after AND enough consecutive listings."""
    gone = replace(delivered(), vanished_at=NOW - absent_for, absent_runs=runs_before)
    plan = plan_sync([(1, b"here", 1)], {b"gone": gone, b"here": delivered()}, KEEP, NOW)
    assert plan.forget == ((b"gone",) if forgotten else ())
    assert plan.absent == (() if forgotten else (b"gone",))


def test_forget_after_is_configurable() -> None:
    """forget_after = 0 forgets after forget_min_listings listings, whatever the time."""
    gone = replace(delivered(), vanished_at=NOW, absent_runs=FORGET_MIN_LISTINGS - 1)
    policy = Policy(forget_after=0)
    plan = plan_sync([(1, b"here", 1)], {b"gone": gone, b"here": delivered()}, policy, NOW)
    assert plan.forget == (b"gone",)


def test_vanished_uidl_that_comes_back_is_not_fetched() -> None:
    """A UIDL listed again after vanishing is reported as reappeared and not fetched."""
    back = replace(delivered(), vanished_at=NOW - 5 * DAY, absent_runs=7)
    plan = plan_sync([(1, b"back", 10)], {b"back": back}, KEEP, NOW)
    assert plan.fetch == ()
    assert plan.reappeared == (b"back",)


def test_empty_listing_changes_nothing_and_warns() -> None:
    """An empty listing notes nothing absent and forgets nothing, with one warning."""
    old = replace(delivered(), vanished_at=NOW - 90 * DAY, absent_runs=50)
    seen = {b"a": delivered(), b"b": delivered(), b"old": old}
    plan = plan_sync([], seen, KEEP, NOW)
    assert plan.shrink_suspected
    assert (plan.absent, plan.forget, plan.fetch) == ((), (), ())
    assert any("far fewer than before" in w for w in plan.warnings)


def test_sharply_shrunken_listing_changes_nothing() -> None:
    """Losing most of a large mailbox at once is a glitch: nothing is noted or forgotten."""
    seen = {f"u{i}".encode(): delivered() for i in range(40)}
    listing: list[ListingItem] = [(1, b"u0", 1), (2, b"u1", 1), (3, b"new", 1)]
    plan = plan_sync(listing, seen, KEEP, NOW)
    assert plan.shrink_suspected
    assert (plan.absent, plan.forget) == ((), ())
    assert plan.fetch == ((3, b"new", 1),)


def test_few_or_deleted_missing_is_not_a_shrink() -> None:
    """Messages we deleted, or a handful read elsewhere, vanish normally."""
    seen = {f"u{i}".encode(): delivered() for i in range(40)}
    seen.update({f"d{i}".encode(): replace(delivered(), deleted_at=NOW) for i in range(100)})
    listing: list[ListingItem] = [(i + 1, f"u{i}".encode(), 1) for i in range(31)]
    plan = plan_sync(listing, seen, KEEP, NOW)
    assert not plan.shrink_suspected
    assert len(plan.absent) == 9 + 100


def test_known_too_large_is_held_silently_and_fetched_when_the_limit_rises() -> None:
    """A recorded too_large message is neither refetched nor warned about until it fits."""
    seen = {b"big": Entry("too_large", size=5000)}
    plan = plan_sync([(1, b"big", 4000)], seen, Policy(max_message_size=4500), NOW)
    assert (plan.fetch, plan.too_large, plan.held, plan.warnings) == ((), (), 1, ())
    assert plan.delete == ()
    raised = plan_sync([(1, b"big", 4000)], seen, Policy(max_message_size=5000), NOW)
    assert raised.fetch == ((1, b"big", 4000),)
    unlimited = plan_sync([(1, b"big", 4000)], seen, Policy(), NOW)
    assert unlimited.fetch == ((1, b"big", 4000),)


def test_too_large_is_never_deleted() -> None:
    """Even with delete = after_delivery a too_large message stays on the server."""
    seen = {b"big": Entry("too_large", size=5000)}
    plan = plan_sync([(1, b"big", 5000)], seen, Policy("after_delivery", None, 100), NOW)
    assert plan.delete == ()


def test_uidls_are_shown_as_text() -> None:
    """Warnings name UIDLs as text, escaping what is not printable ASCII."""
    assert show_uidl(b"00000001abc") == "00000001abc"
    assert show_uidl(b"a\x1b[2J\xff") == "a\\x1b[2J\\xff"
    plan = plan_sync([(1, b"big", 101)], {}, Policy(max_message_size=100), NOW)
    assert "big" in plan.warnings[0]
    assert "b'big'" not in plan.warnings[0]


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
    assert plan.delete == ()
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
    assert len(plan.absent) == 60  # forgotten slowly like any vanished UIDL
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
entries = st.builds(
    Entry,
    st.sampled_from(["pending", "delivered", "delivered", "too_large"]),
    st.floats(NOW - 40 * DAY, NOW) | st.none(),
    st.integers(0, 4000) | st.none(),
    st.none() | st.just(NOW - DAY),
    st.none() | st.floats(NOW - 60 * DAY, NOW),
    st.integers(0, 6),
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
    forget_after=st.sampled_from([0.0, DAY, FORGET_AFTER]),
    forget_min_listings=st.integers(1, 4),
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_properties(case: tuple[list[ListingItem], dict[bytes, Entry], Policy]) -> None:
    """The planner's safety invariants hold for arbitrary listings and seen states."""
    listing, seen, policy = case
    plan = plan_sync(listing, seen, policy, NOW)
    listed = {u for _, u, _ in listing}
    fetched = [u for _, u, _ in plan.fetch]

    if not listed and any(e.vanished_at is None and e.deleted_at is None for e in seen.values()):
        assert plan.shrink_suspected
    for _, uidl in plan.delete:  # never deletes anything not delivered, nor a duplicate
        assert seen[uidl].state == "delivered"
        assert uidl not in plan.duplicates
    # Only a recorded too_large message that now fits is ever fetched again.
    assert all(seen[u].state == "too_large" for u in fetched if u in seen)
    assert len(fetched) == len(set(fetched))
    assert not set(plan.forget) & listed
    assert set(plan.forget) <= set(seen)
    assert not set(plan.absent) & set(plan.forget)
    for uidl in plan.forget:  # forgotten only after the time AND the listings
        since = seen[uidl].vanished_at
        assert since is not None
        assert NOW - since >= policy.forget_after
        assert seen[uidl].absent_runs + 1 >= policy.forget_min_listings
    if plan.shrink_suspected:
        assert (plan.absent, plan.forget) == ((), ())
    elif not (plan.reset_suspected and not policy.allow_uidl_reset):
        assert set(plan.absent) | set(plan.forget) == set(seen) - listed
    assert set(plan.reappeared) <= listed
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


def _apply(plan: Plan, seen: dict[bytes, Entry], now: float) -> dict[bytes, Entry]:
    """What the engine records after a plan (every fetch delivered), as a new mapping."""
    after = dict(seen)
    for _, uidl, _ in plan.fetch:
        after[uidl] = delivered(now)
    for _, uidl, size in plan.too_large:
        after[uidl] = Entry("too_large", size=size)
    for uidl in plan.absent:
        old = after[uidl]
        since = old.vanished_at if old.vanished_at is not None else now
        after[uidl] = replace(old, vanished_at=since, absent_runs=old.absent_runs + 1)
    for uidl in plan.reappeared:
        after[uidl] = replace(after[uidl], vanished_at=None, absent_runs=0)
    for uidl in plan.forget:
        del after[uidl]
    return after


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listings, st.lists(st.sampled_from(["empty", "same", "half"]), min_size=1, max_size=6))
def test_glitchy_listings_never_refetch(listing: list[ListingItem], glitches: list[str]) -> None:
    """Within forget_after, empty or shrunken listings never make a delivered message come back."""
    seen = _apply(plan_sync(listing, {}, KEEP, NOW), {}, NOW)
    delivered_once = set(seen)
    now = NOW
    for glitch in glitches:
        now += DAY
        shown = {"empty": [], "same": listing, "half": listing[: len(listing) // 2]}[glitch]
        plan = plan_sync(shown, seen, KEEP, now)
        seen = _apply(plan, seen, now)
        plan = plan_sync(listing, seen, KEEP, now)
        assert not {u for _, u, _ in plan.fetch} & delivered_once
        seen = _apply(plan, seen, now)
