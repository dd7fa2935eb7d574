"""popsync's configuration: a TOML file validated into frozen pydantic models.

`parse_config` reports every problem in one `ConfigError`, one line each, prefixed with the key's
dotted path (`accounts.work.port: ...`), so a user fixes the whole file in one go. Secrets are
`SecretStr` and never appear in a repr, str, JSON dump or error message.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from popsync.errors import ConfigError
from popsync.units import format_duration, normalize_fingerprint, parse_duration, parse_size

__all__ = [
    "CLEARTEXT_AUTH",
    "SECRET_KEYS",
    "Account",
    "AuthMechanism",
    "Config",
    "DeletePolicy",
    "DeliverTo",
    "FirstRun",
    "LineEndings",
    "LogFormat",
    "LogLevel",
    "OAuth2Provider",
    "Pipelining",
    "TlsMode",
    "TraceHeader",
    "config_from_bytes",
    "default_state_dir",
    "load_config",
    "parse_config",
    "raw_account_tables",
]

TlsMode = Literal["implicit", "starttls", "none"]
AuthMechanism = Literal[
    "auto",
    "user",
    "apop",
    "rpop",
    "plain",
    "login",
    "cram-md5",
    "scram-sha-256",
    "xoauth2",
    "oauthbearer",
]
DeletePolicy = Literal["never", "after_delivery", "after_days"]
FirstRun = Literal["fetch", "mark_seen"]
Pipelining = Literal["auto", "on", "off"]
LogFormat = Literal["auto", "json", "console", "journal"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LineEndings = Literal["lf", "crlf"]
DeliverTo = Literal["maildir", "lmtp", "mda", "mbox"]
TraceHeader = Literal["received", "delivered-to", "x-popsync-uidl"]
OAuth2Provider = Literal["google", "microsoft", "custom"]

#: Exactly one of these supplies an account's password or token (or oauth2_provider does).
SECRET_KEYS = ("password", "password_file", "password_command", "password_env")
#: Keys of the built-in OAuth2 (popsync.oauth2); all but the provider need oauth2_provider.
OAUTH2_KEYS = (
    "oauth2_provider",
    "oauth2_client_id",
    "oauth2_client_secret_file",
    "oauth2_tenant",
    "oauth2_scope",
    "oauth2_token_url",
    "oauth2_device_url",
    "oauth2_auth_url",
)
_OAUTH2_MECHANISMS = ("xoauth2", "oauthbearer")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

MIN_INTERVAL = 10.0
DEFAULT_PORTS: Mapping[str, int] = {"implicit": 995, "starttls": 110, "none": 110}
# Mechanisms that hand the server a reusable credential: over tls = "none" anyone on the path
# learns it. Allowed only when named explicitly (with allow_plaintext, which tls = "none"
# needs anyway), and then each run logs a warning; auth = "auto" never picks them there.
CLEARTEXT_AUTH = frozenset({"user", "rpop", "plain", "login", "xoauth2", "oauthbearer"})

_STANDARD_PORTS = frozenset(DEFAULT_PORTS.values())
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORKER_ID_RE = re.compile(r"[!-~]{1,200}")
_TOML_POSITION_RE = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_CHECKS_ERROR = "popsync_checks"
_TOP_LEVEL_KEYS = (
    "state_dir",
    "max_workers",
    "lmtp_max_sessions",
    "log_format",
    "log_level",
    "metrics_listen",
    "store",
    "store_password_env",
    "store_password_command",
    "worker_id",
    "defaults",
    "accounts",
)


_BAD_NAME = "invalid account name; use 1-64 letters, digits, '_', '.' or '-'"


def _valid_name(name: str) -> bool:
    # "." and ".." are excluded: other modules may use the name in file names.
    return bool(_NAME_RE.fullmatch(name)) and set(name) != {"."}


def _expand_path(value: object) -> Path:
    """Expand ~ in a path string; keep relative paths relative."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty path string")
    if "\0" in value:
        raise ValueError("path contains a NUL character")
    return Path(os.path.expanduser(value))


def _absolute_path(value: object) -> Path:
    """Expand ~ and insist on an absolute path: a daemon's working directory is arbitrary."""
    path = _expand_path(value)
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path or start with ~ (got {str(path)!r})")
    return path


def _on_off(value: object) -> object:
    """`pipelining = true/false` reads naturally in TOML; map it to "on"/"off"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _log_level(value: object) -> object:
    """Accept "INFO" as well as "info", but show a wrong value as the user wrote it."""
    if isinstance(value, str) and value.lower() in get_args(LogLevel):
        return value.lower()
    return value


def _one_or_list(value: object) -> object:
    """`key = "x"` and `key = ["x", "y"]` both mean a list."""
    return [value] if isinstance(value, str | Path) else value


def _ca_list(value: object) -> object:
    if value == []:
        raise ValueError('must name at least one CA bundle, or "system"')
    return _one_or_list(value)


def _ca_source(value: str) -> str:
    """A tls_ca_file entry: "system" (the system CAs) or an absolute path to a PEM bundle."""
    return value if value == "system" else str(_absolute_path(value))


def _fingerprint(value: object) -> str:
    return normalize_fingerprint(value)


def _file_mode(value: object) -> object:
    """A mode as an octal string ("0640", "640") or a TOML integer (0o640)."""
    if isinstance(value, str):
        if not re.fullmatch(r"0?[0-7]{3}", value.strip()):
            raise ValueError(f'must be an octal mode such as "0640" (got {value!r})')
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 0o777:
        raise ValueError(f"must be a mode between 0000 and 0777 (got {value:o})")
    return value


def _lower(value: object) -> object:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, list | tuple):
        return [v.lower() if isinstance(v, str) else v for v in value]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Mode = Annotated[int, BeforeValidator(_file_mode)]
Size = Annotated[int, BeforeValidator(parse_size)]
AbsolutePath = Annotated[Path, BeforeValidator(_absolute_path)]
SecretPath = Annotated[Path, BeforeValidator(_expand_path)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
CaFiles = Annotated[
    tuple[Annotated[str, AfterValidator(_ca_source)], ...], BeforeValidator(_ca_list)
]
Fingerprints = Annotated[
    tuple[Annotated[str, BeforeValidator(_fingerprint)], ...], BeforeValidator(_one_or_list)
]

_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


def _checks_failed(problems: list[tuple[str, str]]) -> PydanticCustomError:
    """One pydantic error carrying several (key, message) problems; parse_config splits them."""
    summary = "; ".join(f"{key}: {message}" if key else message for key, message in problems)
    return PydanticCustomError(
        _CHECKS_ERROR, "{summary}", {"summary": summary, "problems": tuple(problems)}
    )


def _env_name(value: str | None) -> str | None:
    """A ``*password_env`` key: a variable name. Never echoed: it may be a password by mistake."""
    if value is not None and not _ENV_NAME_RE.fullmatch(value):
        raise ValueError(
            "not an environment variable name (letters, digits and '_'; the value is not "
            "shown in case it is a password put here by mistake)"
        )
    return value


def _command_line(value: str | None) -> str | None:
    """A ``*password_command`` key: a non-empty command line that shlex can split."""
    if value is None:
        return value
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot split into arguments: {exc}") from None
    if not argv:
        raise ValueError("must not be empty")
    return value


class Account(BaseModel):
    """One POP3 account, with every default applied."""

    model_config = _MODEL_CONFIG

    name: str
    host: NonEmptyStr
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: TlsMode = "implicit"
    allow_plaintext: bool = False
    tls_ca_file: CaFiles | None = None
    tls_fingerprint: Fingerprints = ()
    tls_verify: bool = True
    username: NonEmptyStr
    password: SecretStr | None = None
    password_file: SecretPath | None = None
    password_command: str | None = None
    password_env: str | None = None
    oauth2_provider: OAuth2Provider | None = None
    oauth2_client_id: NonEmptyStr | None = None
    oauth2_client_secret_file: SecretPath | None = None
    oauth2_tenant: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]{1,100}$")] | None = None
    oauth2_scope: NonEmptyStr | None = None
    oauth2_token_url: str | None = None
    oauth2_device_url: str | None = None
    oauth2_auth_url: str | None = None
    auth: AuthMechanism = "auto"
    deliver: DeliverTo = "maildir"
    maildir: AbsolutePath | None = None
    lmtp: str | None = None
    lmtp_recipient: NonEmptyStr | None = None
    lmtp_sessions: Annotated[int, Field(ge=1, le=32)] = 8
    mda: Annotated[tuple[NonEmptyStr, ...], Field(min_length=1)] | None = None
    mda_timeout: Duration = 300.0
    mbox: AbsolutePath | None = None
    line_endings: Annotated[LineEndings, BeforeValidator(_lower)] = "lf"
    maildir_mode: Mode = 0o700
    file_mode: Mode = 0o600
    add_headers: Annotated[tuple[TraceHeader, ...], BeforeValidator(_lower)] = ()
    delete: DeletePolicy = "never"
    delete_after_days: Annotated[int, Field(ge=1)] | None = None
    max_message_size: Annotated[Size, Field(ge=0)] = 100_000_000
    interval: Duration = 300.0
    timeout: Duration = 60.0
    login_timeout: Duration = 60.0
    listing_timeout: Duration = 600.0
    low_speed_limit: Annotated[Size, Field(ge=0)] = 1024
    low_speed_time: Duration = 60.0
    utf8: bool = True
    pipelining: Annotated[Pipelining, BeforeValidator(_on_off)] = "auto"
    allow_uidl_reset: bool = False
    first_run: FirstRun = "fetch"
    forget_after: Duration = 30 * 86400.0
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        """Fill `port` from `tls`: 995 for implicit TLS, 110 for STARTTLS and plain."""
        if isinstance(data, Mapping) and "port" not in data:
            tls = data.get("tls", "implicit")
            return {**data, "port": DEFAULT_PORTS.get(tls, 995) if isinstance(tls, str) else 995}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _valid_name(value):
            raise ValueError(_BAD_NAME)
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if any(ch.isspace() or ch in "/@" for ch in value):
            raise ValueError(f"not a host name (got {value!r})")
        return value

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_validator("password_command")
    @classmethod
    def _check_command(cls, value: str | None) -> str | None:
        return _command_line(value)

    @field_validator("lmtp")
    @classmethod
    def _check_lmtp(cls, value: str | None) -> str | None:
        if value is not None:
            from popsync.deliver.lmtp import parse_address

            parse_address(value)
        return value

    @field_validator("lmtp_recipient")
    @classmethod
    def _check_recipient(cls, value: str | None) -> str | None:
        if value is not None and any(ch.isspace() or ch in "<>" for ch in value):
            raise ValueError(f"not a mail address (got {value!r})")
        return value

    @field_validator("mda")
    @classmethod
    def _check_mda(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not os.path.isabs(value[0]):
            raise ValueError(f"the command must be an absolute path (got {value[0]!r})")
        for arg in value:
            try:
                arg.format_map({"account": "", "user": "", "uidl_hex": ""})
            except (KeyError, ValueError, IndexError) as exc:
                raise ValueError(
                    f"bad placeholder in {arg!r} ({exc}); use {{account}}, {{user}} or "
                    "{uidl_hex}, and {{ }} for literal braces"
                ) from None
        return value

    @field_validator("password_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        return _env_name(value)

    @field_validator("oauth2_token_url", "oauth2_device_url", "oauth2_auth_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_endpoint(value)
        return value

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, value: float) -> float:
        if value < MIN_INTERVAL:
            raise ValueError(
                f"must be at least {format_duration(MIN_INTERVAL)} (got {format_duration(value)})"
            )
        return value

    @field_validator("forget_after")
    @classmethod
    def _check_forget_after(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must not be negative (got {format_duration(value)})")
        return value

    @field_validator("timeout", "login_timeout", "listing_timeout", "low_speed_time")
    @classmethod
    def _check_timeout(cls, value: float) -> float:
        if value < 1:
            raise ValueError(f"must be at least 1s (got {format_duration(value)})")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        problems = _account_problems(self)
        if problems:
            raise _checks_failed(problems)
        return self

    @property
    def mailbox(self) -> str:
        """The seen-store's key: the server's mailbox, not this account's label.

        ``user@host`` on the standard ports (so switching between 995 and STARTTLS on 110
        keeps the record), ``user@host:port`` on any other port (another server).
        """
        host = self.host.lower().rstrip(".")
        if self.port in _STANDARD_PORTS:
            return f"{self.username}@{host}"
        return f"{self.username}@{host}:{self.port}"

    @property
    def secret_source(self) -> str:
        """Which key supplies the secret, e.g. "password_file"; never the secret itself."""
        return next((key for key in SECRET_KEYS if getattr(self, key) is not None), "")


def _check_endpoint(value: str) -> None:
    """An OAuth2 endpoint: https, or http to a loopback address (a local test server)."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise ValueError(f"must be an https:// URL (got {value!r})")


def _oauth2_problems(account: Account) -> list[tuple[str, str]]:
    """Rules for the built-in OAuth2 keys."""
    provider = account.oauth2_provider
    if provider is None:
        return [
            (key, "only allowed with oauth2_provider")
            for key in OAUTH2_KEYS[1:]
            if getattr(account, key) is not None
        ]
    problems: list[tuple[str, str]] = []
    if account.auth not in _OAUTH2_MECHANISMS:
        problems.append(
            (
                "auth",
                f'must be "xoauth2" or "oauthbearer" with oauth2_provider (got "{account.auth}")',
            )
        )
    if account.oauth2_client_id is None:
        problems.append(("oauth2_client_id", "required with oauth2_provider"))
    if account.oauth2_tenant is not None and provider != "microsoft":
        problems.append(("oauth2_tenant", 'only allowed with oauth2_provider = "microsoft"'))
    urls = ("oauth2_token_url", "oauth2_device_url", "oauth2_auth_url")
    if provider != "custom":
        problems += [
            (key, 'only allowed with oauth2_provider = "custom"')
            for key in urls
            if getattr(account, key) is not None
        ]
        return problems
    if account.oauth2_token_url is None:
        problems.append(("oauth2_token_url", 'required with oauth2_provider = "custom"'))
    if account.oauth2_device_url is None and account.oauth2_auth_url is None:
        problems.append(
            (
                "oauth2_device_url",
                "set it (device login) or oauth2_auth_url (browser login) with oauth2_provider "
                '= "custom"',
            )
        )
    return problems


def _account_problems(account: Account) -> list[tuple[str, str]]:
    """Rules that involve more than one key of an account."""
    problems: list[tuple[str, str]] = []
    sources = [key for key in SECRET_KEYS if getattr(account, key) is not None]
    if account.oauth2_provider is not None:
        problems += [
            (key, "conflicts with oauth2_provider: popsync obtains the token itself")
            for key in sources
        ]
    elif not sources:
        problems.append(("", f"set one of {', '.join(SECRET_KEYS)} (or oauth2_provider)"))
    problems += [
        (extra, f"conflicts with {sources[0]}: set only one of them") for extra in sources[1:]
    ]
    problems += _oauth2_problems(account)
    if account.tls == "none" and not account.allow_plaintext:
        problems.append(
            ("tls", '"none" sends everything unencrypted; set allow_plaintext = true to allow it')
        )
    if account.tls_fingerprint and account.tls == "none":
        problems.append(("tls_fingerprint", 'has no effect with tls = "none"; remove it'))
    if account.tls_fingerprint and account.tls_ca_file is not None:
        problems.append(
            (
                "tls_ca_file",
                "conflicts with tls_fingerprint (a pinned certificate needs no CA): "
                "set only one of them",
            )
        )
    problems += _delivery_problems(account)
    if account.file_mode & 0o600 != 0o600:
        problems.append(("file_mode", "must let the owner read and write (0600 at least)"))
    if account.maildir_mode & 0o700 != 0o700:
        problems.append(("maildir_mode", "must give the owner rwx (0700 at least)"))
    if len(set(account.add_headers)) != len(account.add_headers):
        problems.append(("add_headers", "lists a header twice"))
    if account.delete == "after_days" and account.delete_after_days is None:
        problems.append(("delete_after_days", 'required with delete = "after_days"'))
    if account.delete != "after_days" and account.delete_after_days is not None:
        problems.append(
            (
                "delete_after_days",
                f'only allowed with delete = "after_days" (delete is "{account.delete}")',
            )
        )
    return problems


#: The key each delivery target needs, and the keys that belong to it alone.
_TARGET_KEYS: Mapping[str, tuple[str, ...]] = {
    "maildir": ("maildir",),
    "lmtp": ("lmtp", "lmtp_recipient"),
    "mda": ("mda",),
    "mbox": ("mbox",),
}


def _delivery_problems(account: Account) -> list[tuple[str, str]]:
    """The chosen target's keys are set; other targets' keys are not (a likely mistake)."""
    problems = [
        (key, _missing_target_key(account.deliver))
        for key in _TARGET_KEYS[account.deliver]
        if getattr(account, key) is None
    ]
    for target, keys in _TARGET_KEYS.items():
        if target != account.deliver:
            problems += [
                (key, f'only used with deliver = "{target}" (deliver is "{account.deliver}")')
                for key in keys
                if getattr(account, key) is not None
            ]
    return problems


def default_state_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """$STATE_DIRECTORY (systemd), else /var/lib/popsync for root, else the XDG state dir."""
    env = os.environ if env is None else env
    systemd = env.get("STATE_DIRECTORY", "")
    if systemd:
        # systemd passes a colon-separated list when several StateDirectory= are configured.
        return Path(systemd.split(":")[0])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/popsync")
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "popsync"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "popsync"


class _Settings(BaseModel):
    """The top-level keys other than [defaults] and [accounts]."""

    model_config = _MODEL_CONFIG

    state_dir: AbsolutePath = Field(default_factory=default_state_dir)
    max_workers: Annotated[int, Field(ge=1, le=256)] = 4
    #: LMTP sessions to one server from all accounts together (`popsync.deliver.budget`).
    lmtp_max_sessions: Annotated[int, Field(ge=1, le=1024)] = 16
    log_format: LogFormat = "auto"
    log_level: Annotated[LogLevel, BeforeValidator(_log_level)] = "info"
    #: "HOST:PORT" for the daemon's Prometheus endpoint; None (the default) serves none.
    metrics_listen: str | None = None
    #: None (or "sqlite"): SQLite in state_dir. "postgresql://…": the shared fleet store.
    store: str | None = None
    store_password_env: str | None = None
    store_password_command: str | None = None
    #: Who holds a lease in PostgreSQL mode; None means host:pid (lease.default_worker_id).
    worker_id: str | None = None

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None or value == "sqlite":
            return None
        from popsync.store import check_store_url

        check_store_url(value)
        return value

    @field_validator("store_password_env")
    @classmethod
    def _check_store_env(cls, value: str | None) -> str | None:
        return _env_name(value)

    @field_validator("store_password_command")
    @classmethod
    def _check_store_command(cls, value: str | None) -> str | None:
        return _command_line(value)

    @field_validator("worker_id")
    @classmethod
    def _check_worker_id(cls, value: str | None) -> str | None:
        if value is not None and not _WORKER_ID_RE.fullmatch(value):
            raise ValueError(f"1-200 printable characters without spaces (got {_show(value)})")
        return value

    @model_validator(mode="after")
    def _check_store_secrets(self) -> Self:
        from popsync.store import url_password

        problems: list[tuple[str, str]] = []
        keys = [k for k in ("store_password_env", "store_password_command") if getattr(self, k)]
        if keys and self.store is None:
            problems.append((keys[0], 'only used with store = "postgresql://…"'))
        elif len(keys) > 1:
            problems.append((keys[1], f"conflicts with {keys[0]}: choose one"))
        elif keys and self.store is not None and url_password(self.store) is not None:
            problems.append((keys[0], "conflicts with the password in store: choose one"))
        if problems:
            raise _checks_failed(problems)
        return self

    @field_validator("metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            from popsync.metrics import parse_listen

            parse_listen(value)
        return value


class Config(_Settings):
    """The whole validated configuration."""

    accounts: dict[str, Account]
    #: Non-fatal findings (unsafe file mode, disabled certificate checks); the caller logs them.
    warnings: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        problems = _no_accounts(self.accounts) + _shared_mailboxes(self.accounts)
        if problems:
            raise _checks_failed(problems)
        return self


def _no_accounts(accounts: Mapping[str, object]) -> list[tuple[str, str]]:
    if accounts:
        return []
    return [("accounts", "no accounts configured; add at least one [accounts.NAME] table")]


def _shared_mailboxes(accounts: Mapping[str, Account]) -> list[tuple[str, str]]:
    """No two accounts may name one mailbox: they would share one seen-store record and lock."""
    problems: list[tuple[str, str]] = []
    first: dict[str, str] = {}
    for name, account in accounts.items():
        key = account.mailbox
        if key in first:
            problems.append(
                (
                    _path(["accounts", name]),
                    f"same host and username as {_path(['accounts', first[key]])}: popsync keeps"
                    " one record per mailbox; configure it once",
                )
            )
        else:
            first[key] = name
    return problems


def _config_warnings(accounts: Mapping[str, Account]) -> list[str]:
    return [
        f"{_path(['accounts', name, 'tls_verify'])}: certificate verification is disabled; "
        "anyone on the network path can impersonate the server and read the password"
        for name, account in accounts.items()
        if account.tls_verify is False and account.tls != "none"
    ]


# --- turning pydantic errors into one line per problem -------------------------------------


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _path(parts: Iterable[str | int]) -> str:
    """Dotted TOML-style path; keys that are not bare TOML keys are quoted."""
    return ".".join(
        str(part) if isinstance(part, int) or _BARE_KEY_RE.fullmatch(part) else f'"{part}"'
        for part in parts
    )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(loc: Sequence[str | int], known: Iterable[str]) -> str:
    return f"{_path(loc)}: unknown key{_suggest(str(loc[-1]), known)}"


def _format_error(
    loc: Sequence[str | int], detail: ErrorDetails, known: Iterable[str]
) -> list[str]:
    """One line per problem in a pydantic error; the input is shown unless it may be secret."""
    kind = detail["type"]
    ctx = detail.get("ctx") or {}
    if kind == _CHECKS_ERROR:
        return [
            f"{_path([*loc, key] if key else loc)}: {message}" for key, message in ctx["problems"]
        ]
    where = _path(loc)
    if kind == "missing":
        return [f"{where}: missing required key"]
    if kind == "extra_forbidden":
        return [_unknown_key(loc, known)]
    message = detail["msg"]
    if kind == "value_error":
        # Our validators quote the input themselves where it is safe to.
        return [f"{where}: {message.removeprefix('Value error, ')}"]
    shown = detail.get("input")
    if any(part in SECRET_KEYS for part in loc) or isinstance(shown, dict | list):
        return [f"{where}: {message}"]
    return [f"{where}: {message} (got {_show(shown)})"]


# --- parsing ---------------------------------------------------------------------------------


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION_RE.match(str(exc))
        if match:
            position = f"{source}:{match['line']}:{match['col']}"
            raise ConfigError([f"{position}: invalid TOML: {match['msg']}"]) from None
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None


def _table(data: Mapping[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if isinstance(value, dict):
        return value
    problems.append(f"{key}: must be a table ([{key}]), got {type(value).__name__}")
    return {}


def _account_keys() -> list[str]:
    return [key for key in Account.model_fields if key != "name"]


def _check_keys(
    prefix: Sequence[str], table: Mapping[str, Any], problems: list[str]
) -> dict[str, Any]:
    """Report unknown keys and `name` (it comes from the table key); return the rest."""
    known = _account_keys()
    kept: dict[str, Any] = {}
    for key, value in table.items():
        if key == "name":
            problems.append(
                f"{_path([*prefix, key])}: not allowed; the account name is the table's key"
            )
        elif key not in known:
            problems.append(_unknown_key([*prefix, key], known))
        else:
            kept[key] = value
    return kept


def _merge(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Apply [defaults] under an account's own keys."""
    inherited = dict(defaults)
    if any(key in own for key in (*SECRET_KEYS, "oauth2_provider")):
        # An account choosing its own secret source replaces the default one, not adds to it.
        for key in SECRET_KEYS:
            inherited.pop(key, None)
    if any(key in own for key in SECRET_KEYS) and "oauth2_provider" not in own:
        for key in OAUTH2_KEYS:
            inherited.pop(key, None)
    merged = {**inherited, **own}
    # [defaults] may name a Maildir while one account delivers by LMTP: keys inherited for
    # another target are dropped rather than reported.
    target = merged.get("deliver", "maildir")
    for other, keys in _TARGET_KEYS.items():
        if other != target:
            for key in keys:
                if key not in own:
                    merged.pop(key, None)
    if merged.get("delete") != "after_days" and "delete_after_days" not in own:
        merged.pop("delete_after_days", None)
    return merged


def _account_errors(
    name: str, merged: Mapping[str, Any]
) -> tuple[Account | None, list[ErrorDetails]]:
    try:
        return Account.model_validate({**merged, "name": name}), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    if any(e["type"] == _CHECKS_ERROR for e in errors):
        return None, errors
    # The cross-key checks did not run; a missing target key is still worth reporting now.
    target = merged.get("deliver", "maildir")
    missing = [
        (key, _missing_target_key(target))
        for key in (_TARGET_KEYS.get(target, ()) if isinstance(target, str) else ())
        if merged.get(key) is None and not any(e["loc"][:1] == (key,) for e in errors)
    ]
    if missing:
        detail = _checks_failed(missing)
        errors.append(
            {
                "type": detail.type,
                "loc": (),
                "msg": detail.message(),
                "input": None,
                "ctx": detail.context or {},
            }
        )
    return None, errors


def _missing_target_key(target: str) -> str:
    return "missing required key" + ("" if target == "maildir" else f' with deliver = "{target}"')


def _validate_account(
    name: str, own: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[Account | None, list[str], list[str]]:
    """Validate one account: (account or None, problems in [defaults], problems of its own).

    A bad inherited value is reported once under `defaults.` and then left out, so that the
    account's own keys and cross-key rules are still checked in the same run.
    """
    merged = _merge(defaults, own)
    account, errors = _account_errors(name, merged)
    inherited = {key for key in merged if key not in own}
    bad = [e for e in errors if e["loc"] and e["loc"][0] in inherited]
    default_lines = [
        line for e in bad for line in _format_error(["defaults", *e["loc"]], e, _account_keys())
    ]
    if bad:
        skip = {e["loc"][0] for e in bad}
        account, errors = _account_errors(
            name, {key: value for key, value in merged.items() if key not in skip}
        )
    own_lines = [
        line
        for e in errors
        for line in _format_error(["accounts", name, *e["loc"]], e, _account_keys())
    ]
    return account, default_lines, own_lines


def _validate_settings(data: Mapping[str, Any], problems: list[str]) -> _Settings | None:
    values = {key: data[key] for key in _Settings.model_fields if key in data}
    try:
        return _Settings.model_validate(values)
    except ValidationError as exc:
        problems.extend(
            line
            for e in exc.errors(include_url=False)
            for line in _format_error(list(e["loc"]), e, _TOP_LEVEL_KEYS)
        )
        return None


def _validate_accounts(
    tables: Mapping[str, Any], defaults: Mapping[str, Any], problems: list[str]
) -> dict[str, Account]:
    """Validate every account table, appending problems in file order (defaults first)."""
    accounts: dict[str, Account] = {}
    default_lines: list[str] = []
    own_lines: list[str] = []
    for name, table in tables.items():
        where = _path(["accounts", name])
        if not isinstance(table, dict):
            own_lines.append(f"{where}: must be a table ([{where}])")
            continue
        if not _valid_name(name):
            own_lines.append(f"{where}: {_BAD_NAME}")
            continue
        own = _check_keys(["accounts", name], table, own_lines)
        account, from_defaults, from_account = _validate_account(name, own, defaults)
        default_lines += [line for line in from_defaults if line not in default_lines]
        own_lines += from_account
        if account is not None:
            accounts[name] = account
    problems += default_lines + own_lines
    return accounts


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML text into a `Config`; raise `ConfigError` listing every problem found."""
    data = _parse_toml(text, source)
    problems = [_unknown_key([key], _TOP_LEVEL_KEYS) for key in data if key not in _TOP_LEVEL_KEYS]
    settings = _validate_settings(data, problems)
    defaults = _check_keys(["defaults"], _table(data, "defaults", problems), problems)
    tables = _table(data, "accounts", problems)
    accounts = _validate_accounts(tables, defaults, problems)
    checks = _no_accounts(tables) + _shared_mailboxes(accounts)
    problems += [f"{where}: {message}" for where, message in checks]
    if problems or settings is None:
        raise ConfigError(problems)
    return Config(**dict(settings), accounts=accounts, warnings=tuple(_config_warnings(accounts)))


def raw_account_tables(text: str, source: str = "<string>") -> dict[str, dict[str, Any]]:
    """Each account's known keys as written, [defaults] merged in, unvalidated.

    For ``check-config``, which also checks the files and secrets an account refers to when
    some other key of that account is invalid. Problems are ignored here (parse_config
    reports them); invalid TOML raises `ConfigError`.
    """
    data = _parse_toml(text, source)
    ignored: list[str] = []
    defaults = _check_keys(["defaults"], _table(data, "defaults", ignored), ignored)
    tables = _table(data, "accounts", ignored)
    return {
        name: _merge(defaults, _check_keys(["accounts", name], table, ignored))
        for name, table in tables.items()
        if isinstance(table, dict) and _valid_name(name)
    }


def load_config(path: Path) -> Config:
    """Read and validate a config file; warn in `Config.warnings` if it exposes a password."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    return config_from_bytes(path, raw, mode)


def config_from_bytes(path: Path, raw: bytes, mode: int) -> Config:
    """Validate ``raw``, read from ``path`` whose ``st_mode`` is ``mode`` (for the warning)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8 (byte {exc.start})"]) from None
    config = parse_config(text, str(path))
    inline = [name for name, account in config.accounts.items() if account.password is not None]
    if inline and mode & (stat.S_IRGRP | stat.S_IROTH):
        warning = (
            f"{path}: readable by group or others (mode {stat.S_IMODE(mode):04o}) but holds an "
            f"inline password (accounts: {', '.join(inline)}); run chmod 600 {path} or use "
            "password_file"
        )
        config = config.model_copy(update={"warnings": (warning, *config.warnings)})
    return config
