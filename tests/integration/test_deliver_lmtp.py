"""LMTP delivery into a real Dovecot LMTP server with Pigeonhole Sieve."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from devtools.dovecot import Dovecot, DovecotLmtp, MailUser
from popsync import net
from popsync import sync as sync_module
from popsync.cli import main
from popsync.deliver import Outcome, Spooled
from popsync.deliver.budget import SessionBudget
from popsync.deliver.lmtp import LmtpTarget
from popsync.errors import ExitCode
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.conftest import require_lmtp
from tests.corpus import CORPUS, served
from tests.synchelp import (
    TomlValue,
    assert_exactly_once,
    dovecot_account,
    dovecot_keys,
    make_message,
    only_entries,
    stored_form,
    toml_config,
    write_config,
)

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

SIEVE = """require ["fileinto"];
if header :contains "subject" "list" { fileinto "Lists"; stop; }
"""
# The trace fields Dovecot's LMTP prepends; everything after them is the message.
_DOVECOT_TRACE = re.compile(
    rb"\A(?:(?:Return-Path|Delivered-To|Received):[^\n]*\n(?:[ \t][^\n]*\n)*)+"
)


def strip_trace(stored: bytes, *, required: bool = True) -> bytes:
    """A message as Dovecot stored it, without the trace fields Dovecot added."""
    found = _DOVECOT_TRACE.match(stored)
    if found is None:
        assert not required, stored[:200]
        return stored
    return stored[found.end() :]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """A fresh seen-store in the test's state directory."""
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as opened:
        yield opened


def _sync(
    dovecot: Dovecot, user: MailUser, tmp_path: Path, store: SeenStore, **keys: str | int
) -> RunResult:
    account = dovecot_account(dovecot, user, tmp_path / "unused", tmp_path / "state", **keys)[1]
    return sync_account(account, store)


def _lmtp_keys(server: DovecotLmtp, rcpt: MailUser, *, port: bool = False) -> dict[str, str]:
    address = f"127.0.0.1:{server.lmtp_port}" if port else f"unix:{server.socket_path}"
    return {"deliver": "lmtp", "lmtp": address, "lmtp_recipient": f"{rcpt.name}@example.org"}


def test_sieve_files_each_message_exactly_once_in_the_right_folder(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """Over the unix socket: Sieve files list mail into Lists, the rest lands in INBOX."""
    rcpt = lmtp_server.new_user("r")
    lmtp_server.set_sieve(rcpt, SIEVE)
    plain = [make_message(i, tag="plain") for i in range(6)]
    lists = [make_message(i, tag="list") for i in range(4)]
    mixed = [m for pair in zip(plain[:4], lists, strict=True) for m in pair] + plain[4:]
    dovecot.deliver_many(mail_user, mixed)
    keys = {**_lmtp_keys(lmtp_server, rcpt), "delete": "after_delivery"}
    result = _sync(dovecot, mail_user, tmp_path, store, **keys)
    assert result.outcome == "ok", result.error
    assert (result.fetched, result.deleted) == (10, 10)
    inbox = [strip_trace(m) for m in lmtp_server.folder_messages(rcpt)]
    filed = [strip_trace(m) for m in lmtp_server.folder_messages(rcpt, "Lists")]
    assert_exactly_once(inbox, plain)
    assert_exactly_once(filed, lists)
    assert dovecot.messages(mail_user) == []
    # Nothing left in the spool, and a second run hands nothing over again.
    assert list((tmp_path / "state" / "spool" / "acct" / "tmp").iterdir()) == []
    again = _sync(dovecot, mail_user, tmp_path, store, **_lmtp_keys(lmtp_server, rcpt))
    assert (again.outcome, again.fetched) == ("ok", 0)
    assert len(lmtp_server.folder_messages(rcpt)) == 6


def test_corpus_goes_through_lmtp_byte_exact(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """Long lines, lone CRs, dot and From lines reach Dovecot intact over the TCP port."""
    rcpt = lmtp_server.new_user("c")
    names = list(CORPUS)
    dovecot.deliver_many(mail_user, [CORPUS[name]() for name in names])
    result = _sync(dovecot, mail_user, tmp_path, store, **_lmtp_keys(lmtp_server, rcpt, port=True))
    assert result.outcome == "ok", result.error
    got = [strip_trace(m) for m in lmtp_server.folder_messages(rcpt)]
    assert_exactly_once(got, [served(CORPUS[name]()) for name in names])


def test_trace_headers_name_the_lmtp_recipient(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """add_headers goes ahead of the message; Delivered-To names lmtp_recipient."""
    rcpt = lmtp_server.new_user("t")
    message = make_message(1, tag="trace")
    dovecot.deliver(mail_user, message)
    keys = _lmtp_keys(lmtp_server, rcpt)
    account = dovecot_account(dovecot, mail_user, tmp_path / "x", tmp_path / "state", **keys)[1]
    account = account.model_copy(update={"add_headers": ("delivered-to", "x-popsync-uidl")})
    assert sync_account(account, store).outcome == "ok"
    (stored,) = lmtp_server.folder_messages(rcpt)
    uidl = next(iter(only_entries(store)))
    ours = f"Delivered-To: {rcpt.name}@example.org\nX-Popsync-UIDL: {uidl.decode()}\n"
    assert stored.startswith(b"Return-Path: <>\n")  # Dovecot's own fields come first
    assert stored.endswith(b"\n" + ours.encode() + stored_form(message))


@pytest.fixture
def small_lmtp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotLmtp]:
    """An LMTP server whose quota plugin refuses mail over a 4 KiB mailbox for good (552)."""
    require_lmtp()
    root = Path(tempfile.mkdtemp(prefix="popsync-lmtp-small-"))
    root.chmod(0o711)
    server = DovecotLmtp(root, sieve=False)
    server.extra_config = (
        "mail_plugins = $mail_plugins quota\n"
        "plugin {\n  quota = maildir:User quota\n  quota_rule = *:storage=4K\n}\n"
    )
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_permanent_refusal_is_recorded_rejected_and_never_retried(
    dovecot: Dovecot,
    mail_user: MailUser,
    small_lmtp: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """A 5xx marks the message rejected: kept on the server, not DELEd, not fetched again."""
    rcpt = small_lmtp.new_user("q")
    small = [make_message(i, 200, tag="small") for i in range(3)]
    big = make_message(9, 8000, tag="big")
    dovecot.deliver_many(mail_user, [small[0], big, small[1], small[2]])
    keys = {**_lmtp_keys(small_lmtp, rcpt), "delete": "after_delivery"}
    result = _sync(dovecot, mail_user, tmp_path, store, **keys)
    assert result.outcome == "ok", result.error
    assert (result.fetched, result.rejected, result.deleted) == (3, 1, 3)
    assert any("rejected by lmtp: LMTP 552" in w for w in result.warnings)
    assert_exactly_once([strip_trace(m) for m in small_lmtp.folder_messages(rcpt)], small)
    assert dovecot.messages(mail_user) == [big]
    states = sorted(e.state for e in only_entries(store).values())
    assert states == ["delivered", "delivered", "delivered", "rejected"]
    again = _sync(dovecot, mail_user, tmp_path, store, **keys)
    assert (again.outcome, again.fetched, again.rejected) == ("ok", 0, 0)
    assert dovecot.messages(mail_user) == [big]


def test_unreachable_server_defers_then_delivers_from_the_spool(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
) -> None:
    """No LMTP server: exit 75, messages stay pending and spooled; next run delivers them."""
    rcpt = lmtp_server.new_user("d")
    messages = [make_message(i, tag="later") for i in range(3)]
    dovecot.deliver_many(mail_user, messages)
    keys = {**_lmtp_keys(lmtp_server, rcpt), "delete": "after_delivery"}
    down = {**keys, "lmtp": f"unix:{tmp_path}/no-such-socket"}
    result = _sync(dovecot, mail_user, tmp_path, store, **down)
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    assert "delivery deferred for 3 message(s)" in (result.error or "")
    assert {e.state for e in only_entries(store).values()} == {"pending"}
    (spooled,) = (tmp_path / "state" / "spool" / "acct" / "tmp").iterdir()  # one per batch
    assert spooled.stat().st_size == sum(e.size or 0 for e in only_entries(store).values())
    assert len(dovecot.messages(mail_user)) == 3  # nothing DELEd
    done = _sync(dovecot, mail_user, tmp_path, store, **keys)
    assert done.outcome == "ok", done.error
    assert (done.recovered, done.fetched, done.deleted) == (3, 0, 3)
    assert_exactly_once([strip_trace(m) for m in lmtp_server.folder_messages(rcpt)], messages)
    assert dovecot.messages(mail_user) == []


def test_next_batch_streams_while_the_last_is_handed_over(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batch N goes to the LMTP server in a background thread while batch N+1 downloads."""
    rcpt, messages = _three_batches(dovecot, mail_user, lmtp_server, monkeypatch, "overlap")
    spans: list[tuple[float, float, bool]] = []
    added: list[float] = []
    real_hand_over = LmtpTarget.hand_over
    real_add = sync_module._Batcher.add

    def hand_over(self: LmtpTarget, items: Sequence[Spooled]) -> list[Outcome]:
        started = time.monotonic()
        time.sleep(0.3)  # a slow agent, so the overlap cannot be missed
        outcomes = real_hand_over(self, items)
        main = threading.current_thread() is threading.main_thread()
        spans.append((started, time.monotonic(), main))
        return outcomes

    def add(self: sync_module._Batcher, *args: Any) -> None:
        added.append(time.monotonic())
        real_add(self, *args)

    monkeypatch.setattr(LmtpTarget, "hand_over", hand_over)
    monkeypatch.setattr(sync_module._Batcher, "add", add)
    result = _sync(dovecot, mail_user, tmp_path, store, **_lmtp_keys(lmtp_server, rcpt))
    assert result.outcome == "ok", result.error
    assert result.fetched == 12
    assert_exactly_once([strip_trace(m) for m in lmtp_server.folder_messages(rcpt)], messages)
    assert len(spans) == 3
    assert not any(main for _, _, main in spans)
    first_start, first_end, _ = spans[0]
    assert any(first_start < t < first_end for t in added[4:8])  # batch 2 streamed meanwhile
    # One batch at a time: each hand-over starts after the one before was committed.
    assert all(spans[k][0] >= spans[k - 1][1] for k in range(1, 3))
    assert list((tmp_path / "state" / "spool" / "acct" / "tmp").iterdir()) == []


def test_sessions_stay_open_from_batch_to_batch(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three batches on two sessions connect twice, and every message lands exactly once."""
    rcpt, messages = _three_batches(dovecot, mail_user, lmtp_server, monkeypatch, "kept")
    streams = _count_connects(monkeypatch)
    keys = _lmtp_keys(lmtp_server, rcpt)
    result = _sync(dovecot, mail_user, tmp_path, store, lmtp_sessions=2, **keys)
    assert result.outcome == "ok", result.error
    assert result.fetched == 12
    assert len(streams) == 2
    assert_exactly_once([strip_trace(m) for m in lmtp_server.folder_messages(rcpt)], messages)


def test_an_account_past_the_session_budget_delivers_on_one_session(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other accounts hold all of lmtp_max_sessions: this one (lmtp_sessions = 4) still
    delivers everything, exactly once, on its one guaranteed session."""
    rcpt, messages = _three_batches(dovecot, mail_user, lmtp_server, monkeypatch, "budget")
    connects = _count_connects(monkeypatch)
    keys = _lmtp_keys(lmtp_server, rcpt)
    budget = SessionBudget(3)
    for _ in range(3):
        assert budget.take(keys["lmtp"], first=True)  # three sessions of other accounts
    account = dovecot_account(
        dovecot, mail_user, tmp_path / "unused", tmp_path / "state", lmtp_sessions=4, **keys
    )[1]
    result = sync_account(account, store, lmtp_budget=budget)
    assert result.outcome == "ok", result.error
    assert (result.fetched, len(connects)) == (12, 1)
    assert budget.in_use(keys["lmtp"]) == 3  # its own session was given back
    assert_exactly_once([strip_trace(m) for m in lmtp_server.folder_messages(rcpt)], messages)


def test_once_gives_all_accounts_one_budget_from_the_config(
    dovecot: Dovecot,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """popsync --once with two accounts on one LMTP server and lmtp_max_sessions = 3: both
    runs share one SessionBudget of 3, each mailbox lands exactly once, all counts return."""
    budgets: list[SessionBudget] = []
    real_sync = sync_module.sync_account

    def spy(account: Any, store: Any, **kwargs: Any) -> RunResult:
        budgets.append(kwargs["lmtp_budget"])
        return real_sync(account, store, **kwargs)

    monkeypatch.setattr(sync_module, "sync_account", spy)
    accounts: dict[str, dict[str, TomlValue]] = {}
    expected = {}
    for name in ("one", "two"):
        user, rcpt = dovecot.new_user(name), lmtp_server.new_user(name)
        expected[name] = (rcpt, [make_message(i, tag=name) for i in range(10)])
        dovecot.deliver_many(user, expected[name][1])
        keys: dict[str, TomlValue] = {**_lmtp_keys(lmtp_server, rcpt), "lmtp_sessions": 4}
        accounts[name] = dovecot_keys(dovecot, user, tmp_path / "x", **keys)
    config = tmp_path / "c.toml"
    config.write_text("lmtp_max_sessions = 3\n" + toml_config(tmp_path / "state", accounts))
    config.chmod(0o600)
    assert main(["--once", "--no-progress", "-c", str(config)]) == 0
    assert len(budgets) == 2
    assert budgets[0] is budgets[1]
    assert budgets[0].limit == 3
    assert budgets[0].in_use(f"unix:{lmtp_server.socket_path}") == 0
    for rcpt, messages in expected.values():
        stored = [strip_trace(m) for m in lmtp_server.folder_messages(rcpt)]
        assert_exactly_once(stored, messages)


def _three_batches(
    dovecot: Dovecot,
    user: MailUser,
    lmtp_server: DovecotLmtp,
    monkeypatch: pytest.MonkeyPatch,
    tag: str,
) -> tuple[MailUser, list[bytes]]:
    """Twelve messages for ``user`` on the POP3 server, fetched in batches of four, and a
    fresh LMTP recipient for them."""
    rcpt = lmtp_server.new_user(tag[0])
    messages = [make_message(i, tag=tag) for i in range(12)]
    dovecot.deliver_many(user, messages)
    monkeypatch.setattr(sync_module, "BATCH_MESSAGES", 4)
    return rcpt, messages


def _count_connects(monkeypatch: pytest.MonkeyPatch) -> list[net.Stream]:
    """Every LMTP connection over a unix socket from now on, in the returned list."""
    streams: list[net.Stream] = []
    real_connect = net.connect_unix

    def connect_unix(path: str, *, timeout: float | None) -> net.Stream:
        streams.append(real_connect(path, timeout=timeout))
        return streams[-1]

    monkeypatch.setattr(net, "connect_unix", connect_unix)
    return streams


def test_deferral_mid_run_stops_the_download_and_keeps_the_rest_pending(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    store: SeenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deferred background batch ends the run 75 within a batch; nothing is lost."""
    rcpt, messages = _three_batches(dovecot, mail_user, lmtp_server, monkeypatch, "stall")
    keys = {**_lmtp_keys(lmtp_server, rcpt), "delete": "after_delivery"}
    down = {**keys, "lmtp": f"unix:{tmp_path}/no-such-socket"}
    result = _sync(dovecot, mail_user, tmp_path, store, **down)
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    states = [e.state for e in only_entries(store).values()]
    assert set(states) == {"pending"}
    assert 4 <= len(states) <= 8  # the batch that failed and at most the next one
    assert len(dovecot.messages(mail_user)) == 12
    done = _sync(dovecot, mail_user, tmp_path, store, **keys)
    assert done.outcome == "ok", done.error
    assert (done.recovered, done.fetched, done.deleted) == (len(states), 12 - len(states), 12)
    assert_exactly_once([strip_trace(m) for m in lmtp_server.folder_messages(rcpt)], messages)


def test_check_config_connect_probes_the_lmtp_server(
    dovecot: Dovecot,
    mail_user: MailUser,
    lmtp_server: DovecotLmtp,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--connect greets the LMTP server, says LHLO and tries the recipient; failures are 78."""
    rcpt = lmtp_server.new_user("p")
    good = _lmtp_keys(lmtp_server, rcpt)
    gone = {**good, "lmtp": f"unix:{tmp_path}/no-sock"}
    nobody = {**_lmtp_keys(lmtp_server, rcpt, port=True), "lmtp_recipient": "nobody@"}
    accounts: dict[str, dict[str, TomlValue]] = {
        name: dovecot_keys(dovecot, user, tmp_path / "x", **keys)
        for name, user, keys in (
            ("good", mail_user, good),
            ("gone", dovecot.new_user("g"), gone),
            ("nobody", dovecot.new_user("n"), nobody),
        )
    }
    config = write_config(tmp_path / "c.toml", tmp_path / "state", accounts)
    assert main(["check-config", "--connect", "-c", str(config)]) == ExitCode.CONFIG
    captured = capsys.readouterr()
    out = captured.out
    assert out, captured.err
    good_part = out.split("gone:\n")[0]
    assert f"  lmtp unix:{lmtp_server.socket_path}:" in good_part
    assert "220, LHLO ok (extensions: " in good_part
    assert "PIPELINING" in good_part
    assert "recipient accepted" in good_part
    assert "FAILED" not in good_part
    failed = "FAILED (configuration): accounts."
    assert f"{failed}gone.lmtp: unix:{tmp_path}/no-sock: connect failed: No such file" in out
    assert f"{failed}nobody.lmtp_recipient: the LMTP server refused it: 501" in out
    assert out.count("FAILED") == 2
    assert main(["test", "good", "-c", str(config)]) == 0
    assert "recipient accepted" in capsys.readouterr().out
