"""The documented group-readable Maildir recipe, read back by a second, unprivileged user.

popsync runs as root with the recipe's umask; the reader is ``nobody`` with a spare group
id as its only supplementary group (``setpriv``), so no system account is created.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from tests.conftest import unavailable
from tests.synchelp import REPO, dovecot_keys, make_message, stored_form, write_config

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


@pytest.fixture(autouse=True)
def _root() -> None:
    """These tests switch to a second user: they need root (CI runs as root)."""
    if os.geteuid() != 0:
        unavailable("needs root to switch to a second user")


NOBODY = 65534


def _spare_gid() -> int:
    """A group id no group in /etc/group uses."""
    gid = 47_000
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
        gid += 1


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory under /tmp that other users may traverse (pytest's base is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="popsync-group-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _sync(root: Path, dovecot: Dovecot, user: MailUser, umask: int, **modes: str) -> None:
    config = write_config(
        root / "popsync.toml",
        root / "state",
        {"acct": dovecot_keys(dovecot, user, root / "Maildir", **modes)},
    )
    command = f"umask {umask:04o}; exec {sys.executable} -m popsync --once -c {config}"
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _read_as_reader(maildir: Path, gid: int) -> subprocess.CompletedProcess[bytes]:
    """cat every delivered file as uid nobody with ``gid`` as its only supplementary group."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            f"--groups={gid}",
            "/bin/sh",
            "-c",
            'for f in "$1"/new/*; do cat "$f"; done',
            "reader",
            str(maildir),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )


def _recipe_maildir(root: Path, gid: int) -> Path:
    """install -d -g GROUP -m 2750 MAILDIR, as docs/deployment.md says."""
    maildir = root / "Maildir"
    maildir.mkdir()
    os.chown(maildir, -1, gid)
    maildir.chmod(0o2750)
    return maildir


def test_group_member_reads_mail_with_the_documented_recipe(
    dovecot: Dovecot, mail_user: MailUser, shared_root: Path
) -> None:
    """maildir_mode 0750 + file_mode 0640 + UMask 0027 + setgid dir: a group member reads."""
    gid = _spare_gid()
    maildir = _recipe_maildir(shared_root, gid)
    message = make_message(1, tag="group")
    dovecot.deliver(mail_user, message)
    _sync(shared_root, dovecot, mail_user, 0o027, maildir_mode="0750", file_mode="0640")
    files = list((maildir / "new").iterdir())
    assert len(files) == 1
    info = files[0].stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, gid)
    assert stat.S_IMODE((maildir / "new").stat().st_mode) == 0o2750
    read = _read_as_reader(maildir, gid)
    assert read.returncode == 0, read.stderr
    assert read.stdout == stored_form(message)
    # Someone outside the group is refused.
    outsider = _read_as_reader(maildir, gid + 1)
    assert outsider.returncode != 0
    assert outsider.stdout == b""


@pytest.mark.parametrize(
    ("umask", "modes"),
    [(0o077, {"maildir_mode": "0750", "file_mode": "0640"}), (0o027, {})],
    ids=["umask-0077-strips-group-bits", "default-modes-are-private"],
)
def test_group_member_is_refused_without_the_whole_recipe(
    dovecot: Dovecot, mail_user: MailUser, shared_root: Path, umask: int, modes: dict[str, str]
) -> None:
    """The umask is applied to the configured modes, and the defaults stay private."""
    gid = _spare_gid()
    maildir = _recipe_maildir(shared_root, gid)
    dovecot.deliver(mail_user, make_message(2, tag="private"))
    _sync(shared_root, dovecot, mail_user, umask, **modes)
    (path,) = (maildir / "new").iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    read = _read_as_reader(maildir, gid)
    assert read.returncode != 0
    assert read.stdout == b""
