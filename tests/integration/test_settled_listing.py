"""A settled listing against a real Dovecot: the run that finds nothing new skips the plan.

`popsync.plan.settled` and the store's listing digest let a run whose UIDL listing is the one
the last complete run left settled skip reading the seen rows and planning. These tests count
the seen-store reads and check that nothing the plan would have done is lost: new mail, a
changed policy, a message held as too large, a delete policy, a row changed by someone else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync.client import Pop3Client
from popsync.config import Account
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.synchelp import dovecot_account, maildir_messages, make_message

__all__: list[str] = []

pytestmark = pytest.mark.dovecot


class CountingStore(SeenStore):
    """A seen-store that counts the planner's reads of the delivered rows."""

    plans = 0

    def delivered_times(self, mailbox: str) -> Iterator[tuple[bytes, float]]:
        self.plans += 1
        return super().delivered_times(mailbox)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    """A fresh counting seen-store in the test's state directory."""
    opened = CountingStore.open(tmp_path / "state" / "popsync.sqlite3")
    assert isinstance(opened, CountingStore)
    with opened:
        yield opened


def _account(dovecot: Dovecot, user: MailUser, tmp_path: Path, **extra: str | int) -> Account:
    return dovecot_account(dovecot, user, tmp_path / "Maildir", tmp_path / "state", **extra)[1]


@pytest.fixture
def lists(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each LIST the client asks for: "pipelined" (with UIDL) or "alone"."""
    asked: list[str] = []
    both, alone = Pop3Client.listing_entries, Pop3Client.scan_entries

    def with_uidl(self: Pop3Client) -> object:
        asked.append("pipelined")
        return both(self)

    def after_uidl(self: Pop3Client) -> object:
        asked.append("alone")
        return alone(self)

    monkeypatch.setattr(Pop3Client, "listing_entries", with_uidl)
    monkeypatch.setattr(Pop3Client, "scan_entries", after_uidl)
    return asked


def _sync(account: Account, store: CountingStore) -> tuple[RunResult, bool]:
    """One run; whether it planned (read the seen rows)."""
    before = store.plans
    result = sync_account(account, store)
    assert result.outcome == "ok", result.error
    return result, store.plans > before


def test_nothing_new_skips_the_plan_and_new_mail_still_arrives(
    dovecot: Dovecot, mail_user: MailUser, store: CountingStore, tmp_path: Path, lists: list[str]
) -> None:
    """The second run skips LIST and planning; new mail ends the skip and is fetched once."""
    dovecot.deliver_many(mail_user, [make_message(i) for i in range(3)])
    account = _account(dovecot, mail_user, tmp_path)
    first, planned = _sync(account, store)
    assert (first.fetched, planned, lists) == (3, True, ["pipelined"])
    again, planned = _sync(account, store)
    assert (again.fetched, again.on_server, planned, lists) == (0, 3, False, ["pipelined"])
    dovecot.deliver(mail_user, make_message(3))
    newer, planned = _sync(account, store)
    assert (newer.fetched, planned, lists) == (1, True, ["pipelined", "alone"])
    assert len(maildir_messages(tmp_path / "Maildir")) == 4
    last, planned = _sync(account, store)
    assert (last.fetched, last.on_server, planned) == (0, 4, False)
    assert lists == ["pipelined", "alone"]


def test_a_changed_policy_or_a_changed_row_plans_again(
    dovecot: Dovecot, mail_user: MailUser, store: CountingStore, tmp_path: Path
) -> None:
    """Another max_message_size, or a seen row forgotten by someone else, is planned for."""
    messages = [make_message(i) for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    account = _account(dovecot, mail_user, tmp_path)
    _sync(account, store)
    assert _sync(account, store)[1] is False
    smaller = _account(dovecot, mail_user, tmp_path, max_message_size=10_000_000)
    assert _sync(smaller, store)[1] is True
    assert _sync(smaller, store)[1] is False
    forgotten = sorted(store.entries(account.mailbox))[0]
    store.forget(account.mailbox, [forgotten])  # as an admin command would
    refetched, planned = _sync(smaller, store)
    assert (refetched.fetched, planned) == (1, True)


def test_a_held_message_or_a_delete_policy_never_settles(
    dovecot: Dovecot, mail_user: MailUser, store: CountingStore, tmp_path: Path
) -> None:
    """Held too-large mail is reported every run; a policy that deletes plans every run."""
    dovecot.deliver_many(mail_user, [make_message(0), make_message(1, body_size=20_000)])
    held = _account(dovecot, mail_user, tmp_path, max_message_size=5000)
    for _ in range(2):
        result, planned = _sync(held, store)
        assert (result.skipped, planned) == (1, True)
    deleting = _account(dovecot, mail_user, tmp_path, delete="after_days", delete_after_days=30)
    for _ in range(2):
        assert _sync(deleting, store)[1] is True
