"""The target interface, per-message outcomes, and the spool shared by non-Maildir targets."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from popsync.errors import ExitCode, PopsyncError
from popsync.maildir import LineEndings, Maildir, TmpMessage
from popsync.textsafe import safe_text

__all__ = [
    "Delivered",
    "DeliveryDeferred",
    "DeliveryFailed",
    "Outcome",
    "Rejected",
    "SpoolTarget",
    "Spooled",
    "Target",
    "Temporary",
    "deferral",
    "sanitize",
    "spool_dir",
]


def sanitize(text: str | bytes, limit: int = 300, *, tail: bool = False) -> str:
    """Foreign text (an LMTP reply, an MDA's stderr) made safe for one log line.

    `popsync.textsafe.safe_text` of the stripped text; ``tail`` keeps the end of a long
    text (where a command says what went wrong) instead of its start.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return safe_text(text.strip(), limit, cut="tail" if tail else "note")


@dataclass(frozen=True, slots=True)
class Spooled:
    """One message written and fsynced into the spool, recorded pending under ``name``."""

    uidl: bytes
    name: str
    size: int
    vsize: int | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """The target took the message; ``name`` is what the seen-store records."""

    name: str


@dataclass(frozen=True, slots=True)
class Temporary:
    """Not delivered this time (4xx, EX_TEMPFAIL, a dead agent): stays pending, retried.

    ``failed`` marks an agent that broke rather than deferred (an MDA's exit status 1, say):
    the run then ends 74 instead of 75, so an admin looks at it.
    """

    reason: str
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """Refused for good (5xx): recorded as rejected, never retried and never DELEd."""

    reason: str


Outcome = Delivered | Temporary | Rejected


class DeliveryDeferred(PopsyncError):
    """The target answered "later" (4xx, EX_TEMPFAIL, unreachable): messages stay pending."""

    exit_code = ExitCode.TEMPORARY


class DeliveryFailed(PopsyncError):
    """The delivery command failed: messages stay pending, the admin must look (exit 74)."""

    exit_code = ExitCode.LOCAL_IO


class Target(Protocol):
    """What ``sync.py`` needs from a delivery target."""

    #: "maildir", "lmtp", "mda" or "mbox", for logs and status.
    kind: str
    #: Where messages are written first; its tmp/ follows the Maildir debris rules.
    spool: Maildir
    #: True when `hand_over` may run in a background thread while the next batch streams
    #: in (it must then touch neither the seen-store nor ``sync``'s state).
    overlap: bool
    #: True when a batch's messages share one spool file that `seal` fsyncs once (LMTP);
    #: False when each message is its own file, fsynced by `TmpMessage.finish`.
    shared_spool: bool

    def open(self) -> TmpMessage:
        """A new spool file for one message (the sink RETR streams into)."""
        ...

    def seal(self) -> None:
        """Make the messages opened since the last seal durable (a shared spool's fsync)."""
        ...

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        """Deliver a batch of fsynced, pending spool files; one outcome per item, in order."""
        ...

    def recover(self, items: Sequence[Spooled]) -> list[Outcome | None]:
        """Finish pending rows a crash (or a temporary failure) left; None = spool file gone."""
        ...

    def release(self, names: Sequence[str]) -> None:
        """Drop spool files whose outcome is committed (a no-op for Maildir)."""
        ...

    def close(self) -> None:
        """Release connections and locks."""
        ...


def deferral(outcomes: Sequence[Outcome]) -> PopsyncError | None:
    """The error a run ends with when some messages were not delivered, else None."""
    temporary = [o for o in outcomes if isinstance(o, Temporary)]
    if not temporary:
        return None
    failed = next((o for o in temporary if o.failed), None)
    if failed is not None:
        return DeliveryFailed(f"delivery failed: {failed.reason}")
    count = len(temporary)
    return DeliveryDeferred(f"delivery deferred for {count} message(s): {temporary[0].reason}")


def spool_dir(state_dir: Path, account: str) -> Path:
    """The spool Maildir of one account under the state directory."""
    return state_dir / "spool" / account


class SpoolTarget:
    """Common part of LMTP, MDA and mbox: a private spool Maildir under the state directory.

    LMTP spools the wire form (CRLF, what DATA sends); an MDA gets its stdin straight from
    the spool file, so it spools with the account's ``line_endings`` (LF by default, what
    procmail and maildrop store as they get it).

    Hand-over subclasses implement `hand_over`; recovery hands over again the pending
    files still in the spool (the at-least-once window) and reports the others gone, so
    they are fetched again.
    """

    kind = "spool"
    #: Handing over to an agent is slow (a server's fsyncs, a process per message) and
    #: shares nothing with the download, so ``sync`` overlaps it with the next batch.
    overlap = True
    shared_spool = False

    def __init__(self, spool_path: Path, line_endings: LineEndings = "crlf") -> None:
        spool_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.spool = Maildir(spool_path, line_endings=line_endings)

    def open(self) -> TmpMessage:
        return self.spool.open_tmp()

    def seal(self) -> None:
        return None

    def path(self, name: str) -> Path:
        """The spool file of a pending message."""
        return self.spool.tmp / name

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        raise NotImplementedError

    def recover(self, items: Sequence[Spooled]) -> list[Outcome | None]:
        present = [item for item in items if self.path(item.name).is_file()]
        done = dict(zip((i.name for i in present), self.hand_over(present), strict=True))
        return [done.get(item.name) for item in items]

    def release(self, names: Sequence[str]) -> None:
        for name in names:
            self.spool.remove_tmp(name)

    def close(self) -> None:
        return None


#: How far into a message `sender_in` looks for the header block's end.
HEAD_LIMIT = 65536
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_RETURN_PATH = re.compile(
    rb"(?im)^Return-Path:[ \t]*<([^<>\s\"()\\,;:]*(?:@[A-Za-z0-9.\[\]:-]+)?)>[ \t]*\r?$"
)


def envelope_sender(path: Path, limit: int = HEAD_LIMIT) -> str:
    """The address of the message's first Return-Path header, or "" (the null sender)."""
    with path.open("rb") as file:
        return sender_in(file.read(limit))


def sender_in(head: bytes) -> str:
    """`envelope_sender` for a message's first bytes (at most `HEAD_LIMIT` are looked at)."""
    head = head[:HEAD_LIMIT]
    end = _HEAD_END.search(head)
    found = _RETURN_PATH.search(head[: end.start()] if end else head)
    if found is None:
        return ""
    address = found.group(1).decode("ascii", "replace")
    return address if address.isascii() and address.isprintable() else ""


def unlink_quiet(path: Path) -> None:
    """Remove a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
