"""The sync engine against a real Dovecot: byte-exact delivery, re-runs and delete policies."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.config import Account
from popsync.errors import ExitCode
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.synchelp import (
    assert_exactly_once,
    dovecot_account,
    maildir_files,
    maildir_messages,
    make_message,
    only_entries,
    stored_form,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

DAY = 86400.0
T0 = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """A fresh seen-store in the test's state directory."""
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as opened:
        yield opened


def _account(dovecot: Dovecot, user: MailUser, tmp_path: Path, **extra: str | int) -> Account:
    return dovecot_account(dovecot, user, tmp_path / "Maildir", tmp_path / "state", **extra)[1]


def _sync(account: Account, store: SeenStore, now: float | None = None) -> RunResult:
    result = (
        sync_account(account, store)
        if now is None
        else sync_account(account, store, clock=lambda: now)
    )
    assert result.outcome == "ok", result.error
    return result


def _odd_messages() -> list[bytes]:
    """Messages that stress the wire format: dots, bare LF, long lines, a big body."""
    return [
        make_message(1),
        b"Subject: dots\r\n\r\n.\r\n..\r\n...x\r\n.\r\n",
        b"Subject: bare lf\n\nline one\nline two\n",
        b"Subject: long line\r\n\r\n" + b"y" * 70_000 + b"\r\n",
        b"Subject: big\r\n\r\n" + b"".join(b"%06d " % i + b"z" * 90 + b"\r\n" for i in range(5000)),
        b"Subject: no final newline\r\n\r\nlast line without CRLF",
        b"Subject: binary-ish\r\n\r\n"
        + bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"")
        + b"\r\n",
    ]


def test_first_run_fetches_everything_byte_exact(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """The first run delivers every message byte-for-byte as the server stores it."""
    dovecot.deliver_many(mail_user, _odd_messages())
    account = _account(dovecot, mail_user, tmp_path)
    result = _sync(account, store)
    on_server = dovecot.messages(mail_user)
    assert result.fetched == len(on_server) == 7
    assert result.on_server == 7
    # Dovecot serves what it stores with CRLF line ends; compare with that normalisation.
    expected = [re.sub(rb"(?<!\r)\n", b"\r\n", m) for m in on_server]
    expected[-2] += b"\r\n"  # POP3 always ends a message with CRLF before the terminator
    # bytes counts what came over the wire; the files hold that with LF line ends.
    assert result.bytes == sum(len(m) for m in expected)
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), expected)
    assert not list((tmp_path / "Maildir" / "tmp").iterdir())


def test_crlf_line_endings_keep_the_wire_form_byte_exact(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """With line_endings = "crlf" every file is the served message byte for byte, W= == S=."""
    dovecot.deliver_many(mail_user, _odd_messages())
    _sync(_account(dovecot, mail_user, tmp_path, line_endings="crlf"), store)
    expected = [re.sub(rb"(?<!\r)\n", b"\r\n", m) for m in dovecot.messages(mail_user)]
    expected[-2] += b"\r\n"
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), expected, line_endings="crlf")
    for path in maildir_files(tmp_path / "Maildir"):
        size = path.stat().st_size
        assert path.name.endswith(f",S={size},W={size}"), path.name


def test_lf_default_keeps_a_lone_cr(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """The LF default converts CRLF only: a CR inside a line stays as it is."""
    dovecot.deliver(mail_user, b"Subject: cr\r\n\r\nbefore\rafter\r\nend\r\n")
    _sync(_account(dovecot, mail_user, tmp_path), store)
    assert maildir_messages(tmp_path / "Maildir") == [b"Subject: cr\n\nbefore\rafter\nend\n"]


def test_trace_headers_are_prepended_in_rfc5322_form(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """add_headers prepends Delivered-To, Received and X-Popsync-UIDL; the rest is unchanged."""
    messages = [make_message(i) for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    account = _account(dovecot, mail_user, tmp_path)
    account = account.model_copy(
        update={"add_headers": ("x-popsync-uidl", "received", "delivered-to")}
    )
    _sync(account, store)
    uidls = {e.uidl for e in only_entries(store).values()}
    bodies = {stored_form(m) for m in messages}
    for data in maildir_messages(tmp_path / "Maildir"):
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert parsed["Delivered-To"] == mail_user.name
        received = " ".join(str(parsed["Received"]).split())
        assert received.startswith(f"from [{dovecot.host}] by ")  # an IP: a domain literal
        assert f"for {mail_user.name};" in received
        date = email.utils.parsedate_to_datetime(received.rsplit(";", 1)[1].strip())
        assert abs(date.timestamp() - time.time()) < 600
        uidl = parsed["X-Popsync-UIDL"].encode()
        assert uidl in uidls
        assert f"(UIDL {uidl.decode()})" in received
        # Exactly three fields were added in front; the message follows unchanged.
        head = data.split(b"\nX-Popsync-UIDL: " + uidl + b"\n", 1)
        assert head[0].startswith(b"Delivered-To: ")
        assert head[1] in bodies


def test_maildir_names_carry_the_right_size(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """Every name is `<unique>,S=<size>,W=<CRLF size>` with the real sizes and no UIDL."""
    dovecot.deliver_many(mail_user, [make_message(i, 100 * i) for i in range(1, 6)])
    _sync(_account(dovecot, mail_user, tmp_path), store)
    files = maildir_files(tmp_path / "Maildir")
    assert len(files) == 5
    uidls = {e.uidl.decode() for e in only_entries(store).values()}
    pattern = r"\d+\.M\d+P\d+Q\d+R[0-9a-f]{16}\.[^,/:]+,S=(\d+),W=(\d+)"
    for path in files:
        match = re.fullmatch(pattern, path.name)
        assert match, path.name
        assert int(match.group(1)) == path.stat().st_size
        assert int(match.group(2)) == len(path.read_bytes().replace(b"\n", b"\r\n"))
        assert int(match.group(2)) > int(match.group(1))  # LF stored, so W= counts more
        assert not any(uidl in path.name for uidl in uidls)
    assert {e.state for e in only_entries(store).values()} == {"delivered"}


def test_second_run_fetches_nothing_and_new_mail_is_fetched(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """A re-run fetches nothing; mail that arrives between runs is fetched next time."""
    first = [make_message(i) for i in range(10)]
    dovecot.deliver_many(mail_user, first)
    account = _account(dovecot, mail_user, tmp_path)
    assert _sync(account, store).fetched == 10
    again = _sync(account, store)
    assert (again.fetched, again.on_server) == (0, 10)
    later = [make_message(i, tag="late") for i in range(3)]
    dovecot.deliver_many(mail_user, later)
    third = _sync(account, store)
    assert (third.fetched, third.on_server) == (3, 13)
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), first + later)


def test_starttls_and_pipelining_off_work_too(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """STARTTLS on the plain port with pipelining turned off still fetches everything."""
    messages = [make_message(i) for i in range(5)]
    dovecot.deliver_many(mail_user, messages)
    account = _account(
        dovecot, mail_user, tmp_path, tls="starttls", port=dovecot.pop3_port, pipelining="off"
    )
    assert _sync(account, store).fetched == 5
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)


def test_delete_after_delivery_empties_the_server(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """delete = "after_delivery" removes exactly the delivered messages from the server."""
    messages = [make_message(i) for i in range(12)]
    dovecot.deliver_many(mail_user, messages)
    account = _account(dovecot, mail_user, tmp_path, delete="after_delivery")
    result = _sync(account, store)
    assert (result.fetched, result.deleted) == (12, 12)
    assert dovecot.messages(mail_user) == []
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), messages)
    assert all(e.deleted_at is not None for e in only_entries(store).values())
    # The next runs see an empty mailbox: the deleted messages' rows are forgotten only after
    # forget_after (30 days) and three complete listings without them.
    now = result.started
    after = _sync(account, store, now + DAY)
    assert (after.fetched, after.on_server, after.forgotten) == (0, 0, 0)
    assert all(e.vanished_at == now + DAY for e in only_entries(store).values())
    assert _sync(account, store, now + 2 * DAY).forgotten == 0
    assert _sync(account, store, now + 31 * DAY).forgotten == 12
    assert only_entries(store) == {}


def test_delete_never_keeps_the_server_intact(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """delete = "never" (the default) leaves every message on the server, run after run."""
    messages = [make_message(i) for i in range(6)]
    dovecot.deliver_many(mail_user, messages)
    account = _account(dovecot, mail_user, tmp_path)
    assert account.delete == "never"
    for _ in range(2):
        assert _sync(account, store).deleted == 0
    assert sorted(dovecot.messages(mail_user)) == sorted(messages)


def test_delete_after_days_uses_the_injected_clock(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """delete_after_days deletes only messages delivered at least that many days ago."""
    old = [make_message(i, tag="old") for i in range(4)]
    young = [make_message(i, tag="young") for i in range(3)]
    account = _account(dovecot, mail_user, tmp_path, delete="after_days", delete_after_days=3)
    dovecot.deliver_many(mail_user, old)
    assert _sync(account, store, T0).fetched == 4
    assert _sync(account, store, T0 + 2.9 * DAY).deleted == 0
    dovecot.deliver_many(mail_user, young)
    # Day 5: the old ones are 5 days old and go; the young ones are fetched now.
    fifth = _sync(account, store, T0 + 5 * DAY)
    assert (fifth.fetched, fifth.deleted) == (3, 4)
    assert sorted(dovecot.messages(mail_user)) == sorted(young)
    assert _sync(account, store, T0 + 7.9 * DAY).deleted == 0
    assert _sync(account, store, T0 + 8 * DAY).deleted == 3
    assert dovecot.messages(mail_user) == []
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), old + young)


def test_max_message_size_skips_and_leaves_on_server(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """A message over max_message_size is skipped, remembered, and stays on the server."""
    small = [make_message(i, 200) for i in range(3)]
    big = make_message(99, 20_000)
    dovecot.deliver_many(mail_user, [small[0], big, small[1], small[2]])
    account = _account(
        dovecot, mail_user, tmp_path, max_message_size="10KB", delete="after_delivery"
    )
    result = _sync(account, store)
    assert (result.fetched, result.skipped, result.deleted) == (3, 1, 3)
    assert any("max_message_size" in w for w in result.warnings)
    assert_exactly_once(maildir_messages(tmp_path / "Maildir"), small)
    assert dovecot.messages(mail_user) == [big]
    # Remembered as too large with its size: skipped next time without a new warning.
    (entry,) = [e for e in only_entries(store).values() if e.state == "too_large"]
    assert entry.size is not None
    assert entry.size > 20_000
    again = _sync(account, store)
    assert (again.skipped, again.too_large, again.warnings) == (1, 1, [])
    assert dovecot.messages(mail_user) == [big]


def test_messages_removed_elsewhere_are_forgotten_slowly(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """A UIDL gone from complete listings is forgotten after 30 days and 3 listings."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(4)])
    account = _account(dovecot, mail_user, tmp_path)
    _sync(account, store, T0)
    victim = maildir_files(mail_user.maildir)[0]  # Dovecot moved them to cur/ meanwhile
    victim.unlink()
    result = _sync(account, store, T0 + DAY)
    assert (result.fetched, result.forgotten, result.on_server) == (0, 0, 3)
    vanished = [e for e in only_entries(store).values() if e.vanished_at is not None]
    assert [(e.vanished_at, e.absent_runs) for e in vanished] == [(T0 + DAY, 1)]
    assert _sync(account, store, T0 + 40 * DAY).forgotten == 0  # time enough, 2 listings
    assert _sync(account, store, T0 + 41 * DAY).forgotten == 1
    assert len(only_entries(store)) == 3


def test_wrong_password_is_an_auth_failure(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """Dovecot's [AUTH] refusal becomes outcome "auth" (exit 77) and nothing is written."""
    account = _account(dovecot, mail_user, tmp_path, password="not-the-password")
    result = sync_account(account, store)
    assert (result.outcome, result.exit_code) == ("auth", ExitCode.AUTH)
    assert maildir_files(tmp_path / "Maildir") == []


def test_progress_reports_every_delivered_message(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """The progress callback sees (account, done, total, bytes) after every message."""
    messages = [make_message(i) for i in range(5)]
    dovecot.deliver_many(mail_user, messages)
    calls: list[tuple[str, int, int, int]] = []
    account = _account(dovecot, mail_user, tmp_path)
    result = sync_account(account, store, progress=lambda *args: calls.append(args))
    assert result.outcome == "ok"
    assert [c[1] for c in calls] == [1, 2, 3, 4, 5]
    assert {c[0] for c in calls} == {"acct"}
    assert {c[2] for c in calls} == {5}
    assert calls[-1][3] == result.bytes == sum(len(m) for m in messages)


def test_plan_warning_logged_once_per_change(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, store: SeenStore
) -> None:
    """An unchanged too-large warning is logged at warning level only when it first appears."""
    from structlog.testing import capture_logs

    dovecot.deliver(mail_user, make_message(1, body_size=3000))
    account = _account(dovecot, mail_user, tmp_path, max_message_size=1000)

    def warnings() -> list[str]:
        with capture_logs() as logs:
            _sync(account, store)
        return [e["detail"] for e in logs if e["log_level"] == "warning"]

    first = warnings()
    assert len(first) == 1
    assert "left on the server: 00000001" in first[0]
    assert "b'" not in first[0]
    assert warnings() == []
    dovecot.deliver(mail_user, make_message(2, body_size=3000))
    assert len(warnings()) == 1
