"""Logging setup: real rendered output (JSON lines, console), the stdlib bridge, redaction."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from popsync.logconfig import (
    HEARTBEAT_JOB,
    REDACTED,
    configure_logging,
    redact_secrets,
    stream_is_journal,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo every global change configure_logging makes, so other tests see defaults."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.NOTSET)
    logging.captureWarnings(False)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Parse every line written so far as one JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_event_level_logger_and_utc_timestamp() -> None:
    """Each structlog event becomes one JSON object with an ISO UTC timestamp."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    structlog.get_logger("popsync.sync").info("sync finished", account="work", fetched=3)
    [line] = _json_lines(out)
    assert line["event"] == "sync finished"
    assert line["account"] == "work"
    assert line["fetched"] == 3
    assert line["level"] == "info"
    assert line["logger"] == "popsync.sync"
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)


def test_auto_format_on_a_non_tty_is_json() -> None:
    """format='auto' writes JSON when the stream is not a terminal."""
    out = io.StringIO()
    configure_logging("auto", "info", out)
    structlog.get_logger().warning("disk nearly full")
    assert _json_lines(out)[0]["event"] == "disk nearly full"


def test_stdlib_apscheduler_records_are_bridged_into_json() -> None:
    """A plain logging record from APScheduler is rendered by the same JSON pipeline."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %r was missed", "work")
    [line] = _json_lines(out)
    assert line["event"] == "Run time of job 'work' was missed"
    assert line["logger"] == "apscheduler.scheduler"
    assert line["level"] == "warning"
    assert "timestamp" in line


def test_apscheduler_info_chatter_only_at_debug() -> None:
    """APScheduler's per-run INFO lines are held back at INFO and shown at DEBUG."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    logging.getLogger("apscheduler.executors.default").info("Running job")
    assert out.getvalue() == ""
    configure_logging("json", "debug", out)
    logging.getLogger("apscheduler.executors.default").info("Running job")
    assert [line["event"] for line in _json_lines(out)] == ["Running job"]


def test_level_filters_structlog_and_stdlib() -> None:
    """Events below the configured level are dropped from both sources."""
    out = io.StringIO()
    configure_logging("json", "WARNING", out)
    structlog.get_logger().info("quiet")
    logging.getLogger("other").info("quiet too")
    structlog.get_logger().error("loud")
    assert [line["event"] for line in _json_lines(out)] == ["loud"]


def test_reconfiguring_replaces_instead_of_stacking() -> None:
    """A second call (SIGHUP) leaves one handler and moves output to the new stream."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", first)
    log = structlog.get_logger()
    configure_logging("json", "info", second)
    log.info("after reload")
    logging.getLogger("x").warning("stdlib after reload")
    assert first.getvalue() == ""
    assert [line["event"] for line in _json_lines(second)] == [
        "after reload",
        "stdlib after reload",
    ]


def test_reconfigure_changes_level_of_existing_loggers() -> None:
    """A logger obtained before a reload obeys the level set by the reload."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    log = structlog.get_logger()
    log.debug("hidden")
    configure_logging("json", "debug", out)
    log.debug("visible")
    assert [line["event"] for line in _json_lines(out)] == ["visible"]


def test_exception_is_rendered_in_json() -> None:
    """log.exception puts the formatted traceback in an 'exception' field."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        structlog.get_logger().exception("sync crashed")
    [line] = _json_lines(out)
    assert line["level"] == "error"
    assert "ZeroDivisionError: boom" in line["exception"]


def test_positional_args_and_contextvars() -> None:
    """%-style arguments are interpolated and bound context variables are merged."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    structlog.contextvars.bind_contextvars(job="work")
    structlog.get_logger().info("fetched %d messages", 4)
    [line] = _json_lines(out)
    assert line["event"] == "fetched 4 messages"
    assert line["job"] == "work"


def test_console_format_is_human_readable_without_colors_off_tty() -> None:
    """format='console' on a non-TTY renders a plain key=value line, not JSON, without ANSI."""
    out = io.StringIO()
    configure_logging("console", "info", out)
    structlog.get_logger("popsync.cli").info("started", accounts=2)
    text = out.getvalue()
    assert not ANSI.search(text)
    assert "started" in text
    assert "accounts=2" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_format_on_a_real_tty_is_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """format='auto' on a pseudo-terminal uses the console renderer, coloured by default."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    master, slave = os.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=True) as tty:
            configure_logging("auto", "info", tty)
            structlog.get_logger().info("hello tty", password="hunter2")
            tty.flush()
            data = os.read(master, 65536).decode()
    finally:
        os.close(master)
    assert ANSI.search(data)
    plain = ANSI.sub("", data)
    assert "hello tty" in plain
    assert f"password={REDACTED}" in plain
    assert "hunter2" not in plain
    assert not plain.lstrip().startswith("{")


def test_no_color_disables_ansi_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """NO_COLOR turns colours off even on a terminal."""
    monkeypatch.setenv("NO_COLOR", "1")
    master, slave = os.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=True) as tty:
            configure_logging("auto", "info", tty)
            structlog.get_logger().info("plain please")
            tty.flush()
            data = os.read(master, 65536).decode()
    finally:
        os.close(master)
    assert "plain please" in data
    assert not ANSI.search(data)


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "chatty")])
def test_invalid_format_or_level_is_rejected(fmt: str, level: str) -> None:
    """An unknown format or level raises ValueError instead of silently logging nothing."""
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(fmt, level, io.StringIO())  # type: ignore[arg-type]


def test_rendered_json_redacts_keys_and_protocol_text() -> None:
    """Secrets never reach the rendered JSON, from structlog or from stdlib records."""
    out = io.StringIO()
    configure_logging("json", "debug", out)
    structlog.get_logger().debug(
        "login", user="alice", Password="hunter2", sent=b"PASS hunter2\r\n"
    )
    logging.getLogger("apscheduler").error("job failed: server said no to AUTH PLAIN AGFsaWNl")
    text = out.getvalue()
    assert "hunter2" not in text
    assert "AGFsaWNl" not in text
    login, failure = _json_lines(out)
    assert login["Password"] == REDACTED
    assert login["user"] == "alice"
    assert login["sent"] == repr(b"PASS [redacted]\r\n")
    assert failure["event"] == "job failed: server said no to AUTH PLAIN [redacted]"


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "PASSWORD",
        "pass",
        "secret",
        "Token",
        "authorization",
        "credentials",
        "oauth_token",
        "client-secret",
        "passwd",
    ],
)
def test_redact_secret_keys(key: str) -> None:
    """Secret-named keys are redacted whatever their case, alone or as a suffix."""
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info("x", **{key: "s3cret"})
    assert logs[0][key] == REDACTED


@pytest.mark.parametrize("key", ["password_file", "password_command", "token_url", "passes"])
def test_keys_that_only_mention_secrets_are_kept(key: str) -> None:
    """Keys naming where a secret lives (a path, a command) are not redacted."""
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info("x", **{key: "/run/credentials/popsync/work"})
    assert logs[0][key] == "/run/credentials/popsync/work"


def test_redact_nested_dicts_and_lists_without_mutating_the_caller() -> None:
    """Nested mappings and lists are redacted in a copy; the caller's objects are untouched."""
    account = {"name": "work", "auth": {"token": "abc", "mech": "xoauth2"}, "pass": "x"}
    history = [{"secret": "s"}, "PASS hunter2"]
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info("x", account=account, history=history)
    assert logs[0]["account"] == {
        "name": "work",
        "auth": {"token": REDACTED, "mech": "xoauth2"},
        "pass": REDACTED,
    }
    assert logs[0]["history"] == [{"secret": REDACTED}, f"PASS {REDACTED}"]
    assert account["auth"] == {"token": "abc", "mech": "xoauth2"}
    assert history[1] == "PASS hunter2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C: PASS hunter2 with spaces", f"C: PASS {REDACTED}"),
        ("AUTH PLAIN AGFsaWNlAGh1bnRlcjI=", f"AUTH PLAIN {REDACTED}"),
        ("AUTH XOAUTH2 dXNlcj1h", f"AUTH XOAUTH2 {REDACTED}"),
        ("APOP alice c4c9334bac560ecc979e58001b3e22fb", f"APOP alice {REDACTED}"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30", f"Authorization: Bearer {REDACTED}"),
        # CR is escaped (it would overwrite the line on a terminal); LF is each renderer's job.
        ("sent PASS x\r\nthen STAT", f"sent PASS {REDACTED}\\x0d\nthen STAT"),
    ],
)
def test_redact_protocol_text(text: str, expected: str) -> None:
    """PASS, AUTH initial responses, APOP digests and bearer tokens are scrubbed from text."""
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info(text, detail=text)
    assert logs[0]["event"] == expected
    assert logs[0]["detail"] == expected


@pytest.mark.parametrize(
    "text", ["all tests pass now", "AUTH", "USER alice", "Authentication failed.", "STAT"]
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    """Prose and harmless commands are not redacted."""
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info(text)
    assert logs[0]["event"] == text


# ------------------------------------------------------------------------------ journald
def _journal_env(monkeypatch: pytest.MonkeyPatch, path: Any) -> None:
    """Point $JOURNAL_STREAM at a file's device and inode, as systemd does for its socket."""
    info = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")


def test_stream_is_journal_matches_device_and_inode(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the stream whose dev:ino $JOURNAL_STREAM names counts as the journal."""
    mine, other = tmp_path / "journal", tmp_path / "redirected"
    with mine.open("w") as journal, other.open("w") as redirected:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not stream_is_journal(journal)
        _journal_env(monkeypatch, mine)
        assert stream_is_journal(journal)
        assert not stream_is_journal(redirected)
        assert not stream_is_journal(io.StringIO())
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not stream_is_journal(journal)


def _journal_lines(path: Any) -> list[str]:
    logging.getLogger().handlers[-1].flush()
    return [str(line) for line in path.read_text().splitlines()]


def test_auto_format_on_the_journal_writes_priority_prefixed_lines(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors get <3>, warnings <4>, info <6>, debug <7>; no timestamp, key=value fields."""
    path = tmp_path / "journal"
    with path.open("w") as journal:
        _journal_env(monkeypatch, path)
        configure_logging("auto", "debug", journal)
        log = structlog.get_logger("popsync.sync")
        log.error("sync failed", account="work", error="[AUTH] bad password")
        log.warning("plan warning", account="home")
        log.info("sync finished", account="work", fetched=3)
        log.debug("planned", fetch=0)
        logging.getLogger("apscheduler.scheduler").critical("scheduler died")
        lines = _journal_lines(path)
    assert lines == [
        '<3>popsync.sync: sync failed account=work error="[AUTH] bad password"',
        "<4>popsync.sync: plan warning account=home",
        "<6>popsync.sync: sync finished account=work fetched=3",
        "<7>popsync.sync: planned fetch=0",
        "<2>apscheduler.scheduler: scheduler died",
    ]


def test_journal_lines_prefix_every_traceback_line_and_escape_newlines(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traceback stays at error priority line by line; a newline in a value cannot split one."""
    path = tmp_path / "journal"
    with path.open("w") as journal:
        configure_logging("journal", "info", journal)
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            structlog.get_logger("popsync.scheduler").exception("crash", detail="a\nb", p="PASS x")
        lines = _journal_lines(path)
    assert lines[0] == f'<3>popsync.scheduler: crash detail="a\\nb" p="PASS {REDACTED}"'
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ZeroDivisionError: boom"


def test_json_stays_the_default_when_journal_stream_is_inherited(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child whose stderr goes to a file keeps JSON although it inherited the variable."""
    _journal_env(monkeypatch, tmp_path)  # some other file: the directory
    path = tmp_path / "log"
    with path.open("w") as stream:
        configure_logging("auto", "info", stream)
        structlog.get_logger().info("hello")
        lines = _journal_lines(path)
    assert json.loads(lines[0])["event"] == "hello"


def _run_heartbeat_records() -> None:
    """Log what APScheduler logs around one heartbeat run and one account run."""
    executor = logging.getLogger("apscheduler.executors.heartbeat")
    executor.info('Running job "%s (trigger: interval[0:00:05])"', HEARTBEAT_JOB)
    executor.info('Job "%s (trigger: interval[0:00:05])" executed successfully', HEARTBEAT_JOB)
    logging.getLogger("apscheduler.scheduler").debug("Looking for jobs to run")
    logging.getLogger("apscheduler.executors.default").info('Running job "sync work"')


def test_verbose_does_not_repeat_the_heartbeat() -> None:
    """At debug (-v) an account's job run shows, the heartbeat and scheduler wake-ups do not."""
    out = io.StringIO()
    configure_logging("json", "debug", out)
    _run_heartbeat_records()
    assert [line["event"] for line in _json_lines(out)] == ['Running job "sync work"']


def test_scheduler_debug_shows_wakeups_but_never_the_heartbeat() -> None:
    """With scheduler_debug (-vv) APScheduler's debug lines show; the heartbeat still does not."""
    out = io.StringIO()
    configure_logging("json", "debug", out, scheduler_debug=True)
    _run_heartbeat_records()
    assert [line["event"] for line in _json_lines(out)] == [
        "Looking for jobs to run",
        'Running job "sync work"',
    ]


def test_console_escapes_server_control_sequences() -> None:
    """ESC sequences in a value or a traceback never reach the console raw."""
    out = io.StringIO()
    configure_logging("console", "info", out)
    hostile = "-ERR \x1b]0;pwned\x07\x1b[2J gone"
    try:
        raise RuntimeError(hostile)
    except RuntimeError:
        structlog.get_logger().exception("sync failed", error=hostile)
    text = out.getvalue()
    assert "\x1b]" not in text
    assert "\x1b[2J" not in text
    assert "\x07" not in text
    assert "RuntimeError: -ERR \\x1b]0;pwned\\x07\\x1b[2J gone" in text  # the traceback
    assert text.count("pwned") == 2  # and the field, escaped as well


def test_running_accounts_secret_is_scrubbed_from_every_event() -> None:
    """A secret registered by the running sync is removed from any logged text."""
    from popsync.textsafe import add_secrets, scrubbing

    out = io.StringIO()
    configure_logging("json", "info", out)
    with scrubbing():
        add_secrets(["hunter2", "AGJvYgBodW50ZXIy"])
        structlog.get_logger().warning("server said", detail="-ERR bad pw hunter2 AGJvYgBodW50ZXIy")
    structlog.get_logger().warning("after the run", detail="hunter2")
    first, after = _json_lines(out)
    assert first["detail"] == f"-ERR bad pw {REDACTED} {REDACTED}"
    assert after["detail"] == "hunter2"  # the scope ended with the run
