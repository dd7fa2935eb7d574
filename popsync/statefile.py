"""Small state files in ``state_dir``, replaced atomically and readable by the owner only.

``write_atomic`` is the one way popsync replaces such a file: write a temporary file in the
same directory (mode 0600), fsync it, rename it over the old one, fsync the directory. A crash
at any instruction leaves either the complete old file or the complete new one, never a
half-written one; this matters most for an OAuth2 refresh token, which may be the only valid
one (see :mod:`popsync.oauth2`).

The daemon's record (``daemon.json``: its pid and the outcome of the last config reload) is
kept here too, so ``popsync status`` can show a rejected reload.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DAEMON_FILE",
    "read_daemon_record",
    "remove_daemon_record",
    "write_atomic",
    "write_daemon_record",
]

#: The daemon's record in state_dir.
DAEMON_FILE = "daemon.json"
_MAX_RECORD = 1 << 16


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that a crash leaves the old or the new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def write_daemon_record(state_dir: Path, record: dict[str, Any]) -> None:
    """Write the daemon's record (JSON) to ``state_dir/daemon.json``."""
    data = {"pid": os.getpid(), "written": time.time(), **record}
    write_atomic(state_dir / DAEMON_FILE, json.dumps(data, sort_keys=True).encode() + b"\n")


def remove_daemon_record(state_dir: Path) -> None:
    """Remove the record when the daemon exits; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / DAEMON_FILE).unlink()


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def read_daemon_record(state_dir: Path) -> dict[str, Any] | None:
    """The record of a daemon that is still running, or None (none, stale or unreadable)."""
    try:
        with (state_dir / DAEMON_FILE).open("rb") as handle:
            raw = handle.read(_MAX_RECORD)
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _alive(data.get("pid")):
        return None
    return data
