"""``popsync check-config``: every problem a config file has that shows without connecting.

:func:`check_config_file` reports, in one list: every key error of the file
(:func:`popsync.config.load_config`), and for every account even when some other key of it
is invalid, every secret source (file readable and private, variable set, command
executable; for an ``oauth2_provider`` account a stored token and a readable client secret
file), every CA bundle, and every Maildir (or the directory it will be created in)
and the state directory, writable by the user running the check, and every MDA command and
mbox (`popsync.deliver.probe`). Each problem is one line
that starts with its key, and each line appears once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from popsync.config import SECRET_KEYS, Config, default_state_dir, load_config, raw_account_tables
from popsync.errors import ConfigError

__all__ = ["check_config_file", "directory_problem", "maildir_problem"]


def check_config_file(
    path: Path, *, env: Mapping[str, str] | None = None
) -> tuple[Config | None, list[str]]:
    """Return the config (None if it has key errors) and every problem found, in file order."""
    problems: list[str] = []
    config: Config | None = None
    try:
        config = load_config(path)
    except ConfigError as exc:
        problems += exc.problems
    try:
        tables = raw_account_tables(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return config, problems  # load_config has said why
    for name, keys in tables.items():
        problems += _account_problems(name, keys, env)
    state_dir = config.state_dir if config is not None else _raw_state_dir(path)
    if config is not None:
        problems += _oauth2_problems(config)
        problems += _store_problems(config, env)
    if state_dir is not None:
        problem = directory_problem(state_dir, create=True)
        if problem:
            problems.append(f"state_dir: {problem}")
    return config, list(dict.fromkeys(problems))


def _store_problems(config: Config, env: Mapping[str, str] | None) -> list[str]:
    """The store's password source, checked like an account's (nothing is run)."""
    from popsync.secrets import check_secret_source

    problems: list[str] = []
    for key in ("store_password_env", "store_password_command"):
        value = getattr(config, key)
        if value is not None:
            found = check_secret_source("", key.removeprefix("store_"), value, env=env)
            problems += [p.replace("accounts..password_", "store_password_", 1) for p in found]
    return problems


def _account_problems(
    name: str, keys: Mapping[str, Any], env: Mapping[str, str] | None
) -> list[str]:
    from popsync.net import SYSTEM_CAS, check_ca_file
    from popsync.secrets import check_secret_source

    problems: list[str] = []
    for key in SECRET_KEYS[1:]:
        if key in keys:
            problems += check_secret_source(name, key, keys[key], env=env)
    ca_files = keys.get("tls_ca_file")
    for entry in [ca_files] if isinstance(ca_files, str) else ca_files or ():
        if isinstance(entry, str) and entry != SYSTEM_CAS and _absolute(entry):
            problem = check_ca_file(_absolute(entry) or Path(entry))
            if problem:
                problems.append(f"accounts.{name}.tls_ca_file: {problem}")
    maildir = _absolute(keys.get("maildir"))
    if maildir is not None:
        problem = maildir_problem(maildir)
        if problem:
            problems.append(f"accounts.{name}.maildir: {problem}")
    from popsync.deliver.probe import static_problems

    return problems + static_problems(name, keys)


def _oauth2_problems(config: Config) -> list[str]:
    """Accounts with oauth2_provider: a readable client secret file and a stored token."""
    from popsync.oauth2 import check_account

    return [
        f"accounts.{name}: {problem}"
        for name, account in config.accounts.items()
        if account.oauth2_provider is not None
        for problem in check_account(account, config.state_dir)
    ]


def _absolute(value: object) -> Path | None:
    """The path a config value names, or None when the parser rejects it anyway."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        return None
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else None


def _raw_state_dir(path: Path) -> Path | None:
    try:
        import tomllib

        value = tomllib.loads(path.read_text(encoding="utf-8")).get("state_dir")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return default_state_dir() if value is None else _absolute(value)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def directory_problem(path: Path, *, create: bool) -> str | None:
    """Why ``path`` cannot be used as a writable directory (created with its parents if
    ``create``), or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a directory"
        return None if _writable(path) else f"{path} is not writable by {_user()}"
    if not create:
        return f"{path} does not exist"
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir() or not _writable(ancestor):
        return f"{path} does not exist and {ancestor} is not writable by {_user()}"
    return None


def maildir_problem(path: Path) -> str | None:
    """Why popsync could not deliver into the Maildir ``path``, or None.

    popsync creates the Maildir and its tmp/, new/ and cur/, but not missing parents: a
    typo in the path should not grow a directory tree.
    """
    if path.exists():
        for sub in (path, path / "tmp", path / "new", path / "cur"):
            if sub.exists():
                problem = directory_problem(sub, create=False)
                if problem:
                    return problem
        return None
    parent = path.parent
    if not parent.is_dir():
        return f"parent directory {parent} does not exist (popsync creates only the Maildir)"
    return (
        None
        if _writable(parent)
        else f"cannot create {path}: {parent} is not writable by {_user()}"
    )


def _user() -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f"uid {os.geteuid()}"
