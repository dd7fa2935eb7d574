"""structlog setup: JSON lines for machines, a readable console for people, secrets never.

Everything ends in one stdlib handler whose ``structlog.stdlib.ProcessorFormatter`` renders
both structlog events and plain ``logging`` records (APScheduler's ``"apscheduler"`` logger, the
stdlib ``warnings`` module), so journald and ``docker logs`` see one format. ``redact_secrets``
runs last before rendering, on every event from either source.

``configure_logging`` may be called again (the daemon does on SIGHUP): it replaces its own
handler rather than stacking another one.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "LogFormat", "configure_logging", "redact_secrets"]

LogFormat = Literal["auto", "json", "console"]

REDACTED = "[redacted]"

# A key is secret when its last word (split on _ - . and space) is one of these.
# "password_file" and "password_command" name where a secret lives, not the secret itself.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "pass", "secret", "token", "authorization", "credentials"}
)
_KEY_SPLIT = re.compile(r"[_\-. ]+")

# POP3/SASL lines that carry a secret, as they might appear in a protocol trace or an error.
# Commands are matched in upper case only, so prose such as "tests pass now" is left alone.
_SECRET_TEXT = (
    (re.compile(r"\bPASS[ \t]+[^\r\n]+"), "PASS " + REDACTED),
    (re.compile(r"\b(AUTH[ \t]+[A-Za-z0-9_-]+)[ \t]+[^\s]+"), r"\1 " + REDACTED),
    (re.compile(r"\b(APOP[ \t]+\S+)[ \t]+[0-9A-Fa-f]{32}\b"), r"\1 " + REDACTED),
    (re.compile(r"(?i)\b(Bearer|Basic)[ \t]+[A-Za-z0-9._~+/-]{8,}=*"), r"\1 " + REDACTED),
)

# Loggers that chatter at INFO on every job run; they are held at WARNING unless DEBUG.
_NOISY_LOGGERS = ("apscheduler",)


class _PopsyncHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a reconfiguration can replace it."""


def _is_secret_key(key: object) -> bool:
    """True when a mapping key names a secret value."""
    if not isinstance(key, str):
        return False
    words = _KEY_SPLIT.split(key.strip().lower())
    return bool(words) and words[-1] in _SECRET_WORDS


def _scrub_text(text: str) -> str:
    """Replace secret-looking protocol fragments inside free text."""
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: object) -> object:
    """Redact a value recursively; containers are copied, never mutated."""
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, bytes):
        scrubbed = _scrub_text(value.decode("latin-1"))
        return scrubbed.encode("latin-1")
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_secret_key(key) else _redact_value(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide secret-named keys and PASS/AUTH-looking text, nested too."""
    for key, value in event_dict.items():
        event_dict[key] = REDACTED if _is_secret_key(key) else _redact_value(value)
    return event_dict


def _parse_level(level: str | int) -> int:
    """Turn "info", "DEBUG" or 20 into a logging level number; reject anything else."""
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


def _wants_console(fmt: LogFormat, stream: TextIO) -> bool:
    """Console rendering for an interactive terminal, JSON for everything else."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return fmt == "console"


def _renderer(console: bool, stream: TextIO) -> list[Processor]:
    """The final processors: format exceptions, redact, render."""
    if console:
        colors = bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
        # ConsoleRenderer formats exc_info itself (prettily, with rich when installed).
        return [redact_secrets, structlog.dev.ConsoleRenderer(colors=colors)]
    return [
        structlog.processors.format_exc_info,
        redact_secrets,
        structlog.processors.JSONRenderer(),
    ]


def _shared_processors() -> list[Processor]:
    """Enrichment common to structlog events and foreign stdlib records."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    format: LogFormat = "auto",
    level: str | int = "INFO",
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stderr); safe to call again.

    ``format="auto"`` renders for people when ``stream`` is a TTY and JSON lines otherwise.
    """
    if format not in get_args(LogFormat):
        raise ValueError(f"unknown log format {format!r}")
    number = _parse_level(level)
    out = sys.stderr if stream is None else stream
    shared = _shared_processors()

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(_wants_console(format, out), out),
        ],
    )
    handler = _PopsyncHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PopsyncHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    noisy_level = number if number <= logging.DEBUG else max(number, logging.WARNING)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy_level)
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a reconfiguration (SIGHUP) must reach loggers created before it.
        cache_logger_on_first_use=False,
    )
