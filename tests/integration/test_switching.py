"""Switching to popsync against the real Dovecot: import-state from the real mpop, getmail6 and
fetchmail, first_run = "mark_seen", mark-seen, ls and --dry-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.cli import main
from popsync.seen import SeenStore
from tests.conftest import in_ci
from tests.synchelp import (
    dovecot_keys,
    maildir_messages,
    make_message,
    only_entries,
    stored_form,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


def _need(program: str) -> None:
    if shutil.which(program) is None:
        message = f"{program} is not installed (./dev setup installs it)"
        if in_ci():
            pytest.fail(f"CI is set but {message}")
        pytest.skip(message)


def _run(argv: list[str], home: Path) -> None:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _peer_maildir(home: Path) -> Path:
    maildir = home / "PeerMail"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    return maildir


def _mpop(dovecot: Dovecot, user: MailUser, home: Path) -> Path:
    """Run the real mpop (keep on) and return its UIDLs file."""
    _need("mpop")
    uidls = home / ".mpop_uidls"
    uidls.mkdir(exist_ok=True)
    rc = home / ".mpoprc"
    rc.write_text(
        f"defaults\ntls on\ntls_starttls off\ntls_trust_file {dovecot.ca_file}\n"
        f"account t\nhost {dovecot.host}\nport {dovecot.pop3s_port}\nuser {user.name}\n"
        f"password {user.password}\nkeep on\nonly_new on\n"
        f"delivery maildir {_peer_maildir(home)}\nuidls_file {uidls}/%U_at_%H\n"
    )
    rc.chmod(0o600)
    _run(["mpop", "-q", "-C", str(rc), "t"], home)
    return uidls / f"{user.name}_at_{dovecot.host}"


def _getmail6(dovecot: Dovecot, user: MailUser, home: Path) -> Path:
    """Run the real getmail6 (delete = false) and return its oldmail file."""
    _need("getmail")
    getmaildir = home / ".getmail"
    getmaildir.mkdir(exist_ok=True)
    rc = getmaildir / "getmailrc"
    rc.write_text(
        f"[retriever]\ntype = SimplePOP3SSLRetriever\nserver = {dovecot.host}\n"
        f"port = {dovecot.pop3s_port}\nusername = {user.name}\npassword = {user.password}\n"
        f"ca_certs = {dovecot.ca_file}\n"
        # MDA_external: getmail's Maildir destination refuses to deliver as root (CI).
        "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "cat > {_peer_maildir(home)}/new/getmail.$$")\n'
        "allow_root_commands = true\n[options]\nread_all = false\ndelete = false\nverbose = 0\n"
    )
    _run(["getmail", "--getmaildir", str(getmaildir), "--rcfile", str(rc)], home)
    return getmaildir / f"oldmail-{dovecot.host}-{dovecot.pop3s_port}-{user.name}"


def _fetchmail(dovecot: Dovecot, user: MailUser, home: Path) -> Path:
    """Run the real fetchmail (keep) and return its .fetchids."""
    _need("fetchmail")
    rc = home / ".fetchmailrc"
    # fetchmail checks only DNS names against the certificate (Dovecot's names 127.0.0.1
    # as an IP address), so certificate checks are off for this loopback-only test peer.
    rc.write_text(
        f"set no syslog\npoll {dovecot.host} with proto POP3 service {dovecot.pop3s_port} uidl\n"
        f'  user "{user.name}" there with password "{user.password}" is "root" here keep ssl'
        f" no sslcertck\n  mda \"/bin/sh -c 'cat > {_peer_maildir(home)}/new/f.$$'\"\n"
    )
    rc.chmod(0o600)
    ids = home / ".fetchids"
    _run(["fetchmail", "-s", "-f", str(rc), "-i", str(ids), "--nodetach", "--nosyslog"], home)
    return ids


PEERS = {"mpop": _mpop, "getmail6": _getmail6, "fetchmail": _fetchmail}


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_import_state_then_sync_fetches_only_what_the_peer_had_not(
    peer: str,
    dovecot: Dovecot,
    mail_user: MailUser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The peer fetched 3 messages and left them; after the import popsync fetches only the 2
    that arrived later, and ignores another mailbox in the same file."""
    home = tmp_path / "home"
    home.mkdir()
    early = [make_message(i, tag="early") for i in range(3)]
    dovecot.deliver_many(mail_user, early)
    state = PEERS[peer](dovecot, mail_user, home)
    assert len(maildir_messages(home / "PeerMail")) == 3
    if peer == "mpop":
        with state.open("a") as handle:  # a second mailbox in the same file
            handle.write(" 1 pop.other.example someone\nOTHER-UIDL\n")
    if peer == "fetchmail":
        with state.open("a") as handle:
            handle.write("some@one@pop.other.example OTHER-UIDL\n")
    late = [make_message(i, tag="late") for i in range(2)]
    dovecot.deliver_many(mail_user, late)
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir")
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})

    assert main(["import-state", peer, str(state), "--account", "acct", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"acct: imported 3 UIDL(s) from {state} as delivered, 0 already known")
    if peer == "mpop":
        assert "ignored 1 of other mailboxes (someone@pop.other.example: 1)" in out
    if peer == "fetchmail":
        assert "ignored 1 of other mailboxes (some@one@pop.other.example: 1)" in out

    assert main(["--once", "--no-progress", "-c", str(config)]) == 0
    assert "acct: ok, 2 fetched" in capsys.readouterr().out
    delivered = sorted(maildir_messages(tmp_path / "Maildir"))
    assert delivered == sorted(stored_form(m) for m in late)
    # Importing again changes nothing.
    assert main(["import-state", peer, str(state), "--account", "acct", "-c", str(config)]) == 0
    assert "imported 0 UIDL(s)" in capsys.readouterr().out


def test_import_state_refuses_other_users_getmail_file(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A getmail6 file named for another user imports nothing and says whose it is."""
    other = tmp_path / f"oldmail-{dovecot.host}-995-someone.else"
    other.write_bytes(b"UIDL-1\x001700000000\n")
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir")
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert (
        main(["import-state", "getmail6", str(other), "--account", "acct", "-c", str(config)]) == 0
    )
    assert "imported 0 UIDL(s)" in (out := capsys.readouterr().out)
    assert f"ignored 1 of other mailboxes ({other.name}: 1)" in out


def test_first_run_mark_seen_fetches_only_later_mail(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """first_run = "mark_seen": the first run fetches nothing, the next only new mail."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(4)])
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", first_run="mark_seen")
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert main(["--once", "--dry-run", "-c", str(config)]) == 0
    assert "acct: dry run: first run would mark 4 message(s) as seen" in capsys.readouterr().out
    assert main(["--once", "--no-progress", "-c", str(config)]) == 0
    assert "0 fetched (0 B), 0 skipped, 0 deleted, 4 marked seen" in capsys.readouterr().out
    assert maildir_messages(tmp_path / "Maildir") == []
    dovecot.deliver(mail_user, make_message(99))
    assert main(["--once", "--no-progress", "-c", str(config)]) == 0
    assert "acct: ok, 1 fetched" in capsys.readouterr().out
    assert len(maildir_messages(tmp_path / "Maildir")) == 1


def test_mark_seen_command_and_ls_states(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mark-seen records what is there; ls shows each message's state and decoded headers."""
    dovecot.deliver(mail_user, make_message(1))
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", max_message_size="1k")
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert main(["mark-seen", "acct", "-c", str(config)]) == 0
    assert "acct: marked 1 message(s) as seen; 0 were already known" in capsys.readouterr().out
    dovecot.deliver(
        mail_user,
        b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000"
        b"\r\nSubject: =?utf-8?b?R3LDvMOfZQ==?= \x1b[31mred\r\n\r\nbody\r\n",
    )
    dovecot.deliver(mail_user, make_message(3, body_size=5000))
    assert main(["ls", "acct", "--headers", "--json", "-c", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["number"], r["state"]) for r in rows] == [
        (1, "delivered"),
        (2, "new"),
        (3, "too large"),
    ]
    assert rows[1]["headers"] == {
        "from": "Jörg <j@example.org>",
        "date": "Mon, 1 Jan 2024 00:00:00 +0000",
        "subject": "Grüße \\x1b[31mred",
    }
    assert main(["ls", "acct", "-c", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "3 message(s) on the server"
    assert lines[0].split() == ["number", "size", "uidl", "state"]
    assert lines[2].split()[0] == "2"
    assert lines[2].split()[-1] == "new"
    assert len(dovecot.messages(mail_user)) == 3  # ls never deletes


def test_dry_run_changes_nothing(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run names what it would fetch and delete; server, Maildir and store stay as they
    were (the store is not even created)."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(2)])
    keys = dovecot_keys(dovecot, mail_user, tmp_path / "Maildir", delete="after_delivery")
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert main(["--once", "--dry-run", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "acct: dry run: would fetch 2 message(s)" in out
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "Maildir").exists()
    assert main(["--once", "--no-progress", "-c", str(config)]) == 0
    capsys.readouterr()
    dovecot.deliver(mail_user, make_message(7))
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        before = only_entries(store)
    assert len(before) == 2
    assert main(["--once", "--dry-run", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "would fetch 1 message(s)" in out
    assert len(dovecot.messages(mail_user)) == 1
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        assert only_entries(store) == before


def test_dry_run_names_what_it_would_delete(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With delete = "after_days", a message delivered long enough ago is named for DELE,
    and the dry run still deletes nothing."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(2)])
    keys = dovecot_keys(
        dovecot, mail_user, tmp_path / "Maildir", delete="after_days", delete_after_days=1
    )
    config = write_config(tmp_path / "c.toml", tmp_path / "state", {"acct": keys})
    assert main(["ls", "acct", "--json", "-c", str(config)]) == 0
    first = json.loads(capsys.readouterr().out)[0]["uidl"]
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        mailbox = f"{mail_user.name}@{dovecot.host}:{dovecot.pop3s_port}"
        store.mark_delivered(mailbox, [(first.encode(), "")], time.time() - 3 * 86400)
    assert main(["--once", "--dry-run", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "would fetch 1 message(s)" in out
    assert "delete 1," in out
    assert f"  delete: {first}" in out
    assert len(dovecot.messages(mail_user)) == 2
