"""Measuring one tool run, the disk's own limit, and polls inside a running popsync daemon.

CPU time comes from ``os.wait4`` on the spawned process. On Linux that rusage covers the child
*and* every descendant it waited for (the kernel reports RUSAGE_BOTH), so fetchmail's maildrop
children are included.

Peak RSS cannot come from that same wait4: at exec Linux seeds the new program's ``maxrss`` with
the RSS high-water mark of the address space it replaces (``exec_mmap`` ->
``setmax_mm_hiwater_rss``), i.e. with the ~40 MiB Python harness that forked it. So each tool is
started through GNU ``time`` (27 KB, ~2 MiB RSS): ``time`` forks the tool, wait4s for it and
prints ``ru_maxrss`` (%M, KiB) of the tool's tree, which is then the largest process among the
tool and its reaped children. For a daemon, /proc/PID/status VmHWM (per address space, reset by
exec) is used instead.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DISK_MODES", "WORKER_KEY", "Daemon", "Measurement", "disk_limit", "run_measured"]

DISK_MODES = ("fsync file+dir", "fsync file", "no fsync")
#: The field a labelled :class:`Daemon` adds to each of its log lines.
WORKER_KEY = "_bench_worker"
GNU_TIME = "/usr/bin/time" if os.path.isfile("/usr/bin/time") else shutil.which("time")


@dataclass(frozen=True)
class Measurement:
    """One run: wall seconds, CPU seconds (user+sys), peak RSS in KiB, exit code."""

    wall: float
    cpu: float
    maxrss_kib: int
    exit_code: int
    children_cpu: float = 0.0


def run_measured(
    argv: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float = 900
) -> Measurement:
    """Run ``argv`` to completion with stdout+stderr in ``log``; measure it (see module doc)."""
    rss_file = log.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    if GNU_TIME:
        argv = [GNU_TIME, "-q", "-f", "%M", "-o", str(rss_file), "--", *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it, tell Popen
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    maxrss = usage.ru_maxrss  # fallback without GNU time: includes the harness's RSS
    if rss_file.exists():
        words = rss_file.read_text().split()
        maxrss = int(words[-1]) if words and words[-1].isdigit() else maxrss
    return Measurement(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_kib=maxrss,
        exit_code=proc.returncode,
        children_cpu=children,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_limit(maildir: Path, messages: Iterable[bytes], mode: str) -> Measurement:
    """Write ``messages`` into ``maildir`` (tmp/ -> new/) in-process, the way a fetcher must.

    ``mode`` is one of :data:`DISK_MODES`; no network is involved, so this is the floor any tool
    with that durability can reach on this file system.
    """
    assert mode in DISK_MODES
    tmp, new = maildir / "tmp", maildir / "new"
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i, data in enumerate(messages):
        name = f"{i}.bench"
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            if mode != "no fsync":
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp / name, new / name)
        if mode == "fsync file+dir":
            _fsync_dir(new)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measurement(wall=wall, cpu=cpu, maxrss_kib=0, exit_code=0)


_SKIPPED = "maximum number of running instances"


class _PollSkippedError(Exception):
    """The daemon's scheduler dropped a SIGUSR1 poll (see :meth:`Daemon.poll`)."""


class Daemon:
    """A running ``popsync`` daemon whose JSON log lines (stdout/stderr) are watched.

    Start-up is over at the ``ready_event`` line. A poll is triggered with SIGUSR1 and is over
    when a line with ``event`` equal to ``finished_event`` or ``failed_event`` has arrived for
    every expected account (named by the field ``account_key``).
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path,
        *,
        finished_event: str = "sync finished",
        failed_event: str = "sync failed",
        ready_event: str = "daemon started",
        account_key: str = "account",
        lines: queue.Queue[dict[str, object]] | None = None,
        label: str = "",
    ) -> None:
        self.finished_event = finished_event
        self.failed_event = failed_event
        self.ready_event = ready_event
        self.account_key = account_key
        # Several daemons (a fleet) may share one queue; each line then says whose it is.
        self._lines: queue.Queue[dict[str, object]] = queue.Queue() if lines is None else lines
        self.label = label
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.skipped_polls = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._log.write(raw)
            self._log.flush()
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                if self.label:
                    obj[WORKER_KEY] = self.label
                self._lines.put(obj)

    def _ticks(self) -> float:
        """CPU seconds (user+sys) the daemon used so far, from /proc."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        """CPU seconds (user+sys) the running daemon used so far."""
        return self._ticks()

    def rss_kib(self) -> tuple[int, int]:
        """Return (current RSS, peak RSS) in KiB from /proc/PID/status."""
        now = peak = 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
        return now, peak

    def wait_finished(
        self, accounts: set[str], timeout: float, first_timeout: float | None = None
    ) -> tuple[float, list[str]]:
        """Block until every account logged a finished or failed event.

        Return (perf_counter time of the last one, failure descriptions). ``first_timeout``
        limits the wait for the first such event (used to detect "no poll at start-up").
        """
        pending = set(accounts)
        failures: list[str] = []
        now = time.monotonic()
        deadline = now + timeout
        first_deadline = now + (first_timeout if first_timeout is not None else timeout)
        while pending:
            limit = deadline if len(pending) < len(accounts) else min(deadline, first_deadline)
            left = limit - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"no {self.finished_event!r} for {len(pending)} account(s)")
            try:
                obj = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            event, account = obj.get("event"), str(obj.get(self.account_key))
            if isinstance(event, str) and _SKIPPED in event:
                raise _PollSkippedError(event)
            if event == self.finished_event:
                pending.discard(account)
            elif event == self.failed_event:
                pending.discard(account)
                failures.append(f"{account}: {obj.get('error', 'failed')}")
        return time.perf_counter(), failures

    def settle(self, accounts: set[str], cycle_timeout: float = 120) -> float | None:
        """Wait for the ready event, then for the start-up cycle if the daemon runs one.

        Return the seconds from "ready" to the end of that start-up cycle, or None when no
        account started syncing within 5 s (then the first SIGUSR1 does it).
        """
        t0 = time.perf_counter()
        deadline = time.monotonic() + 30
        while True:
            try:
                obj = self._lines.get(timeout=0.5)
            except queue.Empty:
                obj = {}
            if obj.get("event") == self.ready_event:
                t0 = time.perf_counter()
                break
            if self.proc.poll() is not None:
                raise TimeoutError(f"daemon exited with {self.proc.returncode} before starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.ready_event!r} log line within 30 s")
        try:
            t1, failures = self.wait_finished(accounts, cycle_timeout, first_timeout=5)
        except TimeoutError:
            return None
        if failures:
            raise TimeoutError(f"start-up cycle failed: {'; '.join(failures[:3])}")
        return t1 - t0

    def _drain(self) -> None:
        while not self._lines.empty():
            self._lines.get_nowait()

    def poll(self, accounts: set[str], timeout: float = 300) -> tuple[float, float, list[str]]:
        """Trigger one poll with SIGUSR1; return (seconds until all done, CPU s, failures).

        APScheduler drops a run-now request for a job whose previous run has logged its result
        but not yet returned ("maximum number of running instances reached"); such a dropped
        poll is retried after a short pause and counted in :attr:`skipped_polls`.
        """
        for _attempt in range(5):
            time.sleep(0.2)  # let the previous job return (see above); not timed
            self._drain()
            cpu0 = self._ticks()
            t0 = time.perf_counter()
            self.proc.send_signal(signal.SIGUSR1)
            try:
                t1, failures = self.wait_finished(accounts, timeout)
            except _PollSkippedError:
                self.skipped_polls += 1
                self.wait_quiet(2.0)
                continue
            return t1 - t0, self._ticks() - cpu0, failures
        raise TimeoutError("every SIGUSR1 poll was skipped by the scheduler")

    def wait_quiet(self, seconds: float) -> None:
        """Swallow log lines until none arrived for ``seconds`` (a half-done poll finishing)."""
        while True:
            try:
                self._lines.get(timeout=seconds)
            except queue.Empty:
                return

    def stop(self) -> Measurement:
        """SIGTERM the daemon; return its whole-life CPU (wait4) and peak RSS (VmHWM)."""
        t0 = time.perf_counter()
        peak = 0
        if self.proc.poll() is None:
            peak = self.rss_kib()[1]
            self.proc.send_signal(signal.SIGTERM)
        killer = threading.Timer(20, self.proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            killer.cancel()
        self._reader.join(timeout=5)
        self._log.close()
        return Measurement(
            wall=time.perf_counter() - t0,
            cpu=usage.ru_utime + usage.ru_stime,
            maxrss_kib=peak,
            exit_code=self.proc.returncode if self.proc.returncode is not None else -1,
        )
