"""Prometheus metrics for the daemon, served on ``metrics_listen`` (opt-in).

Only the daemon imports this module, and only when ``metrics_listen`` is set: importing
prometheus_client costs start-up time that ``popsync --once`` and the admin commands must
not pay. Every metric lives in a registry of its own (not the library's global one), so
tests and a second daemon in one interpreter do not collide.

The daemon feeds it: :meth:`Metrics.running` around every sync run, :meth:`Metrics.observe`
with each run's result, :meth:`Metrics.backoff` when the scheduler has chosen the next run
time, and :meth:`Metrics.set_accounts` at start and after a reload. Names follow the
Prometheus conventions (``popsync_`` prefix, ``_total`` for counters, base units
``_seconds`` and ``_bytes``).
"""

from __future__ import annotations

import contextlib
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from popsync import __version__

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from popsync.sync import RunResult

__all__ = ["BACKOFF_REASONS", "OUTCOMES", "Metrics", "parse_listen"]

#: Every run outcome, pre-declared per account so a rate() over them starts at zero.
OUTCOMES = ("ok", "temporary", "auth", "protocol", "local_io", "config", "error")
#: Why the next run is later than the interval: a failure's outcome, or the server's
#: LOGIN-DELAY; "none" while the account runs on schedule.
BACKOFF_REASONS = ("none", "login_delay", *OUTCOMES[1:])


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``"127.0.0.1:9387"`` or ``"[::1]:9387"`` into (host, port); ValueError if bad."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'expected "HOST:PORT", e.g. "127.0.0.1:9387" (got {value!r})')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'write an IPv6 address in brackets, e.g. "[::1]:9387" (got {value!r})')
    return host, int(port)


class Metrics:
    """The daemon's metrics and the HTTP server that exposes them."""

    def __init__(self, seen_entries: Callable[[str], int], worker: str | None = None) -> None:
        """``seen_entries(account)`` counts the account's rows in the seen-store.

        ``worker`` (fleet mode) is published as ``popsync_worker_info{worker_id=…}``: one
        series per process, to join on ``instance`` rather than a label on every metric.
        """
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Info
        from prometheus_client.platform_collector import PlatformCollector
        from prometheus_client.process_collector import ProcessCollector

        self._seen_entries = seen_entries
        self._lock = threading.Lock()
        self._running = 0
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        account = ["account"]
        self.runs = Counter(
            "popsync_runs", "Sync runs by outcome.", [*account, "outcome"], registry=registry
        )
        self.fetched = Counter(
            "popsync_messages_fetched", "Messages delivered.", account, registry=registry
        )
        self.fetched_bytes = Counter(
            "popsync_fetched_bytes", "Bytes of messages delivered.", account, registry=registry
        )
        self.deleted = Counter(
            "popsync_messages_deleted", "Messages deleted on the server.", account,
            registry=registry,
        )  # fmt: skip
        self.skipped = Gauge(
            "popsync_messages_too_large",
            "Messages left on the server at the last run because they exceed max_message_size.",
            account,
            registry=registry,
        )
        self.last_success = Gauge(
            "popsync_last_success_timestamp_seconds",
            "When the last successful run finished (Unix time).",
            account,
            registry=registry,
        )
        self.last_duration = Gauge(
            "popsync_last_run_duration_seconds",
            "How long the last run took.",
            account,
            registry=registry,
        )
        self.backoff_seconds = Gauge(
            "popsync_backoff_seconds",
            "Delay before the next run while backing off (0 on the regular interval).",
            account,
            registry=registry,
        )
        self.backoff_reason = Enum(
            "popsync_backoff_reason",
            "Why the next run is delayed.",
            account,
            states=list(BACKOFF_REASONS),
            registry=registry,
        )
        self.seen = Gauge(
            "popsync_seen_entries",
            "Messages the seen-store remembers for the account.",
            account,
            registry=registry,
        )
        self.accounts = Gauge(
            "popsync_accounts_configured", "Accounts scheduled by the daemon.", registry=registry
        )
        self.in_progress = Gauge(
            "popsync_runs_in_progress", "Sync runs executing right now.", registry=registry
        )
        Info("popsync_build", "popsync version.", registry=registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        if worker is not None:
            Info("popsync_worker", "This fleet worker's id.", registry=registry).info(
                {"worker_id": worker}
            )

    # ----------------------------------------------------------------- server
    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on host:port from a daemon thread; OSError if it cannot bind."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, host, registry=self.registry)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------ feeds
    def set_accounts(self, names: Iterable[str], removed: Iterable[str] = ()) -> None:
        """Declare every account's series (zeros, not gaps); drop removed accounts' series."""
        for name in removed:
            self.forget(name)
        names = list(names)
        self.accounts.set(len(names))
        for name in names:
            for outcome in OUTCOMES:
                self.runs.labels(name, outcome)
            for counter in (self.fetched, self.fetched_bytes, self.deleted):
                counter.labels(name)
            self.backoff_seconds.labels(name)
            self.backoff_reason.labels(name).state("none")

    def forget(self, name: str) -> None:
        """Drop a removed account's series."""
        for metric in (
            self.fetched,
            self.fetched_bytes,
            self.deleted,
            self.skipped,
            self.last_success,
            self.last_duration,
            self.backoff_seconds,
            self.backoff_reason,
            self.seen,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for outcome in OUTCOMES:
            with contextlib.suppress(KeyError):
                self.runs.remove(name, outcome)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Count a run in ``popsync_runs_in_progress`` while the block executes."""
        with self._lock:
            self._running += 1
            self.in_progress.set(self._running)
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self.in_progress.set(self._running)

    def observe(self, result: RunResult, finished: float) -> None:
        """Count one finished run; ``finished`` is its end in Unix time."""
        name = result.account
        self.runs.labels(name, result.outcome).inc()
        self.fetched.labels(name).inc(result.fetched)
        self.fetched_bytes.labels(name).inc(result.bytes)
        self.deleted.labels(name).inc(result.deleted)
        self.last_duration.labels(name).set(result.duration)
        if result.outcome == "ok":
            self.last_success.labels(name).set(finished)
            self.skipped.labels(name).set(result.skipped)
        # A busy or broken store must not fail the run's bookkeeping; the gauge keeps its value.
        with contextlib.suppress(Exception):
            self.seen.labels(name).set(self._seen_entries(name))

    def backoff(self, name: str, seconds: float, reason: str) -> None:
        """The scheduler delayed ``name``'s next run by ``seconds`` beyond its interval."""
        self.backoff_seconds.labels(name).set(seconds)
        self.backoff_reason.labels(name).state(reason if reason in BACKOFF_REASONS else "error")
