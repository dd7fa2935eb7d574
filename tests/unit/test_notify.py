"""sd_notify messages reach a real AF_UNIX datagram socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.notify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, like systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def _fields(sock: socket.socket) -> dict[str, str]:
    """Receive one datagram and split it into KEY=value fields."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_sends_ready_1(listener: tuple[socket.socket, str]) -> None:
    """ready() sends READY=1 and reports that it sent it."""
    sock, path = listener
    assert Notifier(path).ready() is True
    assert _fields(sock) == {"READY": "1"}


def test_ready_with_status_is_one_datagram(listener: tuple[socket.socket, str]) -> None:
    """ready(status) carries both fields in a single datagram."""
    sock, path = listener
    Notifier(path).ready("2 accounts scheduled")
    assert _fields(sock) == {"READY": "1", "STATUS": "2 accounts scheduled"}


def test_status_newlines_cannot_inject_fields(listener: tuple[socket.socket, str]) -> None:
    """A newline in the status text is flattened instead of starting a new assignment."""
    sock, path = listener
    Notifier(path).status("syncing\nREADY=1")
    assert _fields(sock) == {"STATUS": "syncing READY=1"}


@pytest.mark.parametrize(
    ("method", "expected"),
    [("watchdog", {"WATCHDOG": "1"}), ("stopping", {"STOPPING": "1"})],
)
def test_simple_messages(
    listener: tuple[socket.socket, str], method: str, expected: dict[str, str]
) -> None:
    """watchdog() and stopping() send their one-field messages."""
    sock, path = listener
    assert getattr(Notifier(path), method)() is True
    assert _fields(sock) == expected


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    """reloading() sends RELOADING=1 with the current CLOCK_MONOTONIC in microseconds."""
    sock, path = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _fields(sock)
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_extend_timeout_in_microseconds(listener: tuple[socket.socket, str]) -> None:
    """extend_timeout(seconds) is sent as EXTEND_TIMEOUT_USEC."""
    sock, path = listener
    Notifier(path).extend_timeout(1.5)
    assert _fields(sock) == {"EXTEND_TIMEOUT_USEC": "1500000"}


def test_abstract_socket() -> None:
    """An @name address reaches a socket bound in the Linux abstract namespace."""
    name = f"popsync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier("@" + name).ready() is True
        assert _fields(sock) == {"READY": "1"}


def test_unset_socket_is_a_noop() -> None:
    """Without an address nothing is sent and every call returns False."""
    notifier = Notifier(None)
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False


@pytest.mark.parametrize("address", ["", "relative/path.sock", "vsock:2:1234"])
def test_unsupported_addresses_disable(address: str) -> None:
    """Empty, relative and vsock addresses leave the notifier disabled."""
    assert not Notifier(address).enabled


def test_send_failure_returns_false(tmp_path: Path) -> None:
    """A socket path with no listener makes send return False instead of raising."""
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    assert notifier.ready() is False


def test_send_to_closed_listener_returns_false(tmp_path: Path) -> None:
    """A listener that went away (stale socket file) does not raise into the caller."""
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()
    assert path.exists()
    assert Notifier(str(path)).watchdog() is False


def test_from_environ_reads_and_optionally_unsets(listener: tuple[socket.socket, str]) -> None:
    """from_environ uses $NOTIFY_SOCKET and removes it when unset=True."""
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    notifier = Notifier.from_environ(env, unset=True)
    assert "NOTIFY_SOCKET" not in env
    notifier.stopping()
    assert _fields(sock) == {"STOPPING": "1"}
    assert not Notifier.from_environ({}).enabled


def test_from_environ_defaults_to_process_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit mapping, os.environ is read."""
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier.from_environ().ready()
    assert _fields(sock) == {"READY": "1"}


def test_watchdog_interval_from_usec() -> None:
    """WATCHDOG_USEC is converted to seconds."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0


def test_watchdog_interval_checks_pid() -> None:
    """A WATCHDOG_PID naming another process means the watchdog is not ours."""
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert watchdog_interval(env) is None
    assert watchdog_interval(env, pid=os.getpid() + 1) == 1.0


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "5", "WATCHDOG_PID": "x"},
    ],
)
def test_watchdog_interval_disabled(env: dict[str, str]) -> None:
    """Missing, zero or malformed values disable the watchdog."""
    assert watchdog_interval(env) is None


def test_notifier_watchdog_interval_needs_a_socket(tmp_path: Path) -> None:
    """Without a notify socket, pinging is pointless, so no interval is reported."""
    env = {"WATCHDOG_USEC": "2000000"}
    assert Notifier(None).watchdog_interval(env) is None
    assert Notifier(str(tmp_path / "s")).watchdog_interval(env) == 2.0
