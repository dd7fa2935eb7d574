"""MDA delivery through dovecot-lda, procmail and maildrop; mbox delivery read back."""

from __future__ import annotations

import io
import mailbox
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, DovecotLmtp, MailUser
from popsync.client import Pop3Client
from popsync.errors import ExitCode
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.conftest import in_ci
from tests.corpus import CORPUS, served
from tests.integration.test_deliver_lmtp import strip_trace
from tests.synchelp import (
    TomlValue,
    assert_exactly_once,
    dovecot_account,
    make_message,
    only_entries,
    stored_form,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


def _need(program: str) -> str:
    path = shutil.which(program) or (program if Path(program).is_file() else None)
    if path is None:
        if in_ci():
            pytest.fail(f"CI is set but {program} is not installed (./dev setup installs it)")
        pytest.skip(f"{program} is not installed")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """A fresh seen-store in the test's state directory."""
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as opened:
        yield opened


def _sync(
    dovecot: Dovecot, user: MailUser, tmp_path: Path, store: SeenStore, **keys: TomlValue
) -> RunResult:
    account = dovecot_account(dovecot, user, tmp_path / "unused", tmp_path / "state", **keys)[1]
    return sync_account(account, store)


def _maildir_files(where: Path) -> list[bytes]:
    return [p.read_bytes() for sub in ("new", "cur") for p in sorted((where / sub).iterdir())]


def _make_maildir(where: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (where / sub).mkdir(parents=True)
    return where


def test_dovecot_lda_as_mda_runs_sieve(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """dovecot-lda -d USER gets each message on stdin once; Sieve files the list mail."""
    lda = _need("/usr/lib/dovecot/dovecot-lda")
    rcpt = lmtp_server.new_user("l")
    lmtp_server.set_sieve(
        rcpt, 'require ["fileinto"];\nif header :contains "subject" "list" { fileinto "Lists"; }\n'
    )
    plain = [make_message(i, tag="plain") for i in range(3)]
    lists = [make_message(i, tag="list") for i in range(2)]
    dovecot.deliver_many(mail_user, plain + lists)
    argv = [lda, "-c", str(lmtp_server.config_file), "-d", "{user}-ignored", "-e"]
    argv[4] = rcpt.name  # -d takes the Dovecot user; {account}/{user} are popsync's
    result = _sync(dovecot, mail_user, tmp_path, store, deliver="mda", mda=argv)
    assert result.outcome == "ok", result.error
    assert result.fetched == 5
    assert_exactly_once(
        [strip_trace(m, required=False) for m in lmtp_server.folder_messages(rcpt)], plain
    )
    assert_exactly_once(
        [strip_trace(m, required=False) for m in lmtp_server.folder_messages(rcpt, "Lists")], lists
    )


def test_procmail_and_maildrop_as_mda_get_lf_messages(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """procmail and maildrop deliver the corpus with LF line ends, each message once."""
    procmail, maildrop = _need("procmail"), _need("maildrop")
    messages = [CORPUS[name]() for name in CORPUS]
    expected = [served(m) for m in messages]
    for name, argv, rc in [
        ("procmail", [procmail, "-m"], "MAILDIR={dir}/\nDEFAULT={dir}/\n"),
        ("maildrop", [maildrop], 'to "{dir}/"\n'),
    ]:
        box = _make_maildir(tmp_path / name)
        rcfile = tmp_path / f"{name}.rc"
        rcfile.write_text(rc.format(dir=box))
        rcfile.chmod(0o600)
        dovecot.deliver_many(mail_user, messages)
        result = _sync(
            dovecot,
            mail_user,
            tmp_path,
            store,
            deliver="mda",
            mda=[*argv, str(rcfile)],
            delete="after_delivery",
        )
        assert result.outcome == "ok", (name, result.error)
        assert_exactly_once(_maildir_files(box), expected)


def test_mda_exit_codes_defer_or_fail_and_keep_the_message(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """Exit 75 ends the run 75, another status 74 with stderr; nothing is lost or DELEd."""
    message = make_message(1, tag="mda")
    dovecot.deliver(mail_user, message)
    out = tmp_path / "delivered.eml"
    keys: dict[str, TomlValue] = {"deliver": "mda", "delete": "after_delivery"}
    tempfail = ["/bin/sh", "-c", "cat >/dev/null; echo busy >&2; exit 75"]
    result = _sync(dovecot, mail_user, tmp_path, store, mda=tempfail, **keys)
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    broken = ["/bin/sh", "-c", "cat >/dev/null; printf 'bad\\033[31m recipe\\n' >&2; exit 3"]
    result = _sync(dovecot, mail_user, tmp_path, store, mda=broken, **keys)
    assert (result.outcome, result.exit_code) == ("local_io", ExitCode.LOCAL_IO)
    assert "exited with status 3: bad\\x1b[31m recipe" in (result.error or "")
    assert "\x1b" not in (result.error or "")
    assert len(dovecot.messages(mail_user)) == 1
    works = ["/bin/sh", "-c", f'cat > {out}; echo "$0" >> {out}.args', "{account}:{uidl_hex}"]
    result = _sync(dovecot, mail_user, tmp_path, store, mda=works, **keys)
    assert result.outcome == "ok", result.error
    assert (result.recovered, result.fetched, result.deleted) == (1, 0, 1)
    assert out.read_bytes() == stored_form(message)
    uidl = next(iter(only_entries(store)))
    assert (tmp_path / "delivered.eml.args").read_text() == f"acct:{uidl.hex()}\n"


def test_mda_time_limit_kills_and_defers(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """An MDA past mda_timeout is killed; the run ends 75 and the message stays pending."""
    dovecot.deliver(mail_user, make_message(2, tag="slow"))
    slow = ["/bin/sh", "-c", "sleep 30"]
    result = _sync(dovecot, mail_user, tmp_path, store, deliver="mda", mda=slow, mda_timeout="1s")
    assert result.exit_code == ExitCode.TEMPORARY
    assert "timed out after 1s" in (result.error or "")
    assert result.duration < 15
    assert {e.state for e in only_entries(store).values()} == {"pending"}


def _unquote(message: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", message)


def test_mbox_is_mboxrd_readable_by_python_and_unquotes_to_the_corpus(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """The corpus plus From-line bait appended to an mbox reads back message by message."""
    messages = [CORPUS[name]() for name in CORPUS]
    messages.append(b"Subject: from lines\r\n\r\nFrom here\r\n>From there\r\n>>From x\r\n")
    messages.append(b"Return-Path: <bounce@example.org>\r\nSubject: sender\r\n\r\nx\r\n")
    dovecot.deliver_many(mail_user, messages)
    path = tmp_path / "mail" / "inbox.mbox"
    path.parent.mkdir()
    path.write_bytes(b"From old@example.org Mon Jan  1 00:00:00 2024\nSubject: old\n\nold\n\n")
    result = _sync(dovecot, mail_user, tmp_path, store, deliver="mbox", mbox=str(path))
    assert result.outcome == "ok", result.error
    box = mailbox.mbox(path, create=False)
    try:
        read = [_unquote(m.as_bytes(unixfrom=False)) for m in box]
        froms = [m.get_from() for m in box]
    finally:
        box.close()
    assert len(read) == len(messages) + 1
    assert froms[0] == "old@example.org Mon Jan  1 00:00:00 2024"
    assert froms[-1].startswith("bounce@example.org ")
    assert all(f.startswith("MAILER-DAEMON ") for f in froms[1:-1])
    raw = path.read_bytes()
    assert b"\n>From here\n>>From there\n>>>From x\n" in raw
    assert b"\r\n" not in raw[raw.index(b"Subject: line of 2100") :]
    # The served messages with LF line ends (converted once: "\r\r\n" stays "\r\n").
    assert_exactly_once(_split_raw(raw)[1:], [served(m) for m in messages])
    assert not path.with_name("inbox.mbox.lock").exists()


def _split_raw(raw: bytes) -> list[bytes]:
    """Messages of an mboxrd file, unquoted, without From lines and separator lines."""
    parts = re.split(rb"(?:\A|\n)From [^\n]*\n", raw)[1:]
    # The split ate each separator line's LF but the last one.
    parts[-1] = parts[-1].removesuffix(b"\n")
    return [_unquote(part) for part in parts]


@pytest.fixture
def mbox_dovecot() -> Iterator[tuple[Dovecot, Path]]:
    """A second Dovecot whose users' INBOX is ``<dir>/<user>.mbox`` (mail_location mbox:)."""
    root = Path(tempfile.mkdtemp(prefix="popsync-mbox-dovecot-"))
    root.chmod(0o711)
    boxes, homes = root / "mboxes", root / "homes"
    for where in (boxes, homes):
        where.mkdir()
        where.chmod(0o777)  # Dovecot's mail processes run as nobody under root
    server = Dovecot(
        root / "server",
        extra_config=f"mail_location = mbox:{homes}/%u:INBOX={boxes}/%u.mbox\n",
    )
    try:
        with server:
            yield server, boxes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_mbox_is_read_back_by_dovecot(
    dovecot: Dovecot,
    mail_user: MailUser,
    mbox_dovecot: tuple[Dovecot, Path],
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """Dovecot (mbox: mail_location) serves every corpus message, byte-exact after unquoting."""
    reader, boxes = mbox_dovecot
    messages = [CORPUS[name]() for name in CORPUS]
    messages.append(b"Subject: from lines\r\n\r\nFrom here\r\n>From there\r\n")
    dovecot.deliver_many(mail_user, messages)
    path = boxes / "reader.mbox"
    result = _sync(dovecot, mail_user, tmp_path, store, deliver="mbox", mbox=str(path))
    assert result.outcome == "ok", result.error
    path.chmod(0o666)
    client = Pop3Client.connect(reader.host, reader.pop3_port, tls="none", timeout=10)
    try:
        client.login("reader", reader.password, mechanism="user", allow_plaintext=True)
        count = client.stat()[0]
        served_back = []
        for msgnum in range(1, count + 1):
            sink = io.BytesIO()
            client.retr_into(msgnum, sink)
            served_back.append(_unquote(sink.getvalue()))
        client.quit()
    finally:
        client.close()
    # Dovecot serves CRLF; compare with the served originals, converted once to LF and back.
    expected = [served(m).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in messages]
    assert_exactly_once(served_back, expected, line_endings="crlf")
