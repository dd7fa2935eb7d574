"""The Maildir target: today's writer (`popsync.maildir`) behind the target interface.

Guarantee: **exactly-once.** The spool is the destination Maildir itself: a message is
written into its tmp/ and fsynced, recorded pending, renamed into new/ (the rename is the
commit point, new/ is fsynced once per batch), then marked delivered. Recovery finds a
pending file in tmp/ (moves it on), in new/ or cur/ (already delivered), or nowhere
(fetched again: it never reached new/, so no duplicate is possible).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from popsync.deliver.base import Delivered, Outcome, Spooled
from popsync.maildir import LineEndings, Maildir, MessageMissing, TmpMessage

__all__ = ["MaildirTarget"]


class MaildirTarget:
    """Deliver into one Maildir; see the module docstring."""

    kind = "maildir"
    #: Renames and one directory fsync per batch: too cheap to be worth a thread.
    overlap = False
    #: Each message is its own file in tmp/, renamed into new/ on delivery.
    shared_spool = False

    def __init__(
        self,
        path: Path,
        *,
        line_endings: LineEndings = "lf",
        dir_mode: int = 0o700,
        file_mode: int = 0o600,
    ) -> None:
        self.spool = Maildir(
            path, line_endings=line_endings, dir_mode=dir_mode, file_mode=file_mode
        )

    def open(self) -> TmpMessage:
        return self.spool.open_tmp()

    def seal(self) -> None:
        return None  # each file was fsynced by its TmpMessage.finish

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        vsizes = {i.name: i.vsize for i in items if i.vsize is not None}
        finals = self.spool.deliver([i.name for i in items], vsizes)
        return [Delivered(final) for final in finals]

    def recover(self, items: Sequence[Spooled]) -> list[Outcome | None]:
        names = [i.name for i in items]
        try:
            finals = self.spool.deliver(names)
        except MessageMissing as exc:
            missing = set(exc.names)
            found = [n for n in names if n not in missing]
            placed = dict(zip(found, self.spool.deliver(found) if found else [], strict=True))
            return [Delivered(placed[n]) if n in placed else None for n in names]
        return [Delivered(final) for final in finals]

    def release(self, names: Sequence[str]) -> None:
        return None  # the files are the delivered messages

    def close(self) -> None:
        return None
