"""The ``popsync`` command: the daemon, ``--once``, and the admin subcommands.

Every path ends in one exit-code ladder (sysexits, see :class:`popsync.errors.ExitCode`):
a run over several accounts exits with the most serious code any account had, so cron
and systemd see a configuration or authentication problem before a passing network
blip. Imports of the heavy parts are lazy: ``popsync --once`` from a timer should not
pay for APScheduler or rich when it does not use them.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from popsync import __version__
from popsync.errors import ConfigError, ExitCode, PopsyncError, UserError

if TYPE_CHECKING:
    from popsync.config import Account, Config
    from popsync.prelogin import PreLogin
    from popsync.store import Store
    from popsync.sync import Progress

__all__ = ["DEFAULT_CONFIG", "SEVERITY", "config_search_path", "main", "run", "worst_exit_code"]

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

The config file is -c FILE, else $POPSYNC_CONFIG, else the first that exists of
$XDG_CONFIG_HOME/popsync/config.toml (~/.config/popsync/config.toml) and
/etc/popsync/config.toml.
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

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument (to check its metavar), and one
        # left to find its width imports shutil, with bz2 and lzma: ~4 ms of every start.
        # Every argparse formatter takes width; typeshed's protocol names only prog.
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]


def _columns() -> int:
    """The terminal's width as `shutil.get_terminal_size` finds it ($COLUMNS first), or 80."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("COLUMNS", "0")) > 0:
            return int(os.environ["COLUMNS"])
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80
    return columns if columns > 0 else 80


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
        help="config file (default: $POPSYNC_CONFIG, ~/.config/popsync/config.toml, "
        "/etc/popsync/config.toml)",
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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --once: log in and print what would be fetched and deleted; change nothing",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _account_commands(sub)
    for name, text in (
        ("check-config", "validate the config file and password sources without connecting"),
        ("status", "show each account's last run, outcome and counts from the seen-store"),
        ("healthcheck", "exit 0 if the daemon ran recently and not every account is failing"),
    ):
        child = sub.add_parser(name, help=text, description=text)
        _common(child, top=False)
        if name == "status":
            child.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "check-config":
            child.add_argument(
                "--connect",
                action="store_true",
                help="then connect and log in to every account, as `popsync test` does",
            )
        if name == "healthcheck":
            child.add_argument(
                "--max-age",
                type=_duration_arg,
                default=None,
                metavar="DURATION",
                help="how old the last run may be, e.g. 300, 5m, 1h (default: 3 x the longest "
                "interval + 60 s)",
            )
    oauth2 = sub.add_parser(
        "oauth2",
        help="built-in OAuth2: log an account in once (its refresh token is kept in state_dir)",
        description="Built-in OAuth2 for accounts with oauth2_provider set.",
    )
    actions = oauth2.add_subparsers(dest="oauth2_command", metavar="ACTION", required=True)
    login = actions.add_parser(
        "login",
        help="obtain and store the account's first refresh token",
        description="Microsoft and custom providers with oauth2_device_url: prints a URL and a "
        "code to enter there (device login, RFC 8628). Google and custom providers with "
        "oauth2_auth_url: prints a URL to open in a browser on this machine and waits for "
        "its redirect to 127.0.0.1 (PKCE, RFC 8252). Run it as the user the daemon runs as.",
    )
    _common(login, top=False)
    login.add_argument("account", metavar="ACCOUNT", help="the account's name in the config")
    return parser


def _account_commands(sub: Any) -> None:
    """test, ls, mark-seen and import-state: commands about one account."""
    for name, text in (
        ("test", "connect and log in step by step, printing what the server says and why it fails"),
        ("ls", "list the messages on the server and their state in popsync's store (read-only)"),
        ("mark-seen", "record every message now on the server as delivered, without fetching"),
    ):
        child = sub.add_parser(name, help=text, description=text)
        _common(child, top=False)
        child.add_argument("account_name", metavar="ACCOUNT", help="account name from the config")
        if name == "ls":
            child.add_argument(
                "--headers", action="store_true", help="also From, Date and Subject (TOP n 0)"
            )
            child.add_argument("--json", action="store_true", help="machine-readable output")
    text = "mark what fetchmail, getmail6 or mpop already fetched as delivered"
    child = sub.add_parser("import-state", help=text, description=text)
    _common(child, top=False)
    child.add_argument(
        "format",
        choices=("mpop", "getmail6", "fetchmail"),
        metavar="FORMAT",
        help="mpop, getmail6 or fetchmail",
    )
    child.add_argument("file", type=Path, metavar="FILE", help="the other program's state file")
    child.add_argument(
        "--account",
        dest="import_account",
        required=True,
        metavar="NAME",
        help="the popsync account the state belongs to",
    )


def _duration_arg(text: str) -> float:
    """argparse type for durations written as in the config ("300", "5m", "1h30m")."""
    from popsync.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_search_path(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where popsync looks for its config without -c: $POPSYNC_CONFIG, else XDG, else /etc."""
    env = os.environ if env is None else env
    explicit = env.get("POPSYNC_CONFIG", "")
    if explicit:
        return [Path(explicit)]
    xdg = env.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return [base / "popsync" / "config.toml", DEFAULT_CONFIG]


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    candidates = config_search_path()
    # The last candidate is used even when missing, so the error names a real default.
    return next((path for path in candidates if path.exists()), candidates[-1])


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)


def _load(args: argparse.Namespace, *, cached: bool = False) -> Config:
    """The validated config; ``cached`` (short read-only runs) may skip pydantic entirely."""
    path = _config_path(args)
    if args.config is None and not path.exists():
        searched = ", ".join(str(p) for p in config_search_path())
        raise ConfigError(
            [f"cannot read config file: none found (looked for {searched}); use -c FILE"]
        )
    if cached:
        from popsync.configcache import load_config_cached

        config = load_config_cached(path)
    else:
        from popsync.config import load_config

        config = load_config(path)
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
    _lean_structlog()
    from popsync.logconfig import configure_logging

    fmt = args.log_format or config.log_format
    level = config.log_level
    if args.verbose:
        level = "debug"
    elif quiet_on_tty and sys.stderr.isatty():
        # On a terminal the progress bar and summary lines say what a person needs.
        level = "warning"
    configure_logging(fmt, level, scheduler_debug=args.verbose >= 2)


def open_store(config: Config) -> Store:
    """The config's seen-store (see `popsync.store.open_store`)."""
    from popsync.store import open_store as open_configured

    return open_configured(config)


# ----------------------------------------------------------------------------- --once
def _run_once(args: argparse.Namespace) -> ExitCode:
    config = _load(args, cached=True)
    accounts = _select(config, args.account)
    workers = max(1, min(config.max_workers, len(accounts)))
    # Log in before the heavy imports (popsync.prelogin); not on PostgreSQL, which may log
    # while it connects, so logging comes first there.
    early = config.store is None
    if not early:
        _setup_logging(config, args, quiet_on_tty=True)
    store = open_store(config)
    prelogins: dict[str, PreLogin] = {}
    try:
        if early:
            prelogins = _prelogins(accounts[:workers], store)
        _lean_structlog()  # the heavy imports, while the servers answer
        from concurrent.futures import ThreadPoolExecutor

        from popsync.sync import sync_account

        if early:
            _setup_logging(config, args, quiet_on_tty=True)
        from popsync.deliver.budget import SessionBudget

        budget = SessionBudget(config.lmtp_max_sessions)
        bar = _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty())
        with bar as progress, ThreadPoolExecutor(workers, thread_name_prefix="popsync") as pool:
            futures = [
                pool.submit(
                    sync_account,
                    account,
                    store,
                    progress=progress,
                    prelogin=prelogins.get(account.name),
                    lmtp_budget=budget,
                )
                for account in accounts
            ]
            results = [future.result() for future in futures]
    finally:
        for prelogin in prelogins.values():  # a run that never started leaves them here
            prelogin.discard()
        store.close()
    for result in results:
        _say(sys.stdout if result.outcome == "ok" else sys.stderr, result.summary())
    return worst_exit_code([r.exit_code for r in results])


def _prelogins(accounts: list[Account], store: Store) -> dict[str, PreLogin]:
    """Start logging in to the accounts that run first (see `popsync.prelogin`).

    Returns once each is waiting on its server (or has failed), so the imports that follow
    overlap the servers' work instead of competing with the logins for the GIL.
    """
    from popsync.prelogin import ON_THE_WIRE_PATIENCE, PreLogin, starts_early

    started = {a.name: PreLogin(a, store) for a in accounts if starts_early(a)}
    for prelogin in started.values():
        prelogin.on_the_wire.wait(ON_THE_WIRE_PATIENCE)
    return started


class _ProgressBar:
    """A rich progress bar on a terminal, nothing otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: object | None = None

    def __enter__(self) -> Progress | None:
        if not self._enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        from popsync.units import human_bytes

        # Messages as "done/total", bytes received beside them: rich's DownloadColumn would
        # label the message counts as bytes.
        bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("messages"),
            TextColumn("{task.fields[received]}"),
            TimeElapsedColumn(),
            transient=True,
        )
        bar.start()
        self._bar = bar
        tasks: dict[str, object] = {}

        def update(account: str, done: int, total: int, nbytes: int) -> None:
            task = tasks.get(account)
            if task is None:
                task = tasks[account] = bar.add_task(account, total=total, received="")
            bar.update(
                task,  # type: ignore[arg-type]
                completed=done,
                total=total,
                received=human_bytes(nbytes),
            )

        return update

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()  # type: ignore[attr-defined]


# ------------------------------------------------------------------- subcommands
def _check_config(args: argparse.Namespace) -> ExitCode:
    from popsync.checks import check_config_file

    path = _config_path(args)
    if args.config is None and not path.exists():
        _load(args)  # raises the "none found" error
    config, problems = check_config_file(path)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    for warning in config.warnings:
        _say(sys.stderr, f"popsync: warning: {warning}")
    _say(sys.stdout, f"{path}: ok, {len(config.accounts)} account(s): {', '.join(config.accounts)}")
    if config.store is not None:
        from popsync.store import redact_url

        _say(sys.stdout, f"store: {redact_url(config.store)}")
    if not args.connect:
        return ExitCode.OK
    return _test_accounts(config, list(config.accounts), args)


def _status(args: argparse.Namespace) -> ExitCode:
    from popsync.status import collect_status, daemon_line, render_status, state_dir_of

    try:
        config = _load(args, cached=True)
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

    config = _load(args, cached=True)
    store = open_store(config)
    try:
        healthy, reason = healthcheck(config, store, max_age=args.max_age)
    finally:
        store.close()
    _say(sys.stdout if healthy else sys.stderr, reason)
    return ExitCode.OK if healthy else ExitCode.TEMPORARY


def _one_account(config: Config, name: str) -> Account:
    return _select(config, [name])[0]


def _secret(account: Account, state_dir: Path) -> str:
    """The account's secret (for an oauth2_provider account a valid access token, refreshed
    if need be); from now on scrubbed, in every form it is sent, from output."""
    from popsync.prelogin import hide_secret, resolve_secret

    secret = resolve_secret(account, state_dir)
    hide_secret(account, secret)
    return secret


def _test(args: argparse.Namespace) -> ExitCode:
    config = _load(args)
    return _test_accounts(config, [args.account_name], args)


def _test_accounts(config: Config, names: Sequence[str], args: argparse.Namespace) -> ExitCode:
    """Connect to each account step by step; the exit code of the worst failure."""
    from popsync.sync import classify_error

    codes = []
    for name in names:
        account = _one_account(config, name)
        _say(sys.stdout, f"{name}:")
        steps: list[str] = []
        code = ExitCode.OK
        try:
            _test_one(account, steps, config.state_dir)
        except ConfigError as exc:
            code = exc.exit_code
            for problem in exc.problems:
                _say(sys.stdout, f"  FAILED (configuration): {problem}")
        except Exception as exc:  # every failure is reported, then the next account
            code = classify_error(exc, during_login=True)
            where = f" after step {steps[-1]!r}" if steps else ""
            _say(sys.stdout, f"  FAILED ({code.name.lower()}){where}: {_one_line(exc)}")
        codes.append(code)
        codes.append(_probe_delivery(account))
    return worst_exit_code(codes)


def _probe_delivery(account: Account) -> ExitCode:
    """Whether the account's LMTP server takes its recipient (see popsync.deliver.probe)."""
    if account.deliver != "lmtp":
        return ExitCode.OK
    from popsync.deliver.probe import probe_lmtp

    try:
        _say(sys.stdout, f"  {'lmtp ' + str(account.lmtp) + ':':<24} {probe_lmtp(account)}")
    except ConfigError as exc:
        for problem in exc.problems:
            _say(sys.stdout, f"  FAILED (configuration): {problem}")
        return exc.exit_code
    return ExitCode.OK


def _one_line(exc: BaseException) -> str:
    from popsync.session import clean_text

    return clean_text(str(exc).replace("\n", "; ") or type(exc).__name__, 500)


def _test_one(account: Account, steps: list[str], state_dir: Path) -> None:
    """Log in step by step, printing each; ``steps`` says how far it got when it fails."""
    from popsync.session import clean_text, open_session

    def report(step: str, text: str) -> None:
        steps.append(step)
        _say(sys.stdout, f"  {step + ':':<24} {text}")

    secret = _secret(account, state_dir)
    client = open_session(account, secret, report=report)
    try:
        report("logged in", "ok")
        report("capabilities now", clean_text(" ".join(sorted(client.capabilities())), 400))
        count, size = client.stat()
        report("stat", f"{count} message(s), {size} bytes")
        client.quit()
    finally:
        client.close()


def _ls(args: argparse.Namespace) -> ExitCode:
    from popsync.preview import list_mailbox, read_entries

    config = _load(args)
    account = _one_account(config, args.account_name)
    entries = read_entries(config, account.mailbox)
    rows = list_mailbox(account, _secret(account, config.state_dir), entries, headers=args.headers)
    if args.json:
        _say(sys.stdout, json.dumps([row.as_dict() for row in rows], indent=2))
        return ExitCode.OK
    import shutil

    width = shutil.get_terminal_size((100, 24)).columns
    heads = "  date  from  subject" if args.headers else ""
    _say(sys.stdout, f"{'number':>6} {'size':>10}  {'uidl':<24} state{heads}")
    for row in rows:
        size = "?" if row.size is None else str(row.size)
        line = f"{row.msgnum:>6} {size:>10}  {row.uidl:<24} {row.state}"
        if row.headers:
            heads = "  ".join(row.headers.get(k, "") for k in ("date", "from", "subject"))
            line = f"{line}  {heads}"
        _say(sys.stdout, line[:width] if sys.stdout.isatty() else line)
    _say(sys.stdout, f"{len(rows)} message(s) on the server")
    return ExitCode.OK


def _mark_seen(args: argparse.Namespace) -> ExitCode:
    import time

    from popsync.session import open_session
    from popsync.sync import mark_seen

    config = _load(args)
    account = _one_account(config, args.account_name)
    store = open_store(config)
    try:
        with store.lock(account.mailbox, account.name):
            client = open_session(account, _secret(account, config.state_dir))
            try:
                uidls, sizes = client.listings()
                client.quit()
            finally:
                client.close()
            listing = [(n, u, sizes.get(n)) for n, u in uidls]
            marked = mark_seen(store, account.mailbox, listing, time.time())
    finally:
        store.close()
    _say(
        sys.stdout,
        f"{account.name}: marked {marked} message(s) as seen; {len(listing) - marked} were "
        "already known",
    )
    return ExitCode.OK


def _dry_run(args: argparse.Namespace) -> ExitCode:
    import time

    from popsync.preview import dry_run, read_state
    from popsync.sync import classify_error

    config = _load(args)
    codes = []
    for account in _select(config, args.account):
        try:
            entries, first = read_state(config, account.mailbox)
            plan = dry_run(account, _secret(account, config.state_dir), entries, time.time())
        except Exception as exc:  # report it and go on with the next account
            code = classify_error(exc, during_login=True)
            codes.append(code)
            _say(sys.stderr, f"{account.name}: FAILED ({code.name.lower()}) {_one_line(exc)}")
            continue
        _say(sys.stdout, _describe_plan(account, plan, first_run=first))
        codes.append(ExitCode.OK)
    return worst_exit_code(codes)


def _describe_plan(account: Account, plan: object, *, first_run: bool) -> str:
    from popsync.plan import Plan, show_uidls

    assert isinstance(plan, Plan)

    def uidls(items: Sequence[bytes]) -> str:
        return show_uidls(items, count=10, limit=40)

    if first_run and account.first_run == "mark_seen":
        count = len(plan.fetch) + len(plan.too_large)
        return f"{account.name}: dry run: first run would mark {count} message(s) as seen"
    lines = [
        f"{account.name}: dry run: would fetch {len(plan.fetch)} message(s) "
        f"({sum(s or 0 for _, _, s in plan.fetch)} bytes), delete {len(plan.delete)}, "
        f"skip {len(plan.too_large)} too large"
    ]
    if plan.fetch:
        lines.append(f"  fetch: {uidls([u for _, u, _ in plan.fetch])}")
    if plan.delete:
        lines.append(f"  delete: {uidls([u for _, u in plan.delete])}")
    lines += [f"  warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _import_state(args: argparse.Namespace) -> ExitCode:
    from popsync.importer import import_state

    config = _load(args)
    account = _one_account(config, args.import_account)
    store = open_store(config)
    try:
        with store.lock(account.mailbox, account.name):
            report = import_state(args.format, args.file, account, store)
    finally:
        store.close()
    _say(sys.stdout, report.summary())
    return ExitCode.OK


def _oauth2_login(args: argparse.Namespace) -> ExitCode:
    from popsync.oauth2 import login

    config = _load(args)
    [account] = _select(config, [args.account])
    if account.oauth2_provider is None:
        raise ConfigError(
            [f"accounts.{account.name}: no oauth2_provider set; nothing to log in to"]
        )
    path = login(account, config.state_dir, sys.stdout)
    _say(sys.stdout, f"{account.name}: logged in; refresh token stored in {path}")
    return ExitCode.OK


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
    if args.command == "oauth2":
        return _oauth2_login(args)
    commands = {"test": _test, "ls": _ls, "mark-seen": _mark_seen, "import-state": _import_state}
    if args.command in commands:
        return commands[args.command](args)
    if args.dry_run:
        if not args.once:
            raise UserError("--dry-run needs --once")
        return _dry_run(args)
    if args.once:
        return _run_once(args)
    return _daemon(args)


class _OnDemand(types.ModuleType):
    """Stands in for a module in another's namespace; imports the real one on first use."""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(self.__name__) is self:  # used while structlog is being imported
            raise ImportError(f"{self.__name__} is on demand during a lean import")
        return getattr(importlib.import_module(self.__name__), name)


# Imported by structlog at the top, used only in functions popsync never calls: asyncio by
# structlog.stdlib's async methods (~30 ms, several MiB), uuid (and with it platform) by
# the deprecated structlog.threadlocal, which itself is only kept for old callers.
_STRUCTLOG_ON_DEMAND = ("asyncio", "uuid", "structlog.threadlocal")
# Optional parts structlog probes for and popsync never uses: its Twisted integration.
_STRUCTLOG_ABSENT = ("structlog.twisted",)
# Commands that never log through structlog do not import it at all.
_NO_STRUCTLOG = frozenset({"status", "healthcheck"})


def _lean_dataclasses() -> None:
    """Import dataclasses with `inspect` on demand (through an :class:`_OnDemand` stand-in).

    dataclasses imports inspect (with ast, dis and tokenize: ~8 ms of every start) only to
    write a signature into the docstring of a class that has none; popsync's all have one.
    """
    if "dataclasses" in sys.modules or "inspect" in sys.modules:
        return
    sys.modules["inspect"] = _OnDemand("inspect")
    try:
        import dataclasses  # noqa: F401
    finally:
        sys.modules.pop("inspect", None)


def _lean_structlog() -> None:
    """Import structlog without the parts a sync run never uses: rich, asyncio, uuid, ...

    structlog imports rich whenever it is installed (pretty tracebacks for its console
    renderer: ~40 ms, ~4 MiB that JSON logs never use), its Twisted integration when Twisted
    is installed, and a few modules it needs only in functions popsync never calls
    (:data:`_STRUCTLOG_ON_DEMAND`). While structlog is imported, a ``None`` entry in
    ``sys.modules`` makes the optional rich (only off a terminal) and Twisted imports fail as
    if they were absent, and an :class:`_OnDemand` stand-in answers each of the others; the
    entries are removed afterwards, so rich (status table, progress bar), asyncio, uuid and
    structlog.threadlocal stay importable as usual.
    """
    if "structlog" in sys.modules:
        return
    stand_ins: dict[str, types.ModuleType | None] = {
        name: _OnDemand(name) for name in _STRUCTLOG_ON_DEMAND
    }
    stand_ins.update(dict.fromkeys(_STRUCTLOG_ABSENT))
    if not (sys.stderr.isatty() or sys.stdout.isatty()):
        stand_ins["rich"] = None
    stand_ins = {name: m for name, m in stand_ins.items() if name not in sys.modules}
    sys.modules.update(stand_ins)  # type: ignore[arg-type]
    try:
        import structlog
    except ImportError:
        # A structlog that uses one of these at import time: forget the half-imported
        # package and import it the plain way below (slower start, nothing broken).
        for name in [m for m in sys.modules if m.partition(".")[0] == "structlog"]:
            del sys.modules[name]
    else:
        return
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)  # a structlog.* stand-in may be gone already
    import structlog  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``popsync`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors exit here, before any logging
    # --once imports structlog itself, once its logins are on the wire (`_run_once`).
    _lean_dataclasses()
    plain_once = args.command is None and args.once and not args.dry_run
    if args.command not in _NO_STRUCTLOG and not plain_once:
        _lean_structlog()
    from popsync.textsafe import scrubbing

    # Secrets a command registers for scrubbing (popsync test, ls, ...) end with it, so a
    # caller that runs several commands in one process never carries them over; the error
    # lines below are still printed inside the scope.
    with scrubbing():
        return _run_command(args)


def run() -> NoReturn:
    """Entry point of the ``popsync`` console script: :func:`main`, then a quick exit.

    Tearing the interpreter down (freeing every module and object) is about a tenth of a
    short ``--once``: once ``main`` has returned, the exit handlers have run and the
    streams are flushed, nothing is left to do but exit. Only when ``main`` left another
    thread running does the interpreter exit the usual way, so that thread is waited for.
    """
    code = main()
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()  # logging.shutdown() and any other handler, as at a normal exit
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)  # e.g. a closed pipe: the usual exit reports it as it always did
    os._exit(code)


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line (or one per config problem)."""
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
