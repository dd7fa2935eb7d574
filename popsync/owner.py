"""Whose files these are: one seen-store per Maildir, one user per state directory.

Two ways to download a mailbox twice, or to lock the service out of its own files, that no
single run can see by itself:

- **Two seen-stores for one Maildir.** The systemd service keeps its store in
  ``$STATE_DIRECTORY``; a manual ``popsync --once`` with a config that does not name a
  ``state_dir`` would use ``~/.local/state/popsync`` and fetch everything again. So every run
  *claims* the Maildir for its store: ``<maildir>/.popsync-store`` holds the store's path, and
  a run with another store is refused (`StoreMismatch`, exit 78) with the ``state_dir`` line
  that fixes it. A claim whose store no longer exists is taken over (the state directory was
  moved). A config's explicit ``state_dir`` must also agree with ``$STATE_DIRECTORY`` when
  systemd sets it (`check_state_directory`).
- **root in someone else's directory.** root running ``--once`` against the service user's
  state directory or Maildir would leave root-owned lock files, WAL files and Maildir
  directories the service cannot open. popsync refuses (`ForeignOwner`, exit 64) and names the
  owner, rather than switching to that user: switching would also need the config, password
  files and credentials to be readable by that user and would hide who ran what, while
  ``sudo -u OWNER popsync ...`` is one obvious command away.
"""

from __future__ import annotations

import errno
import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from popsync.errors import ConfigError, ExitCode, LocalIOError, PopsyncError

__all__ = [
    "CLAIM_FILENAME",
    "ForeignOwner",
    "StoreMismatch",
    "check_state_directory",
    "claim_maildir",
    "refuse_foreign_root",
]

#: In the Maildir's root, beside tmp/ new/ cur/ (readers ignore files there).
CLAIM_FILENAME = ".popsync-store"
_MAX_CLAIM = 4096


class ForeignOwner(PopsyncError):
    """root was asked to write into a directory another user owns."""

    exit_code = ExitCode.USAGE


class StoreMismatch(PopsyncError):
    """This Maildir is synced with another seen-store; using ours would fetch it all again."""

    exit_code = ExitCode.CONFIG


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (what a mkdir would inherit)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def refuse_foreign_root(path: Path, what: str, *, euid: int | None = None) -> None:
    """As root, refuse to write into ``path`` (or create it) when another user owns it."""
    if (os.geteuid() if euid is None else euid) != 0:
        return
    where = _nearest_existing(Path(path))
    try:
        owner = where.stat().st_uid
    except OSError as exc:
        raise LocalIOError(f"cannot stat {where}: {exc.strerror}") from exc
    if owner == 0:
        return
    name = _user_name(owner)
    raise ForeignOwner(
        f"refusing to run as root: the {what} {path} belongs to {name}"
        f"{'' if where == Path(path) else f' ({where} does)'}, and root would leave files"
        f" {name} cannot use; run popsync as that user, e.g. sudo -u {name} popsync ..."
    )


def check_state_directory(state_dir: Path, env: Mapping[str, str] | None = None) -> None:
    """Under systemd, the config's state_dir must be the unit's StateDirectory=."""
    env = os.environ if env is None else env
    systemd = [Path(p) for p in env.get("STATE_DIRECTORY", "").split(":") if p]
    if systemd and Path(state_dir) not in systemd:
        raise ConfigError(
            [
                f"state_dir: {state_dir} is not the service's state directory {systemd[0]}"
                f' ($STATE_DIRECTORY); set state_dir = "{systemd[0]}" so that the service'
                " and manual runs share one seen-store"
            ]
        )


def _read_claim(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_CLAIM + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalIOError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_CLAIM:
        return None  # not ours: take it over
    return data.decode("utf-8", "replace").strip() or None


def _store_exists(path: str) -> bool:
    """True unless ``path`` is certainly gone (a permission error means: someone's store)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno not in (errno.ENOENT, errno.ENOTDIR)
    return True


def _write_claim(path: Path, store: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{store}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LocalIOError(f"cannot write {path}: {exc.strerror}") from exc


def claim_maildir(maildir: Path, store_path: Path, config_hint: str = "the config") -> None:
    """Record that ``store_path`` syncs ``maildir``; refuse if a live other store does."""
    mine = os.path.realpath(store_path)
    claim = Path(maildir) / CLAIM_FILENAME
    theirs = _read_claim(claim)
    if theirs == mine:
        return
    if theirs is not None and _store_exists(theirs):
        raise StoreMismatch(
            f"{maildir} is synced with the seen-store {theirs}, but this run would use {mine}"
            " and download every message again; set state_dir ="
            f' "{os.path.dirname(theirs)}" in {config_hint} (or remove {claim} if that store'
            " is no longer used)"
        )
    _write_claim(claim, mine)
