"""The durability order, proven on a real run: every message's fsyncs, renames and commits.

``tests/crashwrap.py --trace`` records each fsync, rename and seen-store commit of a real
``popsync --once`` against Dovecot; `tests.durability.check_order` demands, for every
message: file fsync -> pending commit -> rename into new/ -> fsync of new/ -> delivered
commit, all with SQLite at ``synchronous = FULL``. A run with one of those flushes disabled
still delivers every message (the crash tests cannot tell), and the checker must flag it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devtools.dovecot import Dovecot, MailUser
from tests.durability import DISABLE, check_order, read_trace
from tests.synchelp import (
    assert_exactly_once,
    dovecot_keys,
    maildir_messages,
    make_message,
    run_popsync,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

COUNT = 7
BATCH = 3  # three batches: 3, 3 and 1 messages


def _traced_run(
    dovecot: Dovecot, user: MailUser, tmp_path: Path, disable: str | None = None
) -> list[dict[str, Any]]:
    messages = [make_message(i, 150 + 40 * i) for i in range(COUNT)]
    dovecot.deliver_many(user, messages)
    maildir = tmp_path / "Maildir"
    config = write_config(
        tmp_path / "c.toml", tmp_path / "state", {"acct": dovecot_keys(dovecot, user, maildir)}
    )
    trace = tmp_path / "trace.jsonl"
    wrap = ["--at", "never", "--batch-messages", str(BATCH), "--trace", str(trace)]
    if disable is not None:
        wrap += ["--disable-fsync", disable]
    proc = run_popsync(["--once", "-c", str(config)], crash=wrap)
    # The run succeeds either way: only the recorded order tells a missing flush apart.
    assert proc.returncode == 0, proc.stderr
    assert_exactly_once(maildir_messages(maildir), messages)
    return read_trace(trace.read_text())


def _pending_names(events: list[dict[str, Any]]) -> list[str]:
    return [
        name
        for e in events
        if e["ev"] == "commit" and e["kind"] == "pending"
        for name in e["names"]
    ]


def test_every_message_follows_the_durability_order(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """File fsync, pending commit, rename, new/ fsync, delivered commit, for every message."""
    events = _traced_run(dovecot, mail_user, tmp_path)
    assert check_order(events) == []
    names = _pending_names(events)
    assert len(names) == len(set(names)) == COUNT
    commits = [e["kind"] for e in events if e["ev"] == "commit"]
    assert commits == ["pending", "delivered"] * 3  # group commit: one pair per batch
    assert sum(1 for e in events if e["ev"] == "fsync" and e["dir"]) >= 3


_FLAGGED = {
    "file": "its file was not fsynced before the pending commit",
    "new-dir": "new/ was not fsynced after its rename",
    "sqlite": "ran with synchronous=0",
}


@pytest.mark.parametrize("disable", DISABLE)
def test_a_disabled_fsync_is_flagged(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, disable: str
) -> None:
    """With one flush monkeypatched away, the same run delivers all, and the checker objects."""
    events = _traced_run(dovecot, mail_user, tmp_path, disable)
    problems = check_order(events)
    assert problems
    assert all(_FLAGGED[disable] in problem for problem in problems), problems
    if disable != "sqlite":  # every message is named, not just the first
        assert len(problems) == COUNT
