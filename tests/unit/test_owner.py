"""One seen-store per Maildir, no root-owned files in another user's directories (issue 8, row 7).

The suite runs as root (CI does): a directory chowned to ``nobody`` stands for the service
user's state directory or Maildir.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from popsync.errors import ConfigError, ExitCode
from popsync.owner import (
    CLAIM_FILENAME,
    ForeignOwner,
    StoreMismatch,
    check_state_directory,
    claim_maildir,
    refuse_foreign_root,
)
from tests.conftest import unavailable
from tests.synchelp import TomlValue, run_popsync, write_config

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def nobodys(tmp_path: Path) -> Path:
    """A directory owned by nobody, as the service user's directories are."""
    where = tmp_path / "service"
    where.mkdir()
    os.chown(where, NOBODY.pw_uid, NOBODY.pw_gid)
    return where


def _root_owned(tree: Path) -> list[Path]:
    return [p for p in [tree, *tree.rglob("*")] if p.lstat().st_uid == 0]


def test_root_is_refused_in_another_users_directory(nobodys: Path) -> None:
    """As root, a directory owned by nobody (or one to be created inside it) is refused."""
    with pytest.raises(ForeignOwner, match=r"belongs to nobody.*sudo -u nobody") as info:
        refuse_foreign_root(nobodys, "state directory", euid=0)
    assert info.value.exit_code == ExitCode.USAGE
    with pytest.raises(ForeignOwner, match=rf"\({nobodys} does\)"):
        refuse_foreign_root(nobodys / "new" / "Maildir", "Maildir", euid=0)


def test_root_in_its_own_directory_and_other_users_are_fine(nobodys: Path, tmp_path: Path) -> None:
    """root's own directories pass, and the check is only for root."""
    refuse_foreign_root(tmp_path / "not-yet", "Maildir", euid=0)
    refuse_foreign_root(nobodys, "Maildir", euid=NOBODY.pw_uid)


def test_state_dir_must_match_systemds(tmp_path: Path) -> None:
    """Under systemd a config's state_dir that is not $STATE_DIRECTORY is a config error."""
    check_state_directory(tmp_path, {})
    check_state_directory(tmp_path, {"STATE_DIRECTORY": f"{tmp_path}:/var/lib/other"})
    with pytest.raises(ConfigError) as info:
        check_state_directory(tmp_path, {"STATE_DIRECTORY": "/var/lib/popsync"})
    assert info.value.problems == [
        f"state_dir: {tmp_path} is not the service's state directory /var/lib/popsync"
        ' ($STATE_DIRECTORY); set state_dir = "/var/lib/popsync" so that the service and'
        " manual runs share one seen-store"
    ]


def test_a_maildir_is_claimed_by_one_store(tmp_path: Path) -> None:
    """The first store claims the Maildir; another live store is refused with the fix."""
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    ours = tmp_path / "service" / "popsync.sqlite3"
    ours.parent.mkdir()
    ours.touch()
    claim_maildir(maildir, ours)
    claim_maildir(maildir, ours)  # idempotent
    assert (maildir / CLAIM_FILENAME).read_text() == f"{ours}\n"
    manual = tmp_path / "home" / "popsync.sqlite3"
    with pytest.raises(StoreMismatch) as info:
        claim_maildir(maildir, manual)
    assert info.value.exit_code == ExitCode.CONFIG
    assert f'set state_dir = "{ours.parent}"' in str(info.value)
    assert f"this run would use {manual}" in str(info.value)


def test_a_claim_of_a_vanished_store_is_taken_over(tmp_path: Path) -> None:
    """A state directory that was moved away leaves a stale claim; the new store takes it."""
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    (maildir / CLAIM_FILENAME).write_text(f"{tmp_path / 'gone' / 'popsync.sqlite3'}\n")
    claim_maildir(maildir, tmp_path / "new" / "popsync.sqlite3")
    assert (maildir / CLAIM_FILENAME).read_text() == f"{tmp_path / 'new' / 'popsync.sqlite3'}\n"


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[[Path, Path], str]:
    """Write a config with one account on a closed port (no network is ever reached)."""
    if os.geteuid() != 0:
        unavailable("these tests run popsync as root (CI does)")

    def write(state: Path, maildir: Path) -> str:
        keys: dict[str, TomlValue] = {
            "host": "127.0.0.1",
            "port": 9,
            "username": "me",
            "password": "pw-owner-test",
            "maildir": str(maildir),
            "timeout": "2s",
        }
        return str(write_config(tmp_path / "c.toml", state, {"acct": keys}))

    return write


def test_once_as_root_in_the_service_state_dir_is_refused(
    nobodys: Path, tmp_path: Path, config_for: Callable[[Path, Path], str]
) -> None:
    """--once and status as root against nobody's state directory exit 64, leaving no file."""
    config = config_for(nobodys, tmp_path / "Maildir")
    for args in (["--once"], ["status"]):
        proc = run_popsync([*args, "-c", config])
        assert proc.returncode == 64, proc.stderr
        assert "refusing to run as root" in proc.stderr
        assert "belongs to nobody" in proc.stderr
    assert _root_owned(nobodys) == []
    assert list(nobodys.iterdir()) == []
    assert not (tmp_path / "Maildir").exists()


def test_once_as_root_into_another_users_maildir_is_refused(
    nobodys: Path, tmp_path: Path, config_for: Callable[[Path, Path], str]
) -> None:
    """A Maildir owned by nobody is refused before anything is created in it."""
    maildir = nobodys / "Maildir"
    config = config_for(tmp_path / "state", maildir)
    proc = run_popsync(["--once", "-c", config])
    assert proc.returncode == 64, proc.stderr
    assert "the Maildir" in proc.stderr
    assert "belongs to nobody" in proc.stderr
    assert _root_owned(nobodys) == []
    assert not maildir.exists()
