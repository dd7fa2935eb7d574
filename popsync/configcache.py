"""A validated configuration cached by content hash, so a short run skips pydantic.

Importing pydantic and building the config models is most of what a ``popsync --once``
with nothing new costs (about 20 MiB of its peak RSS and a large share of its start-up),
while the file rarely changes between two timer runs. So the first run validates with
:func:`popsync.config.load_config` and writes the result, as JSON, to the cache
directory; later runs whose key matches read it back without importing pydantic.

The key covers everything validation depends on: the file's bytes and whether its mode
exposes it (the permission warning), the environment that fills defaults (``HOME``,
``STATE_DIRECTORY``, ``XDG_STATE_HOME``, the effective uid) and the size and mtime of every
module of the package (a new key or rule invalidates every cache). No secret is written: an
inline ``password`` is stored as where it came from and read again from the file.

A hit returns :class:`Record` objects, duck-typed stand-ins with the same attributes as
``Config``/``Account`` (only attributes: code that needs ``model_copy`` and friends, like
the daemon, calls ``load_config``). Caching is best effort: any problem reading or
writing the cache means a normal validation, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from popsync.config import Config

__all__ = ["Record", "cache_dir", "load_config_cached"]

_FORMAT = 1
_ENV_KEYS = ("HOME", "STATE_DIRECTORY", "XDG_STATE_HOME")


class Record:
    """Read-only attributes from a cached, already validated table."""

    def __init__(self, values: Mapping[str, object]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._values.items() if k != "password")
        return f"{type(self).__name__}({shown})"


class _Secret:
    """Stands in for pydantic's ``SecretStr``: the value never shows in a repr."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretStr('**********')"

    __str__ = __repr__


class _Uncacheable(Exception):
    """A value this format cannot store; the config is simply not cached."""


# ------------------------------------------------------------------------ locating
def cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """systemd's ``$CACHE_DIRECTORY``, else ``$XDG_CACHE_HOME/popsync``, else ~/.cache/popsync."""
    env = os.environ if env is None else env
    systemd = env.get("CACHE_DIRECTORY", "")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "popsync"
    home = env.get("HOME", "")
    return Path(home) / ".cache" / "popsync" if home else None


def _key(raw: bytes, mode: int) -> str:
    digest = hashlib.sha256()
    digest.update(b"%d\0%d\0%d\0" % (_FORMAT, os.geteuid(), mode & (stat.S_IRGRP | stat.S_IROTH)))
    for name in _ENV_KEYS:
        digest.update(os.environ.get(name, "").encode("utf-8", "surrogateescape") + b"\0")
    # Validation reaches into several modules (units, metrics, ...): any change to the
    # package, an upgrade or an edit, gives new keys. stat() is enough and costs ~0.1 ms.
    for module in sorted(Path(__file__).parent.glob("*.py")):
        info = module.stat()
        digest.update(b"%s\0%d\0%d\0" % (module.name.encode(), info.st_size, info.st_mtime_ns))
    digest.update(raw)
    return digest.hexdigest()


def _entry(directory: Path, path: Path) -> Path:
    """One cache file per config path; a changed file overwrites its entry."""
    name = hashlib.sha256(os.fsencode(path.absolute())).hexdigest()[:32]
    return directory / f"config-{name}.json"


# ------------------------------------------------------------------------ encoding
def _encode(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    raise _Uncacheable(type(value).__name__)


def _decode(value: object) -> object:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict):
        if "$path" in value:
            return Path(value["$path"])
        if "$tuple" in value:
            return tuple(_decode(item) for item in value["$tuple"])
        raise ValueError("unknown tagged value")
    return value


def _properties(cls: type) -> list[str]:
    """The read-only properties of a model (``Account.mailbox``): stored with the fields."""
    return [
        name
        for klass in cls.__mro__
        if klass.__module__ == "popsync.config"
        for name, value in vars(klass).items()
        if isinstance(value, property)
    ]


def _dump(config: Config, text: str) -> dict[str, Any]:
    """The JSON document for ``config``; an inline password as the table it came from."""
    import tomllib

    from popsync.config import Account, Config

    own_tables = tomllib.loads(text).get("accounts", {})
    if config.store is not None:
        from popsync.store import url_password

        if url_password(config.store) is not None:
            raise _Uncacheable("a password in store")  # never written to the cache
    settings = {
        name: _encode(getattr(config, name))
        for name in [*Config.model_fields, *_properties(Config)]
        if name != "accounts"
    }
    accounts = {}
    for name, account in config.accounts.items():
        names = [*Account.model_fields, *_properties(Account)]
        values = {field: getattr(account, field) for field in names}
        password = values.pop("password")
        accounts[name] = {field: _encode(value) for field, value in values.items()}
        accounts[name]["password"] = None
        if password is not None:
            at = _quoted_at(text, password.get_secret_value())
            table = "accounts" if "password" in own_tables[name] else "defaults"
            accounts[name]["password"] = table if at is None else {"$at": at}
    return {"settings": settings, "accounts": accounts}


def _quoted_at(text: str, secret: str) -> int | None:
    """Where ``secret`` stands quoted in ``text``, read back up to its closing quote.

    A hit re-reads an inline password from the file (the cache holds no secret); this offset
    lets it slice the password out instead of importing tomllib (with datetime: ~8 ms of each
    start) to parse the whole file again. The key covers the file's bytes, so the slice reads
    the same characters; any occurrence will do. Escaped or quote-holding passwords get None
    and are parsed again.
    """
    start = text.find(secret)
    while start > 0:
        quote = text[start - 1]
        end = text.find(quote, start) if quote in "'\"" else -1
        if end >= 0 and text[start:end] == secret and (quote == "'" or "\\" not in secret):
            return start
        start = text.find(secret, start + 1)
    return None


def _reread(text: str, at: int) -> str:
    """The password `_quoted_at` found at ``at``."""
    return text[at : text.index(text[at - 1], at)]


def _load(document: Mapping[str, Any], text: str) -> Config:
    """Records from a cached document; inline passwords are read again from ``text``."""
    toml: dict[str, Any] = {}
    accounts = {}
    for name, raw in document["accounts"].items():
        source = raw["password"]
        values = {field: _decode(value) for field, value in raw.items() if field != "password"}
        values["password"] = None
        if isinstance(source, dict):
            values["password"] = _Secret(_reread(text, source["$at"]))
        elif source is not None:
            if not toml:
                import tomllib

                toml = tomllib.loads(text)
            table = toml["accounts"][name] if source == "accounts" else toml["defaults"]
            values["password"] = _Secret(table["password"])
        accounts[name] = Record(values)
    settings = {key: _decode(value) for key, value in document["settings"].items()}
    return cast("Config", Record({**settings, "accounts": accounts}))


# ------------------------------------------------------------------------ reading
def _read(entry: Path, key: str, text: str) -> Config | None:
    try:
        document = json.loads(entry.read_bytes())
        if document.get("key") != key:
            return None
        return _load(document, text)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(entry: Path, key: str, config: Config, text: str) -> None:
    try:
        document = {"key": key, **_dump(config, text)}
    except _Uncacheable:
        return
    with contextlib.suppress(OSError):
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        import tempfile  # only a cache miss writes (a hit is most runs: ~3 ms of import)

        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=entry.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(document, out)
            os.replace(tmp, entry)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def load_config_cached(path: Path, directory: Path | None = None) -> Config:
    """As :func:`popsync.config.load_config`, from the cache when the key matches."""
    from_cache = cache_dir() if directory is None else directory
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        from popsync.config import load_config

        return load_config(path)  # it reports the problem in its own words
    key = _key(raw, mode)
    entry = _entry(from_cache, path) if from_cache is not None else None
    if entry is not None:
        cached = _read(entry, key, text)
        if cached is not None:
            return cached

    from popsync.config import config_from_bytes

    # The bytes just hashed, not a second read: the file may change in between.
    config = config_from_bytes(path, raw, mode)
    if entry is not None:
        _write(entry, key, config, text)
    return config
