"""Fleet-mode pieces that need no server: the lease timing knobs."""

from __future__ import annotations

import pytest

from popsync.errors import ConfigError, ExitCode
from popsync.lease import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_RENEW_SECONDS,
    LEASE_SECONDS_ENV,
    RENEW_SECONDS_ENV,
    lease_timing,
)


def test_lease_timing_defaults_to_thirty_seconds_renewed_every_ten() -> None:
    """Without the environment knobs the documented defaults apply."""
    assert lease_timing({}) == (DEFAULT_LEASE_SECONDS, DEFAULT_RENEW_SECONDS) == (30.0, 10.0)


def test_lease_timing_knobs_override_both() -> None:
    """Tests and tuning set both periods through the environment."""
    assert lease_timing({LEASE_SECONDS_ENV: "3", RENEW_SECONDS_ENV: " 1.5 "}) == (3.0, 1.5)


@pytest.mark.parametrize(
    ("lease", "renew", "problem"),
    [
        ("ten", "1", "POPSYNC_LEASE_SECONDS: not a number of seconds"),
        ("3", "3", "POPSYNC_LEASE_RENEW_SECONDS (3) must be above 0 and below"),
        ("3", "0", "POPSYNC_LEASE_RENEW_SECONDS (0) must be above 0 and below"),
    ],
)
def test_lease_timing_refuses_a_lease_renewed_too_rarely(
    lease: str, renew: str, problem: str
) -> None:
    """A renewal period not below the lease would let a healthy worker's lease lapse."""
    with pytest.raises(ConfigError) as caught:
        lease_timing({LEASE_SECONDS_ENV: lease, RENEW_SECONDS_ENV: renew})
    assert caught.value.problems[0].startswith(problem)


def test_a_run_failing_after_its_lease_was_lost_ends_as_the_lease_loss() -> None:
    """A symptom of the takeover (the new owner moved a tmp file) is reported as the loss."""
    from popsync.errors import LocalIOError
    from popsync.lease import LeaseLost
    from popsync.sync import _lease_cause

    symptom = LocalIOError("cannot move tmp/1.x to new/: No such file or directory")
    lost = LeaseLost("the lease is gone")

    def gone() -> None:
        raise lost

    def held() -> None:
        return None

    assert _lease_cause(symptom, gone) is lost
    assert lost.exit_code == ExitCode.TEMPORARY
    assert _lease_cause(symptom, held) is symptom  # the lease is fine: the error stands
    assert _lease_cause(symptom, None) is symptom  # not fleet mode

    def broken() -> None:
        raise OSError("the fence itself failed: the database is down")

    assert _lease_cause(symptom, broken) is symptom  # never a crash, never a worse error
