"""Delivery targets behind one interface: Maildir, LMTP, an MDA command, or an mbox file.

``sync.py`` keeps the durability order and never learns which target it talks to:

1. every message is streamed into a file of the target's *spool* (`Target.spool`, a
   Maildir: the destination Maildir itself, or ``state_dir/spool/<account>/`` for the
   others) and fsynced;
2. the batch is recorded *pending* in the seen-store;
3. `Target.hand_over` delivers the batch and says, per message, *delivered*, *temporary*
   (left pending and handed over again at the next run's `Target.recover`) or *rejected*
   (a permanent refusal: recorded, never retried, never DELEd);
4. the outcome is committed, then `Target.release` drops the spool files.

Each target's module docstring states its guarantee: Maildir is exactly-once (the rename
is the commit point); LMTP, MDA and mbox are at-least-once, with the one window named there.
"""

from __future__ import annotations

from popsync.deliver.base import (
    Delivered,
    DeliveryDeferred,
    DeliveryFailed,
    Outcome,
    Rejected,
    Spooled,
    Target,
    Temporary,
    spool_dir,
)
from popsync.deliver.factory import open_target

__all__ = [
    "Delivered",
    "DeliveryDeferred",
    "DeliveryFailed",
    "Outcome",
    "Rejected",
    "Spooled",
    "Target",
    "Temporary",
    "open_target",
    "spool_dir",
]
