"""Shared fixtures: one private Dovecot per test session (per xdist worker), fresh users."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import structlog

from devtools.dovecot import Dovecot, DovecotLmtp, MailUser, dovecot_available, lmtp_available
from devtools.postgres import Postgres, postgres_available

__all__ = [
    "ca_file",
    "dovecot",
    "in_ci",
    "lmtp_server",
    "mail_user",
    "postgres",
    "require_lmtp",
    "unavailable",
]

_INSTALL_HINT = "install dovecot-core and dovecot-pop3d (./dev setup does it)"


def in_ci() -> bool:
    """True when the CI environment variable says we run in CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """A server, tool or tmpfs a test needs is missing: skip locally, fail in CI."""
    if in_ci():
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """In CI a Dovecot or PostgreSQL test that skips, for whatever reason, is a failure."""
    outcome = yield
    report = outcome.get_result()
    servers = [name for name in ("dovecot", "postgres") if item.get_closest_marker(name)]
    if report.skipped and in_ci() and servers:
        report.outcome = "failed"
        report.longrepr = f"CI is set but this {servers[0]} test was skipped: {report.longrepr}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses Dovecot or PostgreSQL, so ``-m "not dovecot"`` works."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "dovecot" in fixtures:
            item.add_marker(pytest.mark.dovecot)
        if "postgres" in fixtures:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def _private_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test gets its own cache directory: no stale validated config, nothing in ~/.cache."""
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A test that configures logging (``configure_logging`` on its captured stderr) leaves
    no handler behind: later tests' APScheduler lines would hit that closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("apscheduler", "py.warnings")}
    structlog_config = structlog.get_config()
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)
    structlog.configure(**structlog_config)


def _server_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """Return (root, remove_when_done) for the server's files.

    As root, Dovecot's mail processes run as nobody and must traverse the path, but
    pytest keeps its temp base 0700; so root gets a private directory of its own in /tmp.
    """
    if os.geteuid() != 0:
        return tmp_path_factory.mktemp("dovecot"), False
    return Path(tempfile.mkdtemp(prefix="popsync-dovecot-")), True


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A running private Dovecot with POP3 (plain + STLS) and POP3S listeners."""
    if not dovecot_available():
        if in_ci():
            pytest.fail(f"CI is set but Dovecot is not installed: {_INSTALL_HINT}")
        pytest.skip(f"Dovecot is not installed: {_INSTALL_HINT}")
    root, remove = _server_root(tmp_path_factory)
    try:
        with Dovecot(root) as server:
            yield server
    finally:
        if remove:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mail_user(dovecot: Dovecot) -> MailUser:
    """A fresh user with an empty mailbox on the session's Dovecot."""
    return dovecot.new_user()


@pytest.fixture
def ca_file(dovecot: Dovecot) -> Path:
    """PEM file of the CA that signed the Dovecot server certificate."""
    return dovecot.ca_file


_LMTP_HINT = "install dovecot-lmtpd and dovecot-sieve (./dev setup does it)"


def require_lmtp() -> None:
    """Skip (or fail under CI) when Dovecot's LMTP server or Sieve plugin is missing."""
    if not lmtp_available():
        if in_ci():
            pytest.fail(f"CI is set but Dovecot LMTP/Sieve is not installed: {_LMTP_HINT}")
        pytest.skip(f"Dovecot LMTP/Sieve is not installed: {_LMTP_HINT}")


@pytest.fixture(scope="session")
def lmtp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotLmtp]:
    """A running private Dovecot LMTP server with Sieve (its own root, socket and port)."""
    require_lmtp()
    root, remove = _server_root(tmp_path_factory)
    try:
        with DovecotLmtp(root) as server:
            yield server
    finally:
        if remove:
            shutil.rmtree(root, ignore_errors=True)


_POSTGRES_HINT = "install postgresql (./dev setup does it)"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A running private PostgreSQL cluster (initdb + pg_ctl) on a free loopback port."""
    if not postgres_available():
        unavailable(f"PostgreSQL is not installed: {_POSTGRES_HINT}")
    # Not under pytest's 0700 temp base: as root the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="popsync-postgres-"))
    try:
        with Postgres(root) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)
