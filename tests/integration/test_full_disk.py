"""A full disk under the Maildir: exit 74, nothing recorded or DELEd that is not delivered."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.errors import ExitCode
from popsync.maildir import Maildir
from popsync.seen import SeenStore
from tests.conftest import in_ci
from tests.synchelp import (
    assert_exactly_once,
    dovecot_keys,
    maildir_messages,
    make_message,
    only_entries,
    run_popsync,
    stored_form,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

# With the state on the same filesystem, whether the commit after ENOSPC finds a free page
# depends on where the 4 KiB pages fall: 256 KiB left none once the schema grew by one page
# (version 4); 272 KiB leaves the same mid-run failure with room for that commit.
TMPFS_SIZE = 272 * 1024
MESSAGE_BODY = 30_000
COUNT = 20  # 600 kB of mail for a 272 kB filesystem


def _mount(where: Path, size: int) -> None:
    subprocess.run(
        ["/bin/mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs mounted for this test (root only; skipped elsewhere, never in CI)."""
    where = tmp_path / "small"
    where.mkdir()
    reason = ""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        try:
            _mount(where, TMPFS_SIZE)
        except (OSError, subprocess.CalledProcessError) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            reason = f"cannot mount a tmpfs: {exc} {stderr.decode(errors='replace').strip()}"
    if reason:
        if in_ci():
            pytest.fail(f"CI runs as root and must test a full disk: {reason}")
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["/bin/umount", "-l", str(where)], check=False)


def _delivered_names(state: Path) -> list[str]:
    with SeenStore.open(state / "popsync.sqlite3") as store:
        return [e.name for e in only_entries(store).values() if e.state == "delivered"]


@pytest.mark.parametrize("state_on_full_disk", [False, True], ids=["state-elsewhere", "same-fs"])
def test_full_disk_exits_74_and_records_and_deletes_nothing_undelivered(
    dovecot: Dovecot,
    mail_user: MailUser,
    tmp_path: Path,
    small_fs: Path,
    state_on_full_disk: bool,
) -> None:
    """ENOSPC mid-run: exit 74, seen-store matches the Maildir, server untouched, tmp/ empty."""
    messages = [make_message(i, MESSAGE_BODY) for i in range(COUNT)]
    dovecot.deliver_many(mail_user, messages)
    maildir = small_fs / "Maildir"
    state = small_fs / "state" if state_on_full_disk else tmp_path / "state"
    keys = dovecot_keys(dovecot, mail_user, maildir, delete="after_delivery")
    config = write_config(tmp_path / "popsync.toml", state, {"acct": keys})

    proc = run_popsync(["--once", "-c", str(config)])
    assert proc.returncode == ExitCode.LOCAL_IO, proc.stderr
    assert "acct: FAILED (local_io)" in proc.stderr
    # Nothing DELEd: the server still holds every message.
    assert sorted(dovecot.messages(mail_user)) == sorted(messages)
    # No debris: no partial or orphaned file in tmp/.
    assert list((maildir / "tmp").iterdir()) == []
    delivered = maildir_messages(maildir)
    assert 0 < len(delivered) < COUNT
    assert set(delivered) <= {stored_form(m) for m in messages}
    # Everything recorded as delivered is in new/ (or cur/), and every file is recorded.
    names = _delivered_names(state) if (state / "popsync.sqlite3").exists() else []
    where = Maildir(maildir).locate_many(names)
    assert all(place in ("new", "cur") for place in where.values()), where
    if not state_on_full_disk:
        assert len(names) == len(delivered)

    # Free space: the next run delivers the rest, exactly once, and empties the server.
    subprocess.run(
        ["/bin/mount", "-o", "remount,size=8m", str(small_fs)], check=True, capture_output=True
    )
    done = run_popsync(["--once", "-c", str(config)])
    assert done.returncode == 0, done.stderr
    assert_exactly_once(maildir_messages(maildir), messages)
    assert dovecot.messages(mail_user) == []
