"""SIGKILL at every step of the durability order, then a normal run: 0 lost, 0 duplicated."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.config import load_config
from popsync.maildir import Maildir
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.synchelp import (
    assert_exactly_once,
    dovecot_keys,
    maildir_files,
    maildir_messages,
    make_message,
    only_entries,
    run_popsync,
    stored_form,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

KILLED = -9
COUNT = 10
BATCH = 4  # batches of 4, 4 and 2 messages


@dataclass(frozen=True)
class Setup:
    """One account on the test Dovecot with its config, Maildir and state."""

    config: Path
    maildir: Path
    state: Path
    messages: list[bytes]


def _setup(dovecot: Dovecot, user: MailUser, tmp_path: Path, count: int, *, delete: str) -> Setup:
    messages = [make_message(i, 200 + 37 * (i % 11)) for i in range(count)]
    dovecot.deliver_many(user, messages)
    maildir, state = tmp_path / "Maildir", tmp_path / "state"
    keys = dovecot_keys(dovecot, user, maildir, delete=delete)
    config = write_config(tmp_path / "popsync.toml", state, {"acct": keys})
    return Setup(config, maildir, state, messages)


def _store(setup: Setup) -> SeenStore:
    return SeenStore.open(setup.state / "popsync.sqlite3")


def _assert_consistent(setup: Setup) -> None:
    """Nothing recorded as delivered is missing from new/ or cur/; no file is there twice."""
    maildir = Maildir(setup.maildir)
    with _store(setup) as store:
        entries = only_entries(store)
    delivered = [e.name for e in entries.values() if e.state == "delivered"]
    where = maildir.locate_many(delivered)
    assert all(where[name] in ("new", "cur") for name in delivered), where
    files = maildir_messages(setup.maildir)
    assert len(files) == len(set(files)), "a message is in the Maildir twice"
    assert set(files) <= {stored_form(m) for m in setup.messages}


def _finish(setup: Setup) -> RunResult:
    """The normal run after a crash, in-process so its counters can be checked."""
    config = load_config(setup.config)
    with _store(setup) as store:
        result = sync_account(config.accounts["acct"], store)
    assert result.outcome == "ok", result.error
    return result


def _assert_clean(setup: Setup, dovecot: Dovecot, user: MailUser) -> None:
    """Every message exactly once, server emptied, no pending rows, no debris in tmp/."""
    assert_exactly_once(maildir_messages(setup.maildir), setup.messages)
    assert dovecot.messages(user) == []
    with _store(setup) as store:
        assert {e.state for e in only_entries(store).values()} <= {"delivered"}
    assert list((setup.maildir / "tmp").iterdir()) == []


# (step, nth, delivered before the normal run, recovered by it, fetched by it)
STEPS = [
    ("tmp-fsync", 6, 4, 0, 6),  # batch 2 half written, nothing pending yet
    ("pending", 2, 4, 4, 2),  # batch 2 pending, all still in tmp/
    ("rename", 6, 4, 4, 2),  # batch 2 pending, half renamed, new/ not fsynced
    ("new-fsync", 2, 4, 4, 2),  # batch 2 in new/, not yet marked delivered
    ("delivered", 2, 8, 0, 2),  # batch 2 complete
    ("retr", 5, 4, 0, 6),  # in the middle of message 5's body
    ("dele", 1, 10, 0, 0),  # every DELE sent, QUIT never
]


@pytest.mark.parametrize(("step", "nth", "delivered", "recovered", "fetched"), STEPS)
def test_sigkill_at_each_step_loses_and_duplicates_nothing(
    dovecot: Dovecot,
    mail_user: MailUser,
    tmp_path: Path,
    step: str,
    nth: int,
    delivered: int,
    recovered: int,
    fetched: int,
) -> None:
    """A SIGKILL at this step, then a normal run: every message delivered exactly once."""
    setup = _setup(dovecot, mail_user, tmp_path, COUNT, delete="after_delivery")
    killed = run_popsync(
        ["--once", "-c", str(setup.config)],
        crash=["--at", step, "--nth", str(nth), "--batch-messages", str(BATCH)],
    )
    assert killed.returncode == KILLED, killed.stderr
    _assert_consistent(setup)
    with _store(setup) as store:
        states = [e.state for e in only_entries(store).values()]
    assert states.count("delivered") == delivered
    # Nothing was deleted: the connection died before QUIT.
    assert sorted(dovecot.messages(mail_user)) == sorted(setup.messages)

    result = _finish(setup)
    assert (result.recovered, result.fetched, result.deleted) == (recovered, fetched, COUNT)
    _assert_clean(setup, dovecot, mail_user)


def test_sigkill_twice_in_a_row_before_recovery(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """A run killed while recovering an earlier crash still ends with every message once."""
    setup = _setup(dovecot, mail_user, tmp_path, COUNT, delete="after_delivery")
    crash = ["--batch-messages", str(BATCH), "--at"]
    args = ["--once", "-c", str(setup.config)]
    assert run_popsync(args, crash=[*crash, "rename", "--nth", "2"]).returncode == KILLED
    # The second run is killed after its recovery renamed one more pending file.
    assert run_popsync(args, crash=[*crash, "rename", "--nth", "1"]).returncode == KILLED
    _assert_consistent(setup)
    _finish(setup)
    _assert_clean(setup, dovecot, mail_user)


@pytest.mark.slow
def test_random_kills_during_a_500_message_run(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """At least 50 SIGKILLs at random points of a 500-message run, then a clean run."""
    seed = int(time.time())
    rng = random.Random(seed)
    setup = _setup(dovecot, mail_user, tmp_path, 500, delete="after_delivery")
    args = ["--once", "-c", str(setup.config)]
    kills = 0
    killed_at: set[str] = set()
    events = tmp_path / "events"
    while kills < 50:
        nth = rng.randint(1, 80)
        batch = rng.randint(1, 12)
        events.unlink(missing_ok=True)
        crash = ["--at", "random", "--nth", str(nth), "--batch-messages", str(batch)]
        proc = run_popsync(args, crash=[*crash, "--events", str(events)])
        assert proc.returncode in (KILLED, 0), (seed, proc.stderr)
        assert proc.returncode == KILLED, f"seed {seed}: mailbox drained after {kills} kills"
        killed_at.add(events.read_text().split()[-1])
        kills += 1
    # Most kills land mid-RETR, but the commit steps must be hit too.
    assert {"write", "tmp-fsync", "rename"} <= killed_at, (seed, killed_at)
    _assert_consistent(setup)
    assert len(maildir_files(setup.maildir)) > 100, f"seed {seed}: too little progress"
    _finish(setup)
    _assert_clean(setup, dovecot, mail_user)
