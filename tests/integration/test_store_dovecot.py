"""The seen-store's promises against a real Dovecot: too-large messages, slow forgetting,
one record per mailbox (issue 8, rows 5-7), through ``popsync --once`` where it matters."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.seen import MIGRATIONS, SeenStore
from tests.synchelp import (
    TomlValue,
    assert_exactly_once,
    dovecot_keys,
    maildir_files,
    maildir_messages,
    make_message,
    only_entries,
    run_popsync,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


def _config(tmp_path: Path, label: str, keys: dict[str, TomlValue]) -> str:
    return str(write_config(tmp_path / f"{label}.toml", tmp_path / "state", {label: keys}))


def _once(config: str) -> tuple[int, str, str]:
    proc = run_popsync(["--once", "-c", config])
    return proc.returncode, proc.stdout, proc.stderr


def _chown_like(tree: Path, like: Path) -> None:
    """Give ``tree`` the owner of ``like`` (Dovecot's mail processes must write to it)."""
    info = like.stat()
    for root, dirs, files in os.walk(tree):
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            os.chown(name, info.st_uid, info.st_gid)
        for name in files:
            os.chown(os.path.join(root, name), info.st_uid, info.st_gid)


@contextmanager
def _server_shows_only(user: MailUser, keep: int) -> Iterator[None]:
    """Let Dovecot list only the first ``keep`` messages, with their own UIDLs, for a while.

    The real Maildir (with its dovecot-uidlist, so UIDLs survive) is swapped for a copy
    missing the other message files, then put back.
    """
    real = user.maildir
    aside = real.with_name(real.name + ".aside")
    shutil.copytree(real, aside, symlinks=True)
    files = sorted(p for sub in ("cur", "new") for p in (real / sub).iterdir())
    for path in files[keep:]:
        path.unlink()
    try:
        yield
    finally:
        _chown_like(aside, real)
        shutil.rmtree(real)
        aside.rename(real)


@pytest.mark.parametrize("keep", [0, 2], ids=["empty-listing", "shrunk-listing"])
def test_glitchy_listing_does_not_redownload(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, keep: int
) -> None:
    """An empty or sharply shrunken listing forgets nothing: the mailbox is not fetched twice."""
    messages = [make_message(i) for i in range(20)]
    dovecot.deliver_many(mail_user, messages)
    config = _config(tmp_path, "acct", dovecot_keys(dovecot, mail_user, tmp_path / "Maildir"))
    assert _once(config)[0] == 0
    with _server_shows_only(mail_user, keep):
        code, out, err = _once(config)
        assert code == 0, err
        assert f"{keep} on server" in out
        assert "far fewer than before" in err
    code, out, err = _once(config)
    assert code == 0, err
    assert "0 fetched" in out
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        entries = only_entries(store)
    assert len(entries) == 20
    assert all(e.vanished_at is None and e.absent_runs == 0 for e in entries.values())


def test_renamed_account_does_not_redownload(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """The seen-store follows the mailbox: a renamed account fetches nothing again."""
    messages = [make_message(i) for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir")
    assert _once(_config(tmp_path, "old-name", keys))[0] == 0
    code, out, err = _once(_config(tmp_path, "new-name", keys))
    assert code == 0, err
    assert "new-name: ok, 0 fetched" in out
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)


def _write_v1_store(path: Path, label: str, rows: list[tuple[bytes, str]]) -> None:
    """A seen-store as popsync with schema version 1 left it (rows keyed by label)."""
    path.parent.mkdir(mode=0o700, parents=True)
    raw = sqlite3.connect(path)
    with raw:
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        raw.executemany(
            "INSERT INTO seen (account, uidl, state, name, size, first_seen, delivered_at)"
            " VALUES (?, ?, 'delivered', ?, NULL, 1.0, 1.0)",
            [(label, uidl, name) for uidl, name in rows],
        )
    raw.close()


def test_version_1_store_is_migrated_without_redownloading(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """An old label-keyed store is migrated and adopted by its mailbox on the next run."""
    messages = [make_message(i) for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir")
    config = _config(tmp_path, "acct", keys)
    assert _once(config)[0] == 0
    db = tmp_path / "state" / "popsync.sqlite3"
    with SeenStore.open(db) as store:
        rows = [(e.uidl, e.name) for e in only_entries(store).values()]
    shutil.rmtree(db.parent)  # the same store, as popsync 0.1 would have left it
    _write_v1_store(db, "acct", rows)
    code, out, err = _once(config)
    assert code == 0, err
    assert "acct: ok, 0 fetched" in out
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        assert store.mailboxes() == [f"{mail_user.name}@{dovecot.host}:{dovecot.pop3s_port}"]


def test_too_large_is_remembered_shown_and_fetched_after_raising_the_limit(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """A too-large message is listed by status and the summary, then fetched once allowed."""
    small = make_message(1, 200)
    big = make_message(2, 30_000)
    dovecot.deliver_many(mail_user, [small, big])
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", max_message_size="10KB")
    config = _config(tmp_path, "acct", keys)
    code, out, err = _once(config)
    assert code == 0, err
    assert "1 fetched" in out
    assert "1 too large (left on server)" in out
    assert "max_message_size" in err
    status = run_popsync(["status", "--json", "-c", config])
    (row,) = json.loads(status.stdout)
    assert (row["too_large"], row["delivered"]) == (1, 1)
    code, out, err = _once(config)  # remembered: no second warning, still not fetched
    assert (code, "max_message_size" in err) == (0, False)
    assert "0 fetched" in out
    keys["max_message_size"] = "1MB"
    code, out, err = _once(_config(tmp_path, "acct", keys))
    assert code == 0, err
    assert "1 fetched" in out
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), [small, big])
    assert len(maildir_files(tmp_path / "Maildir")) == 2
    assert sorted(dovecot.messages(mail_user)) == sorted([small, big])  # nothing deleted


def test_a_second_seen_store_for_one_maildir_is_refused(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    """A manual run whose config picks another store than the service's is refused (78)."""
    messages = [make_message(i) for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir")
    service = tmp_path / "service"
    manual = tmp_path / "manual"
    for where in (service, manual):
        where.mkdir()
    service_config = write_config(service / "c.toml", service / "state", {"acct": keys})
    manual_config = write_config(manual / "c.toml", manual / "state", {"acct": keys})
    assert _once(str(service_config))[0] == 0
    code, _, err = _once(str(manual_config))
    assert code == 78, err
    assert f'set state_dir = "{service / "state"}"' in err
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)
    # Under systemd the config's state_dir must be the unit's StateDirectory=.
    proc = run_popsync(
        ["--once", "-c", str(service_config)], env={"STATE_DIRECTORY": str(manual / "state")}
    )
    assert proc.returncode == 78, proc.stderr
    assert "is not the service's state directory" in proc.stderr
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)
