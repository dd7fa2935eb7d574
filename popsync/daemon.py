"""The long-running service: signals, reloads, systemd notifications around the scheduler.

Signal handlers only set flags and wake the main thread; all work happens there, so a
signal can never interrupt a half-written SQLite transaction or Maildir rename.

* SIGTERM/SIGINT: stop scheduling, tell running jobs to stop at the next chunk (the
  message in flight is abandoned cleanly: its tmp file is removed, nothing half-done is
  recorded, and the server deletes nothing because no QUIT is sent), wait a bounded time,
  exit 0.
* SIGHUP: read the config again; add, remove or change jobs. A bad new config is logged
  and the old one kept.
* SIGUSR1: poll every account now.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from popsync.errors import ConfigError, ExitCode
from popsync.notify import Notifier

if TYPE_CHECKING:
    from popsync.config import Account, Config, LogFormat
    from popsync.scheduler import AccountScheduler
    from popsync.seen import SeenStore
    from popsync.sync import RunResult

__all__ = ["SHUTDOWN_TIMEOUT", "Daemon", "run_daemon"]

#: How long SIGTERM waits for running jobs before exiting anyway. Docker kills after
#: 10 s by default; a job notices the stop flag within one network read, so this is
#: only reached with a server that has stalled.
SHUTDOWN_TIMEOUT = 8.0
_TICK = 1.0


class Daemon:
    """The main loop around an :class:`AccountScheduler`."""

    def __init__(
        self,
        config_path: Path,
        config: Config,
        store: SeenStore,
        *,
        only: Sequence[str] = (),
        notifier: Notifier | None = None,
        log_format: LogFormat | None = None,
        verbose: int = 0,
    ) -> None:
        from popsync.scheduler import AccountScheduler

        self.config_path = config_path
        self.config = config
        self.store = store
        self.only = tuple(only)
        self.notifier = notifier or Notifier(None)
        self.log_format = log_format
        self.verbose = verbose
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._reload = False
        self._poll = False
        self._log = structlog.get_logger("popsync.daemon")
        self._results: dict[str, RunResult] = {}
        self.scheduler: AccountScheduler = AccountScheduler(
            self._run_account, max_workers=config.max_workers, on_result=self._record
        )

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_poll)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._wake.set()

    def _on_poll(self, signum: int, frame: FrameType | None) -> None:
        self._poll = True
        self._wake.set()

    def request_stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    # ---------------------------------------------------------------------- jobs
    def _accounts(self, config: Config) -> dict[str, Account]:
        names = self.only or tuple(n for n, a in config.accounts.items() if a.enabled)
        return {n: config.accounts[n] for n in names if n in config.accounts}

    def _run_account(self, account: Account) -> RunResult:
        from popsync.sync import sync_account

        return sync_account(account, self.store, stop=self.stop_event)

    def _record(self, result: RunResult) -> None:
        self._results[result.account] = result
        self._wake.set()  # refresh the STATUS= line soon

    def status_line(self) -> str:
        results = list(self._results.values())
        total = len(self.scheduler.accounts)
        failing = [r for r in results if r.outcome != "ok"]
        fetched = sum(r.fetched for r in results)
        text = f"{total} account(s), {len(results)} synced, {len(failing)} failing"
        if failing:
            worst = failing[0]
            text += f" ({worst.account}: {worst.outcome})"
        return text + f"; last runs fetched {fetched} message(s)"

    # ------------------------------------------------------------------ main loop
    def run(self) -> ExitCode:
        unknown = [n for n in self.only if n not in self.config.accounts]
        if unknown:
            raise ConfigError([f"--account {n}: no such account" for n in unknown])
        self.scheduler.set_accounts(self._accounts(self.config))
        self.scheduler.start()
        self._log.info(
            "daemon started",
            accounts=sorted(self.scheduler.accounts),
            max_workers=self.config.max_workers,
        )
        self.notifier.ready(self.status_line())
        watchdog = self.notifier.watchdog_interval()
        last_status = ""
        while not self.stop_event.is_set():
            self._wake.wait(_TICK if watchdog is None else min(_TICK, watchdog / 3))
            self._wake.clear()
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
            if watchdog is not None and self.scheduler.heartbeat_age() < watchdog / 2:
                self.notifier.watchdog()
        return self.shutdown()

    def shutdown(self) -> ExitCode:
        self.notifier.stopping()
        self._log.info("stopping")
        started = time.monotonic()
        clean = self.scheduler.shutdown(SHUTDOWN_TIMEOUT)
        self._log.info(
            "daemon stopped",
            clean=clean,
            seconds=round(time.monotonic() - started, 3),
        )
        return ExitCode.OK

    def reload(self) -> None:
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
            self.notifier.ready(self.status_line())
            return
        if config.state_dir != self.config.state_dir:
            self._log.warning("state_dir changes need a restart; keeping the old one")
        configure_logging(self.log_format or config.log_format, _level(config, self.verbose))
        self.config = config
        added, removed, changed = self.scheduler.set_accounts(self._accounts(config))
        self._log.info("config reloaded", added=added, removed=removed, changed=changed)
        self.notifier.ready(self.status_line())


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
    from popsync.cli import open_store
    from popsync.config import load_config
    from popsync.logconfig import configure_logging

    config = load_config(config_path)
    configure_logging(log_format or config.log_format, _level(config, verbose))
    log = structlog.get_logger("popsync.daemon")
    for warning in config.warnings:
        log.warning("config warning", detail=warning)
    store = open_store(config)
    try:
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
        return daemon.run()
    finally:
        store.close()
