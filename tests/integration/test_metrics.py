"""The Prometheus endpoint of a real daemon, scraped while it syncs real Dovecot mailboxes."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from devtools.dovecot import Dovecot
from popsync import __version__
from popsync.backoff import SLOW_START
from tests.integration.test_daemon import (
    WAIT,
    DaemonProcess,
    _config,
    _keys,
    ev,
    synced,
)
from tests.integration.test_daemon import start_daemon as start_daemon  # noqa: PLC0414
from tests.synchelp import maildir_files, make_message

__all__: list[str] = []

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_when(port: int, runs: dict[str, int]) -> Samples:
    """Scrape until each account has counted ``runs[account]`` runs (the log line comes first)."""
    deadline = time.monotonic() + WAIT
    while True:
        got = scrape(port)
        counted = {
            account: sum(
                v for (name, labels), v in got.items()
                if name == "popsync_runs_total" and ("account", account) in labels
            )
            for account in runs
        }  # fmt: skip
        if counted == runs:
            return got
        assert time.monotonic() < deadline, f"runs counted {counted}, expected {runs}"
        time.sleep(0.05)


def _with_metrics(config: Path) -> None:
    config.write_text('metrics_listen = "127.0.0.1:0"\n' + config.read_text())


def test_metrics_match_what_the_daemon_did(
    dovecot: Dovecot, tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Counters, gauges and backoff agree with the runs against Dovecot, before and after a poll."""
    alice = dovecot.new_user()
    small = [make_message(i) for i in range(2)]
    dovecot.deliver_many(alice, [*small, make_message(9, body_size=20_000)])
    config = _config(
        tmp_path,
        {
            "alice": _keys(
                dovecot, alice, tmp_path, delete="after_delivery", max_message_size="10k"
            ),
            "wrong": _keys(dovecot, dovecot.new_user(), tmp_path, password="not-the-password"),
        },
    )
    _with_metrics(config)
    daemon = start_daemon(config)
    port = daemon.wait_for(ev("serving metrics"))["port"]
    started = time.time()
    daemon.wait_for(synced("alice", fetched=2, deleted=2, skipped=1))
    daemon.wait_for(ev("next run delayed", account="wrong"))

    got = scrape_when(port, {"alice": 1, "wrong": 1})
    delivered = maildir_files(tmp_path / f"Maildir-{alice.name}")
    assert len(delivered) == 2
    assert value(got, "popsync_runs_total", account="alice", outcome="ok") == 1
    assert value(got, "popsync_runs_total", account="alice", outcome="auth") == 0
    assert value(got, "popsync_runs_total", account="wrong", outcome="auth") == 1
    assert value(got, "popsync_messages_fetched_total", account="alice") == 2
    # Bytes as fetched (CRLF on the wire); the files hold them with LF line ends.
    assert value(got, "popsync_fetched_bytes_total", account="alice") == sum(
        len(p.read_bytes().replace(b"\n", b"\r\n")) for p in delivered
    )
    assert value(got, "popsync_messages_deleted_total", account="alice") == 2
    assert value(got, "popsync_messages_too_large", account="alice") == 1
    # Two delivered and the too-large one, remembered so it is not tried again.
    assert value(got, "popsync_seen_entries", account="alice") == 3
    assert value(got, "popsync_seen_entries", account="wrong") == 0
    last = value(got, "popsync_last_success_timestamp_seconds", account="alice")
    assert started - 1 <= last <= time.time()
    assert ("popsync_last_success_timestamp_seconds", frozenset({("account", "wrong")})) not in got
    assert 0 < value(got, "popsync_last_run_duration_seconds", account="alice") < 10
    assert value(got, "popsync_backoff_seconds", account="alice") == 0
    assert value(got, "popsync_backoff_reason", account="alice", popsync_backoff_reason="none") == 1
    assert value(got, "popsync_backoff_seconds", account="wrong") == SLOW_START
    assert value(got, "popsync_backoff_reason", account="wrong", popsync_backoff_reason="auth") == 1
    assert value(got, "popsync_backoff_reason", account="wrong", popsync_backoff_reason="none") == 0
    assert value(got, "popsync_accounts_configured") == 2
    assert value(got, "popsync_runs_in_progress") == 0
    info = value(got, "popsync_build_info", version=__version__, python=_python(got))
    assert info == 1

    # New mail and a poll: the counters move by exactly what the second run did.
    mark = daemon.mark()
    dovecot.deliver(alice, make_message(3))
    daemon.send(signal.SIGUSR1)
    daemon.wait_for(synced("alice", fetched=1), after=mark)
    daemon.wait_for(ev("sync failed", account="wrong"), after=mark)
    got = scrape_when(port, {"alice": 2, "wrong": 2})
    assert value(got, "popsync_runs_total", account="alice", outcome="ok") == 2
    assert value(got, "popsync_messages_fetched_total", account="alice") == 3
    assert value(got, "popsync_messages_deleted_total", account="alice") == 3
    # The two deleted in the first run are gone from the server: kept, as vanished, until
    # forget_after (30 days) and three listings pass; plus the too-large one and the new one.
    assert value(got, "popsync_seen_entries", account="alice") == 4
    assert value(got, "popsync_runs_total", account="wrong", outcome="auth") == 2
    assert value(got, "popsync_backoff_seconds", account="wrong") == 2 * SLOW_START
    assert daemon.stop()[0] == 0


def _python(samples: Samples) -> str:
    [labels] = [dict(labels) for name, labels in samples if name == "popsync_build_info"]
    return labels["python"]
