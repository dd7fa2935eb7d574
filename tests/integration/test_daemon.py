"""The daemon as a real subprocess: JSON logs, signals, backoff and sd_notify, on real servers.

Every test starts ``python -m popsync -c CONFIG`` and reads its stderr line by line as
JSON events. Intervals are the configured minimum (10 s); tests use the first run at
start and SIGUSR1 to poll instead of waiting, except where the interval itself is tested.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.daemon import SHUTDOWN_TIMEOUT
from tests.fake_pop3 import Expect, FakePop3Server, Send, Stall, StartTLS, Step
from tests.synchelp import (
    REPO,
    TomlValue,
    assert_exactly_once,
    dovecot_keys,
    maildir_files,
    make_message,
    run_popsync,
    stored_form,
    write_config,
)

__all__: list[str] = []

Event = dict[str, Any]
Accounts = Mapping[str, Mapping[str, TomlValue]]

WAIT = 10.0
#: The environment a daemon must not inherit from whoever runs the tests.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")


class DaemonProcess:
    """``popsync -c CONFIG`` in a subprocess, its stderr parsed into JSON events."""

    def __init__(
        self,
        config: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        launcher: Sequence[str] = ("-m", "popsync"),
    ) -> None:
        """``launcher`` replaces ``-m popsync``, e.g. with ``tests.crashwrap`` and its options."""
        base = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "-c", str(config), *args],
            cwd=REPO,
            env={**base, "PYTHONPATH": str(REPO), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[Event] = []
        self.raw: list[str] = []
        self.not_json: list[str] = []
        self.stdout = ""
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.not_json.append(line)
                self._cond.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    def mark(self) -> int:
        """Index of the next event, to wait only for events after this point."""
        with self._cond:
            return len(self.events)

    def wait_for(
        self, predicate: Callable[[Event], bool], *, after: int = 0, timeout: float = WAIT
    ) -> Event:
        """The first event from index ``after`` on that matches ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._more()):
                    break
                self._cond.wait(min(remaining, 0.2))
        raise AssertionError(f"no matching event within {timeout}s; log:\n{''.join(self.raw)}")

    def _more(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def find(self, predicate: Callable[[Event], bool], *, after: int = 0) -> list[Event]:
        """Every event so far from ``after`` on that matches."""
        with self._cond:
            return [e for e in self.events[after:] if predicate(e)]

    def send(self, sig: signal.Signals) -> None:
        """Send a signal to the daemon."""
        self.proc.send_signal(sig)

    def stop(self, timeout: float = WAIT) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds until it exited)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        elapsed = time.monotonic() - started
        for reader in self._readers:
            reader.join(5)
        return code, elapsed

    def kill(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons that are killed after the test if still running."""
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, env: Mapping[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(config, *args, env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def ev(name: str, **fields: object) -> Callable[[Event], bool]:
    """Predicate: an event called ``name`` whose fields include ``fields``."""
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


def synced(account: str, **fields: object) -> Callable[[Event], bool]:
    """Predicate: a successful run of ``account``."""
    return ev("sync finished", account=account, outcome="ok", **fields)


def _assert_clean_log(daemon: DaemonProcess) -> None:
    assert daemon.not_json == [], "stderr lines that are not JSON"
    for event in daemon.events:
        assert {"event", "level", "timestamp", "logger"} <= event.keys(), event


def _config(tmp_path: Path, accounts: Accounts) -> Path:
    return write_config(tmp_path / "config.toml", tmp_path / "state", accounts)


def _keys(
    dovecot: Dovecot, user: MailUser, tmp_path: Path, **extra: TomlValue
) -> dict[str, TomlValue]:
    return dovecot_keys(dovecot, user, tmp_path / f"Maildir-{user.name}", interval="10s", **extra)


def _maildir(tmp_path: Path, user: MailUser) -> Path:
    return tmp_path / f"Maildir-{user.name}"


# --------------------------------------------------------------------- fake servers
_GREETING = Send(b"+OK fake POP3 ready\r\n")
_USER = re.compile(rb"USER \S+")
_PASS = re.compile(rb"PASS \S+")


def _login_refused(reply: bytes) -> list[Step]:
    """One connection whose PASS gets ``reply``."""
    caps = b"+OK\r\nUSER\r\nUIDL\r\nRESP-CODES\r\n.\r\n"
    return [
        StartTLS(),
        _GREETING,
        Expect(b"CAPA", caps),
        Expect(_USER, b"+OK\r\n"),
        Expect(_PASS, reply),
    ]


def _session(body: bytes, *, extra_caps: bytes = b"", stall_in_retr: bool = False) -> list[Step]:
    """One connection that lists one message and serves it (or stalls halfway through)."""
    caps = b"+OK\r\nUSER\r\nUIDL\r\n" + extra_caps + b".\r\n"
    steps: list[Step] = [
        StartTLS(),
        _GREETING,
        Expect(b"CAPA", caps),
        Expect(_USER, b"+OK\r\n"),
        Expect(_PASS, b"+OK logged in\r\n"),
        Expect(b"CAPA", caps),
        Expect(b"UIDL", b"+OK\r\n1 fake-uid-1\r\n.\r\n"),
        Expect(b"LIST", b"+OK\r\n1 %d\r\n.\r\n" % len(body)),
    ]
    if stall_in_retr:
        return [*steps, Expect(b"RETR 1", b"+OK\r\n" + body[: len(body) // 2]), Stall(60)]
    return [*steps, Expect(b"RETR 1", b"+OK\r\n" + body + b".\r\n"), Expect(b"QUIT", b"+OK\r\n")]


def _fake_keys(
    server: FakePop3Server, tmp_path: Path, name: str, **extra: TomlValue
) -> dict[str, TomlValue]:
    keys: dict[str, TomlValue] = {
        "host": server.host,
        "port": server.port,
        "tls": "implicit",
        "tls_ca_file": str(server.ca_file),
        "username": "bob",
        "password": "fake-pw",
        "maildir": str(tmp_path / f"Maildir-{name}"),
        "interval": "10s",
        "timeout": "10s",
    }
    keys.update(extra)
    return keys


# ----------------------------------------------------------------------------- tests
def test_delivers_mail_on_start_within_an_interval_and_on_sigusr1(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Mail waiting at start, arriving later, and arriving before SIGUSR1 is delivered once."""
    alice, bob = dovecot.new_user(), dovecot.new_user()
    first = [make_message(i, tag="a") for i in range(3)]
    dovecot.deliver_many(alice, first)
    config = _config(
        tmp_path, {"alice": _keys(dovecot, alice, tmp_path), "bob": _keys(dovecot, bob, tmp_path)}
    )
    daemon = start_daemon(config)
    started = daemon.wait_for(ev("daemon started"))
    assert started["accounts"] == ["alice", "bob"]
    run = daemon.wait_for(synced("alice", fetched=3))
    assert run["host"] == dovecot.host
    assert {"bytes", "skipped", "deleted", "duration", "on_server"} <= run.keys()
    daemon.wait_for(synced("bob", fetched=0))

    # Within one interval (10 s plus at most 1 s jitter), without any signal.
    mark = daemon.mark()
    later = make_message(1, tag="b")
    dovecot.deliver(bob, later)
    arrived = time.monotonic()
    daemon.wait_for(synced("bob", fetched=1), after=mark, timeout=15)
    assert time.monotonic() - arrived < 12.5
    assert not daemon.find(ev("polling every account now"))

    mark = daemon.mark()
    polled = make_message(9, tag="a")
    dovecot.deliver(alice, polled)
    daemon.send(signal.SIGUSR1)
    daemon.wait_for(ev("polling every account now"), after=mark, timeout=3)
    daemon.wait_for(synced("alice", fetched=1), after=mark, timeout=3)

    status = run_popsync(["status", "-c", str(config)])
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].split()[:2] == ["account", "server"]
    assert [line.split()[0] for line in lines[1:]] == ["alice", "bob"]
    assert " ok " in lines[1]
    as_json = run_popsync(["status", "--json", "-c", str(config)])
    rows = {row["account"]: row for row in json.loads(as_json.stdout)}
    assert (rows["alice"]["delivered"], rows["bob"]["delivered"]) == (4, 1)
    assert (rows["alice"]["outcome"], rows["alice"]["pending"]) == ("ok", 0)
    health = run_popsync(["healthcheck", "-c", str(config)])
    assert (health.returncode, health.stdout.split(":")[0]) == (0, "healthy")

    code, elapsed = daemon.stop()
    assert code == 0
    assert elapsed < 5
    assert daemon.wait_for(ev("daemon stopped"))["clean"] is True
    assert_exactly_once(_files(_maildir(tmp_path, alice)), [*first, polled])
    assert_exactly_once(_files(_maildir(tmp_path, bob)), [later])
    _assert_clean_log(daemon)


def _files(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for path in maildir_files(maildir)]


def test_sighup_adds_an_account_and_a_bad_config_keeps_the_old(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """SIGHUP with a new account starts syncing it; a broken file is logged and ignored."""
    alice, bob = dovecot.new_user(), dovecot.new_user()
    dovecot.deliver(bob, make_message(1, tag="bob"))
    config = _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path)})
    daemon = start_daemon(config)
    daemon.wait_for(synced("alice"))

    mark = daemon.mark()
    _config(
        tmp_path, {"alice": _keys(dovecot, alice, tmp_path), "bob": _keys(dovecot, bob, tmp_path)}
    )
    daemon.send(signal.SIGHUP)
    reloaded = daemon.wait_for(ev("config reloaded"), after=mark)
    assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (["bob"], [], [])
    daemon.wait_for(synced("bob", fetched=1), after=mark)

    mark = daemon.mark()
    config.write_text(config.read_text() + "\n[accounts.broken]\nhost = 'x'\n")
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_for(ev("config reload failed, keeping the old config"), after=mark)
    assert failed["level"] == "error"
    assert "accounts.broken.username: missing required key" in failed["problems"]

    # Both accounts of the old config are still scheduled and syncing.
    mark = daemon.mark()
    dovecot.deliver(alice, make_message(2, tag="alice"))
    daemon.send(signal.SIGUSR1)
    daemon.wait_for(synced("alice", fetched=1), after=mark)
    daemon.wait_for(synced("bob", fetched=0), after=mark)
    assert daemon.stop()[0] == 0
    assert len(maildir_files(_maildir(tmp_path, bob))) == 1
    _assert_clean_log(daemon)


class NotifySocket:
    """An AF_UNIX datagram socket collecting sd_notify messages, as systemd would."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="popsync-notify-")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str) -> list[dict[str, str]]:
        """Every message that set ``key``."""
        return [fields for _, fields in self.messages if key in fields]

    def wait(self, key: str, count: int = 1, timeout: float = WAIT) -> list[dict[str, str]]:
        """Wait until ``count`` messages set ``key``."""
        deadline = time.monotonic() + timeout
        while len(self.having(key)) < count:
            assert time.monotonic() < deadline, f"{count} x {key} not received: {self.messages}"
            time.sleep(0.02)
        return self.having(key)

    def close(self) -> None:
        """Stop receiving and remove the socket."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A bound notification socket."""
    sock = NotifySocket()
    yield sock
    sock.close()


def test_sd_notify_messages_arrive_on_a_real_socket(
    dovecot: Dovecot,
    tmp_path: Path,
    start_daemon: Callable[..., DaemonProcess],
    notify_socket: NotifySocket,
) -> None:
    """READY, STATUS, WATCHDOG heartbeats, RELOADING on SIGHUP and STOPPING on SIGTERM."""
    alice = dovecot.new_user()
    dovecot.deliver_many(alice, [make_message(i) for i in range(2)])
    config = _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path)})
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"}
    daemon = start_daemon(config, env=env)
    ready = notify_socket.wait("READY")[0]
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("1 account(s)")
    daemon.wait_for(synced("alice", fetched=2))
    deadline = time.monotonic() + WAIT
    while not any("1 synced" in m["STATUS"] for m in notify_socket.having("STATUS")):
        assert time.monotonic() < deadline, notify_socket.messages
        time.sleep(0.05)
    assert any(
        "fetched 2 message(s)" in m["STATUS"] and "0 failing" in m["STATUS"]
        for m in notify_socket.having("STATUS")
    )

    # WATCHDOG_USEC=1 s: pings every quarter to half second, from a live scheduler.
    first_ping = len(notify_socket.wait("WATCHDOG"))
    notify_socket.wait("WATCHDOG", first_ping + 4, timeout=3)
    stamps = [t for t, m in notify_socket.messages if "WATCHDOG" in m]
    assert max(b - a for a, b in itertools.pairwise(stamps)) < 0.9  # within WATCHDOG_USEC
    assert all(m["WATCHDOG"] == "1" for m in notify_socket.having("WATCHDOG"))

    daemon.send(signal.SIGHUP)
    reloading = notify_socket.wait("RELOADING")[0]
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    notify_socket.wait("READY", 2)
    order = [next(iter(m)) for _, m in notify_socket.messages if "READY" in m or "RELOADING" in m]
    assert order == ["READY", "RELOADING", "READY"]

    assert daemon.stop()[0] == 0
    assert notify_socket.wait("STOPPING")[0]["STOPPING"] == "1"
    _assert_clean_log(daemon)


def test_sigterm_during_a_large_retr_then_restart_delivers_the_rest_once(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """SIGTERM amid 30 MB messages exits 0 fast; the next start delivers the rest exactly once."""
    alice = dovecot.new_user()
    big = [make_message(i, body_size=30_000_000, tag="big") for i in range(3)]
    small = [make_message(i, tag="small") for i in range(5)]
    everything = [small[0], big[0], small[1], big[1], big[2], *small[2:]]
    dovecot.deliver_many(alice, everything)
    maildir = _maildir(tmp_path, alice)
    config = _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path)})

    daemon = start_daemon(config)
    daemon.wait_for(ev("daemon started"))
    time.sleep(0.1)  # into the first RETRs
    code, elapsed = daemon.stop()
    assert code == 0
    assert elapsed < SHUTDOWN_TIMEOUT
    first = daemon.wait_for(lambda e: e.get("account") == "alice" and "outcome" in e)
    assert first["outcome"] == "temporary", "the run should have been interrupted"
    assert first["fetched"] < len(everything)
    assert daemon.wait_for(ev("daemon stopped"))["clean"] is True
    assert list((maildir / "tmp").iterdir()) == []  # no half message anywhere

    again = start_daemon(config)
    again.wait_for(synced("alice", fetched=len(everything) - first["fetched"]), timeout=30)
    assert again.stop()[0] == 0
    assert_exactly_once(_files(maildir), everything)
    _assert_clean_log(daemon)
    _assert_clean_log(again)


def test_sigterm_with_a_stalled_server_exits_in_bounded_time(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A server stalling mid-RETR cannot hold up shutdown; the next start delivers it once."""
    body = b"Subject: stalled\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    with FakePop3Server(_session(body, stall_in_retr=True), linger=1) as stalling:
        config = _config(tmp_path, {"slow": _fake_keys(stalling, tmp_path, "slow", timeout="60s")})
        daemon = start_daemon(config)
        deadline = time.monotonic() + WAIT
        while b"RETR 1" not in stalling.commands:
            assert time.monotonic() < deadline, stalling.commands
            time.sleep(0.02)
        time.sleep(0.2)
        code, elapsed = daemon.stop(timeout=SHUTDOWN_TIMEOUT + 10)
    assert code == 0
    assert SHUTDOWN_TIMEOUT - 1 < elapsed < SHUTDOWN_TIMEOUT + 4
    assert daemon.wait_for(ev("daemon stopped"))["clean"] is False
    daemon.wait_for(ev("exiting with a stalled job abandoned"))
    maildir = tmp_path / "Maildir-slow"
    assert maildir_files(maildir) == []

    with FakePop3Server(_session(body)) as server:
        _config(tmp_path, {"slow": _fake_keys(server, tmp_path, "slow")})
        again = start_daemon(config)
        again.wait_for(synced("slow", fetched=1))
        assert again.stop()[0] == 0
    server.check()
    assert _files(maildir) == [stored_form(body)]
    assert list((maildir / "tmp").iterdir()) == []  # the abandoned half message is gone
    _assert_clean_log(daemon)
    _assert_clean_log(again)


def test_in_use_backs_off_while_other_accounts_keep_syncing(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """-ERR [IN-USE] doubles the busy account's delay; the Dovecot account syncs every time."""
    alice = dovecot.new_user()
    refusals = [_login_refused(b"-ERR [IN-USE] mailbox locked by another client\r\n")] * 3
    with FakePop3Server(*refusals, linger=1) as busy:
        config = _config(
            tmp_path,
            {"alice": _keys(dovecot, alice, tmp_path), "busy": _fake_keys(busy, tmp_path, "busy")},
        )
        daemon = start_daemon(config)
        for failures, delay, message in (
            (1, 10.0, "next run on schedule"),
            (2, 20.0, "next run delayed"),
            (3, 40.0, "next run delayed"),
        ):
            mark = daemon.mark() if failures > 1 else 0
            dovecot.deliver(alice, make_message(failures, tag="alice"))
            if failures > 1:
                daemon.send(signal.SIGUSR1)
            failed = daemon.wait_for(ev("sync failed", account="busy"), after=mark)
            assert failed["outcome"] == "temporary"
            assert "[IN-USE]" in failed["error"]
            backoff = daemon.wait_for(ev(message, account="busy"), after=mark)
            assert (backoff["failures"], backoff["delay"]) == (failures, delay)
            daemon.wait_for(synced("alice", fetched=1), after=mark)
        assert daemon.stop()[0] == 0
    busy.check()
    assert busy.connections == 3  # only the runs we asked for: no hammering
    assert len(maildir_files(_maildir(tmp_path, alice))) == 3
    _assert_clean_log(daemon)


def test_login_delay_is_honoured(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """[LOGIN-DELAY] at PASS and CAPA LOGIN-DELAY 900 both push the next run out."""
    body = b"Subject: hi\r\n\r\nhello\r\n"
    with (
        FakePop3Server(_login_refused(b"-ERR [LOGIN-DELAY] wait a bit\r\n"), linger=1) as delayed,
        FakePop3Server(_session(body, extra_caps=b"LOGIN-DELAY 900\r\n")) as announced,
    ):
        config = _config(
            tmp_path,
            {
                "delayed": _fake_keys(delayed, tmp_path, "delayed"),
                "announced": _fake_keys(announced, tmp_path, "announced"),
            },
        )
        daemon = start_daemon(config)
        refused = daemon.wait_for(ev("next run delayed", account="delayed"))
        assert (refused["outcome"], refused["delay"]) == ("temporary", 300.0)
        capa = daemon.wait_for(ev("next run delayed", account="announced"))
        assert (capa["outcome"], capa["delay"], capa["failures"]) == ("ok", 900.0, 0)
        assert daemon.stop()[0] == 0
    delayed.check()
    announced.check()
    assert _files(tmp_path / "Maildir-announced") == [stored_form(body)]


@pytest.fixture(scope="module")
def secret_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A Dovecot whose password is a unique string, so any leak of it is unambiguous."""
    if os.geteuid() == 0:  # the mail processes run as nobody and must reach the root
        root = Path(tempfile.mkdtemp(prefix="popsync-secret-dovecot-"))
        root.chmod(0o711)
    else:
        root = tmp_path_factory.mktemp("secret-dovecot")
    try:
        with Dovecot(root, password="Pw" + secrets.token_hex(12)) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_secrets_never_appear_in_logs_even_with_vv(
    dovecot: Dovecot,  # skips the test where Dovecot is not installed
    secret_dovecot: Dovecot,
    tmp_path: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Neither a good nor a refused password shows up, through runs, reloads and shutdown."""
    good, wrong = secret_dovecot.new_user(), secret_dovecot.new_user()
    secret_dovecot.deliver(good, make_message(1))
    wrong_secret = "Wrong" + secrets.token_hex(12)
    password_file = tmp_path / "wrong.password"
    password_file.write_text(wrong_secret + "\n")
    password_file.chmod(0o600)
    wrong_keys = _keys(secret_dovecot, wrong, tmp_path, password_file=str(password_file))
    del wrong_keys["password"]
    config = _config(tmp_path, {"good": _keys(secret_dovecot, good, tmp_path), "wrong": wrong_keys})
    daemon = start_daemon(config, "-vv")
    daemon.wait_for(synced("good", fetched=1))
    refused = daemon.wait_for(ev("sync failed", account="wrong"))
    assert refused["outcome"] == "auth"
    daemon.send(signal.SIGHUP)
    daemon.wait_for(ev("config reloaded"))
    daemon.send(signal.SIGUSR1)
    daemon.wait_for(ev("polling every account now"))
    code, elapsed = daemon.stop()
    assert code == 0
    assert elapsed < 5, "".join(daemon.raw)

    everything = "".join(daemon.raw) + daemon.stdout
    assert daemon.find(lambda e: e["level"] == "debug"), "-vv should log at debug level"
    for secret in (secret_dovecot.password, wrong_secret):
        assert secret not in everything
    status = run_popsync(["status", "--json", "-c", str(config)])
    assert secret_dovecot.password not in status.stdout + status.stderr
    assert wrong_secret not in status.stdout + status.stderr
    _assert_clean_log(daemon)


def test_apscheduler_logging_goes_through_the_json_pipeline(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """With -v APScheduler's own records come out as JSON events like popsync's."""
    alice = dovecot.new_user()
    config = _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path)})
    daemon = start_daemon(config, "-v")
    daemon.wait_for(synced("alice"))
    event = daemon.wait_for(lambda e: str(e.get("logger", "")).startswith("apscheduler"))
    assert {"event", "level", "timestamp"} <= event.keys()
    assert daemon.stop()[0] == 0
    _assert_clean_log(daemon)


def test_password_put_in_password_env_never_reaches_the_log(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A password mistaken for a variable name stays out of reload errors, runs and status."""
    alice, bob = dovecot.new_user(), dovecot.new_user()
    config = _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path)})
    daemon = start_daemon(config)
    daemon.wait_for(synced("alice"))
    invalid, valid = "Pa55 w0rd!" + secrets.token_hex(4), "Hunter2" + secrets.token_hex(6)
    for mistaken, expected in (
        (invalid, "config reload failed, keeping the old config"),
        (valid, "config reloaded"),
    ):
        bob_keys = _keys(dovecot, bob, tmp_path, password_env=mistaken)
        del bob_keys["password"]
        _config(tmp_path, {"alice": _keys(dovecot, alice, tmp_path), "bob": bob_keys})
        mark = daemon.mark()
        daemon.send(signal.SIGHUP)
        daemon.wait_for(ev(expected), after=mark)
    failed = daemon.wait_for(ev("sync failed", account="bob"))
    assert failed["outcome"] == "config"
    assert daemon.stop()[0] == 0
    status = run_popsync(["status", "--json", "-c", str(config)])
    everything = "".join(daemon.raw) + daemon.stdout + status.stdout + status.stderr
    assert invalid not in everything
    assert valid not in everything
    assert "password_env: the environment variable it names is not set" in everything
