"""The validated-config cache: load_config's values, no pydantic on a hit, no secret stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from popsync.config import Account, Config, load_config
from popsync.configcache import Record, _properties, cache_dir, load_config_cached
from popsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-cache-secret"
DEFAULT_SECRET = "default-cache-secret"

RICH = f"""
state_dir = "~/state"
max_workers = 3
log_level = "DEBUG"

[defaults]
host = "pop.example.org"
password = "{DEFAULT_SECRET}"
interval = "5m"
max_message_size = "10M"

[accounts.own]
username = "alice"
password = "{SECRET}"
maildir = "~/Mail/own"
tls = "starttls"
tls_ca_file = "/etc/ssl/ca.pem"
delete = "after_days"
delete_after_days = 7

[accounts.inherited]
username = "bob"
maildir = "/srv/mail/bob"
pipelining = false
timeout = "90s"

[accounts.file]
username = "carol"
password_file = "~/secret"
maildir = "/srv/mail/carol"
tls_verify = false
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "popsync.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def same_values(cached: Config, validated: Config) -> None:
    """Every field of the settings and of every account is equal and of the same type."""
    for name in Config.model_fields:
        if name != "accounts":
            assert getattr(cached, name) == getattr(validated, name), name
            assert type(getattr(cached, name)) is type(getattr(validated, name)), name
    assert list(cached.accounts) == list(validated.accounts)
    for key, account in validated.accounts.items():
        hit = cached.accounts[key]
        for name in Account.model_fields:
            ours, theirs = getattr(hit, name), getattr(account, name)
            if name == "password" and theirs is not None:
                assert ours.get_secret_value() == theirs.get_secret_value()
                continue
            assert ours == theirs, (key, name)
            assert type(ours) is type(theirs), (key, name)
        for name in _properties(Account):  # mailbox, secret_source, ...
            assert getattr(hit, name) == getattr(account, name), (key, name)


def test_a_hit_has_the_values_load_config_gives(tmp_path: Path) -> None:
    """The second load comes from the cache, with every field as load_config validates it."""
    path = write(tmp_path, RICH)
    first = load_config_cached(path, tmp_path / "cache")
    second = load_config_cached(path, tmp_path / "cache")
    assert isinstance(first, Config)
    assert isinstance(second, Record)
    same_values(second, load_config(path))
    inherited = second.accounts["inherited"].password
    assert inherited is not None
    assert inherited.get_secret_value() == DEFAULT_SECRET


def test_no_secret_is_written(tmp_path: Path) -> None:
    """The cache file holds neither inline password; a hit still repr-hides them."""
    path = write(tmp_path, RICH)
    load_config_cached(path, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    text = entry.read_text()
    assert SECRET not in text
    assert DEFAULT_SECRET not in text
    assert entry.stat().st_mode & 0o077 == 0
    hit = load_config_cached(path, tmp_path / "cache")
    assert SECRET not in repr(hit.accounts["own"])
    assert SECRET not in repr(hit.accounts["own"].password)


def test_a_changed_file_is_validated_again(tmp_path: Path) -> None:
    """New bytes mean a new key: the edit shows, and a broken edit is reported."""
    path = write(tmp_path, RICH)
    load_config_cached(path, tmp_path / "cache")
    write(tmp_path, RICH.replace("max_workers = 3", "max_workers = 5"))
    assert load_config_cached(path, tmp_path / "cache").max_workers == 5
    write(tmp_path, RICH.replace("max_workers = 3", "max_workers = 0"))
    with pytest.raises(ConfigError, match="max_workers"):
        load_config_cached(path, tmp_path / "cache")
    with pytest.raises(ConfigError, match="max_workers"):
        load_config_cached(path, tmp_path / "cache")  # an invalid file is never cached


def test_mode_and_environment_are_part_of_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The permission warning follows the mode; ~ follows HOME, even on a would-be hit."""
    path = write(tmp_path, RICH, mode=0o600)
    cache = tmp_path / "cache"
    assert load_config_cached(path, cache).warnings == load_config(path).warnings
    path.chmod(0o644)
    warned = load_config_cached(path, cache)
    assert any("readable by group or others" in w for w in warned.warnings)
    assert load_config_cached(path, cache).warnings == warned.warnings
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    moved = load_config_cached(path, cache)
    assert moved.state_dir == tmp_path / "elsewhere" / "state"


def test_a_broken_cache_falls_back_to_validation(tmp_path: Path) -> None:
    """A corrupt, foreign or unwritable cache never fails the load."""
    path = write(tmp_path, RICH)
    cache = tmp_path / "cache"
    load_config_cached(path, cache)
    (entry,) = cache.iterdir()
    entry.write_text("{not json")
    assert isinstance(load_config_cached(path, cache), Config)
    document = json.loads(entry.read_text())
    document["accounts"]["own"]["maildir"] = {"$weird": 1}
    entry.write_text(json.dumps(document))
    assert isinstance(load_config_cached(path, cache), Config)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    assert isinstance(load_config_cached(path, blocked / "cache"), Config)


def test_unreadable_file_is_reported_like_load_config(tmp_path: Path) -> None:
    """A missing file raises the ConfigError load_config raises."""
    with pytest.raises(ConfigError) as ours:
        load_config_cached(tmp_path / "missing.toml", tmp_path / "cache")
    with pytest.raises(ConfigError) as theirs:
        load_config(tmp_path / "missing.toml")
    assert ours.value.problems == theirs.value.problems


def test_records_are_read_only(tmp_path: Path) -> None:
    """A cached config cannot be changed, like the frozen models."""
    path = write(tmp_path, RICH)
    load_config_cached(path, tmp_path / "cache")
    hit: Any = load_config_cached(path, tmp_path / "cache")
    with pytest.raises(AttributeError):
        hit.accounts["own"].host = "evil.example.org"
    with pytest.raises(AttributeError):
        _ = hit.accounts["own"].no_such_key


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CACHE_DIRECTORY": "/var/cache/popsync", "HOME": "/h"}, "/var/cache/popsync"),
        ({"XDG_CACHE_HOME": "/xdg", "HOME": "/h"}, "/xdg/popsync"),
        ({"XDG_CACHE_HOME": "relative", "HOME": "/h"}, "/h/.cache/popsync"),
        ({}, None),
    ],
)
def test_cache_dir(env: dict[str, str], expected: str | None) -> None:
    """systemd's CacheDirectory= first, then XDG, then ~/.cache; none without a home."""
    found = cache_dir(env)
    assert (str(found) if found is not None else None) == expected


def test_a_hit_imports_no_pydantic(tmp_path: Path) -> None:
    """In a fresh interpreter, loading a cached config leaves pydantic unimported."""
    path = write(tmp_path, RICH)
    load_config_cached(path, tmp_path / "cache")
    code = (
        "import sys; from pathlib import Path; from popsync.configcache import load_config_cached;"
        f"c = load_config_cached(Path({str(path)!r}), Path({str(tmp_path / 'cache')!r}));"
        "print(c.accounts['own'].host, 'pydantic' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert out.split() == ["pop.example.org", "False"]


def test_the_example_config_is_cached_whole(tmp_path: Path) -> None:
    """Every key of config.example.toml survives the cache (a new key type would show here)."""
    path = write(tmp_path, (ROOT / "config.example.toml").read_text())
    validated = load_config_cached(path, tmp_path / "cache")
    hit = load_config_cached(path, tmp_path / "cache")
    assert isinstance(hit, Record), "the example config was not cached"
    same_values(hit, validated)


def test_sync_checks_cleartext_auth_without_the_config_module() -> None:
    """sync uses sasl.REVEALING for config.CLEARTEXT_AUTH: the same set, in upper case."""
    from popsync.config import CLEARTEXT_AUTH
    from popsync.pop3.sasl import REVEALING

    assert {name.upper() for name in CLEARTEXT_AUTH} == REVEALING


@pytest.mark.parametrize(
    ("toml_value", "password", "sliced"),
    [
        ('"plain-secret"', "plain-secret", True),
        ("'literal\"quote'", 'literal"quote', True),
        ('"pässwörd ünïcode"', "pässwörd ünïcode", True),
        ('"alice"', "alice", True),  # the username's occurrence comes first: any one will do
        ('"esc\\"aped"', 'esc"aped', False),
        ('"back\\\\slash"', "back\\slash", False),
        ('"""multi"""', "multi", True),
    ],
)
def test_an_inline_password_is_read_back_exactly(
    tmp_path: Path, toml_value: str, password: str, sliced: bool
) -> None:
    """A hit gives the password load_config gives; a plain one by its offset, no tomllib."""
    text = (
        'state_dir = "/state"\n[accounts.a]\nhost = "pop.example.org"\nusername = "alice"\n'
        f'password = {toml_value}\nmaildir = "/m"\n'
    )
    path = write(tmp_path, text)
    load_config_cached(path, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    stored = json.loads(entry.read_text())["accounts"]["a"]["password"]
    assert isinstance(stored, dict) is sliced, stored
    hit = load_config_cached(path, tmp_path / "cache")
    assert isinstance(hit, Record)
    cached = hit.accounts["a"].password
    assert cached is not None
    assert cached.get_secret_value() == password
    validated = load_config(path).accounts["a"].password
    assert validated is not None
    assert validated.get_secret_value() == password
