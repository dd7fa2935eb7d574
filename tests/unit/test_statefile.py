"""State files: atomic 0600 replacement and the daemon's record."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from popsync.statefile import (
    DAEMON_FILE,
    read_daemon_record,
    remove_daemon_record,
    write_atomic,
    write_daemon_record,
)

__all__: list[str] = []


def test_write_atomic_replaces_with_0600_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """The new content replaces the old one, mode 0600, with no temporary file left over."""
    target = tmp_path / "token.json"
    target.write_text("old")
    target.chmod(0o644)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["token.json"]


def test_write_atomic_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync leaves the old content and removes the temporary file."""
    target = tmp_path / "token.json"
    target.write_text("old")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["token.json"]


def test_daemon_record_round_trip_and_removal(tmp_path: Path) -> None:
    """A live process's record is read back; after removal there is none."""
    write_daemon_record(tmp_path, {"reload_rejected": {"at": 1.0, "problems": ["x: bad"]}})
    record = read_daemon_record(tmp_path)
    assert record is not None
    assert record["pid"] == os.getpid()
    assert record["reload_rejected"]["problems"] == ["x: bad"]
    remove_daemon_record(tmp_path)
    assert read_daemon_record(tmp_path) is None
    remove_daemon_record(tmp_path)  # a second removal is fine


def test_record_of_a_dead_daemon_or_garbage_is_ignored(tmp_path: Path) -> None:
    """A record whose pid has exited, or that is not JSON, counts as no daemon."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (tmp_path / DAEMON_FILE).write_text(json.dumps({"pid": int(dead.stdout)}))
    assert read_daemon_record(tmp_path) is None
    (tmp_path / DAEMON_FILE).write_text("{not json")
    assert read_daemon_record(tmp_path) is None
