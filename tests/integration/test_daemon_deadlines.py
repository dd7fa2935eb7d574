"""The daemon against drip-feeding, refusing and locked servers: no account waits for them.

Runs ``python -m popsync`` like tests/integration/test_daemon.py (whose helpers it uses):
drip-feeding fake servers and a real Dovecot under ``max_workers = 1``, the systemd
watchdog fed only while runs make progress, the slow retry after ``[AUTH]`` and
``[SYS/PERM]``, and ``[IN-USE]`` from a Dovecot with ``pop3_lock_session = yes``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot
from popsync import net
from popsync.client import Pop3Client
from tests.fake_pop3 import Drip, Expect, FakePop3Server, Send, StartTLS, Step
from tests.integration.test_daemon import (
    DaemonProcess,
    NotifySocket,
    _assert_clean_log,
    _fake_keys,
    _login_refused,
    ev,
    notify_socket,
    start_daemon,
    synced,
)
from tests.synchelp import TomlValue, dovecot_keys, make_message, run_popsync, toml_config

__all__ = ["notify_socket", "start_daemon"]

_CAPS = b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"
_BUDGETS: dict[str, TomlValue] = {
    "timeout": "5s",
    "login_timeout": "2s",
    "listing_timeout": "2s",
    "low_speed_limit": "1KiB",
    "low_speed_time": "2s",
}


def _logged_in() -> list[Step]:
    return [
        StartTLS(),
        Send(b"+OK fake POP3 ready\r\n"),
        Expect(b"CAPA", _CAPS),
        Expect(re.compile(rb"USER \S+"), b"+OK\r\n"),
        Expect(re.compile(rb"PASS \S+"), b"+OK logged in\r\n"),
        Expect(b"CAPA", _CAPS),
    ]


def _drip(phase: str) -> list[Step]:
    """One connection that drips forever in ``phase``: login, listing or transfer."""
    if phase == "login":
        return [StartTLS(), Drip(b"+OK " + b"x" * 5000 + b"\r\n", every=0.1)]
    if phase == "listing":  # above the minimum rate, but endless
        lines = b"".join(b"%d drip-%d\r\n" % (n, n) for n in range(1, 50_000))
        return [*_logged_in(), Expect(b"UIDL"), Drip(b"+OK\r\n" + lines, every=0.02, chunk=256)]
    body = b"Subject: drip\r\n\r\n" + b"x" * 5000 + b"\r\n"  # 10 bytes a second
    return [
        *_logged_in(),
        Expect(b"UIDL", b"+OK\r\n1 drip-1\r\n.\r\n"),
        Expect(b"LIST", b"+OK\r\n1 %d\r\n.\r\n" % len(body)),
        Expect(b"RETR 1", b"+OK\r\n"),
        Drip(body, every=0.1),
    ]


def _write(tmp_path: Path, accounts: dict[str, dict[str, TomlValue]], workers: int = 1) -> Path:
    path = tmp_path / "config.toml"
    text = toml_config(tmp_path / "state", accounts)
    path.write_text(text.replace("max_workers = 2", f"max_workers = {workers}"))
    path.chmod(0o600)
    return path


def _failures(daemon: DaemonProcess, name: str) -> list[dict[str, object]]:
    return daemon.find(ev("sync failed", account=name))


@pytest.mark.slow
def test_drip_feeding_servers_never_delay_a_healthy_account_with_one_worker(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Three dripping servers, a wrong password and [SYS/PERM] cannot stall Dovecot's account.

    max_workers = 1 and the dripping accounts come first in the file. Each drip ends at
    its phase's budget or minimum rate (exit 75); after that first failure none of them
    queues for the worker again, so the healthy account syncs on its interval and right
    after SIGUSR1. The refused logins wait their slow retry (backoff.SLOW_START, then
    doubled), not the interval.
    """
    healthy, wrong = dovecot.new_user(), dovecot.new_user()
    dovecot.deliver_many(healthy, [make_message(i, tag="first") for i in range(2)])
    phases = ("login", "listing", "transfer")
    drips = [FakePop3Server(*[_drip(phase)] * 4, linger=0.1) for phase in phases]
    perm = FakePop3Server(*[_login_refused(b"-ERR [SYS/PERM] account disabled\r\n")] * 2, linger=1)
    try:
        accounts: dict[str, dict[str, TomlValue]] = {
            f"drip-{phase}": _fake_keys(server, tmp_path, f"drip-{phase}", **_BUDGETS)
            for phase, server in zip(phases, drips, strict=True)
        }
        accounts["wrong"] = dovecot_keys(
            dovecot, wrong, tmp_path / "Maildir-wrong", password="not-" + wrong.password
        )
        accounts["perm"] = _fake_keys(perm, tmp_path, "perm")
        accounts["healthy"] = dovecot_keys(
            dovecot, healthy, tmp_path / "Maildir-healthy", interval="10s"
        )
        daemon = start_daemon(_write(tmp_path, accounts))
        # The first time, the healthy account may wait for the runs queued ahead of it,
        # each for at most its login_timeout (2 s) before it gives the worker back.
        daemon.wait_for(synced("healthy", fetched=2), timeout=20)
        mark = daemon.mark()
        dovecot.deliver(healthy, make_message(1, tag="interval"))
        delivered = time.monotonic()

        for phase in phases:
            failed = daemon.wait_for(ev("sync failed", account=f"drip-{phase}"))
            assert failed["outcome"] == "temporary"
            assert f"in the {phase} phase" in failed["error"], failed
        refused_at = {}
        for name, code in (("wrong", "[AUTH]"), ("perm", "[SYS/PERM]")):
            failed = daemon.wait_for(ev("sync failed", account=name))
            refused_at[name] = time.monotonic()
            assert (failed["outcome"], code in failed["error"]) == ("auth", True), failed
            delayed = daemon.wait_for(ev("next run delayed", account=name))
            assert (delayed["failures"], delayed["delay"]) == (1, 1800.0)

        # On schedule: the interval run fetches the new message (10 s + at most 1 s jitter).
        daemon.wait_for(synced("healthy", fetched=1), after=mark, timeout=15)
        assert time.monotonic() - delivered < 12.5

        # The drips retry on their own interval; the refused logins do not.
        for phase in phases:
            _wait(lambda p=phase: len(_failures(daemon, f"drip-{p}")) >= 2, 20)  # type: ignore[misc]
        _wait(lambda: time.monotonic() > max(refused_at.values()) + 12, 20)
        assert len(_failures(daemon, "wrong")) == len(_failures(daemon, "perm")) == 1

        # SIGUSR1 polls all six at once, the drips first; the healthy one is not held up.
        mark = daemon.mark()
        dovecot.deliver(healthy, make_message(2, tag="poll"))
        daemon.send(signal.SIGUSR1)
        polled = time.monotonic()
        daemon.wait_for(synced("healthy", fetched=1), after=mark, timeout=10)
        assert time.monotonic() - polled < 4.0
        for name in ("wrong", "perm"):  # an explicit poll retries now, and doubles the delay
            delayed = daemon.wait_for(ev("next run delayed", account=name), after=mark)
            assert (delayed["failures"], delayed["delay"]) == (2, 3600.0)
        assert daemon.stop()[0] == 0
    finally:
        for server in [*drips, perm]:
            server.close()
    perm.check()
    assert perm.connections == 2
    assert all(server.connections >= 3 for server in drips)
    _assert_clean_log(daemon)


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_watchdog_is_not_fed_while_no_run_makes_progress(
    tmp_path: Path,
    start_daemon: Callable[..., DaemonProcess],
    notify_socket: NotifySocket,
) -> None:
    """A run stuck where no timeout reaches (a hanging password_command) stops WATCHDOG=1."""
    keys: dict[str, TomlValue] = {
        "host": "127.0.0.1",
        "port": _closed_port(),
        "username": "u",
        "password_command": "sh -c 'sleep 5; echo pw'",
        "maildir": str(tmp_path / "Maildir"),
        "interval": "10s",
        "timeout": "1s",
        "login_timeout": "1s",
        "low_speed_time": "1s",  # stall limit: twice the longest of these, 2 s
    }
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"}
    daemon = start_daemon(_write(tmp_path, {"stuck": keys}), env=env)
    notify_socket.wait("READY")
    withheld = daemon.wait_for(ev("no run makes progress; withholding watchdog pings"))
    assert withheld["stalled"] == ["stuck"]
    assert notify_socket.having("WATCHDOG"), "fed while the run was still young"
    daemon.wait_for(ev("runs make progress again; watchdog pings resume"), timeout=10)
    failed = daemon.wait_for(ev("sync failed", account="stuck"))
    assert "connection refused" in failed["error"]
    before = len(notify_socket.having("WATCHDOG"))
    notify_socket.wait("WATCHDOG", before + 2)  # fed again once the run is over
    stamps = [t for t, m in notify_socket.messages if "WATCHDOG" in m]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # Longer than WATCHDOG_USEC = 1 s: systemd would have restarted this daemon.
    assert max(gaps) > 2.0
    assert daemon.stop()[0] == 0
    _assert_clean_log(daemon)


@pytest.fixture(scope="module")
def locking_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A Dovecot with pop3_lock_session = yes: a second session gets -ERR [IN-USE]."""
    if os.geteuid() == 0:  # the mail processes run as nobody and must reach the root
        root = Path(tempfile.mkdtemp(prefix="popsync-locking-dovecot-"))
        root.chmod(0o711)
    else:
        root = tmp_path_factory.mktemp("locking-dovecot")
    try:
        with Dovecot(root, lock_session=True) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_in_use_from_dovecot_exits_75_and_the_daemon_backs_off(
    dovecot: Dovecot,  # fails in CI (skips elsewhere) where Dovecot is not installed
    locking_dovecot: Dovecot,
    tmp_path: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """While another session holds the mailbox, --once exits 75 and the daemon backs off."""
    user = locking_dovecot.new_user()
    message = make_message(1, tag="locked")
    locking_dovecot.deliver(user, message)
    keys = dovecot_keys(locking_dovecot, user, tmp_path / "Maildir", interval="10s", timeout="30s")
    holder = Pop3Client.connect(
        locking_dovecot.host,
        locking_dovecot.pop3s_port,
        tls="implicit",
        context=net.default_context(locking_dovecot.ca_file),
    )
    try:
        holder.login(user.name, user.password)
        daemon = start_daemon(_write(tmp_path, {"locked": keys}))
        # Meanwhile a manual run with its own state: Dovecot waits 10 s, then refuses it too.
        once_dir = tmp_path / "once"
        once_dir.mkdir()
        other = dict(keys, maildir=str(once_dir / "Maildir"))
        once = run_popsync(["--once", "-c", str(_write(once_dir, {"locked": other}))])
        assert once.returncode == 75, once.stderr
        assert "locked: FAILED (temporary)" in once.stderr
        assert "[IN-USE]" in once.stderr

        failed = daemon.wait_for(ev("sync failed", account="locked"), timeout=20)
        assert failed["outcome"] == "temporary"
        assert "[IN-USE]" in failed["error"]
        first = daemon.wait_for(ev("next run on schedule", account="locked"))
        assert (first["failures"], first["delay"]) == (1, 10.0)
        mark = daemon.mark()
        daemon.send(signal.SIGUSR1)
        backoff = daemon.wait_for(ev("next run delayed", account="locked"), after=mark, timeout=20)
        assert (backoff["outcome"], backoff["failures"], backoff["delay"]) == ("temporary", 2, 20.0)
    finally:
        holder.quit()
    mark = daemon.mark()
    daemon.send(signal.SIGUSR1)
    daemon.wait_for(synced("locked", fetched=1), after=mark)
    assert daemon.stop()[0] == 0
    assert (tmp_path / "Maildir" / "new").is_dir()
    _assert_clean_log(daemon)
