"""The ``popsync`` command: the daemon, ``--once``, and the admin subcommands.

Every path ends in one exit-code ladder (sysexits, see :class:`popsync.errors.ExitCode`):
a run over several accounts exits with the most serious code any account had, so cron
and systemd see a configuration or authentication problem before a passing network
blip. Imports of the heavy parts are lazy: ``popsync --once`` from a timer should not
pay for APScheduler or rich when it does not use them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from popsync import __version__
from popsync.errors import ConfigError, ExitCode, PopsyncError

if TYPE_CHECKING:
    from popsync.config import Account, Config
    from popsync.seen import SeenStore
    from popsync.sync import Progress

__all__ = ["DEFAULT_CONFIG", "SEVERITY", "main", "worst_exit_code"]

DEFAULT_CONFIG = Path("/etc/popsync/config.toml")

#: Most serious first: what a multi-account run exits with when accounts disagree.
SEVERITY = (
    ExitCode.SOFTWARE,
    ExitCode.CONFIG,
    ExitCode.USAGE,
    ExitCode.AUTH,
    ExitCode.PROTOCOL,
    ExitCode.LOCAL_IO,
    ExitCode.TEMPORARY,
    ExitCode.OK,
)

_DESCRIPTION = """\
Fetch mail from POP3 servers into Maildirs, exactly once.

Without a subcommand popsync runs as a daemon and polls every account on its interval;
with --once it syncs every account (or those named with --account) once and exits.
"""

_EPILOG = """\
exit codes: 0 ok, 64 usage, 74 local I/O (disk full, unwritable Maildir),
75 temporary (network, timeout, [IN-USE], [LOGIN-DELAY], [SYS/TEMP]; retry later),
76 protocol (broken server, bad certificate), 77 authentication refused, 78 configuration.

The config file is -c FILE, else $POPSYNC_CONFIG, else /etc/popsync/config.toml.
Documentation of every key: config.example.toml and docs/configuration.md.
"""


def worst_exit_code(codes: Sequence[ExitCode]) -> ExitCode:
    """The most serious of ``codes`` by :data:`SEVERITY` (OK for none)."""
    for code in SEVERITY:
        if code in codes:
            return code
    return ExitCode.OK


# ------------------------------------------------------------------------ arguments
class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; the sysexits ladder says 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Subcommands accept the same options; SUPPRESS keeps a top-level value from being
    # overwritten by the subparser's default.
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help="config file (default: $POPSYNC_CONFIG or /etc/popsync/config.toml)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="debug logging: session steps, plans, job runs (never secrets); -vv adds the "
        "scheduler's own debug lines",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console", "journal"),
        default=default,
        help="log format (default from config: auto = journal lines when stderr is journald's, "
        "console on a terminal, JSON otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="popsync",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"popsync {__version__}")
    _common(parser, top=True)
    parser.add_argument(
        "--once", action="store_true", help="sync every account once and exit (for cron/timers)"
    )
    parser.add_argument(
        "--account",
        "-a",
        action="append",
        default=[],
        metavar="NAME",
        help="only this account (repeatable); with --once or the daemon",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("check-config", "validate the config file and password sources without connecting"),
        ("status", "show each account's last run, outcome and counts from the seen-store"),
        ("healthcheck", "exit 0 if the daemon ran recently and not every account is failing"),
    ):
        child = sub.add_parser(name, help=text, description=text)
        _common(child, top=False)
        if name == "status":
            child.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "healthcheck":
            child.add_argument(
                "--max-age",
                type=float,
                default=None,
                metavar="SECONDS",
                help="how old the last run may be (default: 3 x the longest interval + 60 s)",
            )
    return parser


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get("POPSYNC_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)


def _load(args: argparse.Namespace) -> Config:
    from popsync.config import load_config

    config = load_config(_config_path(args))
    for warning in config.warnings:
        _say(sys.stderr, f"popsync: warning: {warning}")
    return config


def _select(config: Config, names: Sequence[str]) -> list[Account]:
    if not names:
        return [a for a in config.accounts.values() if a.enabled]
    unknown = [n for n in names if n not in config.accounts]
    if unknown:
        known = ", ".join(sorted(config.accounts))
        raise ConfigError([f"--account {n}: no such account (known: {known})" for n in unknown])
    return [config.accounts[n] for n in names]


def _setup_logging(config: Config, args: argparse.Namespace, *, quiet_on_tty: bool) -> None:
    from popsync.logconfig import configure_logging

    fmt = args.log_format or config.log_format
    level = config.log_level
    if args.verbose:
        level = "debug"
    elif quiet_on_tty and sys.stderr.isatty():
        # On a terminal the progress bar and summary lines say what a person needs.
        level = "warning"
    configure_logging(fmt, level, scheduler_debug=args.verbose >= 2)


def open_store(config: Config) -> SeenStore:
    """Open the seen-store in the config's state directory."""
    from popsync.seen import SeenStore

    return SeenStore.open(config.state_dir / "popsync.sqlite3")


# ----------------------------------------------------------------------------- --once
def _run_once(args: argparse.Namespace) -> ExitCode:
    from popsync.sync import sync_account

    config = _load(args)
    accounts = _select(config, args.account)
    _setup_logging(config, args, quiet_on_tty=True)
    store = open_store(config)
    try:
        with _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty()) as progress:
            workers = max(1, min(config.max_workers, len(accounts)))
            with ThreadPoolExecutor(workers, thread_name_prefix="popsync") as pool:
                futures = [
                    pool.submit(sync_account, account, store, progress=progress)
                    for account in accounts
                ]
                results = [future.result() for future in futures]
    finally:
        store.close()
    for result in results:
        _say(sys.stdout if result.outcome == "ok" else sys.stderr, result.summary())
    return worst_exit_code([r.exit_code for r in results])


class _ProgressBar:
    """A rich progress bar on a terminal, nothing otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: object | None = None

    def __enter__(self) -> Progress | None:
        if not self._enabled:
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bar

        bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            transient=True,
        )
        bar.start()
        self._bar = bar
        tasks: dict[str, object] = {}

        def update(account: str, done: int, total: int, nbytes: int) -> None:
            task = tasks.get(account)
            if task is None:
                task = tasks[account] = bar.add_task(account, total=total)
            bar.update(task, completed=done, total=total)  # type: ignore[arg-type]

        return update

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()  # type: ignore[attr-defined]


# ------------------------------------------------------------------- subcommands
def _check_config(args: argparse.Namespace) -> ExitCode:
    from popsync.secrets import resolve_secret

    path = _config_path(args)
    config = _load(args)
    problems = []
    for account in config.accounts.values():
        try:
            resolve_secret(account)
        except PopsyncError as exc:
            problems.append(f"accounts.{account.name}: {exc}")
    if problems:
        raise ConfigError(problems)
    _say(sys.stdout, f"{path}: ok, {len(config.accounts)} account(s): {', '.join(config.accounts)}")
    return ExitCode.OK


def _status(args: argparse.Namespace) -> ExitCode:
    from popsync.status import collect_status, daemon_line, render_status, state_dir_of

    try:
        config = _load(args)
    except ConfigError:
        # A broken file may be what the running daemon just rejected: say so, then fail.
        daemon = daemon_line(state_dir_of(_config_path(args)))
        if daemon is not None:
            _say(sys.stderr, daemon[0])
        raise
    store = open_store(config)
    try:
        rows = collect_status(config, store)
    finally:
        store.close()
    if args.json:
        _say(sys.stdout, json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        render_status(rows, sys.stdout)
    daemon = daemon_line(config.state_dir)
    if daemon is not None and daemon[1]:
        # On stderr: stdout stays the table (or one JSON document) that scripts parse.
        _say(sys.stderr, daemon[0])
    return ExitCode.OK


def _healthcheck(args: argparse.Namespace) -> ExitCode:
    from popsync.status import healthcheck

    config = _load(args)
    store = open_store(config)
    try:
        healthy, reason = healthcheck(config, store, max_age=args.max_age)
    finally:
        store.close()
    _say(sys.stdout if healthy else sys.stderr, reason)
    return ExitCode.OK if healthy else ExitCode.TEMPORARY


def _daemon(args: argparse.Namespace) -> ExitCode:
    from popsync.daemon import run_daemon

    return run_daemon(
        _config_path(args), accounts=args.account, verbose=args.verbose, log_format=args.log_format
    )


def _dispatch(args: argparse.Namespace) -> ExitCode:
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "status":
        return _status(args)
    if args.command == "healthcheck":
        return _healthcheck(args)
    if args.once:
        return _run_once(args)
    return _daemon(args)


def _lean_structlog() -> None:
    """Import structlog without rich when no terminal will show rich output.

    structlog imports rich (for pretty tracebacks in its console renderer) whenever rich
    is installed: about 40 ms and 4 MiB that JSON logs never use, paid by every
    ``popsync --once`` from a timer. A ``None`` entry in ``sys.modules`` makes that
    optional import fail as if rich were absent; rich itself stays importable for the
    status table and the progress bar afterwards.
    """
    if "structlog" in sys.modules or sys.stderr.isatty() or sys.stdout.isatty():
        return
    saved = sys.modules.get("rich")
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        if saved is None:
            del sys.modules["rich"]
        else:
            sys.modules["rich"] = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``popsync`` console script."""
    _lean_structlog()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_dispatch(args))
    except ConfigError as exc:
        where = _config_path(args)
        _say(sys.stderr, f"popsync: {where}: configuration error:")
        for problem in exc.problems:
            _say(sys.stderr, f"  {problem}")
        return int(exc.exit_code)
    except PopsyncError as exc:
        _say(sys.stderr, f"popsync: {exc}")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        _say(sys.stderr, "popsync: interrupted")
        return 130
