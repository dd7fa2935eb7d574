"""Backoff rules: pure functions of outcome, failure count, interval and the server's word."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popsync.backoff import MAX_BACKOFF, SLOW_RETRY, SLOW_START, next_delay

TEMPORARY = ("temporary", "local_io", "error")


def test_success_returns_to_the_interval() -> None:
    """A successful run is followed by the plain interval."""
    assert next_delay("ok", 0, 300.0) == 300.0


@pytest.mark.parametrize("outcome", TEMPORARY)
def test_temporary_failures_double_from_the_interval(outcome: str) -> None:
    """IN-USE, SYS/TEMP, timeouts: interval, then 2x, 4x, 8x."""
    assert [next_delay(outcome, n, 60.0) for n in (1, 2, 3, 4)] == [60.0, 120.0, 240.0, 480.0]


def test_temporary_backoff_is_capped() -> None:
    """However many failures, a temporary problem waits at most MAX_BACKOFF."""
    assert next_delay("temporary", 50, 60.0) == MAX_BACKOFF


def test_cap_never_undercuts_a_long_interval() -> None:
    """An account polled daily is never polled more often because it failed."""
    assert next_delay("temporary", 3, 86400.0) == 86400.0


@pytest.mark.parametrize("outcome", ["auth", "config"])
def test_refused_credentials_retry_slowly(outcome: str) -> None:
    """[AUTH] and [SYS/PERM] start at half an hour and double up to SLOW_RETRY."""
    assert next_delay(outcome, 1, 60.0) == SLOW_START
    assert next_delay(outcome, 2, 60.0) == 2 * SLOW_START
    assert next_delay(outcome, 30, 60.0) == SLOW_RETRY


def test_protocol_errors_turn_slow_after_a_few() -> None:
    """A broken server is retried like a temporary failure at first, then slowly."""
    assert next_delay("protocol", 1, 60.0) == 60.0
    assert next_delay("protocol", 3, 60.0) == 240.0
    assert next_delay("protocol", 4, 60.0) >= SLOW_START


def test_login_delay_is_a_floor() -> None:
    """[LOGIN-DELAY] / CAPA LOGIN-DELAY n raise the delay, even after a success."""
    assert next_delay("ok", 0, 60.0, retry_after=900.0) == 900.0
    assert next_delay("temporary", 1, 60.0, retry_after=300.0) == 300.0
    assert next_delay("temporary", 5, 60.0, retry_after=300.0) == 960.0


@given(
    outcome=st.sampled_from(["ok", "temporary", "auth", "protocol", "local_io", "config", "error"]),
    failures=st.integers(0, 1000),
    interval=st.floats(10.0, 7 * 86400.0),
    retry_after=st.none() | st.floats(0.0, 86400.0),
)
def test_delay_bounds(
    outcome: str, failures: int, interval: float, retry_after: float | None
) -> None:
    """Never sooner than the interval or the server's delay, never later than the caps allow."""
    delay = next_delay(outcome, failures, interval, retry_after=retry_after)
    assert delay >= interval
    assert retry_after is None or delay >= retry_after
    assert delay <= max(SLOW_RETRY, interval, retry_after or 0.0)


@given(failures=st.integers(1, 100), interval=st.floats(10.0, 3600.0))
def test_more_failures_never_mean_sooner(failures: int, interval: float) -> None:
    """Backoff is monotonic in the failure count."""
    for outcome in ("temporary", "auth", "protocol"):
        assert next_delay(outcome, failures + 1, interval) >= next_delay(
            outcome, failures, interval
        )
