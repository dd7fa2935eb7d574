"""``popsync import-state``: take over what mpop, getmail6 or fetchmail already fetched.

Each parser reads the peer's own state file into ``(host, user, uidl)`` entries; the
entries for the account's server and user are recorded in the seen-store as delivered
(without a Maildir file), so the next sync fetches exactly what the peer had not. The
formats, as the real programs write them (the integration test runs each one):

* **mpop** (1.4.x): ``#`` comment lines, then for each mailbox a line that starts with a
  space, ``" COUNT HOST USER"``, followed by COUNT UIDLs, one per line. By default one
  file per account under ``~/.mpop_uidls/``, but one file may hold several mailboxes.
* **getmail6**: ``oldmail-HOST-PORT-USER`` in the getmail directory (``/`` and ``:`` in
  the name replaced by ``-``), lines of ``UIDL\\0TIMESTAMP``. The server and user are
  only in the file name.
* **fetchmail**: ``~/.fetchids``, lines of ``USER@POLLNAME UIDL``; the user may itself
  contain ``@``, so the last ``@`` of the first field separates them.

A file that does not parse is refused as a whole, with the line that did not: importing
half of a file would make popsync fetch the rest again.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from popsync.errors import ExitCode, UserError

if TYPE_CHECKING:
    from popsync.config import Account
    from popsync.store import Store

__all__ = [
    "FORMATS",
    "ImportReport",
    "StateFileError",
    "import_state",
    "parse_fetchmail",
    "parse_getmail6",
    "parse_mpop",
]

#: Larger state files are refused: even 10 million UIDLs fit in far less.
MAX_STATE_BYTES = 512 * 1024 * 1024

#: One entry of a peer's state: (host, user, uidl); host None means "the file's own".
Entry = tuple[str, str, str]


class StateFileError(UserError):
    """The state file cannot be read or parsed; nothing was imported."""

    exit_code = ExitCode.USAGE


@dataclass
class ImportReport:
    """What an import did, for the one summary line."""

    account: str
    file: Path
    imported: int = 0
    known: int = 0
    ignored: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line: imported, already known, ignored and for whom."""
        line = (
            f"{self.account}: imported {self.imported} UIDL(s) from {self.file} as delivered, "
            f"{self.known} already known"
        )
        ignored = sum(self.ignored.values())
        if ignored:
            others = ", ".join(f"{who}: {n}" for who, n in self.ignored.most_common(5))
            more = ", ..." if len(self.ignored) > 5 else ""
            line += f"; ignored {ignored} of other mailboxes ({others}{more})"
        return line


def _lines(data: bytes, path: Path) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateFileError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def _refuse(path: Path, number: int, what: str) -> StateFileError:
    return StateFileError(f"{path}:{number}: {what}; nothing was imported")


def _uidl(path: Path, number: int, text: str) -> str:
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text) or len(text) > 512:
        raise _refuse(path, number, "not a UIDL")
    return text


def parse_mpop(data: bytes, path: Path) -> list[Entry]:
    """mpop's UIDLs file: ``" COUNT HOST USER"`` headers, each followed by COUNT UIDLs."""
    entries: list[Entry] = []
    host = user = ""
    remaining = 0
    header_line = 0
    for number, line in enumerate(_lines(data, path), 1):
        if remaining:
            entries.append((host, user, _uidl(path, number, line)))
            remaining -= 1
        elif line.startswith("#") or not line.strip():
            continue
        elif line.startswith(" "):
            parts = line[1:].split(" ", 2)
            if len(parts) != 3 or not parts[0].isdigit() or not parts[1] or not parts[2]:
                raise _refuse(path, number, 'expected " COUNT HOST USER"')
            remaining, host, user = int(parts[0]), parts[1], parts[2]
            header_line = number
        else:
            raise _refuse(path, number, "a UIDL outside any mpop mailbox list (not an mpop file?)")
    if remaining:
        raise _refuse(path, header_line, f"the list ends {remaining} UIDL(s) short")
    return entries


_GETMAIL_NAME = re.compile(r"oldmail-(?P<rest>.+)")


def _getmail_part(text: str) -> str:
    # getmail6 builds the name from "%(server)s-%(port)i-%(username)s" and replaces "/"
    # and ":" by "-".
    return text.replace("/", "-").replace(":", "-")


def parse_getmail6(data: bytes, path: Path) -> list[Entry]:
    """getmail6's ``oldmail-HOST-PORT-USER``: ``UIDL\\0TIMESTAMP`` lines; host from the name."""
    if not _GETMAIL_NAME.fullmatch(path.name):
        raise StateFileError(
            f"{path}: cannot tell which server and user this is for: getmail6 names its state "
            "files oldmail-HOST-PORT-USER; pass that file, not a renamed copy"
        )
    entries: list[Entry] = []
    for number, line in enumerate(_lines(data, path), 1):
        uidl, sep, stamp = line.partition("\0")
        if not sep or not stamp.strip().lstrip("-").replace(".", "", 1).isdigit():
            raise _refuse(path, number, "expected UIDL, a NUL byte and a timestamp")
        # The file name's HOST-PORT-USER is matched by import_state.
        entries.append(("", "", _uidl(path, number, uidl)))
    return entries


def parse_fetchmail(data: bytes, path: Path) -> list[Entry]:
    """fetchmail's ``.fetchids``: ``USER@POLLNAME UIDL`` lines (the user may contain ``@``)."""
    entries: list[Entry] = []
    for number, line in enumerate(_lines(data, path), 1):
        if not line.strip():
            continue
        who, sep, uidl = line.partition(" ")
        user, at, host = who.rpartition("@")
        if not sep or not at or not user or not host:
            raise _refuse(path, number, "expected USER@POLLNAME UIDL")
        entries.append((host, user, _uidl(path, number, uidl.strip())))
    return entries


FORMATS: dict[str, Callable[[bytes, Path], list[Entry]]] = {
    "mpop": parse_mpop,
    "getmail6": parse_getmail6,
    "fetchmail": parse_fetchmail,
}


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_STATE_BYTES + 1)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"{path}: larger than {MAX_STATE_BYTES} bytes; not a state file")
    return data


def _ours(kind: str, path: Path, account: Account) -> Callable[[str, str], bool]:
    """Whether an entry's (host, user) is this account's mailbox."""
    if kind == "getmail6":
        pattern = (
            f"oldmail-{re.escape(_getmail_part(account.host))}-[0-9]+-"
            f"{re.escape(_getmail_part(account.username))}"
        )
        mine = re.fullmatch(pattern, path.name, re.IGNORECASE) is not None
        return lambda host, user: mine
    return lambda host, user: host.lower() == account.host.lower() and user == account.username


def import_state(
    kind: str,
    path: Path,
    account: Account,
    store: Store,
    *,
    now: float | None = None,
) -> ImportReport:
    """Record the peer's UIDLs for ``account``'s server and user as delivered."""
    entries = FORMATS[kind](_read(path), path)
    mine = _ours(kind, path, account)
    report = ImportReport(account.name, path)
    wanted: dict[bytes, None] = {}
    for host, user, uidl in entries:
        if mine(host, user):
            wanted[uidl.encode("utf-8")] = None
        else:
            report.ignored[f"{user}@{host}" if host else path.name] += 1
    known = store.entries(account.mailbox)
    fresh = [uidl for uidl in wanted if uidl not in known]
    report.known = len(wanted) - len(fresh)
    if fresh:
        store.mark_delivered(
            account.mailbox, [(uidl, "") for uidl in fresh], time.time() if now is None else now
        )
    report.imported = len(fresh)
    return report
