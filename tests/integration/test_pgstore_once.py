"""``popsync --once`` with ``store = "postgresql://…"`` against the real Dovecot and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg
import pytest

from devtools.dovecot import Dovecot, MailUser
from devtools.postgres import Postgres
from popsync.config import parse_config
from popsync.errors import LockBusy
from popsync.lease import LeaseStore, mailbox_key
from tests.pghelp import private_postgres
from tests.synchelp import (
    REPO,
    TomlValue,
    assert_exactly_once,
    dovecot_keys,
    maildir_messages,
    make_message,
    run_popsync,
    toml_config,
)

KILLED = -9
#: Runs popsync's main() with short leases (2 s database timeouts), two-message batches, and
#: a SIGSTOP of itself right after its STOP_AFTER-th mark_delivered commit (a worker paused
#: mid-run: GC, VM migration).
_PAUSER = """
import os, signal, sys
import popsync.sync as sync
from popsync import pgstore
sync.BATCH_MESSAGES = 2
opener = pgstore.PgStore.open.__func__
def short_leases(cls, *args, **kwargs):
    kwargs.update(lease_seconds=float(os.environ["LEASE"]), renew_seconds=1.0, timeout=2.0)
    return opener(cls, *args, **kwargs)
pgstore.PgStore.open = classmethod(short_leases)
deliver = pgstore.PgStore.mark_delivered
calls = [0]
def mark_delivered(self, *args, **kwargs):
    deliver(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == int(os.environ["STOP_AFTER"]):
        os.kill(os.getpid(), signal.SIGSTOP)
pgstore.PgStore.mark_delivered = mark_delivered
from popsync.cli import main
sys.exit(main(sys.argv[1:]))
"""
DB_PASSWORD = "Zq7-db-secret-e2e"


def write_pg_config(
    path: Path, dsn: str, state_dir: Path, account: Mapping[str, TomlValue], *extra: str
) -> Path:
    """A 0600 config with one account and ``store = dsn`` (plus ``extra`` top-level lines)."""
    text = toml_config(state_dir, {"acct": account})
    path.write_text("\n".join([f'store = "{dsn}"', *extra, text]))
    path.chmod(0o600)
    return path


def delivered_rows(dsn: str) -> dict[str, int]:
    """Seen rows by state, straight from the database."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT state, count(*) FROM seen GROUP BY state").fetchall()
    return {str(state): int(count) for state, count in rows}


@pytest.fixture
def dsn(postgres: Postgres) -> str:
    """An empty schema of the test's own on the session cluster."""
    return postgres.new_schema("once")


def test_first_fetch_then_nothing_new(
    dovecot: Dovecot, mail_user: MailUser, dsn: str, tmp_path: Path
) -> None:
    """--once fetches every message into the Maildir with rows in PostgreSQL, then nothing."""
    messages = [make_message(i) for i in range(5)]
    dovecot.deliver_many(mail_user, messages)
    maildir = tmp_path / "Maildir"
    state = tmp_path / "state"
    config = write_pg_config(
        tmp_path / "popsync.toml", dsn, state, dovecot_keys(dovecot, mail_user, maildir)
    )
    first = run_popsync(["--once", "-c", str(config)])
    assert first.returncode == 0, first.stderr
    assert_exactly_once(maildir_messages(maildir), messages)
    assert delivered_rows(dsn) == {"delivered": 5}
    again = run_popsync(["--once", "-c", str(config)])
    assert again.returncode == 0, again.stderr
    assert_exactly_once(maildir_messages(maildir), messages)
    assert not (state / "popsync.sqlite3").exists()  # nothing went to SQLite
    # ... but state_dir exists as in SQLite mode (spools, tokens, the daemon record go there).
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert not (maildir / ".popsync-store").exists()  # a shared store claims no Maildir
    status = run_popsync(["status", "--json", "-c", str(config)])
    assert status.returncode == 0, status.stderr
    [row] = json.loads(status.stdout)
    assert row["account"] == "acct"
    with psycopg.connect(dsn) as conn:
        runs = conn.execute("SELECT outcome, fetched, consecutive_failures FROM runs").fetchall()
        lease = conn.execute("SELECT holder, token FROM accounts_lease").fetchall()
    assert runs == [("ok", 0, 0)]  # the second run's record
    assert len(lease) == 1
    assert lease[0][1] is None  # released


def test_kill_9_mid_run_then_rerun_delivers_each_message_once(
    dovecot: Dovecot, mail_user: MailUser, dsn: str, tmp_path: Path
) -> None:
    """A run SIGKILLed after its third rename into new/ is finished by the next, exactly once."""
    messages = [make_message(i) for i in range(6)]
    dovecot.deliver_many(mail_user, messages)
    maildir = tmp_path / "Maildir"
    config = write_pg_config(
        tmp_path / "popsync.toml",
        dsn,
        tmp_path / "state",
        dovecot_keys(dovecot, mail_user, maildir, delete="after_delivery"),
    )
    args = ["--once", "-c", str(config)]
    killed = run_popsync(args, crash=["--at", "rename", "--nth", "3", "--batch-messages", "2"])
    assert killed.returncode == KILLED, killed.stderr
    assert delivered_rows(dsn).get("pending", 0) >= 1  # the interrupted batch
    assert sorted(dovecot.messages(mail_user)) == sorted(messages)  # nothing deleted yet
    # The killed run's lease outlives it; a rerun must wait for it (here: take it back).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE accounts_lease SET expires_at = clock_timestamp()")
    rerun = run_popsync(args)
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once(maildir_messages(maildir), messages)
    assert delivered_rows(dsn) == {"delivered": 6}
    assert dovecot.messages(mail_user) == []


def test_a_held_lease_makes_once_exit_75_with_one_clear_line(
    dovecot: Dovecot, mail_user: MailUser, dsn: str, tmp_path: Path
) -> None:
    """While another worker holds the account's lease, --once exits 75 naming it; then runs."""
    dovecot.deliver_many(mail_user, [make_message(1)])
    maildir = tmp_path / "Maildir"
    keys = dovecot_keys(dovecot, mail_user, maildir)
    config = write_pg_config(tmp_path / "popsync.toml", dsn, tmp_path / "state", keys)
    mailbox = parse_config(config.read_text()).accounts["acct"].mailbox
    with LeaseStore(dsn) as leases:
        lease = leases.claim("mx9:4242", mailbox_key(mailbox))
        busy = run_popsync(["--once", "-c", str(config)])
        assert busy.returncode == 75, busy.stderr
        assert "being synced by worker mx9:4242" in busy.stderr
        assert "Traceback" not in busy.stderr
        assert maildir_messages(maildir) == []
        leases.release(lease.token)
    done = run_popsync(["--once", "-c", str(config)])
    assert done.returncode == 0, done.stderr
    assert len(maildir_messages(maildir)) == 1


def test_the_database_password_never_shows(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """With a password-protected role the password is in no output, logs at debug included."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(2)])
    maildir = tmp_path / "Maildir"
    keys = dovecot_keys(dovecot, mail_user, maildir)
    with private_postgres(password=DB_PASSWORD) as server:
        url = server.dsn()
        assert DB_PASSWORD not in url
        by_env = write_pg_config(
            tmp_path / "env.toml", url, tmp_path / "state", keys, 'store_password_env = "DB_PW"'
        )
        outputs = []
        ok = run_popsync(["--once", "-v", "-c", str(by_env)], env={"DB_PW": DB_PASSWORD})
        assert ok.returncode == 0, ok.stderr
        outputs.append(ok.stdout + ok.stderr)
        assert len(maildir_messages(maildir)) == 2
        for command in (["status"], ["check-config"], ["--once", "-v"]):
            proc = run_popsync([*command, "-c", str(by_env)], env={"DB_PW": DB_PASSWORD})
            assert proc.returncode == 0, proc.stderr
            outputs.append(proc.stdout + proc.stderr)
        # In the URL itself: shown redacted, and a wrong one is refused (77) without echo.
        inline = f"postgresql://{server.user}:{DB_PASSWORD}@{server.host}:{server.port}/postgres"
        in_url = write_pg_config(tmp_path / "url.toml", inline, tmp_path / "state", keys)
        checked = run_popsync(["check-config", "-c", str(in_url)])
        assert checked.returncode == 0, checked.stderr
        assert ":[redacted]@" in checked.stdout
        outputs.append(checked.stdout + checked.stderr)
        wrong = run_popsync(["--once", "-c", str(by_env)], env={"DB_PW": DB_PASSWORD + "x"})
        assert wrong.returncode == 77, wrong.stderr
        assert "PostgreSQL refused the login" in wrong.stderr
        outputs.append(wrong.stdout + wrong.stderr)
    for text in outputs:
        assert DB_PASSWORD not in text


def test_an_unreachable_database_is_exit_75_with_one_line(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """PostgreSQL stopped: --once exits 75 with one 'PostgreSQL unavailable' line, no traceback."""
    dovecot.deliver_many(mail_user, [make_message(1)])
    maildir = tmp_path / "Maildir"
    keys = dovecot_keys(dovecot, mail_user, maildir)
    with private_postgres(password=DB_PASSWORD) as server:
        url = f"postgresql://{server.user}:{DB_PASSWORD}@{server.host}:{server.port}/postgres"
        config = write_pg_config(tmp_path / "popsync.toml", url, tmp_path / "state", keys)
        assert run_popsync(["--once", "-c", str(config)]).returncode == 0
        server.stop()
        down = run_popsync(["--once", "-c", str(config)])
    assert down.returncode == 75, down.stderr
    lines = [line for line in down.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, down.stderr
    assert "PostgreSQL unavailable" in lines[0]
    assert DB_PASSWORD not in down.stdout + down.stderr


def _state(pid: int) -> str:
    """The process state letter from /proc (T when stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _lease_expired(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT bool_and(expires_at <= clock_timestamp()) FROM accounts_lease")
        return bool(row.fetchone()[0])  # type: ignore[index]


def test_a_paused_once_is_taken_over_and_its_commits_refused(
    dovecot: Dovecot, mail_user: MailUser, dsn: str, tmp_path: Path
) -> None:
    """SIGSTOP past the lease: another --once takes over; the resumed one commits nothing (75)."""
    messages = [make_message(i) for i in range(6)]
    dovecot.deliver_many(mail_user, messages)
    maildir = tmp_path / "Maildir"
    keys = dovecot_keys(dovecot, mail_user, maildir)
    config = write_pg_config(tmp_path / "popsync.toml", dsn, tmp_path / "state", keys)
    mailbox = parse_config(config.read_text()).accounts["acct"].mailbox
    paused = subprocess.Popen(
        [sys.executable, "-c", _PAUSER, "--once", "-c", str(config)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "LEASE": "8", "STOP_AFTER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for("the first run to stop itself", lambda: _state(paused.pid) == "T")
        assert len(maildir_messages(maildir)) == 2  # its first batch is delivered
        with LeaseStore(dsn) as leases, pytest.raises(LockBusy, match=f":{paused.pid} "):
            leases.claim("test", mailbox_key(mailbox))  # still held by the stopped worker
        _wait_for("its lease to expire", lambda: _lease_expired(dsn), timeout=30)
        taker = run_popsync(["--once", "-c", str(config)])
        assert taker.returncode == 0, taker.stderr
        assert_exactly_once(maildir_messages(maildir), messages)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
        _, err = paused.communicate(timeout=60)
    assert paused.returncode == 75, err
    assert "lease expired or taken over" in err
    assert "Traceback" not in err
    assert_exactly_once(maildir_messages(maildir), messages)  # the resumed run added nothing
    assert delivered_rows(dsn) == {"delivered": 6}
    with psycopg.connect(dsn) as conn:
        runs = conn.execute("SELECT outcome, fetched FROM runs").fetchall()
    assert runs == [("ok", 4)]  # the taker's record; the resumed run's was refused


def test_postgresql_stopped_during_a_run_is_exit_75_then_resumed(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """PostgreSQL stops mid-run: the run ends 75 in one clean line; a later run finishes once."""
    messages = [make_message(i) for i in range(4)]
    dovecot.deliver_many(mail_user, messages)
    maildir = tmp_path / "Maildir"
    keys = dovecot_keys(dovecot, mail_user, maildir)
    with private_postgres(password=DB_PASSWORD) as server:
        url = f"postgresql://{server.user}:{DB_PASSWORD}@{server.host}:{server.port}/postgres"
        config = write_pg_config(tmp_path / "popsync.toml", url, tmp_path / "state", keys)
        run = subprocess.Popen(
            [sys.executable, "-c", _PAUSER, "--once", "-c", str(config)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "LEASE": "30", "STOP_AFTER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for("the run to stop itself", lambda: _state(run.pid) == "T")
            server.stop()
        finally:
            os.kill(run.pid, signal.SIGCONT)
            out, err = run.communicate(timeout=120)
        assert run.returncode == 75, err
        [summary] = [line for line in err.splitlines() if line.startswith("acct:")]
        assert "PostgreSQL unavailable: connection failed" in summary, err
        assert "Connection refused" in summary
        assert "psycopg.pool" not in err  # no reconnection noise
        assert "Traceback" not in out + err
        assert DB_PASSWORD not in out + err
        assert len(maildir_messages(maildir)) == 2  # the batch committed before the stop
        server.start()  # same port
        with psycopg.connect(url, autocommit=True) as conn:  # the dead run's lease: let go
            conn.execute("UPDATE accounts_lease SET expires_at = clock_timestamp()")
        again = run_popsync(["--once", "-c", str(config)])
        assert again.returncode == 0, again.stderr
    assert_exactly_once(maildir_messages(maildir), messages)
