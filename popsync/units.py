"""Human-friendly durations ("5m", "1h30m") and sizes ("50MB", "1.5GiB") for the config file.

Parsers raise `ValueError` with a message that quotes the input and shows valid examples, so the
config layer can show it to the user unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from decimal import Decimal

__all__ = [
    "format_duration",
    "format_size",
    "human_bytes",
    "normalize_fingerprint",
    "parse_duration",
    "parse_size",
]

# Seconds per unit as decimal strings: decimal is imported by the parsers (config
# validation) only, not by every run that formats a size or a fingerprint.
_DURATION_UNITS: dict[str, str] = {
    "ms": "0.001",
    "s": "1",
    "m": "60",
    "h": "3600",
    "d": "86400",
    "w": "604800",
}
# Units must appear largest first ("1h30m", not "30m1h"), each at most once.
_DURATION_ORDER = ("w", "d", "h", "m", "s", "ms")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|[wdhms])", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_DURATION_HINT = "expected a number of seconds or a number with a unit: '90s', '5m', '1h30m', '2d'"

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)
_SIZE_HINT = "expected a number of bytes or a number with a unit: '512k', '50MB', '1.5GiB'"


def _check_number(value: object, kind: str, hint: str) -> Decimal | None:
    """Return a plain number as Decimal, None for strings; reject bools and other types."""
    from decimal import Decimal

    # bool is an int subclass, but `interval = true` is a mistake, not 1 second.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid {kind} {value!r}: {hint}")
    if isinstance(value, str):
        return None
    number = Decimal(str(value))
    if not number.is_finite() or number < 0:
        raise ValueError(f"invalid {kind} {value!r}: must be a non-negative number")
    return number


def parse_duration(value: object) -> float:
    """Parse "90s", "5m", "1h30m", "2d", "250ms" or a plain number of seconds into seconds."""
    from decimal import Decimal

    number = _check_number(value, "duration", _DURATION_HINT)
    if number is not None:
        return float(number)
    assert isinstance(value, str)
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        return float(Decimal(text))
    total = Decimal(0)
    position = 0
    last_rank = -1
    for match in _DURATION_PART.finditer(text):
        unit = match.group(2).lower()
        rank = _DURATION_ORDER.index(unit)
        if match.start() != position or rank <= last_rank:
            break
        total += Decimal(match.group(1)) * Decimal(_DURATION_UNITS[unit])
        position = _skip_spaces(text, match.end())
        last_rank = rank
    else:
        if position == len(text) and last_rank >= 0:
            return float(total)
    raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")


def _skip_spaces(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def parse_size(value: object) -> int:
    """Parse "512k", "50MB", "1.5GiB" or a plain number of bytes; kB/MB/GB are powers of 1000."""
    from decimal import Decimal

    number = _check_number(value, "size", _SIZE_HINT)
    if number is None:
        assert isinstance(value, str)
        match = _SIZE_RE.fullmatch(value.strip())
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"invalid size {value!r}: {_SIZE_HINT}")
        number = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    if number != number.to_integral_value():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(number)


def format_duration(seconds: float) -> str:
    """Render seconds compactly (5430 -> "1h30m30s"); parse_duration reads it back."""
    if seconds != int(seconds) or seconds < 1:
        return f"{seconds:g}s"
    remaining = int(seconds)
    parts: list[str] = []
    for unit in ("d", "h", "m", "s"):
        step = int(_DURATION_UNITS[unit])
        count, remaining = divmod(remaining, step)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_size(size: int) -> str:
    """Render bytes with the largest decimal unit dividing them exactly (50000000 -> "50MB")."""
    for unit in ("TB", "GB", "MB", "kB"):
        step = _SIZE_UNITS[unit.lower()]
        if size and size % step == 0:
            return f"{size // step}{unit}"
    return f"{size}B"


def human_bytes(count: int) -> str:
    """Render a byte count for people, rounded (1536 -> "1.5 KiB"); not parseable back."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


_FINGERPRINT_RE = re.compile(r"(?:sha256:)?((?:[0-9A-Fa-f]{2}:?){32})", re.IGNORECASE)


def normalize_fingerprint(text: object) -> str:
    """``"sha256:ab:cd..."`` (or bare hex) -> ``"sha256:AB:CD:..."``; ValueError if malformed."""
    match = _FINGERPRINT_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    digits = match[1].replace(":", "") if match else ""
    if len(digits) != 64:
        shown = repr(text[:100]) if isinstance(text, str) else type(text).__name__
        raise ValueError(
            f'not a SHA-256 fingerprint (got {shown}); expected "sha256:" and 32 hex bytes'
            " separated by colons, as `popsync test` prints it"
        )
    return "sha256:" + ":".join(digits[i : i + 2] for i in range(0, 64, 2)).upper()
