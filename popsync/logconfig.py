"""structlog setup: JSON lines for machines, a readable console for people, secrets never.

Three renderings: JSON lines (the default when stderr is a file or pipe, as under Docker), a
console for an interactive terminal, and journal lines when stderr is connected to journald
(``$JOURNAL_STREAM`` names stderr's device and inode, as systemd sets it for a unit with
``StandardError=journal``). A journal line is ``<N>logger: event key=value ...`` with the
syslog priority prefix ``<N>`` that journald strips and stores as the entry's priority
(``SyslogLevelPrefix=yes``, the default), so ``journalctl -p err`` finds errors; journald adds
its own timestamp, so the line carries none.

Everything ends in one stdlib handler whose ``structlog.stdlib.ProcessorFormatter`` renders
both structlog events and plain ``logging`` records (APScheduler's ``"apscheduler"`` logger, the
stdlib ``warnings`` module), so journald and ``docker logs`` see one format. ``redact_secrets``
runs last before rendering, on every event from either source: besides secret-named keys and
PASS/AUTH-looking text it removes the running account's secret (:mod:`popsync.textsafe`) and
escapes control characters, so a server's ``ESC`` sequences or CR/LF cannot reach a terminal
or forge log lines, even through a traceback.

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

from popsync.textsafe import escape_controls, scrub

__all__ = [
    "HEARTBEAT_JOB",
    "REDACTED",
    "LogFormat",
    "configure_logging",
    "journal_renderer",
    "redact_secrets",
    "stream_is_journal",
]

LogFormat = Literal["auto", "json", "console", "journal"]

#: The name popsync.scheduler gives its heartbeat job; APScheduler's lines about it are dropped.
HEARTBEAT_JOB = "popsync heartbeat"

# syslog(3) priorities by structlog level name; journald files a line under its prefix.
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}

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

# Loggers that chatter at INFO on every job run; they are held at WARNING unless DEBUG, and
# even then at INFO (one "Running job" line per account run) unless scheduler_debug is set:
# at DEBUG APScheduler logs every wake-up, i.e. every few seconds.
_NOISY_LOGGERS = ("apscheduler",)


class _PopsyncHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a reconfiguration can replace it."""


class _DropHeartbeat(logging.Filter):
    """Drops APScheduler's lines about the heartbeat job, which runs every few seconds."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("apscheduler"):
            return True
        try:
            return HEARTBEAT_JOB not in record.getMessage()
        except Exception:  # a malformed record is for the formatter to report
            return True


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
    """Redact a value recursively; containers are copied, never mutated.

    Control characters are escaped except LF and TAB: tracebacks need them, and every
    renderer deals with line breaks itself (JSON and journal lines escape them).
    """
    if isinstance(value, str):
        return escape_controls(scrub(_scrub_text(value)), keep_newlines=True)
    if isinstance(value, bytes):
        # Shown as its repr by every renderer, which escapes control bytes already.
        scrubbed = scrub(_scrub_text(value.decode("latin-1")))
        return scrubbed.encode("latin-1", "replace")
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_secret_key(key) else _redact_value(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide secrets (by key, by PASS/AUTH shape, by value), escape controls."""
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


def stream_is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journald stream systemd named in ``$JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for the unit's stdout/stderr connection to
    journald; a child whose stderr was redirected elsewhere inherits the variable, so the
    device and inode must match the stream's own, as sd_journal_stream_fd(3) advises.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # StringIO, a closed stream
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def _rendering(fmt: LogFormat, stream: TextIO) -> LogFormat:
    """Resolve "auto": journal lines for journald, console for a terminal, JSON otherwise."""
    if fmt != "auto":
        return fmt
    if stream_is_journal(stream):
        return "journal"
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty and isatty() else "json"


def _one_line(text: str) -> str:
    """Escape line breaks: journald would start a new entry, without a priority prefix."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _journal_value(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if text and not any(ch.isspace() or ch in '"=\\' for ch in text):
        return text
    return '"' + _one_line(text).replace('"', '\\"') + '"'


def journal_renderer(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    """structlog renderer: ``<N>logger: event key=value ...`` lines for journald.

    A traceback spans several lines; journald makes each line an entry of its own, so every
    line gets the prefix (else the traceback of an error would be filed as info).
    """
    level = str(event_dict.pop("level", "info"))
    prefix = f"<{_PRIORITY.get(level, 6)}>"
    event_dict.pop("timestamp", None)
    name = event_dict.pop("logger", None)
    event = _one_line(str(event_dict.pop("event", "")))
    trace = event_dict.pop("exception", None)
    pairs = " ".join(f"{key}={_journal_value(value)}" for key, value in event_dict.items())
    head = f"{name}: {event}" if name else event
    lines = [" ".join(part for part in (head, pairs) if part)]
    if trace:
        lines += str(trace).rstrip("\n").splitlines()
    return "\n".join(prefix + line for line in lines)


def _renderer(rendering: LogFormat, stream: TextIO) -> list[Processor]:
    """The final processors: format exceptions, redact, render."""
    if rendering == "journal":
        return [structlog.processors.format_exc_info, redact_secrets, journal_renderer]
    if rendering == "console":
        colors = bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
        # Tracebacks are formatted before redaction (not by the renderer, prettily with
        # rich), so an exception message quoting the server is escaped like the rest.
        return [
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.dev.ConsoleRenderer(colors=colors),
        ]
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
    *,
    scheduler_debug: bool = False,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stderr); safe to call again.

    ``format="auto"`` writes journal lines when ``stream`` is journald's, renders for people
    when it is a TTY, and JSON lines otherwise. APScheduler's DEBUG chatter (every wake-up)
    shows only with ``scheduler_debug`` (``-vv``); its heartbeat job never shows.
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
            *_renderer(_rendering(format, out), out),
        ],
    )
    handler = _PopsyncHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_DropHeartbeat())

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PopsyncHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    if number > logging.DEBUG:
        noisy_level = max(number, logging.WARNING)
    else:
        noisy_level = number if scheduler_debug else logging.INFO
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
