"""What a short run imports: ``popsync --once`` off a terminal, ``--help`` and ``status``.

Each command runs in a fresh interpreter with pipes for stdin, stdout and stderr (as
under cron or a systemd timer) and reports ``sys.modules`` at exit. The start-up of a
timer run is mostly imports, so the heavy ones it never uses must stay out: rich
(structlog's pretty tracebacks), APScheduler (the daemon's), asyncio (structlog's async
methods) and, once the validated config is cached, pydantic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from devtools.dovecot import Dovecot, MailUser
from tests.synchelp import TomlValue, dovecot_keys, maildir_messages, make_message, write_config

ROOT = Path(__file__).resolve().parents[2]
NEVER_ON_A_TIMER_RUN = ("rich", "apscheduler", "asyncio", "psycopg", "psycopg_pool")
# Loaded only when a run needs them: trace header fields (email), password_command
# (subprocess), config validation (decimal, pydantic), structlog's deprecated threadlocal
# and its Twisted integration (never), a config re-parsed for an inline password (tomllib),
# a class without a docstring (inspect), a config cache written or a certificate diagnosed
# (tempfile, shutil).
ONLY_WHEN_NEEDED = (
    "email",
    "subprocess",
    "decimal",
    "structlog.threadlocal",
    "structlog.twisted",
    "tomllib",
    "inspect",
    "tempfile",
    "shutil",
)

# Runs popsync's main() and writes the names of all imported modules to $MODULES_OUT.
_WRAPPER = (
    "import json, os, sys\n"
    "from popsync.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    with open(os.environ['MODULES_OUT'], 'w') as out:\n"
    "        json.dump(sorted(sys.modules), out)\n"
    "sys.exit(code)\n"
)


def _wrapped(tmp_path: Path, wrapper: str, *args: str) -> tuple[int, str, Any]:
    """Run ``wrapper`` (which writes JSON to $MODULES_OUT) as ``popsync ARGS`` off a terminal:
    exit code, stderr and the JSON it wrote."""
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "MODULES_OUT": str(out), "PYTHONPATH": str(ROOT)},
    )
    return proc.returncode, proc.stderr, json.loads(out.read_text())


def run_popsync(tmp_path: Path, *args: str) -> tuple[int, set[str]]:
    """Exit code and imported modules (and their top-level packages) of one ``popsync ARGS``."""
    code, _, modules = _wrapped(tmp_path, _WRAPPER, *args)
    return code, {*modules, *(name.split(".")[0] for name in modules)}


def test_once_off_a_terminal_imports_only_what_it_uses(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """--once imports no rich, APScheduler or asyncio; with the config cached, no pydantic."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(3)])
    maildir = tmp_path / "Maildir"
    config = write_config(
        tmp_path / "popsync.toml",
        tmp_path / "state",
        {"acct": dovecot_keys(dovecot, mail_user, maildir)},
    )
    first_code, first = run_popsync(tmp_path, "--once", "-c", str(config))
    assert first_code == 0
    assert len(maildir_messages(maildir)) == 3
    again_code, again = run_popsync(tmp_path, "--once", "-c", str(config))
    assert again_code == 0
    for modules in (first, again):
        assert {"structlog", "sqlite3", "ssl"} <= modules  # it did log and sync
        assert not modules & set(NEVER_ON_A_TIMER_RUN), sorted(modules & set(NEVER_ON_A_TIMER_RUN))
    assert "pydantic" in first  # the first run validated and cached the config
    assert "pydantic" not in again
    assert not again & set(ONLY_WHEN_NEEDED), sorted(again & set(ONLY_WHEN_NEEDED))


# Records which thread opens each connection to a server, as JSON in $MODULES_OUT.
_AT_CONNECT = (
    "import json, os, sys, threading\n"
    "import popsync.net as net\n"
    "seen = []\n"
    "real_open = net._open\n"
    "def spy(*args, **kwargs):\n"
    "    seen.append(threading.current_thread().name)\n"
    "    return real_open(*args, **kwargs)\n"
    "net._open = spy\n"
    "from popsync.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "with open(os.environ['MODULES_OUT'], 'w') as out:\n"
    "    json.dump(seen, out)\n"
    "sys.exit(code)\n"
)


def test_once_logs_in_from_the_prelogin_thread(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """--once logs in from the thread started before the engine is imported (prelogin)."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(2)])
    maildir = tmp_path / "Maildir"
    keys = dovecot_keys(dovecot, mail_user, maildir)
    config = write_config(tmp_path / "popsync.toml", tmp_path / "state", {"acct": keys})
    for _ in ("first fetch", "nothing new"):
        code, stderr, connections = _wrapped(tmp_path, _AT_CONNECT, "--once", "-c", str(config))
        assert code == 0, stderr
        assert connections == ["popsync-prelogin-acct"]
        assert len(maildir_messages(maildir)) == 2


def test_help_and_status_stay_light(tmp_path: Path) -> None:
    """--help imports neither structlog nor pydantic; a cached status no pydantic either."""
    keys: dict[str, TomlValue] = {
        "host": "pop.example.org",
        "username": "alice",
        "password_env": "POPSYNC_TEST_PASSWORD",
        "maildir": str(tmp_path / "Maildir"),
    }
    config = write_config(tmp_path / "popsync.toml", tmp_path / "state", {"acct": keys})
    code, modules = run_popsync(tmp_path, "--help")
    assert code == 0
    assert not modules & {"structlog", "pydantic", "rich", "sqlite3", "ssl"}
    assert run_popsync(tmp_path, "status", "-c", str(config))[0] == 0
    code, modules = run_popsync(tmp_path, "status", "-c", str(config))
    assert code == 0
    assert "sqlite3" in modules
    assert not modules & {"pydantic", "structlog", "apscheduler", "asyncio"}


def test_structlog_stand_ins_forward_to_the_real_modules() -> None:
    """After the lean import, structlog's own references to asyncio and uuid still work."""
    code = (
        "import sys; from popsync.cli import _lean_structlog; _lean_structlog()\n"
        "assert 'asyncio' not in sys.modules and 'uuid' not in sys.modules\n"
        "import asyncio, uuid, structlog.stdlib, structlog.threadlocal\n"
        "assert structlog.stdlib.asyncio.get_running_loop is asyncio.get_running_loop\n"
        "assert structlog.threadlocal.uuid.UUID is uuid.UUID\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def test_a_structlog_that_needs_a_stand_in_at_import_still_imports(tmp_path: Path) -> None:
    """A structlog that uses uuid while it is imported still imports (the plain way)."""
    fake = tmp_path / "structlog"
    fake.mkdir()
    (fake / "__init__.py").write_text("from uuid import uuid4\nMARK = uuid4()\n")
    code = (
        "import sys, uuid; from popsync.cli import _lean_structlog\n"
        "del sys.modules['uuid']\n"
        "_lean_structlog()\n"
        "import structlog, uuid\n"
        "assert isinstance(structlog.MARK, uuid.UUID), structlog.MARK\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def _run_entry(tmp_path: Path, main_body: str) -> subprocess.CompletedProcess[str]:
    """Run ``popsync.cli.run()`` with ``main`` replaced by ``main_body`` (stdout piped)."""
    code = (
        "import atexit, sys, threading, time\n"
        "import popsync.cli as cli\n"
        "def main():\n"
        + "".join(f"    {line}\n" for line in main_body.splitlines())
        + "cli.main = main\n"
        "cli.run()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_entry_point_exits_quickly_with_output_and_exit_handlers(tmp_path: Path) -> None:
    """run() keeps main's exit code, buffered output and atexit handlers when it skips teardown."""
    proc = _run_entry(
        tmp_path,
        "atexit.register(lambda: open('atexit.txt', 'w').write('ran'))\n"
        "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "return 75",
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (75, "to stdout\n", "to stderr\n")
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_entry_point_waits_for_a_thread_main_left_running(tmp_path: Path) -> None:
    """run() exits the usual way, after the thread, when main left a non-daemon thread running."""
    proc = _run_entry(
        tmp_path,
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    open('thread.txt', 'w').write('done')\n"
        "threading.Thread(target=late).start()\n"
        "return 3",
    )
    assert proc.returncode == 3, proc.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"


def test_python_m_popsync_uses_the_entry_point(tmp_path: Path) -> None:
    """``python -m popsync`` reports a configuration error with its exit code through run()."""
    bad = tmp_path / "bad.toml"
    bad.write_text("state_dir = 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "popsync", "--once", "-c", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 78, proc.stderr
    assert "configuration error" in proc.stderr
