"""Tests for popsync.units: duration and size parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popsync.units import (
    format_duration,
    format_size,
    human_bytes,
    normalize_fingerprint,
    parse_duration,
    parse_size,
)

__all__: list[str] = []

_DURATION_HINT = "expected a number of seconds or a number with a unit: '90s', '5m', '1h30m', '2d'"
_SIZE_HINT = "expected a number of bytes or a number with a unit: '512k', '50MB', '1.5GiB'"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300.0),
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("1H30M", 5400.0),
        ("30", 30.0),
        (" 45 ", 45.0),
        (10, 10.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration_valid(text: str | int | float, seconds: float) -> None:
    """Valid durations in every accepted spelling parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "m", "5x", "30m1h", "1h1h", "-5s", "nan", "1e3", "5 minutes", "h5"]
)
def test_parse_duration_invalid_strings(text: str) -> None:
    """Malformed duration strings raise ValueError quoting the input and showing examples."""
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f"invalid duration {text!r}: {_DURATION_HINT}"


@pytest.mark.parametrize("value", [True, None, [5], {"m": 5}])
def test_parse_duration_rejects_non_numbers(value: object) -> None:
    """Booleans and non-scalar values are not durations."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_parse_duration_rejects_negative_number() -> None:
    """A negative number of seconds is refused with its own message."""
    with pytest.raises(ValueError, match=r"^invalid duration -1: must be a non-negative number$"):
        parse_duration(-1)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50MB", 50_000_000),
        ("50mb", 50_000_000),
        ("1.5GiB", 1_610_612_736),
        ("1.5gib", 1_610_612_736),
        ("512k", 512_000),
        ("512K", 512_000),
        ("512kB", 512_000),
        ("10 KiB", 10_240),
        ("2MiB", 2_097_152),
        ("1TB", 10**12),
        ("100", 100),
        ("100B", 100),
        ("0", 0),
        (1024, 1024),
        (2.0, 2),
    ],
)
def test_parse_size_valid(text: str | int | float, size: int) -> None:
    """Decimal units are powers of 1000 and binary units powers of 1024, case-insensitively."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5XB", "-1", "1e3", "MB", "5 M B"])
def test_parse_size_invalid_strings(text: str) -> None:
    """Malformed size strings raise ValueError quoting the input and showing examples."""
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f"invalid size {text!r}: {_SIZE_HINT}"


@pytest.mark.parametrize("value", ["1.5B", "0.0001k", 1.5])
def test_parse_size_rejects_fractional_bytes(value: object) -> None:
    """A size that is not a whole number of bytes is refused rather than rounded."""
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, None, float("inf"), -3])
def test_parse_size_rejects_other_values(value: object) -> None:
    """Booleans, None, infinity and negative numbers are not sizes."""
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(5430, "1h30m30s"), (300, "5m"), (86400, "1d"), (0.25, "0.25s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    """Durations render in the compact unit notation."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("size", "text"), [(50_000_000, "50MB"), (1536, "1536B"), (0, "0B")])
def test_format_size(size: int, text: str) -> None:
    """Sizes render with the largest decimal unit that divides them."""
    assert format_size(size) == text


@given(st.integers(min_value=1, max_value=10**8))
def test_format_duration_round_trips(seconds: int) -> None:
    """parse_duration reads back whatever format_duration writes for whole seconds."""
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**15))
def test_format_size_round_trips(size: int) -> None:
    """parse_size reads back whatever format_size writes."""
    assert parse_size(format_size(size)) == size


def test_fingerprints_are_normalized() -> None:
    """tls_fingerprint accepts any case, with or without colons and the sha256: prefix."""
    canonical = "sha256:" + ":".join(["AB"] * 32)
    assert normalize_fingerprint("ab" * 32) == canonical
    assert normalize_fingerprint("SHA256:" + ":".join(["ab"] * 32)) == canonical
    for bad in ("sha256:AB", "sha1:" + "ab" * 20, "zz" * 32, 7):
        with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
            normalize_fingerprint(bad)


def test_human_bytes() -> None:
    """Byte counts for people round to one decimal above a KiB."""
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 1024**2)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
    ]
