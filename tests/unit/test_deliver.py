"""Unit tests for the delivery targets' pure parts and local behaviour."""

from __future__ import annotations

import mailbox
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from popsync.deliver.base import (
    Delivered,
    DeliveryDeferred,
    DeliveryFailed,
    Rejected,
    Spooled,
    Temporary,
    deferral,
    envelope_sender,
    sanitize,
)
from popsync.deliver.lmtp import LmtpTarget, Reply, dot_stuffed, parse_address
from popsync.deliver.mbox import MboxTarget, from_line, mboxrd_quoted
from popsync.deliver.mda import MdaTarget, expand_argv
from popsync.seen import SeenStore


def _spool_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "msg"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/run/dovecot/lmtp", "/run/dovecot/lmtp"),
        ("localhost:24", ("localhost", 24)),
        ("[::1]:2424", ("::1", 2424)),
    ],
)
def test_parse_address(address: str, expected: object) -> None:
    """unix:/path and HOST:PORT forms are understood."""
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["unix:relative", "host", "host:0", "a b:24", "host:99999"])
def test_parse_address_refuses_nonsense(address: str) -> None:
    """Relative sockets, missing or bad ports are errors."""
    with pytest.raises(ValueError, match=r"expected|absolute|range"):
        parse_address(address)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 18])
def test_dot_stuffing_is_chunk_independent(tmp_path: Path, chunk: int) -> None:
    """Every line starting with a dot gets one more, wherever a chunk ends."""
    data = b".a\r\nb\r\n..c\r\n.\r\nd.e\r\n"
    body = b"".join(dot_stuffed(_spool_file(tmp_path, data), chunk))
    assert body == b"..a\r\nb\r\n...c\r\n..\r\nd.e\r\n.\r\n"


def test_dot_stuffing_ends_an_unterminated_message(tmp_path: Path) -> None:
    """A message without a final line end gets CRLF before the terminator."""
    assert b"".join(dot_stuffed(_spool_file(tmp_path, b"x\r\nlast"))) == b"x\r\nlast\r\n.\r\n"


def test_reply_outcomes() -> None:
    """2xx delivered, 4xx temporary, 5xx rejected; the text is sanitized."""
    assert Reply(250, ["ok"]).outcome("lmtp:x") == Delivered("lmtp:x")
    assert Reply(451, ["later"]).outcome() == Temporary("LMTP 451 later")
    assert Reply(552, ["full\x1b[2J"]).outcome() == Rejected("LMTP 552 full\\x1b[2J")


def test_envelope_sender_reads_the_first_return_path_only(tmp_path: Path) -> None:
    """The Return-Path of the header block is the sender; body lines and junk are ignored."""
    head = b"Return-Path: <bounce@example.org>\r\nSubject: x\r\n\r\nReturn-Path: <no@x>\r\n"
    assert envelope_sender(_spool_file(tmp_path, head)) == "bounce@example.org"
    for junk in (b"Return-Path: <a b@x>\r\n\r\n", b"Subject: y\r\n\r\nReturn-Path: <z@x>\r\n"):
        assert envelope_sender(_spool_file(tmp_path, junk)) == ""


def test_sanitize_and_deferral() -> None:
    """Foreign text becomes one bounded printable line; failed beats deferred."""
    assert sanitize(b" a\r\nb\x00c\n") == "a\\x0d\\x0ab\\x00c"
    assert sanitize("x" * 50 + "END", 10, tail=True) == "...xxxxxxxEND"
    assert deferral([Delivered("n")]) is None
    deferred = deferral([Delivered("n"), Temporary("busy")])
    assert isinstance(deferred, DeliveryDeferred)
    assert str(deferred) == "delivery deferred for 1 message(s): busy"
    assert isinstance(deferral([Temporary("busy"), Temporary("bad", failed=True)]), DeliveryFailed)


def test_unreachable_lmtp_defers_every_message(tmp_path: Path) -> None:
    """No server at the socket: every message of the batch is Temporary, none lost."""
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{tmp_path}/none", recipient="r")
    with target.open() as msg:
        msg.write(b"Subject: x\r\n\r\ny\r\n")
    target.seal()
    outcomes = target.hand_over([Spooled(b"u", msg.name, msg.size)])
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], Temporary)
    assert msg.path.read_bytes() == b"Subject: x\r\n\r\ny\r\n"  # still spooled


def test_expand_argv_placeholders() -> None:
    """{account}, {user} and {uidl_hex} are replaced; doubled braces are literal."""
    argv = ["/bin/x", "-a", "{account}", "--user={user}", "{uidl_hex}", "{{literal}}"]
    assert expand_argv(argv, account="work", user="me", uidl=b"A/1") == [
        "/bin/x",
        "-a",
        "work",
        "--user=me",
        "412f31",
        "{literal}",
    ]


def test_mda_gets_the_spool_file_on_stdin_and_stderr_is_kept_short(tmp_path: Path) -> None:
    """The command reads the message from stdin; a failure keeps only the end of stderr."""
    out = tmp_path / "out"
    ok = MdaTarget(
        tmp_path / "spool", argv=["/bin/sh", "-c", f"cat > {out}"], account="a", user="u"
    )
    with ok.open() as msg:
        msg.write(b"Subject: x\r\n\r\nbody\r\n")
    item = Spooled(b"u1", msg.name, msg.size)
    assert ok.hand_over([item]) == [Delivered("mda:7531")]
    assert out.read_bytes() == b"Subject: x\n\nbody\n"  # LF by default
    noisy = "head -c 100000 /dev/zero | tr '\\0' e >&2; echo TAIL >&2; exit 2"
    bad = MdaTarget(tmp_path / "spool", argv=["/bin/sh", "-c", noisy], account="a", user="u")
    (outcome,) = bad.hand_over([item])
    assert isinstance(outcome, Temporary)
    assert outcome.failed
    assert outcome.reason.startswith("MDA /bin/sh exited with status 2: ...eee")
    assert outcome.reason.endswith("eeeTAIL")  # the end of stderr is kept
    assert len(outcome.reason) < 600
    missing = MdaTarget(tmp_path / "spool", argv=["/nonexistent/mda"], account="a", user="u")
    (gone,) = missing.hand_over([item])
    assert isinstance(gone, Temporary)
    assert gone.failed
    assert "cannot run" in gone.reason


def test_from_line_and_mboxrd_quoting(tmp_path: Path) -> None:
    """asctime From lines; every >*From line gains a >; CRLF becomes LF; blank line after."""
    assert from_line("", 0) == b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n"
    data = b"From: a\r\n\r\nFrom x\r\n>From y\r\nnot From z\r\nend"
    for chunk in (1, 5, 1 << 18):
        quoted = b"".join(mboxrd_quoted(_spool_file(tmp_path, data), chunk))
        assert quoted == b"From: a\n\n>From x\n>>From y\nnot From z\nend\n\n"


def test_mbox_appends_under_both_locks_and_mailbox_reads_it(tmp_path: Path) -> None:
    """Messages are appended with a From line; the dotlock is gone afterwards."""
    path = tmp_path / "mbox"
    target = MboxTarget(tmp_path / "spool", mbox=path)
    items = []
    for i in range(3):
        with target.open() as msg:
            msg.write(b"Subject: m%d\r\n\r\nFrom here\r\n" % i)
        items.append(Spooled(b"u%d" % i, msg.name, msg.size))
    assert all(isinstance(o, Delivered) for o in target.hand_over(items))
    target.release([i.name for i in items])
    box = mailbox.mbox(path)
    assert [m["subject"] for m in box] == ["m0", "m1", "m2"]
    assert not (tmp_path / "mbox.lock").exists()
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_mbox_waits_for_a_live_dotlock_and_breaks_a_dead_one(tmp_path: Path) -> None:
    """A dotlock of a live process blocks; one naming a dead PID on this host is stale."""
    path = tmp_path / "mbox"
    lock = tmp_path / "mbox.lock"
    target = MboxTarget(tmp_path / "spool", mbox=path)
    with target.open() as msg:
        msg.write(b"Subject: x\r\n\r\ny\r\n")
    item = Spooled(b"u", msg.name, msg.size)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    lock.write_text(f"{child}:{os.uname().nodename}\n")
    assert target.hand_over([item]) == [Delivered("mbox:0")]
    lock.write_text(f"{os.getpid()}:{os.uname().nodename}\n")
    released = threading.Timer(0.5, lock.unlink)
    size, started = path.stat().st_size, time.monotonic()
    released.start()
    assert target.hand_over([item]) == [Delivered(f"mbox:{size}")]
    assert time.monotonic() - started >= 0.4  # it waited for the live lock
    released.join()


def test_mbox_recovery_uses_the_journal(tmp_path: Path) -> None:
    """A complete append is not repeated; a partial one is cut back and done again."""
    path = tmp_path / "mbox"
    target = MboxTarget(tmp_path / "spool", mbox=path)
    with target.open() as msg:
        msg.write(b"Subject: x\r\n\r\ny\r\n")
    item = Spooled(b"u", msg.name, msg.size)
    target.hand_over([item])  # crash here: the journal stays, the commit never happened
    full = path.read_bytes()
    assert target.recover([item]) == [Delivered("mbox:0")]
    assert path.read_bytes() == full
    path.write_bytes(full[:10])  # as if killed mid-append
    assert target.recover([item]) == [Delivered("mbox:0")]
    assert path.read_bytes() == full


def test_seen_store_migrates_to_rejected_and_keeps_rows(tmp_path: Path) -> None:
    """A version-1 database gains the rejected state without losing a row."""
    db = tmp_path / "popsync.sqlite3"
    with SeenStore.open(db) as store:
        store.add_pending("a", [(b"p", "n1", 1)])
        store.mark_delivered("a", [(b"d", "n2")], at=1.0)
        store.mark_rejected("a", [(b"p", "LMTP 552 full")], at=2.0)
        store.mark_rejected("a", [(b"d", "must not change a delivered row")], at=2.0)
        entries = store.entries("a")
    assert (entries[b"p"].state, entries[b"p"].name) == ("rejected", "LMTP 552 full")
    assert entries[b"d"].state == "delivered"
    conn = sqlite3.connect(db)
    try:
        check = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'seen'").fetchone()[0]
    finally:
        conn.close()
    assert "'rejected'" in check


def test_mbox_from_line_is_dated_by_the_spool_file(tmp_path: Path) -> None:
    """The From line carries the message's arrival time, so a redone append is identical."""
    path = tmp_path / "mbox"
    target = MboxTarget(tmp_path / "spool", mbox=path)
    with target.open() as msg:
        msg.write(b"Subject: x\r\n\r\ny\r\n")
    os.utime(target.path(msg.name), (1_000_000_000, 1_000_000_000))
    target.hand_over([Spooled(b"u", msg.name, msg.size)])
    assert path.read_bytes().startswith(b"From MAILER-DAEMON Sun Sep  9 01:46:40 2001\n")
