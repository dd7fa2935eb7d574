"""Helpers for fleet-mode tests: several real ``popsync`` daemons sharing one PostgreSQL.

Each worker gets its own config file (same accounts, same database, its own ``worker_id``
and, unless told otherwise, its own ``state_dir``: local spools are out of each other's
reach, as on separate machines). Leases are short (`LEASE` s, renewed every `RENEW` s)
through the documented environment knobs, so takeovers happen within seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.integration.test_daemon import DaemonProcess, Event
from tests.synchelp import TomlValue, _toml

__all__ = [
    "LEASE",
    "RENEW",
    "CutProxy",
    "fleet_config",
    "is_stopped",
    "overlapping_runs",
    "run_intervals",
    "start_worker",
    "wait_until",
]

LEASE = 3.0
RENEW = 1.0
ENV = {"POPSYNC_LEASE_SECONDS": str(LEASE), "POPSYNC_LEASE_RENEW_SECONDS": str(RENEW)}


def fleet_config(
    path: Path,
    *,
    dsn: str,
    worker_id: str,
    state_dir: Path,
    accounts: Mapping[str, Mapping[str, TomlValue]],
    max_workers: int = 2,
) -> Path:
    """Write one worker's config: the shared accounts and store, its own id and state_dir."""
    lines = [
        f"state_dir = {_toml(str(state_dir))}",
        f"store = {_toml(dsn)}",
        f"worker_id = {_toml(worker_id)}",
        f"max_workers = {max_workers}",
        "",
    ]
    for name, keys in accounts.items():
        lines.append(f"[accounts.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def start_worker(
    start: Callable[..., DaemonProcess],
    config: Path,
    *,
    at: str | None = None,
    nth: int = 1,
    signal: str = "KILL",
    batch: int | None = None,
) -> DaemonProcess:
    """Start ``popsync -c CONFIG`` with the short test leases.

    With ``at`` (or ``batch``) it runs under `tests.crashwrap`: killed (or, with ``signal =
    "STOP"``, stopped) at the ``nth`` event ``at``, with ``batch`` messages per batch.
    """
    if at is None and batch is None:
        return start(config, env=ENV)
    launcher = ["-m", "tests.crashwrap", "--at", at or "never", "--nth", str(nth)]
    launcher += ["--signal", signal]
    if batch is not None:
        launcher += ["--batch-messages", str(batch)]
    return start(config, env=ENV, launcher=[*launcher, "--"])


def is_stopped(worker: DaemonProcess) -> bool:
    """Whether the process is stopped (SIGSTOP): state T in /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{worker.proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    workers: Iterable[DaemonProcess] = (),
) -> None:
    """Poll ``check`` every 0.1 s until it is true; AssertionError naming ``what`` if not.

    The failure shows the last log lines of ``workers``.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- worker {i}:\n" + "".join(w.raw[-40:]) for i, w in enumerate(workers)
            )
            raise AssertionError(f"not within {timeout}s: {what}\n{logs}")
        time.sleep(0.1)


def run_intervals(workers: Iterable[DaemonProcess]) -> dict[str, list[tuple[float, float, int]]]:
    """Per account, the (start, end, worker index) of every finished or failed run."""
    found: dict[str, list[tuple[float, float, int]]] = {}
    for index, worker in enumerate(workers):
        for event in worker.find(_run_event):
            end = datetime.fromisoformat(str(event["timestamp"])).timestamp()
            start = end - float(event["duration"])
            found.setdefault(str(event["account"]), []).append((start, end, index))
    return found


def _run_event(event: Event) -> bool:
    return event.get("event") in ("sync finished", "sync failed") and "duration" in event


def overlapping_runs(workers: Iterable[DaemonProcess]) -> list[tuple[str, Any, Any]]:
    """Runs of one account by two different workers that overlapped in time."""
    problems: list[tuple[str, Any, Any]] = []
    for account, runs in run_intervals(workers).items():
        for first, second in itertools.combinations(sorted(runs), 2):
            if first[2] != second[2] and second[0] < first[1]:
                problems.append((account, first, second))
    return problems


class CutProxy:
    """A loopback TCP proxy to ``(host, port)`` whose traffic the test can cut and restore.

    ``cut()`` freezes every connection (bytes are no longer forwarded, nothing is closed:
    a partition, not a reset) and refuses new ones by not accepting them; ``restore()``
    lets traffic flow again.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.wait()
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._open.wait()
                if self._closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
