"""The long-running service: signals, reloads, systemd notifications around the scheduler.

Signal handlers only set flags and write a byte to a pipe the main thread waits on; all
work happens there, so a signal can never interrupt a half-written SQLite transaction or
Maildir rename, nor deadlock on a lock the main thread holds.

* SIGTERM/SIGINT: stop scheduling and tell running jobs to stop before their next message
  (a run that stops commits what it has, sends no QUIT, so the server deletes nothing);
  wait at most ``SHUTDOWN_TIMEOUT`` seconds, then exit 0. A job stuck on a stalled server
  is abandoned at that point, which is as safe as kill -9 by the durability order.
* SIGHUP: read the config again; add, remove or change jobs. A bad new config is logged
  and the old one kept, and the rejection stays visible until a reload succeeds: in the
  ``STATUS=`` line (``systemctl status``) and in ``state_dir/daemon.json``, which
  ``popsync status`` reads. (The units' ``ExecReload=`` also runs ``popsync check-config``
  first, so ``systemctl reload`` itself fails on a bad file.)
* SIGUSR1: poll every account now.

With ``store = "postgresql://…"`` the daemon is one worker of a fleet: `popsync.fleet`'s
`FleetScheduler` takes the scheduler's place (claiming due accounts by lease, fencing each
run with its lease token); signals mean the same, for this worker's accounts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, cast

import structlog

from popsync.deliver.budget import SessionBudget
from popsync.errors import ConfigError, ExitCode
from popsync.notify import Notifier

if TYPE_CHECKING:
    from popsync.config import Account, Config, LogFormat
    from popsync.fleet import FleetScheduler, FleetStore
    from popsync.metrics import Metrics
    from popsync.scheduler import AccountScheduler
    from popsync.store import Store
    from popsync.sync import RunResult

__all__ = ["SHUTDOWN_TIMEOUT", "Daemon", "run_daemon"]

#: How long SIGTERM waits for running jobs before exiting anyway. Docker kills after
#: 10 s by default; a job notices the stop flag within one network read, so this is
#: only reached with a server that has stalled.
SHUTDOWN_TIMEOUT = 8.0
_TICK = 1.0


class Daemon:
    """The main loop around an :class:`AccountScheduler` (fleet mode: a FleetScheduler)."""

    def __init__(
        self,
        config_path: Path,
        config: Config,
        store: Store,
        *,
        only: Sequence[str] = (),
        notifier: Notifier | None = None,
        log_format: LogFormat | None = None,
        verbose: int = 0,
    ) -> None:
        from popsync.scheduler import HEARTBEAT_EVERY, AccountScheduler

        self.config_path = config_path
        self.config = config
        self.store = store
        self.only = tuple(only)
        self.notifier = notifier or Notifier(None)
        self.log_format = log_format
        self.verbose = verbose
        #: Set when shutdown begins; running jobs stop at the next message.
        self.stop_event = threading.Event()
        #: False after a shutdown that had to leave a stalled job running.
        self.clean = True
        # Signal handlers run on the main thread between bytecodes, possibly while it holds
        # a threading lock; so they only set flags and write to this pipe, never take a lock.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_requested = False
        self._reload = False
        self._poll = False
        self._log = structlog.get_logger("popsync.daemon")
        self._results: dict[str, RunResult] = {}
        #: LMTP sessions of all runs together, per server (`popsync.deliver.budget`).
        self.lmtp_budget = SessionBudget(config.lmtp_max_sessions)
        #: (when, problems) of the last rejected reload; None once a reload succeeds.
        self.reload_failure: tuple[float, list[str]] | None = None
        #: The Prometheus metrics, when ``metrics_listen`` is set (started by run()).
        self.metrics: Metrics | None = None
        self._progressing = True
        self.watchdog = self.notifier.watchdog_interval()
        beat = HEARTBEAT_EVERY if self.watchdog is None else min(HEARTBEAT_EVERY, self.watchdog / 4)
        self.scheduler: AccountScheduler | FleetScheduler
        if _fleet_mode(config):
            from popsync.fleet import FleetScheduler

            self.scheduler = FleetScheduler(
                self._run_fenced,
                cast("FleetStore", store),
                max_workers=config.max_workers,
                on_result=self._record,
                heartbeat_every=beat,
                on_delay=self._delayed,
            )
        else:
            self.scheduler = AccountScheduler(
                self._run_account,
                max_workers=config.max_workers,
                on_result=self._record,
                heartbeat_every=beat,
                on_delay=self._delayed,
            )

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        """Route SIGTERM/SIGINT, SIGHUP and SIGUSR1 to this daemon (main thread only)."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_poll)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.request_reload()

    def _on_poll(self, signum: int, frame: FrameType | None) -> None:
        self.request_poll()

    def request_stop(self) -> None:
        """Stop gracefully (what SIGTERM does); safe from any thread or signal handler."""
        self._stop_requested = True
        self._wake_up()

    def request_reload(self) -> None:
        """Reload the config file (what SIGHUP does)."""
        self._reload = True
        self._wake_up()

    def request_poll(self) -> None:
        """Poll every account now (what SIGUSR1 does)."""
        self._poll = True
        self._wake_up()

    def _wake_up(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is already awake
            os.write(self._wake_w, b"\0")

    def _sleep(self, timeout: float) -> None:
        """Wait until woken or ``timeout`` passes; select() resumes after signals (PEP 475)."""
        select.select([self._wake_r], [], [], timeout)
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass

    def close(self) -> None:
        """Release the wake-up pipe."""
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---------------------------------------------------------------------- jobs
    def _accounts(self, config: Config) -> dict[str, Account]:
        names = self.only or tuple(n for n, a in config.accounts.items() if a.enabled)
        return {n: config.accounts[n] for n in names if n in config.accounts}

    def _run_fenced(
        self, account: Account, store: Store, fence: Callable[[], None], stop: threading.Event
    ) -> RunResult:
        """A fleet run: the store seen through the run's lease, its fence and stop flag."""
        return self._run_account(account, store=store, fence=fence, stop=stop)

    def _run_account(
        self,
        account: Account,
        *,
        store: Store | None = None,
        fence: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RunResult:
        from popsync.sync import sync_account

        name = account.name

        def run() -> RunResult:
            return sync_account(
                account,
                self.store if store is None else store,
                stop=self.stop_event if stop is None else stop,
                on_activity=lambda: self.scheduler.note_activity(name),
                fence=fence,
                lmtp_budget=self.lmtp_budget,
            )

        if self.metrics is None:
            return run()
        with self.metrics.running():
            return run()

    def _record(self, result: RunResult) -> None:
        self._results[result.account] = result
        if self.metrics is not None:
            self.metrics.observe(result, time.time())
        # The STATUS= line is refreshed by the next tick (within a second): waking the main
        # loop after every run would rebuild it once per run, O(accounts) each time.

    def _delayed(self, result: RunResult, delay: float) -> None:
        """The scheduler chose the next run of ``result.account``: publish any backoff."""
        if self.metrics is None:
            return
        account = self.config.accounts.get(result.account)  # one lookup, not a copy of all
        if account is None or delay == account.interval:
            self.metrics.backoff(result.account, 0.0, "none")
        else:
            reason = "login_delay" if result.outcome == "ok" else result.outcome
            self.metrics.backoff(result.account, delay, reason)

    def _start_metrics(self) -> None:
        """Serve /metrics on ``metrics_listen``; a port in use is temporary (exit 75)."""
        listen = self.config.metrics_listen
        if listen is None:
            return
        from popsync.errors import NetworkError
        from popsync.metrics import Metrics, parse_listen

        host, port = parse_listen(listen)
        store = self.store

        def seen_entries(name: str) -> int:  # a count, not every row: stores hold millions
            account = self.config.accounts.get(name)
            return 0 if account is None else store.count(account.mailbox)

        metrics = Metrics(seen_entries, getattr(self.scheduler, "worker_id", None))
        try:
            metrics.serve(host, port)
        except OSError as exc:
            raise NetworkError(f"metrics_listen {listen}: cannot listen: {exc.strerror}") from None
        self.metrics = metrics
        self._log.info("serving metrics", host=host, port=metrics.port, path="/metrics")

    def status_line(self) -> str:
        """The ``STATUS=`` text for ``systemctl status``: counts and the first failure."""
        accounts = self.scheduler.accounts
        results = [r for name, r in list(self._results.items()) if name in accounts]
        failing = [r for r in results if r.outcome != "ok"]
        fetched = sum(r.fetched for r in results)
        text = f"{len(accounts)} account(s), {len(results)} synced, {len(failing)} failing"
        if failing:
            worst = failing[0]
            text += f" ({worst.account}: {worst.outcome})"
        text += f"; last runs fetched {fetched} message(s)"
        if self.reload_failure is not None:
            problems = self.reload_failure[1]
            first = problems[0] if problems else "invalid config"
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            text += f"; config reload REJECTED, running the previous config: {first}{more}"
        return text

    def _write_record(self) -> None:
        """Publish pid and reload outcome for ``popsync status``; failure only logs."""
        from popsync.statefile import write_daemon_record

        failure = self.reload_failure
        reload = None if failure is None else {"at": failure[0], "problems": failure[1]}
        try:
            write_daemon_record(
                self.config.state_dir,
                {"config": str(self.config_path), "reload_rejected": reload},
            )
        except OSError as exc:
            self._log.warning("cannot write the daemon record", error=str(exc))

    # ------------------------------------------------------------------ main loop
    def run(self) -> ExitCode:
        """Schedule every account and serve signals until asked to stop."""
        unknown = [n for n in self.only if n not in self.config.accounts]
        if unknown:
            raise ConfigError([f"--account {n}: no such account" for n in unknown])
        self._start_metrics()
        accounts = self._accounts(self.config)
        if self.metrics is not None:
            self.metrics.set_accounts(accounts)
        self.scheduler.set_accounts(accounts)
        self.scheduler.start()
        self._log.info(
            "daemon started",
            accounts=sorted(self.scheduler.accounts),
            max_workers=self.config.max_workers,
            watchdog=self.watchdog,
        )
        self._write_record()
        self.notifier.ready(self.status_line())
        tick = _TICK if self.watchdog is None else min(_TICK, self.watchdog / 4)
        last_status = ""
        last_ping = -math.inf
        while True:
            self._sleep(tick)  # returns at once when a request is already waiting
            if self._stop_requested:
                break
            if self._reload:
                self._reload = False
                self.reload()
            if self._poll:
                self._poll = False
                self._log.info("polling every account now")
                self.scheduler.poll_now()
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line
            last_ping = self._watchdog(last_ping)
        return self.shutdown()

    def _watchdog(self, last_ping: float) -> float:
        """Ping systemd's watchdog while the daemon makes progress; return the ping time.

        Progress: the scheduler's heartbeat is fresh, and unless no run is in progress,
        at least one run is not stalled (see ``AccountScheduler.making_progress``). A
        daemon whose every run is stuck gets no pings, so systemd restarts it.
        """
        if self.watchdog is None:
            return last_ping
        now = time.monotonic()
        fresh = self.scheduler.heartbeat_age() < self.watchdog / 2
        progressing = self.scheduler.making_progress()
        if progressing != self._progressing:
            self._progressing = progressing
            if progressing:
                self._log.info("runs make progress again; watchdog pings resume")
            else:
                self._log.warning(
                    "no run makes progress; withholding watchdog pings",
                    stalled=self.scheduler.stalled(),
                )
        if fresh and progressing and now - last_ping >= self.watchdog / 4:
            self.notifier.watchdog()
            return now
        return last_ping

    def shutdown(self) -> ExitCode:
        """Stop scheduling, let running jobs stop, wait at most SHUTDOWN_TIMEOUT seconds."""
        self.stop_event.set()
        self.notifier.stopping()
        self._log.info("stopping")
        started = time.monotonic()
        self.clean = self.scheduler.shutdown(SHUTDOWN_TIMEOUT)
        if self.metrics is not None:
            self.metrics.close()
        from popsync.statefile import remove_daemon_record

        with contextlib.suppress(OSError):
            remove_daemon_record(self.config.state_dir)
        self._log.info(
            "daemon stopped",
            clean=self.clean,
            seconds=round(time.monotonic() - started, 3),
        )
        return ExitCode.OK

    def reload(self) -> None:
        """Apply the config file again; a bad one is logged and the running one kept."""
        from popsync.config import load_config
        from popsync.logconfig import configure_logging

        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self._log.error(
                "config reload failed, keeping the old config",
                path=str(self.config_path),
                problems=exc.problems,
            )
            self.reload_failure = (time.time(), exc.problems)
            self._write_record()
            self.notifier.ready(self.status_line())
            return
        for key in _RESTART_KEYS:
            if getattr(config, key) != getattr(self.config, key):
                self._log.warning(f"{key} changes need a restart; keeping the old value")
        configure_logging(
            self.log_format or config.log_format,
            _level(config, self.verbose),
            scheduler_debug=self.verbose >= 2,
        )
        for warning in config.warnings:
            self._log.warning("config warning", detail=warning)
        self.config = config.model_copy(
            update={key: getattr(self.config, key) for key in _RESTART_KEYS}
        )
        self.lmtp_budget.limit = config.lmtp_max_sessions
        accounts = self._accounts(config)
        if self.metrics is not None:
            self.metrics.set_accounts(
                accounts, removed=set(self.scheduler.accounts) - set(accounts)
            )
        added, removed, changed = self.scheduler.set_accounts(accounts)
        self._log.info("config reloaded", added=added, removed=removed, changed=changed)
        self.reload_failure = None
        self._write_record()
        self.notifier.ready(self.status_line())


#: Settings a reload cannot change: the old value is kept (with a warning).
_RESTART_KEYS = ("state_dir", "max_workers", "metrics_listen", "store", "worker_id")


def _fleet_mode(config: Config) -> bool:
    from popsync.store import is_postgres_url

    return is_postgres_url(config.store)


def _level(config: Config, verbose: int) -> str:
    return "debug" if verbose else config.log_level


def run_daemon(
    config_path: Path,
    *,
    accounts: Sequence[str] = (),
    verbose: int = 0,
    log_format: LogFormat | None = None,
) -> ExitCode:
    """Run until SIGTERM; raises ConfigError for a bad config at start (exit 78)."""
    from popsync.config import load_config
    from popsync.logconfig import configure_logging
    from popsync.store import open_store

    config = load_config(config_path)
    configure_logging(
        log_format or config.log_format, _level(config, verbose), scheduler_debug=verbose >= 2
    )
    log = structlog.get_logger("popsync.daemon")
    for warning in config.warnings:
        log.warning("config warning", detail=warning)
    store = open_store(config)
    daemon = Daemon(
        config_path,
        config,
        store,
        only=accounts,
        notifier=Notifier.from_environ(unset=True),
        log_format=log_format,
        verbose=verbose,
    )
    daemon.install_signal_handlers()
    try:
        code = daemon.run()
    except BaseException:
        daemon.close()
        store.close()
        raise
    daemon.close()
    if not daemon.clean:
        _abandon(code)
    store.close()
    return code


def _abandon(code: ExitCode) -> NoReturn:
    """Exit now although a stalled job still runs; interpreter exit would wait for it.

    Safe by the durability order: whatever the job has committed is complete, and
    anything it has not is repaired or fetched again by the next run, as after kill -9.
    """
    structlog.get_logger("popsync.daemon").warning("exiting with a stalled job abandoned")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(int(code))
