"""kill -9 at every step of LMTP, MDA and mbox delivery: nothing lost, duplicates measured.

The only window in which LMTP and MDA may deliver twice is after the agent accepted a
message and before the delivered commit. The hand-over of batch N runs while batch N+1
streams in, so a kill during that download (``retr``, ``tmp-fsync``) may land in the window
of batch N; the test counts the messages in the window at the kill (what the agent holds
minus the rows committed delivered) and asserts that exactly those are duplicated, that
they are never more than one batch, and that a kill right after the hand-over returned
(``handover``) catches exactly one batch. mbox closes even that window with its append
journal, so it never duplicates.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, DovecotLmtp, MailUser
from popsync.config import load_config
from popsync.seen import SeenStore
from popsync.sync import sync_account
from tests.conftest import unavailable
from tests.integration.test_deliver_lmtp import strip_trace
from tests.integration.test_deliver_mda_mbox import _split_raw
from tests.synchelp import (
    TomlValue,
    dovecot_keys,
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
BATCH = 4  # batches of 4, 4 and 2

# (step, nth): each durability step, in the second batch where there is one.
STEPS = [
    ("retr", 5),
    ("tmp-fsync", 6),
    ("pending", 2),
    ("handover", 2),
    ("delivered", 2),
    ("dele", 1),
]
# (kind, step, nth): every step for every target, and the steps only one target has.
CASES = [(kind, step, nth) for kind in ("lmtp", "mda", "mbox") for step, nth in STEPS] + [
    ("lmtp", "spool-fsync", 2),  # the batch's one spool fsync, before it is pending
]


def _read_lmtp(server: DovecotLmtp, rcpt: MailUser) -> Callable[[], list[bytes]]:
    return lambda: [strip_trace(m) for m in server.folder_messages(rcpt)]


def _target(
    kind: str, tmp_path: Path, lmtp_server: DovecotLmtp
) -> tuple[dict[str, TomlValue], Callable[[], list[bytes]]]:
    """Account keys for one target, and a reader of what it delivered (LF form)."""
    if kind == "lmtp":
        rcpt = lmtp_server.new_user("k")
        keys: dict[str, TomlValue] = {
            "deliver": "lmtp",
            "lmtp": f"unix:{lmtp_server.socket_path}",
            "lmtp_recipient": f"{rcpt.name}@example.org",
        }
        return keys, _read_lmtp(lmtp_server, rcpt)
    if kind == "mda":
        box = tmp_path / "mda-out"
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True)
        rcfile = tmp_path / "mailfilter"
        rcfile.write_text(f'to "{box}/"\n')
        rcfile.chmod(0o600)

        def read_mda() -> list[bytes]:
            return [p.read_bytes() for p in sorted((box / "new").iterdir())]

        return {"deliver": "mda", "mda": ["/usr/bin/maildrop", str(rcfile)]}, read_mda
    path = tmp_path / "inbox.mbox"

    def read_mbox() -> list[bytes]:
        raw = path.read_bytes() if path.exists() else b""
        return _split_raw(raw) if raw else []

    return {"deliver": "mbox", "mbox": str(path)}, read_mbox


def _settled_count(delivered: Callable[[], list[bytes]]) -> int:
    """How many messages the agent holds once it has finished what the killed run sent.

    An LMTP server still delivers a message whose final dot arrived before the kill.
    """
    count = len(delivered())
    for _ in range(50):
        time.sleep(0.1)
        again = len(delivered())
        if again == count:
            return count
        count = again
    return count


@pytest.mark.parametrize(("kind", "step", "nth"), CASES, ids=[f"{s}-{k}" for k, s, _ in CASES])
def test_sigkill_at_each_step_of_a_spooled_delivery(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    kind: str,
    step: str,
    nth: int,
    record_property: Callable[[str, object], None],
) -> None:
    """Kill at this step, then a normal run: no loss; duplicates only in the named window."""
    if kind == "mda" and not Path("/usr/bin/maildrop").exists():
        unavailable("maildrop is not installed (./dev setup installs it)")
    messages = [make_message(i, 200 + 37 * i, tag=kind) for i in range(COUNT)]
    dovecot.deliver_many(mail_user, messages)
    keys, delivered = _target(kind, tmp_path, lmtp_server)
    account_keys = dovecot_keys(dovecot, mail_user, tmp_path / "x", delete="after_delivery", **keys)
    config = write_config(tmp_path / "popsync.toml", tmp_path / "state", {"acct": account_keys})
    crash = ["--at", step, "--nth", str(nth), "--batch-messages", str(BATCH)]
    killed = run_popsync(["--once", "-c", str(config)], crash=crash)
    assert killed.returncode == KILLED, killed.stderr
    assert sorted(dovecot.messages(mail_user)) == sorted(messages)  # nothing DELEd yet

    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        committed = sum(e.state == "delivered" for e in only_entries(store).values())
        window = _settled_count(delivered) - committed  # accepted by the agent, commit lost
        result = sync_account(load_config(config).accounts["acct"], store)
        states = {e.state for e in only_entries(store).values()}
    assert result.outcome == "ok", result.error
    assert states == {"delivered"}
    assert dovecot.messages(mail_user) == []
    assert list((tmp_path / "state" / "spool" / "acct" / "tmp").iterdir()) == []

    got = Counter(delivered())
    want = Counter(stored_form(m) for m in messages)
    assert not want - got, "lost"
    assert not got - want - want, "unexpected content"
    duplicates = sum((got - want).values())
    record_property("duplicates", duplicates)  # --junitxml shows the measured window
    # The measured window: what the agent had accepted when the commit was lost.
    assert duplicates == (0 if kind == "mbox" else window), (kind, step, duplicates, window)
    assert 0 <= window <= BATCH, (kind, step, window)
    if step == "handover" and kind != "mbox":
        assert window == BATCH
    if step in ("pending", "delivered", "dele"):  # the batch before was committed first
        assert duplicates == 0, (kind, step, duplicates)


def test_mbox_partial_append_is_cut_back(
    dovecot: Dovecot, mail_user: MailUser, lmtp_server: DovecotLmtp, tmp_path: Path
) -> None:
    """A run killed half-way through writing the mbox leaves no half message behind."""
    messages = [make_message(i, 50_000, tag="big") for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    keys, delivered = _target("mbox", tmp_path, lmtp_server)
    account_keys = dovecot_keys(dovecot, mail_user, tmp_path / "x", **keys)
    config = write_config(tmp_path / "popsync.toml", tmp_path / "state", {"acct": account_keys})
    script = (
        "import os, signal, sys\n"
        "from popsync.deliver import mbox\n"
        "real = mbox._write_all\n"
        "count = [0]\n"
        "def write(fd, data):\n"
        "    count[0] += 1\n"
        "    if count[0] == 5:\n"
        "        real(fd, data[: len(data) // 2])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(fd, data)\n"
        "mbox._write_all = write\n"
        "from popsync import cli\n"
        f"sys.exit(cli.main(['--once', '-c', {str(config)!r}]))\n"
    )
    import subprocess
    import sys

    from tests.synchelp import REPO

    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == KILLED, proc.stderr
    path = tmp_path / "inbox.mbox"
    partial = path.read_bytes()
    assert re.search(rb"big000001", partial)  # the kill really came mid-append
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        result = sync_account(load_config(config).accounts["acct"], store)
    assert result.outcome == "ok", result.error
    assert Counter(delivered()) == Counter(stored_form(m) for m in messages)
