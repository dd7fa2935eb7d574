"""The server listing and the seen-store rows, in the compact form the planner reads.

At a million messages every per-message Python object counts: a tuple of three with two
ints costs ~130 octets, a dict entry ~40, a `~popsync.seen.SeenEntry` with its name ~250.
So a run never holds a tuple per listed message nor an entry object per seen row:

- `Listing` keeps UIDL and LIST as the POP3 core parsed them (message numbers and sizes in
  ``array('q')``, the UIDLs in one list) and hands out ``(number, uidl, size)`` tuples only
  while the planner iterates;
- `SeenView` is the planner's ``seen`` mapping: one dict keyed by the listing's own UIDL
  objects (no second copy of them), whose value for a delivered row is an object shared by
  every row delivered at the same time (a batch). Rows in any other state are kept whole;
  rows whose UIDL is not listed go into a second dict.

Pure: no I/O, no clock; `popsync.sync` builds both from `popsync.client.Pop3Client.listings`
and `popsync.seen.SeenStore.delivered_times` / ``other_rows``. The planner reads ``state``,
``delivered_at``, ``deleted_at``, ``vanished_at``, ``absent_runs`` and (for too_large rows)
``size``: plain delivered rows have constants for all but the time; any row that differs is
read whole.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Collection, ItemsView, Iterable, Iterator, Mapping, Sequence
from itertools import chain, compress, islice, repeat
from operator import countOf, is_not, lt
from typing import Any, overload

from popsync.plan import ListingItem
from popsync.pop3 import ScanEntries, UidlEntries
from popsync.seen import EntryRow, SeenEntry

__all__ = ["Listing", "SeenValue", "SeenView", "uidl_digest"]

_NO_SIZE = -1


class Listing(Sequence[ListingItem]):
    """UIDL joined with LIST: ``(message number, UIDL, size or None)`` in server order."""

    __slots__ = ("_joined", "numbers", "sizes", "uids")

    def __init__(self, uidl: UidlEntries, scan: ScanEntries) -> None:
        self.numbers = uidl.numbers
        self.uids = uidl.uids
        self._joined: dict[bytes, SeenValue | None] | None = None
        if scan.numbers == uidl.numbers:  # the usual case: both list 1..n in order
            self.sizes = scan.sizes
        else:
            by_number = dict(scan)
            self.sizes = array("q", (by_number.get(n, _NO_SIZE) for n in uidl.numbers))

    @classmethod
    def from_items(cls, items: Iterable[ListingItem]) -> Listing:
        """Build one from ``(number, uidl, size or None)`` tuples (tests, small listings)."""
        uidl, sizes = UidlEntries(), array("q")
        for number, uid, size in items:
            uidl.numbers.append(number)
            uidl.uids.append(uid)
            sizes.append(_NO_SIZE if size is None else size)
        listing = cls(uidl, ScanEntries())
        listing.sizes = sizes
        return listing

    def __len__(self) -> int:
        return len(self.numbers)

    def joined(self) -> dict[bytes, SeenValue | None]:
        """Each distinct UIDL (the listing's own objects) mapped to its seen entry or None.

        Built once; `SeenView` fills in the entries, and the planner uses the keys as the
        set of listed UIDLs (`distinct_uidls`), so the one dict serves both.
        """
        if self._joined is None:
            self._joined = dict.fromkeys(self.uids)
        return self._joined

    def distinct_uidls(self) -> Collection[bytes] | None:
        """Every listed UIDL, when numbers ascend and none is listed twice; else None.

        The planner's fast path (`popsync.plan`): such a listing needs no reordering and
        no duplicate handling.
        """
        numbers = self.numbers
        ascending = all(map(lt, numbers, islice(numbers, 1, None)))
        joined = self.joined()
        return joined.keys() if ascending and len(joined) == len(self) else None

    def _item(self, index: int) -> ListingItem:
        size = self.sizes[index]
        return self.numbers[index], self.uids[index], None if size == _NO_SIZE else size

    @overload
    def __getitem__(self, index: int) -> ListingItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[ListingItem]: ...
    def __getitem__(self, index: int | slice) -> ListingItem | list[ListingItem]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(len(self))[index]]
        return self._item(index)

    def __iter__(self) -> Iterator[ListingItem]:
        if _NO_SIZE not in self.sizes:  # every size known: tuples made in C
            return zip(self.numbers, self.uids, self.sizes, strict=True)
        return map(self._item, range(len(self)))

    def __repr__(self) -> str:
        return f"Listing({self[:3]!r}{'...' if len(self) > 3 else ''}, n={len(self)})"


def uidl_digest(uidl: UidlEntries, salt: bytes) -> bytes:
    """A hash of a UIDL listing (message numbers and UIDLs, in order) and ``salt``.

    What `popsync.seen.SeenStore.set_listing_digest` keeps for a settled listing. Sizes are
    left out: they matter only to messages not yet fetched or held too large, and a listing is
    only remembered as settled when it has neither (`popsync.plan.settled`). No UIDL contains
    a line feed, so joining with one is unambiguous.
    """
    h = hashlib.sha256(salt)
    h.update(len(uidl.numbers).to_bytes(8, "little"))
    h.update(uidl.numbers.tobytes())
    h.update(b"\n".join(uidl.uids))
    return h.digest()


class _Delivered:
    """A plain delivered row as the planner sees it (`popsync.plan.EntryLike`).

    One object per distinct delivery time, shared by every row delivered in the same batch.
    Plain: `popsync.seen.SeenStore.delivered_times` returns only rows neither deleted nor
    vanished, so those fields are constants here (and the size, read only for too_large rows).
    """

    __slots__ = ("delivered_at",)
    state = "delivered"
    size = None
    deleted_at = None
    vanished_at = None
    absent_runs = 0

    def __init__(self, delivered_at: float) -> None:
        self.delivered_at = delivered_at

    def __repr__(self) -> str:
        return f"_Delivered(delivered_at={self.delivered_at!r})"


SeenValue = SeenEntry | _Delivered


class SeenView(Mapping[bytes, SeenValue]):
    """The seen rows of one account as ``{uidl: entry}``, stored against a listing.

    Delivered rows come back as a shared object with only ``state`` and ``delivered_at``
    (all that `popsync.plan.EntryLike` asks for); rows in any other state as `SeenEntry`.
    ``delivered`` and ``others`` are `popsync.seen.SeenStore.delivered_times` and
    `popsync.seen.SeenStore.other_rows`.
    """

    __slots__ = ("_count", "_listed", "_unlisted")

    def __init__(
        self,
        listing: Listing,
        delivered: Iterable[tuple[bytes, float]],
        others: Iterable[EntryRow],
    ) -> None:
        # Listed rows go into the listing's own dict: assigning to an existing key keeps
        # the listing's bytes object, so no UIDL is held twice.
        listed = listing.joined()
        unlisted: dict[bytes, SeenValue] = {}
        shared: dict[float, _Delivered] = {}
        last: _Delivered | None = None
        for uidl, delivered_at in delivered:
            if last is None or last.delivered_at != delivered_at:  # rows come in batches
                last = shared.setdefault(delivered_at, _Delivered(delivered_at))
            if uidl in listed:
                listed[uidl] = last
            else:
                unlisted[uidl] = last
        for row in others:
            entry = SeenEntry(*row)
            if entry.uidl in listed:
                listed[entry.uidl] = entry
            else:
                unlisted[entry.uidl] = entry
        self._listed = listed
        self._unlisted = unlisted
        self._count = len(unlisted) + len(listed) - countOf(listed.values(), None)

    def get(self, uidl: bytes, default: Any = None) -> Any:
        value = self._listed.get(uidl)
        return self._unlisted.get(uidl, default) if value is None else value

    def __getitem__(self, uidl: bytes) -> SeenValue:
        value = self._listed.get(uidl)
        return self._unlisted[uidl] if value is None else value

    def __contains__(self, uidl: object) -> bool:
        return self._listed.get(uidl) is not None or uidl in self._unlisted  # type: ignore[call-overload]

    def _present(self) -> Iterator[bool]:
        return map(is_not, self._listed.values(), repeat(None))

    def __iter__(self) -> Iterator[bytes]:
        return chain(compress(self._listed, self._present()), self._unlisted)

    def items(self) -> ItemsView[bytes, SeenValue]:
        return _Items(self)

    def __len__(self) -> int:
        return self._count


class _Items(ItemsView[bytes, SeenValue]):
    """SeenView.items() without a lookup per key (the planner walks all of them)."""

    _mapping: SeenView

    def __iter__(self) -> Iterator[tuple[bytes, SeenValue]]:
        view = self._mapping
        listed = compress(view._listed.items(), view._present())
        return chain(listed, view._unlisted.items())  # type: ignore[arg-type]
