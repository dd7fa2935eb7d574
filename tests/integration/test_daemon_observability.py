"""The daemon seen from outside: journald lines, a quiet -v, and reloads that tell the truth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot
from tests.integration.test_daemon import (
    WAIT,
    DaemonProcess,
    NotifySocket,
    _config,
    _keys,
    ev,
    synced,
)
from tests.integration.test_daemon import notify_socket as notify_socket  # noqa: PLC0414
from tests.integration.test_daemon import start_daemon as start_daemon  # noqa: PLC0414
from tests.synchelp import REPO, make_message, run_popsync

__all__: list[str] = []


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes]) -> str:
    """Wait until ``path`` contains ``text``; return the whole file."""
    deadline = time.monotonic() + WAIT
    while True:
        content = path.read_text()
        if text in content:
            return content
        assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{content}"
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{content}"
        time.sleep(0.05)


@pytest.fixture
def journal_daemon(
    tmp_path: Path, notify_socket: NotifySocket
) -> Iterator[Callable[[Path], tuple[subprocess.Popen[bytes], Path]]]:
    """Start ``popsync -v`` with stderr in a file that $JOURNAL_STREAM names by dev:ino."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: Path) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / "journal.log"
        with log.open("wb") as stderr:
            info = os.fstat(stderr.fileno())
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}",
                # A 2 s watchdog makes the heartbeat job beat every 0.5 s.
                "NOTIFY_SOCKET": notify_socket.path,
                "WATCHDOG_USEC": "2000000",
            }
            env.pop("WATCHDOG_PID", None)
            proc = subprocess.Popen(
                [sys.executable, "-m", "popsync", "-v", "-c", str(config)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_journal_stream_gets_priority_prefixed_lines_and_no_heartbeat(
    dovecot: Dovecot,
    tmp_path: Path,
    journal_daemon: Callable[[Path], tuple[subprocess.Popen[bytes], Path]],
    notify_socket: NotifySocket,
) -> None:
    """Under $JOURNAL_STREAM a failed run is <3>, a good one <6>; -v shows no heartbeat."""
    alice = dovecot.new_user()
    dovecot.deliver(alice, make_message(1))
    config = _config(
        tmp_path,
        {
            "alice": _keys(dovecot, alice, tmp_path),
            "wrong": _keys(dovecot, dovecot.new_user(), tmp_path, password="not-the-password"),
        },
    )
    proc, log = journal_daemon(config)
    _wait_for_text(log, "account=alice", proc)
    _wait_for_text(log, "sync failed account=wrong", proc)
    # Four heartbeats (0.5 s each) pass while we watch.
    pings = len(notify_socket.having("WATCHDOG"))
    notify_socket.wait("WATCHDOG", pings + 4)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0
    lines = log.read_text().splitlines()

    assert lines, "nothing logged"
    assert all(line[:3] in {"<2>", "<3>", "<4>", "<6>", "<7>"} for line in lines), lines
    assert any(
        line.startswith("<6>popsync.sync: sync finished account=alice") and "fetched=1" in line
        for line in lines
    ), lines
    failed = [line for line in lines if "sync failed account=wrong" in line]
    assert failed, lines
    assert failed[0].startswith("<3>popsync.sync: "), lines
    assert "outcome=auth" in failed[0]
    assert "not-the-password" not in log.read_text()
    # -v shows each account's job run, never the heartbeat nor APScheduler's wake-ups.
    assert any('Running job "sync alice' in line for line in lines), lines
    assert not [line for line in lines if "heartbeat" in line or "Looking for jobs" in line]


def test_rejected_reload_shows_in_status_line_and_popsync_status(
    dovecot: Dovecot,
    tmp_path: Path,
    start_daemon: Callable[..., DaemonProcess],
    notify_socket: NotifySocket,
) -> None:
    """A bad config on SIGHUP shows in STATUS= and `popsync status` until a good reload."""
    alice = dovecot.new_user()
    config = _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path)})
    good = config.read_text()
    daemon = start_daemon(config, env={"NOTIFY_SOCKET": notify_socket.path})
    daemon.wait_for(synced("alice"))
    status = run_popsync(["status", "-c", str(config)])
    assert status.returncode == 0
    assert "daemon:" not in status.stdout + status.stderr  # nothing to report

    # check-config (the units' first ExecReload=) refuses the file, as the daemon will.
    config.write_text(good + "\n[accounts.broken]\nhost = 'x'\n")
    check = run_popsync(["check-config", "-c", str(config)])
    assert check.returncode == 78
    assert "accounts.broken.username: missing required key" in check.stderr

    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    daemon.wait_for(ev("config reload failed, keeping the old config"), after=mark)
    deadline = time.monotonic() + WAIT
    while not any("REJECTED" in m["STATUS"] for m in notify_socket.having("STATUS")):
        assert time.monotonic() < deadline, notify_socket.messages
        time.sleep(0.05)
    line = next(m["STATUS"] for m in notify_socket.having("STATUS") if "REJECTED" in m["STATUS"])
    assert "config reload REJECTED, running the previous config: " in line
    assert "accounts.broken.username: missing required key" in line

    # The file is still broken: status fails like check-config, but names the daemon's state.
    status = run_popsync(["status", "-c", str(config)])
    assert status.returncode == 78
    assert f"daemon: pid {daemon.proc.pid}, config reload REJECTED" in status.stderr
    assert "still running the previous config" in status.stderr
    assert "accounts.broken.username: missing required key" in status.stderr

    # A file that is valid again but not yet reloaded: the daemon still runs the old one.
    config.write_text(good)
    status = run_popsync(["status", "-c", str(config)])
    assert status.returncode == 0
    assert "config reload REJECTED" in status.stderr
    as_json = run_popsync(["status", "--json", "-c", str(config)])
    assert "REJECTED" in as_json.stderr
    assert "REJECTED" not in as_json.stdout

    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    daemon.wait_for(ev("config reloaded"), after=mark)
    status = run_popsync(["status", "-c", str(config)])
    assert status.returncode == 0
    assert "REJECTED" not in status.stdout + status.stderr
    ready = notify_socket.having("READY")[-1]
    assert "REJECTED" not in ready["STATUS"]
    assert daemon.stop()[0] == 0
    # A stopped daemon leaves no record behind.
    assert not (tmp_path / "state" / "daemon.json").exists()
