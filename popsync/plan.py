"""The pure sync planner: what to fetch, what to DELE and what to forget.

`plan_sync(listing, seen, policy, now)` looks at one *complete* server listing and the account's
seen-store entries and returns a `Plan`. It does no I/O and reads no clock (`now` is a
parameter), so every rule here is tested with hypothesis properties.

Invariants (the product's promises, in order of importance):
- Only entries with ``state == "delivered"`` are ever DELEd; a pending entry is neither fetched
  nor deleted (the engine recovers pending rows *before* planning, so one left here is unsafe).
- A delivered UIDL is never fetched again; a UIDL is fetched at most once per plan.
- A UIDL listed more than once (a broken server) is fetched once, from its lowest message
  number, and never DELEd: we cannot tell which copy the server would remove.
- A UIDL reset (the server renumbered every message) is detected and, unless the account allows
  it, stops the run from fetching, deleting or forgetting anything.
- A message bigger than ``max_message_size`` is never fetched and never deleted: it is returned
  in ``too_large`` once, to be recorded as *too_large*; a recorded one is fetched as soon as the
  limit allows it (the user raised it).
- Forgetting is slow: a UIDL missing from the listing is only *noted absent* (``absent``); it is
  forgotten once it has been absent for ``forget_after`` seconds AND ``forget_min_listings``
  consecutive complete listings. A vanished UIDL that comes back is not fetched again
  (``reappeared``). An empty or sharply shrunken listing (`shrink_suspected`) notes nothing
  absent and forgets nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "FORGET_AFTER",
    "FORGET_MIN_LISTINGS",
    "RESET_MIN_DELIVERED",
    "RESET_MISSING_RATIO",
    "RESET_UNKNOWN_RATIO",
    "SHRINK_MIN_LOST",
    "SHRINK_RATIO",
    "DeletePolicy",
    "EntryLike",
    "ListingItem",
    "Plan",
    "Policy",
    "plan_sync",
    "settled",
    "show_uidl",
    "show_uidls",
]

DeletePolicy = Literal["never", "after_delivery", "after_days"]
ListingItem = tuple[int, bytes, int | None]

#: Reset detection only trusts statistics over at least this many delivered entries.
RESET_MIN_DELIVERED = 50
#: Fraction of delivered UIDLs missing from the listing that suggests a reset.
RESET_MISSING_RATIO = 0.9
#: Fraction of listed UIDLs that must be unknown (a mailbox full of "new" mail) for a reset.
RESET_UNKNOWN_RATIO = 0.5

_DAY = 86400.0
#: A UIDL is forgotten after this long absent (the ``forget_after`` default) ...
FORGET_AFTER = 30 * _DAY
#: ... and this many consecutive complete listings without it.
FORGET_MIN_LISTINGS = 3
#: A listing that lacks at least SHRINK_MIN_LOST known UIDLs and shrank to SHRINK_RATIO or less
#: of the messages we expected (not counting ones we deleted) looks like a server glitch.
SHRINK_MIN_LOST = 10
SHRINK_RATIO = 0.5
_MAX_NAMED = 5  # UIDLs named in one warning before "..." takes over


class EntryLike(Protocol):
    """What the planner reads from a seen-store entry (`popsync.seen.SeenEntry` fits)."""

    @property
    def state(self) -> str: ...

    @property
    def delivered_at(self) -> float | None: ...

    @property
    def size(self) -> int | None: ...

    @property
    def deleted_at(self) -> float | None: ...

    @property
    def vanished_at(self) -> float | None: ...

    @property
    def absent_runs(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-account rules; "never" is the keep-everything-on-the-server policy."""

    delete: DeletePolicy = "never"
    delete_after_days: int | None = None
    max_message_size: int | None = None
    allow_uidl_reset: bool = False
    forget_after: float = FORGET_AFTER
    forget_min_listings: int = FORGET_MIN_LISTINGS

    def __post_init__(self) -> None:
        if self.delete not in ("never", "after_delivery", "after_days"):
            raise ValueError(f"unknown delete policy {self.delete!r}")
        if self.delete == "after_days" and (
            self.delete_after_days is None or self.delete_after_days < 0
        ):
            raise ValueError("delete='after_days' needs delete_after_days >= 0")
        if self.max_message_size is not None and self.max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        if self.forget_after < 0 or self.forget_min_listings < 1:
            raise ValueError("forget_after must be >= 0 and forget_min_listings >= 1")


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's answer; listing tuples are in ascending message-number order.

    ``too_large`` holds messages to record as too large (new ones); ``held`` counts the
    recorded ones still over the limit. ``absent`` are UIDLs to note as missing once more,
    ``forget`` those missing long enough to drop, ``reappeared`` vanished ones listed again.
    """

    fetch: tuple[ListingItem, ...] = ()
    delete: tuple[tuple[int, bytes], ...] = ()
    forget: tuple[bytes, ...] = ()
    too_large: tuple[tuple[int, bytes, int], ...] = ()
    held: int = 0
    absent: tuple[bytes, ...] = ()
    reappeared: tuple[bytes, ...] = ()
    duplicates: tuple[bytes, ...] = ()
    reset_suspected: bool = False
    shrink_suspected: bool = False
    warnings: tuple[str, ...] = ()


def show_uidl(uidl: bytes, limit: int = 80) -> str:
    """A UIDL as text for a log line: printable ASCII as is, anything else escaped, capped.

    Its own few lines rather than `popsync.textsafe`: this module stays pure (stdlib only),
    and a UIDL is octets, never a secret.
    """
    text = uidl[:limit].decode("ascii", "backslashreplace")
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
    return text + ("..." if len(uidl) > limit else "")


def show_uidls(uidls: Sequence[bytes], *, count: int = _MAX_NAMED, limit: int = 80) -> str:
    """Name the first ``count`` UIDLs for a warning without flooding the log."""
    shown = ", ".join(show_uidl(u, limit) for u in uidls[:count])
    return shown + (", ..." if len(uidls) > count else "")


def _first_and_duplicates(
    listing: Sequence[ListingItem],
) -> tuple[Iterable[ListingItem], list[bytes], Collection[bytes]]:
    """The first (lowest message number) item per UIDL in number order, the UIDLs listed
    more than once, and every listed UIDL.

    A listing may have a million items: none is copied, and in the usual case (numbers
    ascending, no UIDL twice) the only thing built is one dict of the listing's own UIDLs,
    or nothing when the listing offers ``distinct_uidls()`` (`popsync.listing.Listing`).
    """
    distinct = getattr(listing, "distinct_uidls", None)
    known: Collection[bytes] | None = distinct() if callable(distinct) else None
    if known is not None:
        return listing, [], known
    listed: dict[bytes, None] = {}
    last = -1
    ascending = True
    for number, uidl, _ in listing:
        ascending = ascending and number > last
        last = number
        listed[uidl] = None
    if ascending and len(listed) == len(listing):
        return listing, [], listed.keys()
    del listed
    first: dict[bytes, int] = {}
    duplicates: dict[bytes, None] = {}
    for index in sorted(range(len(listing)), key=lambda i: listing[i][0]):
        uidl = listing[index][1]
        if uidl in first:
            duplicates[uidl] = None
        else:
            first[uidl] = index
    return (listing[index] for index in first.values()), list(duplicates), first.keys()


def _reset_suspected(listed: Collection[bytes], seen: Mapping[bytes, EntryLike]) -> bool:
    """True when most delivered UIDLs vanished and most listed UIDLs are new to us."""
    delivered = [u for u, e in seen.items() if e.state == "delivered"]
    if len(delivered) < RESET_MIN_DELIVERED or not listed:
        return False
    missing = sum(1 for u in delivered if u not in listed)
    if missing < RESET_MISSING_RATIO * len(delivered):
        return False  # the usual case; spares a pass over a listing of a million
    unknown = sum(1 for u in listed if u not in seen)
    return unknown > RESET_UNKNOWN_RATIO * len(listed)


def _may_delete(entry: EntryLike, policy: Policy, now: float) -> bool:
    """The delete policy for one delivered entry."""
    if entry.state != "delivered" or policy.delete == "never":
        return False
    if policy.delete == "after_delivery":
        return True
    days = policy.delete_after_days
    # A delivered row without a timestamp (should not happen) is kept: deleting is irreversible.
    return (
        days is not None
        and entry.delivered_at is not None
        and (now - entry.delivered_at >= days * _DAY)
    )


def _limit_allows(size: int | None, limit: int | None) -> bool:
    """Unknown sizes pass: the client's max_size guard stops an oversized RETR."""
    return limit is None or size is None or size <= limit


def _absence(
    listed: Collection[bytes], seen: Mapping[bytes, EntryLike], policy: Policy, now: float
) -> tuple[list[bytes], list[bytes], bool]:
    """(UIDLs to note absent once more, UIDLs absent long enough to forget, shrink suspected).

    One pass over the seen rows (a million at scale). A shrink: the listing lost UIDLs it
    showed last time (ours to delete excepted), and is empty or lost many and most of them;
    then nothing is noted or forgotten.
    """
    absent: list[bytes] = []
    forget: list[bytes] = []
    expected = 0
    lost = 0
    for uidl, entry in seen.items():
        since = entry.vanished_at
        shown_last_time = since is None and entry.deleted_at is None
        expected += shown_last_time
        if uidl in listed:
            continue
        lost += shown_last_time
        if (
            since is not None
            and now - since >= policy.forget_after
            and entry.absent_runs + 1 >= policy.forget_min_listings
        ):
            forget.append(uidl)
        else:
            absent.append(uidl)
    shrunk = not listed or (lost >= SHRINK_MIN_LOST and len(listed) <= SHRINK_RATIO * expected)
    if lost and shrunk:
        return [], [], True
    return absent, forget, False


def plan_sync(
    listing: Sequence[ListingItem],
    seen: Mapping[bytes, EntryLike],
    policy: Policy,
    now: float,
) -> Plan:
    """Plan one run from a complete listing of (message number, UIDL, size or None)."""
    unique, duplicates, listed = _first_and_duplicates(listing)
    dup_set = set(duplicates)
    warnings: list[str] = []
    if duplicates:
        warnings.append(
            f"server listed {len(duplicates)} UIDL(s) more than once ({show_uidls(duplicates)});"
            " fetching each once and never deleting them"
        )

    reset = _reset_suspected(listed, seen)
    if reset and not policy.allow_uidl_reset:
        warnings.append(
            "UIDL reset suspected: most delivered UIDLs vanished and most listed ones are new;"
            " fetching, deleting and forgetting nothing (set allow_uidl_reset to accept it)"
        )
        return Plan(duplicates=tuple(duplicates), reset_suspected=True, warnings=tuple(warnings))
    if reset:
        warnings.append("UIDL reset suspected and allowed: listed messages are fetched again")

    fetch: list[ListingItem] = []
    too_large: list[tuple[int, bytes, int]] = []
    held = 0
    delete: list[tuple[int, bytes]] = []
    reappeared: list[bytes] = []
    limit = policy.max_message_size
    for msgnum, uidl, size in unique:
        entry = seen.get(uidl)
        if entry is None:
            if _limit_allows(size, limit):
                fetch.append((msgnum, uidl, size))
            else:
                too_large.append((msgnum, uidl, size or 0))
            continue
        if entry.vanished_at is not None:
            reappeared.append(uidl)
        if entry.state == "too_large":
            # The recorded size may exceed LIST's (RETR outgrew it); the larger one counts.
            known = max(entry.size or 0, size or 0)
            if _limit_allows(known, limit):
                fetch.append((msgnum, uidl, size))
            else:
                held += 1
        elif uidl not in dup_set and _may_delete(entry, policy, now):
            delete.append((msgnum, uidl))
        # Any other known entry (pending, rejected, or delivered and kept) is left alone.

    if too_large:
        warnings.append(
            f"{len(too_large)} message(s) larger than max_message_size={limit} remembered and"
            f" left on the server: {show_uidls([u for _, u, _ in too_large])}"
        )
    absent, forget, shrink = _absence(listed, seen, policy, now)
    if shrink:
        warnings.append(
            f"the server listed {len(listed)} message(s), far fewer than before; treating"
            " the listing as a glitch: nothing is marked vanished or forgotten"
        )
    return Plan(
        fetch=tuple(fetch),
        delete=tuple(delete),
        forget=tuple(forget),
        too_large=tuple(too_large),
        held=held,
        absent=tuple(absent),
        reappeared=tuple(reappeared),
        duplicates=tuple(duplicates),
        reset_suspected=reset,
        shrink_suspected=shrink,
        warnings=tuple(warnings),
    )


def settled(plan: Plan, policy: Policy) -> bool:
    """True when, once ``plan`` has run to completion, planning the same listing again with the
    same policy and an unchanged seen-store would find nothing to do.

    Then every listed UIDL is known and delivered or rejected (fetched now or before), and
    nothing else can come of it: the policy never deletes, no row is absent (so nothing is
    noted, forgotten or suspected of a shrink), nothing is too large or held, no UIDL is
    listed twice and no warning is due. Reappeared rows are fine: this run marks them present.
    `popsync.sync` then skips reading the seen-store and planning for that listing.
    """
    return (
        policy.delete == "never"
        and not plan.delete
        and not plan.too_large
        and not plan.held
        and not plan.absent
        and not plan.forget
        and not plan.duplicates
        and not plan.reset_suspected
        and not plan.shrink_suspected
        and not plan.warnings
    )
