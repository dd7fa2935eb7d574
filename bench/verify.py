"""Check a tool's Maildir against the server's mailbox: every message exactly once, intact.

A delivered file is accepted when it ends with the original message and everything before that
is header fields a delivery agent is known to prepend (Received, Return-Path, Delivered-To, ...).
The server stores and sends CRLF line ends; mpop, getmail6 and fetchmail+maildrop write LF files
(the Unix convention), so a file that matches only after CRLF -> LF is counted as "converted EOL",
not as corruption. getmail6 re-serialises headers with Python's email package and re-folds header
lines longer than 78 columns; a file whose header block equals the original after RFC 5322
unfolding (and whose body is byte-identical) is counted as "refolded headers", shown separately.
Any other difference, a missing message, a duplicate or a foreign file makes the run FAILED.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ADDED_HEADERS", "Verdict", "verify_maildir"]

ADDED_HEADERS = frozenset(
    {"received", "return-path", "delivered-to", "x-original-to", "status", "x-status"}
)
_ADDED_PREFIXES = ("x-getmail", "x-fetchmail", "x-popsync")
_MSGID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_FIELD = re.compile(rb"^([!-9;-~]+):")


@dataclass
class Verdict:
    """Outcome of one verification; ``ok`` is False for any loss, duplicate or corruption."""

    expected: int
    delivered: int = 0
    converted_eol: int = 0
    refolded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every message arrived exactly once and intact."""
        return not self.problems and self.delivered == self.expected

    def summary(self) -> str:
        """Return "OK", "OK (converted EOL)" or "FAILED: ..." for the results table."""
        if not self.ok:
            first = "; ".join(self.problems[:3]) or f"{self.delivered}/{self.expected} delivered"
            more = f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
            return f"FAILED: {first}{more}"
        notes = ["converted EOL"] if self.converted_eol else []
        if self.refolded:
            notes.append(f"refolded headers in {self.refolded} msgs")
        return f"OK ({', '.join(notes)})" if notes else "OK"


def _message_id(data: bytes) -> bytes | None:
    end = data.find(b"\n\n")
    end2 = data.find(b"\r\n\r\n")
    cut = min(x for x in (end, end2, len(data)) if x >= 0)
    m = _MSGID.search(data, 0, cut)
    return m.group(1) if m else None


def _only_added_headers(prefix: bytes) -> str | None:
    """Return None when ``prefix`` is only known prepended header fields, else the offender."""
    for line in prefix.splitlines():
        if not line or line[:1] in (b" ", b"\t"):
            continue  # folded continuation of the previous field
        m = _FIELD.match(line)
        if m is None:
            return line[:40].decode("latin-1")
        name = m.group(1).decode("ascii").lower()
        if name not in ADDED_HEADERS and not name.startswith(_ADDED_PREFIXES):
            return name
    return None


def _unfold(message: bytes) -> bytes:
    """LF line ends and RFC 5322 unfolding of the header block; the body is left alone."""
    lf = message.replace(b"\r\n", b"\n")
    cut = lf.find(b"\n\n")
    head, body = (lf, b"") if cut < 0 else (lf[:cut], lf[cut:])
    return head.replace(b"\n ", b" ").replace(b"\n\t", b"\t") + body


def _compare(data: bytes, original: bytes) -> tuple[str, str | None]:
    """Return (how it matched: "", "eol" or "refolded"; problem) for one delivered file."""
    for how, want, got in (
        ("", original, data),
        ("eol", original.replace(b"\r\n", b"\n"), data),
        ("refolded", _unfold(original), _unfold(data)),
    ):
        if got.endswith(want):
            bad = _only_added_headers(got[: len(got) - len(want)])
            return how, None if bad is None else f"unexpected header {bad!r}"
    return "", "content differs"


def _files(maildir: Path) -> Iterable[Path]:
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            yield from d.iterdir()


def verify_maildir(maildir: Path, messages: Iterable[bytes]) -> Verdict:
    """Compare every file in ``maildir``'s new/ and cur/ with the server's ``messages``."""
    originals: dict[bytes, bytes] = {}
    for msg in messages:
        mid = _message_id(msg)
        assert mid is not None, "generated messages always carry a Message-ID"
        originals[mid] = msg
    verdict = Verdict(expected=len(originals))
    seen: Counter[bytes] = Counter()
    for path in _files(maildir):
        data = path.read_bytes()
        mid = _message_id(data)
        if mid is None or mid not in originals:
            verdict.problems.append(f"foreign file {path.name}")
            continue
        seen[mid] += 1
        if seen[mid] > 1:
            verdict.problems.append(f"duplicate {mid.decode()}")
            continue
        how, problem = _compare(data, originals[mid])
        if problem:
            verdict.problems.append(f"{mid.decode()}: {problem}")
            continue
        verdict.delivered += 1
        # the original ends with CRLF; a converting tool leaves a bare LF at the end
        verdict.converted_eol += how == "eol" or (how == "refolded" and not data.endswith(b"\r\n"))
        verdict.refolded += how == "refolded"
    missing = len(originals) - len(seen)
    if missing:
        verdict.problems.append(f"{missing} missing")
    if list((maildir / "tmp").iterdir()) if (maildir / "tmp").is_dir() else []:
        verdict.problems.append("files left in tmp/")
    return verdict
