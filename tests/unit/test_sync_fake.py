"""The sync engine against hostile and unusual scripted servers (tests/fake_pop3.py)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from popsync import sync as sync_module
from popsync.config import Account, parse_config
from popsync.deliver.maildir import MaildirTarget
from popsync.errors import ExitCode, LocalIOError
from popsync.maildir import Maildir, new_unique_name
from popsync.plan import RESET_MIN_DELIVERED
from popsync.seen import SeenStore
from popsync.sync import _OWN_TMP, RunResult, clean_debris, sync_account
from tests.fake_pop3 import Close, Expect, FakePop3Server, Send, Stall, StartTLS, Step
from tests.synchelp import make_message, only_entries, stored_form, toml_config

__all__: list[str] = []

PASSWORD = "fake-pw-7c1e"
CAPS = b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n"


def _stuff(message: bytes) -> bytes:
    """Dot-stuff a CRLF message for the wire."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def _retr_reply(message: bytes) -> bytes:
    return b"+OK message follows\r\n" + _stuff(message) + b".\r\n"


def _login(caps: bytes = CAPS) -> list[Step]:
    """Implicit TLS, greeting, CAPA, USER/PASS and the CAPA after login."""
    return [
        StartTLS(),
        Send(b"+OK fake ready\r\n"),
        Expect(b"CAPA", reply=caps),
        Expect(b"USER me", reply=b"+OK\r\n"),
        Expect(b"PASS " + PASSWORD.encode(), reply=b"+OK logged in\r\n"),
        Expect(b"CAPA", reply=caps),
    ]


def _listing(items: Sequence[tuple[int, bytes, int]]) -> list[Step]:
    uidl = b"".join(b"%d %s\r\n" % (n, u) for n, u, _ in items)
    scan = b"".join(b"%d %d\r\n" % (n, size) for n, _, size in items)
    return [
        Expect(b"UIDL", reply=b"+OK\r\n" + uidl + b".\r\n"),
        Expect(b"LIST", reply=b"+OK\r\n" + scan + b".\r\n"),
    ]


def _account(tmp_path: Path, server: FakePop3Server, **extra: str | int | bool) -> Account:
    keys: dict[str, str | int | bool] = {
        "host": server.host,
        "port": server.port,
        "tls": "implicit",
        "tls_ca_file": str(server.ca_file),
        "username": "me",
        "password": PASSWORD,
        "auth": "user",
        "maildir": str(tmp_path / "Maildir"),
        "timeout": "1s",
    }
    keys.update(extra)
    return parse_config(toml_config(tmp_path / "state", {"acct": keys}), "t.toml").accounts["acct"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """A fresh seen-store."""
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as opened:
        yield opened


def _files(tmp_path: Path, sub: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tmp_path / "Maildir" / sub).iterdir())]


def _run(account: Account, store: SeenStore, **kwargs: object) -> RunResult:
    return sync_account(account, store, **kwargs)  # type: ignore[arg-type]


M1, M2, M3 = make_message(1), make_message(2), make_message(3)


def test_disconnect_mid_retr_leaves_no_partial_message(tmp_path: Path, store: SeenStore) -> None:
    """A server that hangs up inside a message body: exit 75, only whole messages kept."""
    script = [
        *_login(),
        *_listing([(1, b"u1", len(M1)), (2, b"u2", len(M2))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
        Expect(b"RETR 2", reply=b"+OK\r\n" + M2[: len(M2) // 2]),
        Close(),
    ]
    with FakePop3Server(script) as server:
        result = _run(_account(tmp_path, server, delete="after_delivery"), store)
    server.check()
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    assert _files(tmp_path, "new") == [stored_form(M1)]
    assert _files(tmp_path, "tmp") == []
    entries = only_entries(store)
    assert set(entries) == {b"u1"}
    assert entries[b"u1"].state == "delivered"
    assert not any(c.startswith((b"DELE", b"QUIT")) for c in server.commands)


def test_stalled_retr_times_out_without_a_partial_message(tmp_path: Path, store: SeenStore) -> None:
    """A RETR that never ends hits the timeout: exit 75 and nothing of it anywhere."""
    script = [
        *_login(),
        *_listing([(1, b"u1", len(M1))]),
        Expect(b"RETR 1", reply=b"+OK\r\n" + M1[:100]),
        Stall(5),
    ]
    with FakePop3Server(script, linger=0.1) as server:
        result = _run(_account(tmp_path, server), store)
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    assert "timed out" in (result.error or "")
    assert _files(tmp_path, "new") == _files(tmp_path, "tmp") == []
    assert only_entries(store) == {}


def test_duplicate_uidls_are_fetched_once_and_never_deleted(
    tmp_path: Path, store: SeenStore
) -> None:
    """A UIDL listed twice is fetched once (lowest number), never DELEd, with a warning."""
    script = [
        *_login(),
        *_listing([(1, b"dup", len(M1)), (2, b"u2", len(M2)), (3, b"dup", len(M3))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
        Expect(b"RETR 2", reply=_retr_reply(M2)),
        Expect(b"DELE 2", reply=b"+OK\r\n"),
        Expect(b"QUIT", reply=b"+OK bye\r\n"),
        Close(),
    ]
    with FakePop3Server(script) as server, capture_logs() as logs:
        result = _run(_account(tmp_path, server, delete="after_delivery"), store)
    server.check()
    assert result.outcome == "ok", result.error
    assert (result.fetched, result.deleted) == (2, 1)
    assert sorted(_files(tmp_path, "new")) == sorted(map(stored_form, [M1, M2]))
    assert any("more than once" in w for w in result.warnings)
    assert any(e["event"] == "plan warning" and e["log_level"] == "warning" for e in logs)


def test_uidl_reset_warns_and_fetches_nothing(tmp_path: Path, store: SeenStore) -> None:
    """When every known UIDL vanished and all listed ones are new, the run warns and waits."""
    count = RESET_MIN_DELIVERED + 10
    items = [(i + 1, b"new%d" % i, len(M1)) for i in range(count)]
    script = [*_login(), *_listing(items), Expect(b"QUIT", reply=b"+OK\r\n"), Close()]
    with FakePop3Server(script) as server, capture_logs() as logs:
        account = _account(tmp_path, server, delete="after_delivery")
        old = [(b"old%d" % i, f"name{i}") for i in range(count)]
        store.mark_delivered(account.mailbox, old, 1.0)
        result = _run(account, store)
    server.check()
    assert result.outcome == "ok"
    assert (result.fetched, result.deleted, result.forgotten) == (0, 0, 0)
    assert any("UIDL reset suspected" in w for w in result.warnings)
    assert any("UIDL reset" in str(e.get("detail")) for e in logs)
    assert len(only_entries(store)) == count  # nothing forgotten either


def test_utf8_is_sent_before_login_when_offered(tmp_path: Path, store: SeenStore) -> None:
    """A server announcing UTF8 gets the UTF8 command in AUTHORIZATION state."""
    caps = b"+OK\r\nUSER\r\nUIDL\r\nUTF8\r\n.\r\n"
    script = [
        StartTLS(),
        Send(b"+OK fake\r\n"),
        Expect(b"CAPA", reply=caps),
        Expect(b"UTF8", reply=b"+OK UTF8 on\r\n"),
        Expect(b"USER me", reply=b"+OK\r\n"),
        Expect(b"PASS " + PASSWORD.encode(), reply=b"+OK\r\n"),
        Expect(b"CAPA", reply=caps),
        *_listing([]),
        Expect(b"QUIT", reply=b"+OK\r\n"),
        Close(),
    ]
    with FakePop3Server(script) as server:
        result = _run(_account(tmp_path, server), store)
    server.check()
    assert result.outcome == "ok", result.error


def test_message_larger_than_its_list_size_is_remembered_and_the_rest_synced(
    tmp_path: Path, store: SeenStore
) -> None:
    """A RETR that outgrows LIST is cut off, remembered as too large, and the rest still syncs."""
    big = make_message(9, 200_000)  # far past 10 KB plus the guard's slack
    after = make_message(2, 100)
    listing = _listing([(1, b"u1", 100), (2, b"u2", len(after))])
    first = [*_login(), *listing, Expect(b"RETR 1", reply=_retr_reply(big))]
    # The cut-off cost the connection: popsync logs in again, skips u1 and fetches u2.
    second = [
        *_login(),
        *listing,
        Expect(b"RETR 2", reply=_retr_reply(after)),
        Expect(b"QUIT", reply=b"+OK bye\r\n"),
        Close(),
    ]
    # The next run downloads nothing again and warns no more: the message stays on the server.
    third = [*_login(), *listing, Expect(b"QUIT", reply=b"+OK bye\r\n"), Close()]
    with FakePop3Server(first, second, third, linger=0.1) as server:
        account = _account(tmp_path, server, max_message_size="10KB")
        result = _run(account, store)
        again = _run(account, store)
    server.check()
    assert (result.outcome, result.exit_code) == ("ok", ExitCode.OK), result.error
    assert (result.fetched, result.too_large) == (1, 1)
    assert _files(tmp_path, "tmp") == []
    assert _files(tmp_path, "new") == [stored_form(after)]
    entries = only_entries(store)
    assert entries[b"u1"].state == "too_large"
    assert (entries[b"u1"].size or 0) > 11_000
    assert entries[b"u2"].state == "delivered"
    assert any("u1" in w and "too large" in w for w in result.warnings)
    assert not any("b'u1'" in w for w in result.warnings)
    assert "1 too large (left on server)" in result.summary()
    assert (again.outcome, again.fetched, again.too_large, again.warnings) == ("ok", 0, 1, [])
    assert server.commands.count(b"RETR 1") == 1
    assert not any(c.startswith(b"DELE") for c in server.commands)


def test_garbage_greeting_is_a_protocol_error(tmp_path: Path, store: SeenStore) -> None:
    """A server that does not speak POP3 gives outcome "protocol" (exit 76)."""
    with FakePop3Server([StartTLS(), Send(b"HTTP/1.1 400 Bad Request\r\n\r\n"), Close()]) as server:
        result = _run(_account(tmp_path, server), store)
    assert (result.outcome, result.exit_code) == ("protocol", ExitCode.PROTOCOL)


@pytest.mark.parametrize(
    ("reply", "outcome", "code"),
    [
        (b"-ERR [IN-USE] mailbox locked\r\n", "temporary", ExitCode.TEMPORARY),
        (b"-ERR [SYS/TEMP] try later\r\n", "temporary", ExitCode.TEMPORARY),
        (b"-ERR [LOGIN-DELAY] too soon\r\n", "temporary", ExitCode.TEMPORARY),
        (b"-ERR [AUTH] bad password\r\n", "auth", ExitCode.AUTH),
        (b"-ERR bad password\r\n", "auth", ExitCode.AUTH),
    ],
)
def test_login_refusals_map_to_exit_codes(
    tmp_path: Path, store: SeenStore, reply: bytes, outcome: str, code: ExitCode
) -> None:
    """RFC 2449/3206 response codes at login map to the sysexits ladder."""
    script = [*_login()[:-2], Expect(b"PASS " + PASSWORD.encode(), reply=reply)]
    with FakePop3Server(script, linger=0.1) as server:
        result = _run(_account(tmp_path, server), store)
    assert (result.outcome, result.exit_code) == (outcome, code)
    if b"LOGIN-DELAY" in reply:
        assert result.retry_after is not None


def test_failed_pending_record_leaves_no_debris(
    tmp_path: Path, store: SeenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the seen-store cannot record a batch, its tmp files are removed and nothing DELEd."""

    def broken(*_args: object, **_kwargs: object) -> None:
        raise LocalIOError("database or disk is full")

    monkeypatch.setattr(store, "add_pending", broken)
    script = [
        *_login(),
        *_listing([(1, b"u1", len(M1)), (2, b"u2", len(M2))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
        Expect(b"RETR 2", reply=_retr_reply(M2)),
    ]
    with FakePop3Server(script, linger=0.1) as server:
        result = _run(_account(tmp_path, server, delete="after_delivery"), store)
    assert (result.outcome, result.exit_code) == ("local_io", ExitCode.LOCAL_IO)
    assert _files(tmp_path, "new") == _files(tmp_path, "tmp") == []
    assert not any(c.startswith(b"DELE") for c in server.commands)


def test_stop_request_ends_the_run_between_messages(tmp_path: Path, store: SeenStore) -> None:
    """A set stop event ends the run as "temporary" with whole messages only."""
    stop = threading.Event()
    stop.set()
    script = [
        *_login(),
        *_listing([(1, b"u1", len(M1))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
    ]
    with FakePop3Server(script, linger=0.1) as server:
        result = _run(_account(tmp_path, server), store, stop=stop)
    assert result.outcome == "temporary"
    assert _files(tmp_path, "tmp") == []
    assert only_entries(store) == {}


def test_quit_lost_means_deletes_are_sent_again(tmp_path: Path, store: SeenStore) -> None:
    """A connection lost after DELE but before QUIT's +OK re-sends the DELE next run."""
    first = [
        *_login(),
        *_listing([(1, b"u1", len(M1))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
        Expect(b"DELE 1", reply=b"+OK\r\n"),
        Expect(b"QUIT"),
        Close(),
    ]
    second = [
        *_login(),
        *_listing([(1, b"u1", len(M1))]),
        Expect(b"DELE 1", reply=b"+OK\r\n"),
        Expect(b"QUIT", reply=b"+OK bye\r\n"),
        Close(),
    ]
    with FakePop3Server(first, second) as server:
        account = _account(tmp_path, server, delete="after_delivery")
        one = _run(account, store)
        assert one.outcome == "temporary"
        assert only_entries(store)[b"u1"].deleted_at is None
        two = _run(account, store)
    server.check()
    assert only_entries(store)[b"u1"].deleted_at is not None
    assert (two.outcome, two.fetched, two.deleted) == ("ok", 0, 1)
    assert _files(tmp_path, "new") == [stored_form(M1)]


def test_clean_debris_removes_only_files_of_dead_popsync_runs(tmp_path: Path) -> None:
    """Debris of a dead or earlier popsync goes; live writers', kept and foreign files stay."""
    md = Maildir(tmp_path / "Maildir")
    child = subprocess.Popen(["sleep", "30"])
    try:
        live_pid = child.pid
        gone = subprocess.Popen(["true"])
        gone.wait()
        host = _OWN_TMP.fullmatch(new_unique_name(md.hostname))
        assert host is not None

        def name(pid: int, serial: int) -> str:
            return f"1700000000.M1P{pid}Q{serial}R{serial:016x}.{host['host']}"

        files = {
            "dead": name(gone.pid, 1),
            "live": name(live_pid, 2),
            "mine_stale": name(os.getpid(), 3),
            "kept": name(gone.pid, 4),
            "other_host": f"1700000000.M1P{gone.pid}Q5R{5:016x}.elsewhere",
            "other_agent": "1700000000.P123.mailhost",
        }
        for file in files.values():
            (md.tmp / file).write_bytes(b"partial")
        in_flight = sync_module._open_tmp(MaildirTarget(md.path))
        try:
            removed = clean_debris(md, {files["kept"]})
        finally:
            in_flight.discard()
            sync_module._release([in_flight.name])
    finally:
        child.kill()
        child.wait()
    assert sorted(removed) == sorted([files["dead"], files["mine_stale"]])
    left = {p.name for p in md.tmp.iterdir()}
    assert left == {files[k] for k in ("live", "kept", "other_host", "other_agent")}


def test_refused_dele_still_quits_and_commits_the_others(tmp_path: Path, store: SeenStore) -> None:
    """A -ERR to one DELE is a warning: QUIT is still sent, so accepted DELEs take effect."""
    script = [
        *_login(),
        *_listing([(1, b"u1", len(M1)), (2, b"u2", len(M2))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
        Expect(b"RETR 2", reply=_retr_reply(M2)),
        Expect(b"DELE 1", reply=b"-ERR message 1 already deleted\r\n"),
        Expect(b"DELE 2", reply=b"+OK\r\n"),
        Expect(b"QUIT", reply=b"+OK bye\r\n"),
        Close(),
    ]
    with FakePop3Server(script, linger=0.1) as server:
        result = _run(_account(tmp_path, server, delete="after_delivery"), store)
    server.check()
    assert result.outcome == "ok", result.error
    assert result.deleted == 1
    assert any("refused DELE 1" in w for w in result.warnings)
    assert b"QUIT" in server.commands
    entries = only_entries(store)
    assert entries[b"u1"].deleted_at is None
    assert entries[b"u2"].deleted_at is not None
    assert _files(tmp_path, "new") == [stored_form(M1), stored_form(M2)]


def test_debug_log_shows_session_steps_and_plan(tmp_path: Path, store: SeenStore) -> None:
    """At debug level a run logs its login (TLS, capabilities) and its plan, never the secret."""
    script = [
        *_login(),
        *_listing([(1, b"u1", len(M1))]),
        Expect(b"RETR 1", reply=_retr_reply(M1)),
        Expect(b"QUIT", reply=b"+OK bye\r\n"),
        Close(),
    ]
    with FakePop3Server(script, linger=0.1) as server, capture_logs() as logs:
        result = _run(_account(tmp_path, server), store)
    assert result.outcome == "ok", result.error
    events = {entry["event"]: entry for entry in logs}
    assert events["logged in"]["tls"].startswith("TLS")
    assert "UIDL" in events["logged in"]["capabilities"]
    assert (events["planned"]["on_server"], events["planned"]["fetch"]) == (1, 1)
    assert PASSWORD not in repr(logs)
