"""``popsync --once``: the exit-code ladder, summary lines, --account, and no leaked secrets."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devtools.dovecot import Dovecot, MailUser
from popsync.cli import _ProgressBar, main
from popsync.config import load_config
from popsync.seen import SeenStore
from popsync.sync import sync_account
from tests.conftest import in_ci
from tests.fake_pop3 import Close, Expect, FakePop3Server, Send, Stall, StartTLS, Step
from tests.synchelp import (
    TomlValue,
    assert_exactly_once,
    dovecot_keys,
    maildir_messages,
    make_message,
    run_popsync,
    write_config,
)

__all__: list[str] = []

SECRET = "Sekr3t-pw-9f2c71"  # a wrong password that must never be printed or logged
SUMMARY = re.compile(
    r"acct: ok, (\d+) fetched \([\d.]+ (B|KiB|MiB)\), (\d+) skipped, (\d+) deleted,"
    r" (\d+) on server in \d+\.\d\ds"
)

Runner = Callable[[list[str]], tuple[int, str, str]]


def _in_process(capsys: pytest.CaptureFixture[str]) -> Runner:
    def run(args: list[str]) -> tuple[int, str, str]:
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _subprocess(args: list[str]) -> tuple[int, str, str]:
    proc = run_popsync(args)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(params=["main", "subprocess"])
def run(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Runner:
    """Run ``popsync`` in-process through cli.main, or as a real subprocess."""
    return _in_process(capsys) if request.param == "main" else _subprocess


def _config(tmp_path: Path, **accounts: dict[str, TomlValue]) -> str:
    return str(write_config(tmp_path / "popsync.toml", tmp_path / "state", accounts))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plain_keys(tmp_path: Path, port: int, **extra: TomlValue) -> dict[str, TomlValue]:
    keys: dict[str, TomlValue] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": "implicit",
        "username": "me",
        "password": SECRET,
        "maildir": str(tmp_path / "Maildir"),
        "timeout": "2s",
    }
    keys.update(extra)
    return keys


# --------------------------------------------------------------------------- exit codes
@pytest.mark.dovecot
def test_ok_exits_0_with_one_summary_line(
    run: Runner, dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """A good run exits 0 and prints one summary line per account on stdout."""
    messages = [make_message(i) for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    config = _config(tmp_path, acct=dovecot_keys(dovecot, mail_user, tmp_path / "Maildir"))
    code, out, _err = run(["--once", "-c", config])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1
    match = SUMMARY.fullmatch(lines[0])
    assert match, lines
    assert (match[1], match[3], match[4], match[5]) == ("3", "0", "0", "3")
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)


def test_connection_refused_exits_75(run: Runner, tmp_path: Path) -> None:
    """Nothing listening on the port is temporary trouble: 75."""
    config = _config(tmp_path, acct=_plain_keys(tmp_path, _closed_port()))
    code, out, err = run(["--once", "-c", config])
    assert code == 75
    assert out == ""
    assert "acct: FAILED (temporary)" in err
    assert "connection refused" in err


@pytest.mark.dovecot
def test_wrong_password_exits_77(
    run: Runner, dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """Dovecot refusing the password gives 77 and names the account."""
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", password=SECRET)
    code, _out, err = run(["--once", "-c", _config(tmp_path, acct=keys)])
    assert code == 77
    assert "acct: FAILED (auth)" in err


def test_garbage_server_exits_76(run: Runner, tmp_path: Path) -> None:
    """A server that does not speak POP3 is a protocol error: 76."""
    script: list[Step] = [StartTLS(), Send(b"SSH-2.0-OpenSSH_9.2\r\n"), Close()]
    with FakePop3Server(script) as server:
        keys = _plain_keys(tmp_path, server.port, tls_ca_file=str(server.ca_file))
        code, _out, err = run(["--once", "-c", _config(tmp_path, acct=keys)])
    assert code == 76
    assert "acct: FAILED (protocol)" in err


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write into: a read-only tmpfs as root, mode 0500 otherwise."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o500)
        yield where
        where.chmod(0o700)
        return
    mount = ["/bin/mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)]
    done = subprocess.run(mount, capture_output=True, check=False)
    if done.returncode != 0:
        reason = f"cannot mount a read-only tmpfs: {done.stderr.decode(errors='replace')}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["/bin/umount", "-l", str(where)], check=False)


_CAPA_FLOOD = b"+OK\r\nSTLS\r\nUSER\r\n" + b"X-FLOOD %s\r\n" % (b"f" * 92) * 20_000 + b".\r\n"


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_huge_capa_before_login_exits_76_and_sends_nothing(
    run: Runner, tmp_path: Path, tls: str
) -> None:
    """A 2 MB CAPA before STLS or before login is refused after 64 KiB: 76, no credential."""
    script: list[Step] = [Send(b"+OK hi\r\n"), Expect(b"CAPA", reply=_CAPA_FLOOD)]
    if tls == "implicit":
        script.insert(0, StartTLS())
    with FakePop3Server(script) as server:
        keys = _plain_keys(tmp_path, server.port, tls=tls, tls_ca_file=str(server.ca_file))
        code, _out, err = run(["--once", "-c", _config(tmp_path, acct=keys)])
    assert code == 76
    assert "acct: FAILED (protocol)" in err
    assert "CAPA reply is larger than 65536 octets" in err
    assert server.commands[0] == b"CAPA"
    assert not [c for c in server.commands if c.split()[0] in (b"STLS", b"USER", b"PASS", b"AUTH")]


def test_unwritable_maildir_exits_74(run: Runner, tmp_path: Path, readonly_dir: Path) -> None:
    """A Maildir that cannot be created is local I/O trouble: 74, before any connection."""
    keys = _plain_keys(tmp_path, _closed_port(), maildir=str(readonly_dir / "Maildir"))
    code, _out, err = run(["--once", "-c", _config(tmp_path, acct=keys)])
    assert code == 74
    assert "acct: FAILED (local_io)" in err
    assert "Maildir" in err


def test_bad_config_exits_78_with_every_problem(run: Runner, tmp_path: Path) -> None:
    """A bad config exits 78 and prints each problem on its own line with its key path."""
    config = tmp_path / "bad.toml"
    config.write_text(
        f'state_dir = "{tmp_path}/state"\n[accounts.work]\nhost = "h"\nport = 70000\nhots = 1\n'
        f'username = "u"\npassword = "{SECRET}"\nmaildir = "{tmp_path}/md"\n'
    )
    code, out, err = run(["--once", "-c", str(config)])
    assert code == 78
    assert out == ""
    assert err.splitlines() == [
        f"popsync: {config}: configuration error:",
        "  accounts.work.hots: unknown key; did you mean 'host'?",
        "  accounts.work.port: Input should be less than or equal to 65535 (got 70000)",
    ]
    assert SECRET not in err


def test_missing_config_exits_78(run: Runner, tmp_path: Path) -> None:
    """A config file that does not exist is a configuration error, named on stderr."""
    code, _out, err = run(["--once", "-c", str(tmp_path / "nope.toml")])
    assert code == 78
    assert "nope.toml" in err


# ----------------------------------------------------------------- accounts and summary
@pytest.mark.dovecot
def test_account_option_selects_and_worst_code_wins(
    dovecot: Dovecot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--account runs only the named account; several accounts exit with the worst code."""
    good, bad = dovecot.new_user(), dovecot.new_user()
    dovecot.deliver(good, make_message(1))
    dovecot.deliver(bad, make_message(2))
    config = _config(
        tmp_path,
        acct=dovecot_keys(dovecot, good, tmp_path / "A"),
        other=dovecot_keys(dovecot, bad, tmp_path / "B", password=SECRET),
    )
    assert main(["--once", "-c", config, "--account", "acct"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("acct: ok, 1 fetched")
    assert not (tmp_path / "B").exists()

    assert main(["--once", "-c", config]) == 77
    out, err = capsys.readouterr()
    assert SUMMARY.fullmatch(out.strip()), out
    assert "other: FAILED (auth)" in err

    assert main(["--once", "-c", config, "--account", "nosuch"]) == 78
    _, err = capsys.readouterr()
    assert "--account nosuch: no such account (known: acct, other)" in err


@pytest.mark.dovecot
def test_config_defaults_to_popsync_config_env(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """Without -c the subprocess reads $POPSYNC_CONFIG."""
    config = _config(tmp_path, acct=dovecot_keys(dovecot, mail_user, tmp_path / "Maildir"))
    proc = run_popsync(["--once"], env={"POPSYNC_CONFIG": config})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("acct: ok, 0 fetched")


# ------------------------------------------------------------------------- no secrets
@pytest.mark.dovecot
@pytest.mark.parametrize("source", ["password", "password_file"])
def test_password_never_printed_or_logged(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, source: str
) -> None:
    """Neither stdout, stderr (debug logs on) nor captured structlog events hold the secret."""
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    extra: dict[str, TomlValue] = (
        {"password": SECRET} if source == "password" else {"password_file": str(secret_file)}
    )
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir")
    del keys["password"]
    keys.update(extra)
    keys["auth"] = "user"  # PASS <secret> on the wire, the easiest thing to leak
    config = _config(tmp_path, acct=keys)
    for args in (["--once", "-vv", "--log-format", "json"], ["--once", "--log-format", "console"]):
        proc = run_popsync([*args, "-c", config])
        assert proc.returncode == 77, proc.stderr
        assert SECRET not in proc.stdout
        assert SECRET not in proc.stderr
        assert "FAILED (auth)" in proc.stderr
    account = load_config(Path(config)).accounts["acct"]
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store, capture_logs() as logs:
        result = sync_account(account, store)
    assert result.outcome == "auth"
    assert logs, "the run logged nothing"
    assert SECRET not in repr(logs)
    assert SECRET not in repr(result)


def test_account_locked_by_another_process_exits_75(tmp_path: Path) -> None:
    """While another process holds the account's lock, --once exits 75 and touches nothing."""
    port = _closed_port()
    config = _config(tmp_path, acct=_plain_keys(tmp_path, port))
    with (
        SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store,
        store.lock(f"me@127.0.0.1:{port}"),
    ):
        proc = run_popsync(["--once", "-c", config])
    assert proc.returncode == 75
    assert "acct: FAILED (temporary)" in proc.stderr
    assert "already being synced by another process" in proc.stderr
    assert not (tmp_path / "Maildir").exists()


def test_a_locked_account_is_not_logged_in_to_early(tmp_path: Path) -> None:
    """--once logs in ahead of its imports (popsync.prelogin), but only with the lock held."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        config = _config(tmp_path, acct=_plain_keys(tmp_path, port))
        with (
            SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store,
            store.lock(f"me@127.0.0.1:{port}"),
        ):
            proc = run_popsync(["--once", "-c", config])
        assert proc.returncode == 75, proc.stderr
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # the backlog would hold any connection made
            listener.accept()


def test_progress_bar_tracks_each_account_on_a_terminal() -> None:
    """On a terminal the progress callback drives one rich task per account; else none."""
    with _ProgressBar(enabled=False) as progress:
        assert progress is None
    bar = _ProgressBar(enabled=True)
    with bar as progress:
        assert progress is not None
        progress("a", 1, 3, 100)
        progress("b", 1, 1, 50)
        progress("a", 3, 3, 300)
        tasks = {t.description: (t.completed, t.total) for t in bar._bar.tasks}  # type: ignore[attr-defined]
    assert tasks == {"a": (3, 3), "b": (1, 1)}


def test_progress_bar_counts_messages_and_shows_bytes_apart() -> None:
    """The bar shows done/total messages, and the bytes received as their own text."""
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress

    bar = _ProgressBar(enabled=True)
    with bar as progress:
        assert progress is not None
        progress("a", 342, 500, 3 * 1024 * 1024)
        rich_bar = bar._bar
        assert isinstance(rich_bar, Progress)
        assert not any(isinstance(c, DownloadColumn) for c in rich_bar.columns)
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(rich_bar.make_tasks_table(rich_bar.tasks))
        text = console.export_text()
    assert "342/500 messages" in text
    assert "3.0 MiB" in text
    assert "bytes" not in text


def test_popsync_test_says_where_a_timeout_stopped(tmp_path: Path) -> None:
    """A server that greets and then stalls: popsync test names the last step it reached."""
    script: list[Step] = [StartTLS(), Send(b"+OK hello\r\n"), Stall(10)]
    with FakePop3Server(script) as server:
        keys = _plain_keys(tmp_path, server.port, tls_ca_file=str(server.ca_file), timeout="1s")
        config = _config(tmp_path, acct=keys)
        result = run_popsync(["test", "acct", "-c", config])
    assert result.returncode == 75
    assert "  greeting:                hello\n" in result.stdout
    assert "  FAILED (temporary) after step 'greeting': " in result.stdout
    assert "timed out" in result.stdout
    assert SECRET not in result.stdout + result.stderr
