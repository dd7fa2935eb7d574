"""Phase budgets and the minimum transfer rate against drip-feeding scripted servers."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync import net
from popsync.config import Account, parse_config
from popsync.errors import ExitCode, NetworkError
from popsync.seen import SeenStore
from popsync.sync import RunResult, sync_account
from tests.fake_pop3 import Drip, Expect, FakePop3Server, Send, StartTLS, Step
from tests.synchelp import (
    make_message,
    only_entries,
    run_popsync,
    stored_form,
    toml_config,
    write_config,
)

__all__: list[str] = []

PASSWORD = "fake-pw-d3ad"
CAPS = b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"
#: A greeting that would take 50 s to arrive at one byte per 0.1 s.
SLOW_GREETING = Drip(b"+OK " + b"x" * 500 + b"\r\n", every=0.1)


def _login() -> list[Step]:
    return [
        StartTLS(),
        Send(b"+OK fake ready\r\n"),
        Expect(b"CAPA", reply=CAPS),
        Expect(b"USER me", reply=b"+OK\r\n"),
        Expect(b"PASS " + PASSWORD.encode(), reply=b"+OK logged in\r\n"),
        Expect(b"CAPA", reply=CAPS),
    ]


def _keys(tmp_path: Path, server: FakePop3Server, **extra: str | int) -> dict[str, str | int]:
    keys: dict[str, str | int] = {
        "host": server.host,
        "port": server.port,
        "tls": "implicit",
        "tls_ca_file": str(server.ca_file),
        "username": "me",
        "password": PASSWORD,
        "auth": "user",
        "maildir": str(tmp_path / "Maildir"),
        "timeout": "5s",
        "login_timeout": "1s",
        "listing_timeout": "1s",
        "low_speed_limit": "1KiB",
        "low_speed_time": "1s",
    }
    keys.update(extra)
    return keys


def _account(tmp_path: Path, server: FakePop3Server, **extra: str | int) -> Account:
    text = toml_config(tmp_path / "state", {"acct": _keys(tmp_path, server, **extra)})
    return parse_config(text, "t.toml").accounts["acct"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeenStore]:
    """A fresh seen-store."""
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as opened:
        yield opened


def _timed_run(account: Account, store: SeenStore) -> tuple[RunResult, float]:
    started = time.monotonic()
    result = sync_account(account, store)
    return result, time.monotonic() - started


def _maildir(tmp_path: Path, sub: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tmp_path / "Maildir" / sub).iterdir())]


def test_a_dripping_greeting_ends_at_login_timeout(tmp_path: Path, store: SeenStore) -> None:
    """A greeting that never ends costs login_timeout, not forever: exit 75 naming the phase."""
    with FakePop3Server([StartTLS(), SLOW_GREETING], linger=0.1) as server:
        result, elapsed = _timed_run(_account(tmp_path, server), store)
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    assert "timed out in the login phase" in (result.error or "")
    assert "login_timeout = 1s" in (result.error or "")
    assert 0.9 < elapsed < 2.0


def test_a_dripping_login_reply_counts_against_the_same_budget(
    tmp_path: Path, store: SeenStore
) -> None:
    """Greeting, CAPA and USER each answered slowly: the budget covers them together."""
    script: list[Step] = [
        StartTLS(),
        Drip(b"+OK hi\r\n", every=0.05),
        Expect(b"CAPA"),
        Drip(CAPS, every=0.05),
        Expect(b"USER me"),
        Drip(b"+OK " + b"y" * 100 + b"\r\n", every=0.05),
    ]
    with FakePop3Server(script, linger=0.1) as server:
        result, elapsed = _timed_run(_account(tmp_path, server, login_timeout="2s"), store)
    assert result.exit_code == ExitCode.TEMPORARY
    assert "login phase" in (result.error or "")
    assert 1.9 < elapsed < 3.0
    assert not any(c.startswith(b"PASS") for c in server.commands)


def test_a_dripping_retr_falls_below_the_minimum_rate(tmp_path: Path, store: SeenStore) -> None:
    """20 bytes per second of a message: abandoned after low_speed_time, nothing kept."""
    message = make_message(1, body_size=5000)
    script = [
        *_login(),
        Expect(b"UIDL", reply=b"+OK\r\n1 u1\r\n.\r\n"),
        Expect(b"LIST", reply=b"+OK\r\n1 %d\r\n.\r\n" % len(message)),
        Expect(b"RETR 1", reply=b"+OK\r\n"),
        Drip(message, every=0.05),
    ]
    with FakePop3Server(script, linger=0.1) as server:
        result, elapsed = _timed_run(_account(tmp_path, server), store)
    assert (result.outcome, result.exit_code) == ("temporary", ExitCode.TEMPORARY)
    error = result.error or ""
    assert re.search(r"too slow in the transfer phase: \d+ bytes in 1s", error), error
    assert "low_speed_limit = 1024 bytes/s over low_speed_time = 1s" in error
    assert 0.9 < elapsed < 2.0
    assert _maildir(tmp_path, "new") == _maildir(tmp_path, "tmp") == []
    assert only_entries(store) == {}


def test_a_large_message_on_a_slow_link_still_arrives(tmp_path: Path, store: SeenStore) -> None:
    """A transfer longer than every budget, but above the minimum rate, completes."""
    message = b"Subject: big\r\n\r\n" + b"z" * 60_000 + b"\r\n"
    wire = b"+OK\r\n" + message + b".\r\n"
    script = [
        *_login(),
        Expect(b"UIDL", reply=b"+OK\r\n1 u1\r\n.\r\n"),
        Expect(b"LIST", reply=b"+OK\r\n1 %d\r\n.\r\n" % len(message)),
        Expect(b"RETR 1"),
        Drip(wire, every=0.05, chunk=2048),  # about 40 KiB/s for 1.5 s
        Expect(b"QUIT", reply=b"+OK bye\r\n"),
    ]
    with FakePop3Server(script) as server:
        result, elapsed = _timed_run(_account(tmp_path, server, timeout="1s"), store)
    server.check()
    assert result.outcome == "ok", result.error
    assert elapsed > 1.4  # longer than login_timeout, listing_timeout and low_speed_time
    assert _maildir(tmp_path, "new") == [stored_form(message)]


def test_an_endless_listing_ends_at_listing_timeout(tmp_path: Path, store: SeenStore) -> None:
    """A UIDL listing that keeps coming above the minimum rate is cut at listing_timeout."""
    lines = b"".join(b"%d uid-%d\r\n" % (n, n) for n in range(1, 20_000))
    script = [*_login(), Expect(b"UIDL"), Drip(b"+OK\r\n" + lines, every=0.02, chunk=256)]
    with FakePop3Server(script, linger=0.1) as server:
        result, elapsed = _timed_run(_account(tmp_path, server), store)
    assert result.exit_code == ExitCode.TEMPORARY
    assert "timed out in the listing phase: not done within listing_timeout = 1s" in (
        result.error or ""
    )
    assert 0.9 < elapsed < 2.0


def _slow_resolver(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    real = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> object:
        if kwargs.get("flags") != socket.AI_NUMERICHOST:
            time.sleep(delay)
            host = "127.0.0.1"
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", slow)


def test_name_resolution_honours_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that takes 3 s is abandoned at the 0.3 s timeout."""
    _slow_resolver(monkeypatch, 3.0)
    started = time.monotonic()
    with pytest.raises(net.NetworkTimeout, match=r"timed out during name resolution after 0\.3s"):
        net.connect("slow.invalid", 110, timeout=0.3, context=None)
    assert time.monotonic() - started < 1.0


def test_name_resolution_honours_the_login_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget shorter than the timeout, the budget ends the lookup, naming the phase."""
    _slow_resolver(monkeypatch, 3.0)
    pace = net.Pace.budget("login", 0.3, "login_timeout")
    started = time.monotonic()
    with pytest.raises(net.PhaseTimeout, match="login phase") as caught:
        net.connect("slow.invalid", 110, timeout=10, context=None, pace=pace)
    assert time.monotonic() - started < 1.0
    assert caught.value.phase == "login"
    assert isinstance(caught.value, NetworkError)


def test_the_misconfiguration_probes_bound_name_resolution_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second connections that diagnose a wrong tls/port give up at their timeout."""
    _slow_resolver(monkeypatch, 3.0)
    started = time.monotonic()
    assert net.probe_greeting("slow.invalid", 110, 0.3) is None
    assert net.probe_tls("slow.invalid", 995, 0.3) is False
    assert time.monotonic() - started < 1.5


def test_once_exits_75_with_a_line_naming_the_phase(tmp_path: Path) -> None:
    """`popsync --once` against a dripping greeting: exit 75 and the phase on stderr."""
    with FakePop3Server([StartTLS(), SLOW_GREETING], linger=0.1) as server:
        config = write_config(
            tmp_path / "c.toml", tmp_path / "state", {"acct": _keys(tmp_path, server)}
        )
        proc = run_popsync(["--once", "-c", str(config)], timeout=30)
    assert proc.returncode == 75, proc.stderr
    assert "acct: FAILED (temporary)" in proc.stderr
    assert "timed out in the login phase: not done within login_timeout = 1s" in proc.stderr
