"""Metrics: listen addresses, the series a run produces, and the docs that query them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from popsync.config import parse_config
from popsync.errors import ConfigError
from popsync.metrics import Metrics, parse_listen
from popsync.sync import RunResult

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9387", ("127.0.0.1", 9387)),
        ("[::1]:9387", ("::1", 9387)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_parse_listen_accepts_host_port(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [IPv6]:PORT split into host and port."""
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9387", ":9387", "127.0.0.1:", "host:99999", "::1:9387", "a:b"])
def test_parse_listen_rejects_malformed(text: str) -> None:
    """A missing host or port, a port out of range or a bare IPv6 address is refused."""
    with pytest.raises(ValueError, match=r"HOST:PORT|brackets"):
        parse_listen(text)


_ACCOUNT = """
[accounts.a]
host = "pop.example.org"
username = "u"
password = "p"
maildir = "/tmp/m"
"""


def test_config_reports_a_bad_metrics_listen() -> None:
    """metrics_listen is validated with the rest of the file, named by its key."""
    assert parse_config(_ACCOUNT).metrics_listen is None
    assert parse_config('metrics_listen = "127.0.0.1:9387"\n' + _ACCOUNT).metrics_listen
    with pytest.raises(ConfigError) as info:
        parse_config('metrics_listen = "9387"\n' + _ACCOUNT)
    assert info.value.problems[0].startswith('metrics_listen: expected "HOST:PORT"')


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_runs_feed_counters_gauges_and_backoff() -> None:
    """Two runs and a failure add up; the backoff reason is one-hot; removal drops series."""
    metrics = Metrics(lambda name: {"a": 7, "b": 0}[name])
    metrics.set_accounts(["a", "b"])
    zero = _samples(metrics)
    assert zero[("popsync_runs_total", frozenset({("account", "a"), ("outcome", "auth")}))] == 0
    assert zero[("popsync_accounts_configured", frozenset())] == 2
    with metrics.running():
        assert _samples(metrics)[("popsync_runs_in_progress", frozenset())] == 1
        ok = RunResult("a", fetched=3, bytes=300, deleted=2, skipped=1, duration=1.5)
    metrics.observe(ok, 1000.0)
    metrics.observe(RunResult("a", fetched=1, bytes=50, duration=0.5), 1010.0)
    metrics.observe(RunResult("b", outcome="auth", duration=0.2), 1020.0)
    metrics.backoff("b", 1800.0, "auth")
    metrics.backoff("a", 0.0, "none")
    got = _samples(metrics)
    a, b = frozenset({("account", "a")}), frozenset({("account", "b")})
    assert got[("popsync_runs_in_progress", frozenset())] == 0
    assert got[("popsync_runs_total", a | {("outcome", "ok")})] == 2
    assert got[("popsync_runs_total", b | {("outcome", "auth")})] == 1
    assert got[("popsync_messages_fetched_total", a)] == 4
    assert got[("popsync_fetched_bytes_total", a)] == 350
    assert got[("popsync_messages_deleted_total", a)] == 2
    assert got[("popsync_messages_too_large", a)] == 0  # the latest run skipped none
    assert got[("popsync_last_success_timestamp_seconds", a)] == 1010.0
    assert ("popsync_last_success_timestamp_seconds", b) not in got
    assert got[("popsync_last_run_duration_seconds", a)] == 0.5
    assert got[("popsync_seen_entries", a)] == 7
    assert got[("popsync_backoff_seconds", b)] == 1800.0
    assert got[("popsync_backoff_reason", b | {("popsync_backoff_reason", "auth")})] == 1
    assert got[("popsync_backoff_reason", b | {("popsync_backoff_reason", "none")})] == 0
    metrics.set_accounts(["a"], removed=["b"])
    after = _samples(metrics)
    assert not [key for key in after if ("account", "b") in key[1]]
    assert after[("popsync_accounts_configured", frozenset())] == 1


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"\bpopsync_[a-z_]+\b", text))


def _exposed() -> set[str]:
    metrics = Metrics(lambda name: 0)
    metrics.set_accounts(["a"])
    metrics.observe(RunResult("a"), 1.0)
    metrics.backoff("a", 0.0, "none")
    return {name for name, _ in _samples(metrics)}


@pytest.mark.parametrize("doc", ["alerts.yml", "grafana-dashboard.json"])
def test_dashboard_and_alerts_query_only_real_metrics(doc: str) -> None:
    """Every popsync_* name in the sample dashboard and alert rules is one popsync exposes."""
    text = (ROOT / "docs" / doc).read_text()
    used = _names_in(text)
    assert used, f"{doc} queries no popsync metric"
    assert used - _exposed() == set()


def test_dashboard_is_grafana_json_with_panels_and_variables() -> None:
    """The dashboard parses, has panels with Prometheus targets and the account variable."""
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    assert dash["panels"]
    assert all(panel["targets"] and panel["targets"][0]["expr"] for panel in dash["panels"])
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "account"}


def test_a_fleet_worker_publishes_its_id_once() -> None:
    """In fleet mode one info series names the worker; without it there is none."""
    fleet = _samples(Metrics(lambda name: 0, worker="host-a:41"))
    assert fleet[("popsync_worker_info", frozenset({("worker_id", "host-a:41")}))] == 1
    assert not [key for key in _samples(Metrics(lambda name: 0)) if "worker" in key[0]]
