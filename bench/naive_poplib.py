"""The script people write first: stdlib poplib, UIDL, RETR each new message, write a Maildir file.

Usage: naive_poplib.py HOST PORT USER PASSWORD MAILDIR SEEN_JSON

Seen UIDLs live in a JSON file written once at the end (so a crash mid-run refetches: the naive
way). Each message goes to ``tmp/``, is fsynced and renamed into ``new/`` (no directory fsync).
poplib strips the line ends, so lines are joined with CRLF again: the file holds exactly the bytes
the server sent (after dot-unstuffing). Deliberately stdlib-only: it runs under any python3.
"""

from __future__ import annotations

import json
import os
import poplib
import socket
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _deliver(maildir: Path, data: bytes, seq: int) -> None:
    name = f"{time.time():.6f}.P{os.getpid()}Q{seq}.{socket.gethostname()}"
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, maildir / "new" / name)


def main(argv: list[str]) -> int:
    """Fetch every message whose UIDL is not in SEEN_JSON into MAILDIR, keeping it on the server."""
    host, port, user, password, maildir_s, seen_s = argv
    maildir, seen_path = Path(maildir_s), Path(seen_s)
    seen: set[str] = set(json.loads(seen_path.read_text())) if seen_path.exists() else set()
    pop = poplib.POP3(host, int(port), timeout=60)
    pop.user(user)
    pop.pass_(password)
    _, listing, _ = pop.uidl()
    for seq, line in enumerate(listing):
        num, uid = line.decode("ascii").split(None, 1)
        if uid in seen:
            continue
        _, lines, _ = pop.retr(int(num))
        _deliver(maildir, b"\r\n".join(lines) + b"\r\n", seq)
        seen.add(uid)
    pop.quit()
    tmp = seen_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(seen)))
    os.replace(tmp, seen_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
