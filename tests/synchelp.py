"""Helpers for the sync-engine tests: config files, test messages, Maildir contents."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from devtools.dovecot import Dovecot, MailUser
from popsync.config import Account, Config, parse_config
from popsync.seen import SeenEntry, SeenStore

__all__ = [
    "REPO",
    "TomlValue",
    "assert_exactly_once",
    "dovecot_account",
    "dovecot_keys",
    "maildir_files",
    "maildir_messages",
    "make_message",
    "only_entries",
    "run_popsync",
    "stored_form",
    "toml_config",
    "write_config",
]

REPO = Path(__file__).resolve().parents[1]

TomlValue = str | int | bool | float | list[str]


def _toml(value: TomlValue) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def toml_config(state_dir: Path, accounts: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """A config file text with one [accounts.NAME] table per entry."""
    lines = [f"state_dir = {_toml(str(state_dir))}", "max_workers = 2", ""]
    for name, keys in accounts.items():
        lines.append(f"[accounts.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(
    path: Path, state_dir: Path, accounts: Mapping[str, Mapping[str, TomlValue]]
) -> Path:
    """Write a 0600 config file and return its path."""
    path.write_text(toml_config(state_dir, accounts))
    path.chmod(0o600)
    return path


def dovecot_keys(
    dovecot: Dovecot, user: MailUser, maildir: Path, **extra: TomlValue
) -> dict[str, TomlValue]:
    """Account keys for ``user`` on the test Dovecot over implicit TLS."""
    keys: dict[str, TomlValue] = {
        "host": dovecot.host,
        "port": dovecot.pop3s_port,
        "tls": "implicit",
        "tls_ca_file": str(dovecot.ca_file),
        "username": user.name,
        "password": user.password,
        "maildir": str(maildir),
        "timeout": "10s",
    }
    keys.update(extra)
    if keys.get("deliver", "maildir") != "maildir":
        keys.pop("maildir")
    return keys


def dovecot_account(
    dovecot: Dovecot, user: MailUser, maildir: Path, state_dir: Path, **extra: TomlValue
) -> tuple[Config, Account]:
    """A parsed config with one account ``acct`` for ``user``."""
    text = toml_config(state_dir, {"acct": dovecot_keys(dovecot, user, maildir, **extra)})
    config = parse_config(text, "test.toml")
    return config, config.accounts["acct"]


def make_message(index: int, body_size: int = 300, tag: str = "m") -> bytes:
    """A unique RFC 5322 message with dot-stuffing bait and a long line."""
    filler = (f"{tag}{index:06d} " * (body_size // 8 + 1))[:body_size]
    return (
        f"From: sender@example.org\r\nTo: rcpt@example.org\r\n"
        f"Subject: test {tag} {index}\r\nMessage-ID: <{tag}.{index}@example.org>\r\n\r\n"
        f".leading dot line\r\n{filler}\r\n..\r\nend {tag}{index}\r\n"
    ).encode()


def maildir_files(maildir: Path) -> list[Path]:
    """Every delivered file (new/ and cur/)."""
    return sorted(
        p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()
    )


def maildir_messages(maildir: Path) -> list[bytes]:
    """The contents of every delivered file."""
    return [p.read_bytes() for p in maildir_files(maildir)]


def stored_form(wire: bytes, line_endings: str = "lf") -> bytes:
    """What a Maildir file holds for a message received as ``wire``: CRLF -> LF by default."""
    return wire.replace(b"\r\n", b"\n") if line_endings == "lf" else wire


def assert_exactly_once(
    delivered: Iterable[bytes], expected: Sequence[bytes], *, line_endings: str = "lf"
) -> None:
    """Every expected message (received as ``expected``) is stored exactly once, nothing else."""
    got = Counter(delivered)
    want = Counter(stored_form(m, line_endings) for m in expected)
    lost = want - got
    extra = got - want
    assert not lost, f"{sum(lost.values())} message(s) lost"
    assert not extra, f"{sum(extra.values())} message(s) duplicated or unexpected"


def run_popsync(
    args: Sequence[str],
    *,
    crash: Sequence[str] | None = None,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run popsync (or the crash wrapper when ``crash`` is given) as a real subprocess."""
    if crash is None:
        argv = [sys.executable, "-m", "popsync", *args]
    else:
        argv = [sys.executable, "-m", "tests.crashwrap", *crash, "--", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        argv,
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def only_entries(store: SeenStore) -> dict[bytes, SeenEntry]:
    """The seen rows of the store's only mailbox ({} when it has none)."""
    keys = store.mailboxes()
    assert len(keys) <= 1, keys
    return store.entries(keys[0]) if keys else {}
