"""``popsync status`` rows and rendering, and the healthcheck verdicts, from a real seen-store."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from popsync.config import Config, parse_config
from popsync.seen import RunRecord, SeenStore
from popsync.status import collect_status, healthcheck, render_status

NOW = 1_800_000_000.0


def _config(tmp_path: Path) -> Config:
    return parse_config(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[defaults]\nusername = "u"\npassword = "hunter2-secret"\ninterval = "5m"\n'
        f'[accounts.home]\nhost = "pop.home.invalid"\nmaildir = "{tmp_path / "home"}"\n'
        f'[accounts.work]\nhost = "pop.work.invalid"\nport = 1995\nmaildir = "{tmp_path / "w"}"\n'
        f'[accounts.old]\nhost = "pop.old.invalid"\nmaildir = "{tmp_path / "o"}"\nenabled = false\n'
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Three accounts, one disabled."""
    return _config(tmp_path)


@pytest.fixture
def store(config: Config) -> Iterator[SeenStore]:
    """An empty seen-store in the config's state_dir."""
    with SeenStore.open(config.state_dir / "popsync.sqlite3") as opened:
        yield opened


def _key(account: str) -> str:
    """The mailbox key of one of _config's accounts (work is on a non-standard port)."""
    return f"u@pop.{account}.invalid" + (":1995" if account == "work" else "")


def _run(store: SeenStore, account: str, at: float, outcome: str = "ok", **kw: object) -> None:
    store.record_run(_key(account), RunRecord(started=at - 1, finished=at, outcome=outcome, **kw))  # type: ignore[arg-type]


def test_rows_count_delivered_pending_and_last_run(config: Config, store: SeenStore) -> None:
    """Each account's row shows its store counts and its last run."""
    store.add_pending(_key("home"), [(b"u1", "t1", 10), (b"u2", "t2", 20), (b"u3", "t3", 30)])
    store.mark_delivered(_key("home"), [(b"u1", "n1"), (b"u2", "n2")], NOW)
    store.mark_deleted(_key("home"), [b"u1"], NOW)
    _run(store, "home", NOW, fetched=2, messages_on_server=3)
    _run(store, "work", NOW - 10, "temporary", error="[IN-USE] locked")
    _run(store, "work", NOW - 5, "temporary", error="[IN-USE] locked")
    store.mark_too_large(_key("home"), [(b"big", 10**9)], NOW)
    rows = {row.account: row for row in collect_status(config, store)}
    assert list(rows) == ["home", "work", "old"]
    assert (rows["home"].too_large, rows["work"].too_large) == (1, 0)
    home, work, old = rows["home"], rows["work"], rows["old"]
    assert (home.delivered, home.pending, home.deleted, home.on_server) == (2, 1, 1, 3)
    assert (home.outcome, home.last_run, home.last_fetched, home.host) == (
        "ok",
        NOW,
        2,
        "pop.home.invalid:995",
    )
    assert (work.outcome, work.failures, work.error) == ("temporary", 2, "[IN-USE] locked")
    assert (old.enabled, old.last_run, old.outcome) == (False, None, None)
    assert home.as_dict()["last_run"] == "2027-01-15T08:00:00+00:00"
    json.dumps([row.as_dict() for row in rows.values()])  # serialisable for --json


def test_plain_rendering_is_an_aligned_table(config: Config, store: SeenStore) -> None:
    """Off a terminal the table is plain aligned text with a header and no secrets."""
    _run(store, "home", NOW - 125, fetched=4, messages_on_server=4)
    _run(store, "work", NOW - 7200, "auth", error="[AUTH] Authentication failed.")
    out = io.StringIO()
    render_status(collect_status(config, store), out, now=NOW)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "account", "server", "last", "run", "outcome", "on", "server",
        "delivered", "pending", "rejected", "too", "large", "last", "fetched", "last", "error",
    ]  # fmt: skip
    assert lines[1].split()[:4] == ["home", "pop.home.invalid:995", "2m", "ago"]
    assert "[AUTH] Authentication failed." in lines[2]
    assert "2h ago" in lines[2]
    assert lines[3].split()[:4] == ["old", "(disabled)", "pop.old.invalid:995", "never"]
    assert lines[0].index("outcome") == lines[1].index("ok")  # columns line up
    assert "hunter2" not in out.getvalue()
    assert "\x1b[" not in out.getvalue()


def test_healthy_when_recent_and_not_all_failing(config: Config, store: SeenStore) -> None:
    """One account ok and recent is enough."""
    _run(store, "home", NOW - 30)
    _run(store, "work", NOW - 30, "temporary")
    healthy, reason = healthcheck(config, store, now=NOW)
    assert healthy, reason
    assert reason == "healthy: 2 account(s) ran, 1 failing"


def test_unhealthy_before_any_run(config: Config, store: SeenStore) -> None:
    """A store with no runs is not healthy."""
    assert healthcheck(config, store, now=NOW) == (False, "unhealthy: no account has run yet")


def test_unhealthy_when_stale(config: Config, store: SeenStore) -> None:
    """No run for longer than 3 intervals + 60 s (or --max-age) is unhealthy."""
    _run(store, "home", NOW - 961)
    healthy, reason = healthcheck(config, store, now=NOW)
    assert not healthy
    assert reason == "unhealthy: no run for 961s (limit 960s)"
    assert healthcheck(config, store, now=NOW - 2)[0]
    assert not healthcheck(config, store, now=NOW - 800, max_age=100)[0]


def test_unhealthy_when_every_enabled_account_fails(config: Config, store: SeenStore) -> None:
    """Recent runs that all failed are unhealthy; a disabled account does not count."""
    _run(store, "home", NOW - 5, "auth")
    _run(store, "work", NOW - 5, "temporary")
    _run(store, "old", NOW - 5)
    healthy, reason = healthcheck(config, store, now=NOW)
    assert not healthy
    assert reason == "unhealthy: every account is failing (home, work)"


class _Terminal(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def test_terminal_rendering_is_a_rich_table(
    config: Config, store: SeenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal the same rows come out as a titled rich table."""
    # Servers may send codes in lower case; rich must not take "[in-use]" for markup.
    _run(store, "work", NOW - 5, "temporary", error="[in-use] locked")
    monkeypatch.setenv("COLUMNS", "160")  # the width of a roomy terminal
    out = _Terminal()
    render_status(collect_status(config, store), out, now=NOW)
    text = out.getvalue()
    assert "popsync accounts" in text
    assert "[in-use] locked" in text
    assert any(ch in text for ch in "┃│|")  # drawn as a table, unlike the plain output
    for name in ("home", "work", "old"):
        assert name in text


def test_fleet_rows_show_the_worker_lease_expiry_and_next_due(
    config: Config, store: SeenStore
) -> None:
    """In fleet mode the table and the JSON carry the lease: holder, until when, next due."""
    _run(store, "home", NOW - 60, fetched=1, messages_on_server=1)
    rows = [
        replace(row, fleet=True, worker=worker, lease_expires=expires, next_due=due)
        for row, (worker, expires, due) in zip(
            collect_status(config, store),
            [("host-a:17", NOW + 20, NOW - 5), (None, None, NOW + 3600), (None, None, NOW)],
            strict=True,
        )
    ]
    out = io.StringIO()
    render_status(rows, out, now=NOW)
    header, home, work, _ = out.getvalue().splitlines()
    assert header.split()[14:19] == ["worker", "lease", "until", "next", "due"]
    assert home.split()[-5:] == ["1", "host-a:17", "in", "20s", "now"]
    assert "in 1h" in work
    as_json = rows[0].as_dict()
    assert as_json["worker"] == "host-a:17"
    assert as_json["lease_expires"] == "2027-01-15T08:00:20+00:00"
    assert as_json["next_due"] == "2027-01-15T07:59:55+00:00"
    plain = collect_status(config, store)[0].as_dict()
    assert not {"worker", "lease_expires", "next_due"} & plain.keys()  # SQLite: unchanged
