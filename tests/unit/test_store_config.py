"""The ``store`` key and its secrets: validation, redaction, and no psycopg for SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from popsync.config import parse_config
from popsync.configcache import load_config_cached
from popsync.errors import ConfigError, ExitCode, SecretError
from popsync.secrets import resolve_store_password
from popsync.store import check_store_url, is_postgres_url, redact_url, url_password

SECRET = "s3cr3t-db-pw"
ACCOUNT = """
[accounts.work]
host = "pop.example.com"
username = "me"
password_env = "POP_PW"
maildir = "/srv/mail/work"
"""


def problems_of(text: str) -> list[str]:
    """The problem lines of a config that must fail (exit 78)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    assert info.value.exit_code == ExitCode.CONFIG
    return info.value.problems


@pytest.mark.parametrize("value", [None, "sqlite"])
def test_sqlite_is_the_default(value: str | None) -> None:
    """No store key, or "sqlite", means SQLite in state_dir (store is None)."""
    text = ACCOUNT if value is None else f'store = "{value}"\n' + ACCOUNT
    config = parse_config(text)
    assert config.store is None
    assert config.worker_id is None


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
def test_postgres_urls_are_accepted(scheme: str) -> None:
    """Both libpq schemes select PostgreSQL, with libpq parameters kept as written."""
    url = f"{scheme}://popsync@db.example.net:5433/popsync?sslmode=verify-full"
    config = parse_config(f'store = "{url}"\nworker_id = "mx1:7"\n' + ACCOUNT)
    assert config.store == url
    assert is_postgres_url(config.store)
    assert config.worker_id == "mx1:7"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://u:PW@h/db", 'must be "sqlite"'),
        ("postgresql://u:PW@h:notaport/db", "not a valid URL"),
        ("postgresql:///db", "names no host"),
        ("postgresql://u:PW@h/d b", "spaces or control characters"),
    ],
)
def test_bad_store_urls_are_config_errors_without_the_password(url: str, expected: str) -> None:
    """A bad store URL is one clear line naming the key, never showing the password."""
    [problem] = problems_of(f'store = "{url}"\n' + ACCOUNT)
    assert problem.startswith("store: ")
    assert expected in problem
    assert "PW" not in problem


def test_host_may_come_from_a_parameter() -> None:
    """A Unix-socket URL names its host in ``host=`` instead of the authority."""
    check_store_url("postgresql:///popsync?host=/run/postgresql")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:PW@h:5432/db", "postgresql://u:[redacted]@h:5432/db"),
        (
            "postgresql://u@h/db?password=PW&sslmode=require",
            "postgresql://u@h/db?password=[redacted]&sslmode=require",
        ),
        ("postgresql://h/db", "postgresql://h/db"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:[redacted]@h/db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """The password goes, from the authority and from a password= parameter; the rest stays."""
    assert redact_url(url) == shown


def test_url_password() -> None:
    """The password in a URL is found (percent-decoded) in either place, or None."""
    assert url_password("postgresql://u:p%40ss@h/db") == "p@ss"
    assert url_password("postgresql://u@h/db?password=x") == "x"
    assert url_password("postgresql://u@h/db") is None


def test_store_secrets_need_a_postgres_store_and_exclude_each_other() -> None:
    """store_password_* without PostgreSQL, both at once, or with a URL password are refused."""
    assert problems_of('store_password_env = "DB_PW"\n' + ACCOUNT) == [
        'store_password_env: only used with store = "postgresql://…"'
    ]
    both = 'store = "postgresql://u@h/db"\nstore_password_env = "A"\nstore_password_command = "x"\n'
    assert problems_of(both + ACCOUNT) == [
        "store_password_command: conflicts with store_password_env: choose one"
    ]
    inline = 'store = "postgresql://u:pw@h/db"\nstore_password_env = "A"\n'
    assert problems_of(inline + ACCOUNT) == [
        "store_password_env: conflicts with the password in store: choose one"
    ]


def test_a_password_in_store_password_env_is_not_echoed() -> None:
    """A password pasted into store_password_env is refused without being shown."""
    [problem] = problems_of(
        f'store = "postgresql://u@h/db"\nstore_password_env = "{SECRET}-x"\n' + ACCOUNT
    )
    assert SECRET not in problem
    assert problem.startswith("store_password_env: not an environment variable name")


def test_worker_id_is_validated() -> None:
    """worker_id must be printable without spaces."""
    [problem] = problems_of('worker_id = "a b"\n' + ACCOUNT)
    assert problem.startswith("worker_id: ")


def test_resolve_store_password(tmp_path: Path) -> None:
    """The store password comes from the environment or a command, errors named by key."""
    assert resolve_store_password(None, None) is None
    assert resolve_store_password("DB_PW", None, env={"DB_PW": SECRET}) == SECRET
    with pytest.raises(SecretError) as info:
        resolve_store_password("DB_PW", None, env={})
    assert info.value.problems == [
        "store_password_env: the environment variable it names is not set"
    ]
    script = tmp_path / "pw"
    script.write_text(f"#!/bin/sh\necho {SECRET}\n")
    script.chmod(0o700)
    assert resolve_store_password(None, str(script), env={"PATH": "/bin"}) == SECRET
    with pytest.raises(SecretError) as failed:
        resolve_store_password(None, "/bin/false", env={"PATH": "/bin"})
    assert failed.value.problems[0].startswith("store_password_command: command '/bin/false'")


def test_a_url_with_a_password_is_not_cached(tmp_path: Path) -> None:
    """The validated-config cache never holds a store password; a URL without one is cached."""
    cache = tmp_path / "cache"
    config = tmp_path / "config.toml"
    config.write_text(f'store = "postgresql://u:{SECRET}@h/db"\n' + ACCOUNT)
    config.chmod(0o600)
    assert load_config_cached(config, cache).store == f"postgresql://u:{SECRET}@h/db"
    assert not any(SECRET in p.read_text() for p in cache.glob("*"))
    assert not list(cache.glob("config-*.json"))
    config.write_text('store = "postgresql://u@h/db"\n' + ACCOUNT)
    load_config_cached(config, cache)
    assert len(list(cache.glob("config-*.json"))) == 1
    assert load_config_cached(config, cache).store == "postgresql://u@h/db"


def test_check_config_shows_the_store_redacted(tmp_path: Path) -> None:
    """check-config names the store, with its password replaced."""
    config = tmp_path / "config.toml"
    store = f'store = "postgresql://u:{SECRET}@db.example.net/popsync"\n'
    state = f'state_dir = "{tmp_path / "state"}"\n'
    account = ACCOUNT.replace("/srv/mail/work", str(tmp_path / "Maildir"))
    config.write_text(store + state + account)
    config.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "POP_PW": "x"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "store: postgresql://u:[redacted]@db.example.net/popsync" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr


def test_check_config_checks_the_store_password_source(tmp_path: Path) -> None:
    """check-config reports an unset store_password_env by its key (78)."""
    from popsync.checks import check_config_file

    config = tmp_path / "config.toml"
    text = 'store = "postgresql://u@h/db"\nstore_password_env = "DB_PW"\n'
    config.write_text(text + ACCOUNT)
    config.chmod(0o600)
    _, problems = check_config_file(config, env={"POP_PW": "x"})
    assert "store_password_env: the environment variable it names is not set" in problems
    _, problems = check_config_file(config, env={"POP_PW": "x", "DB_PW": SECRET})
    assert not any(p.startswith("store_password") for p in problems)
