"""Tests for popsync.config: parsing, defaults, exact error texts, warnings and secret hiding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from popsync.config import Account, Config, default_state_dir, load_config, parse_config
from popsync.errors import ConfigError, ExitCode

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-very-secret"
#: Every top-level key a user can set (``warnings`` is computed, ``accounts`` a table).
_TOP_LEVEL_SETTINGS = set(Config.model_fields) - {"accounts", "warnings"}

MINIMAL = """
[accounts.work]
host = "pop.example.com"
username = "me@example.com"
password_env = "POP_PW"
maildir = "/srv/mail/work"
"""


def problems_of(text: str) -> list[str]:
    """The problem lines parse_config reports for `text` (it must fail)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    assert info.value.exit_code == ExitCode.CONFIG
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_minimal_account_gets_every_default() -> None:
    """An account with only the required keys is completed with the documented defaults."""
    account = parse_config(MINIMAL).accounts["work"]
    assert account.model_dump() == {
        "name": "work",
        "host": "pop.example.com",
        "port": 995,
        "tls": "implicit",
        "allow_plaintext": False,
        "tls_ca_file": None,
        "tls_fingerprint": (),
        "tls_verify": True,
        "username": "me@example.com",
        "password": None,
        "password_file": None,
        "password_command": None,
        "password_env": "POP_PW",
        "oauth2_provider": None,
        "oauth2_client_id": None,
        "oauth2_client_secret_file": None,
        "oauth2_tenant": None,
        "oauth2_scope": None,
        "oauth2_token_url": None,
        "oauth2_device_url": None,
        "oauth2_auth_url": None,
        "auth": "auto",
        "maildir": Path("/srv/mail/work"),
        "delete": "never",
        "delete_after_days": None,
        "max_message_size": 100_000_000,
        "interval": 300.0,
        "timeout": 60.0,
        "login_timeout": 60.0,
        "listing_timeout": 600.0,
        "low_speed_limit": 1024,
        "low_speed_time": 60.0,
        "utf8": True,
        "pipelining": "auto",
        "allow_uidl_reset": False,
        "first_run": "fetch",
        "forget_after": 30 * 86400.0,
        "enabled": True,
        "line_endings": "lf",
        "maildir_mode": 0o700,
        "file_mode": 0o600,
        "add_headers": (),
        "deliver": "maildir",
        "lmtp": None,
        "lmtp_recipient": None,
        "lmtp_sessions": 8,
        "mda": None,
        "mda_timeout": 300.0,
        "mbox": None,
    }
    assert account.secret_source == "password_env"


def test_top_level_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Top-level keys default sensibly, state_dir from $STATE_DIRECTORY when systemd sets it."""
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    config = parse_config(MINIMAL)
    assert (config.state_dir, config.max_workers, config.log_format, config.log_level) == (
        tmp_path / "a",
        4,
        "auto",
        "info",
    )
    assert config.lmtp_max_sessions == 16  # max_workers x the former lmtp_sessions default
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"STATE_DIRECTORY": "/run/x"}, 0, "/run/x"),
        ({}, 0, "/var/lib/popsync"),
        ({"HOME": "/home/me"}, 1000, "/home/me/.local/state/popsync"),
        ({"HOME": "/home/me", "XDG_STATE_HOME": "/xdg"}, 1000, "/xdg/popsync"),
        ({"HOME": "/home/me", "XDG_STATE_HOME": "relative"}, 1000, "/home/me/.local/state/popsync"),
    ],
)
def test_default_state_dir(env: dict[str, str], euid: int, expected: str) -> None:
    """The state directory follows systemd, then root, then the XDG base directory spec."""
    assert default_state_dir(env, euid) == Path(expected)


def test_port_follows_tls_mode() -> None:
    """Without an explicit port, STARTTLS and plain use 110 and implicit TLS uses 995."""
    text = MINIMAL.replace('host = "pop.example.com"', 'host = "h"\ntls = "starttls"')
    assert parse_config(text).accounts["work"].port == 110
    assert parse_config(text + "port = 1995\n").accounts["work"].port == 1995


def test_units_and_tilde_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Durations become seconds, sizes bytes, and ~ in paths the home directory."""
    monkeypatch.setenv("HOME", "/home/me")
    text = MINIMAL.replace('"/srv/mail/work"', '"~/Maildir"') + (
        'interval = "1h30m"\ntimeout = 90\nmax_message_size = "1.5MiB"\n'
    )
    account = parse_config(text).accounts["work"]
    assert (account.maildir, account.interval, account.timeout, account.max_message_size) == (
        Path("/home/me/Maildir"),
        5400.0,
        90.0,
        1_572_864,
    )


def test_defaults_are_inherited_and_overridden() -> None:
    """[defaults] keys apply to every account; an account's own keys win."""
    text = """
    [defaults]
    interval = "10m"
    delete = "after_days"
    delete_after_days = 7
    password_command = "pass show mail"
    username = "shared"
    [accounts.a]
    host = "a.example"
    maildir = "/m/a"
    [accounts.b]
    host = "b.example"
    maildir = "/m/b"
    interval = "1m"
    delete = "never"
    password_file = "/etc/popsync/b"
    """
    accounts = parse_config(text).accounts
    a, b = accounts["a"], accounts["b"]
    assert (a.interval, a.delete, a.delete_after_days, a.password_command, a.username) == (
        600.0,
        "after_days",
        7,
        "pass show mail",
        "shared",
    )
    # b's own secret source replaces the inherited one, and delete_after_days is dropped
    # because b does not delete after days.
    assert (b.interval, b.delete, b.delete_after_days, b.password_command, b.password_file) == (
        60.0,
        "never",
        None,
        None,
        Path("/etc/popsync/b"),
    )


def test_many_problems_reported_at_once() -> None:
    """Unknown keys, type errors, bad units and cross-key rules are all reported in one error."""
    text = """
    max_workrs = 3
    log_level = "LOUD"
    [defaults]
    pasword = "x"
    interval = "abc"
    [accounts.work]
    host = "pop.example.com"
    port = "abc"
    tls = "tls"
    username = "me"
    password = 12345
    maildir = "rel/Maildir"
    [accounts.home]
    host = "pop.isp.net"
    tls = "none"
    auth = "user"
    username = "me"
    password_env = "PW"
    password_file = "/x"
    maildir = "/m"
    delete_after_days = 3
    [accounts.quick]
    host = "pop.example.com"
    username = "me"
    password_env = "PW"
    maildir = "/q"
    interval = "5s"
    [accounts."bad/name"]
    """
    assert problems_of(text) == [
        "max_workrs: unknown key; did you mean 'max_workers'?",
        "log_level: Input should be 'debug', 'info', 'warning', 'error' or 'critical' (got 'LOUD')",
        "defaults.pasword: unknown key; did you mean 'password'?",
        "defaults.interval: invalid duration 'abc': expected a number of seconds or a number "
        "with a unit: '90s', '5m', '1h30m', '2d'",
        "accounts.work.port: Input should be a valid integer, unable to parse string as an "
        "integer (got 'abc')",
        "accounts.work.tls: Input should be 'implicit', 'starttls' or 'none' (got 'tls')",
        "accounts.work.password: Input should be a valid string",
        "accounts.work.maildir: must be an absolute path or start with ~ (got 'rel/Maildir')",
        "accounts.home.password_env: conflicts with password_file: set only one of them",
        'accounts.home.tls: "none" sends everything unencrypted; set allow_plaintext = true '
        "to allow it",
        'accounts.home.delete_after_days: only allowed with delete = "after_days" '
        '(delete is "never")',
        "accounts.quick.interval: must be at least 10s (got 5s)",
        "accounts.\"bad/name\": invalid account name; use 1-64 letters, digits, '_', '.' or '-'",
    ]


def test_missing_keys_and_secret_source() -> None:
    """Missing required keys and a missing secret source are each reported."""
    text = """
    [accounts.a]
    tls = "starttls"
    delete = "after_days"
    [accounts.b]
    host = "h"
    username = "u"
    maildir = "/m"
    delete = "after_days"
    name = "other"
    """
    assert problems_of(text) == [
        "accounts.a.host: missing required key",
        "accounts.a.username: missing required key",
        "accounts.a.maildir: missing required key",
        "accounts.b.name: not allowed; the account name is the table's key",
        "accounts.b: set one of password, password_file, password_command, password_env "
        "(or oauth2_provider)",
        'accounts.b.delete_after_days: required with delete = "after_days"',
    ]


def test_plaintext_allowed_with_challenge_response_auth() -> None:
    """tls = "none" is accepted with allow_plaintext and a mechanism that hides the password."""
    text = MINIMAL + 'tls = "none"\nallow_plaintext = true\nauth = "apop"\n'
    account = parse_config(text).accounts["work"]
    assert (account.tls, account.port, account.auth) == ("none", 110, "apop")


@pytest.mark.parametrize("auth", ["user", "plain", "login", "xoauth2", "oauthbearer", "rpop"])
def test_plaintext_allowed_with_explicit_revealing_auth(auth: str) -> None:
    """tls = "none" with allow_plaintext and an explicit revealing mechanism is honoured."""
    text = MINIMAL + f'tls = "none"\nallow_plaintext = true\nauth = "{auth}"\n'
    account = parse_config(text).accounts["work"]
    assert (account.tls, account.allow_plaintext, account.auth) == ("none", True, auth)


def test_revealing_auth_over_none_still_needs_allow_plaintext() -> None:
    """Without allow_plaintext, tls = "none" is refused whatever the mechanism."""
    text = MINIMAL + 'tls = "none"\nauth = "user"\n'
    assert problems_of(text) == [
        'accounts.work.tls: "none" sends everything unencrypted; set allow_plaintext = true '
        "to allow it"
    ]


def test_password_in_password_env_is_never_echoed() -> None:
    """A password put in password_env by mistake does not appear in the config error."""
    secret = "hunter2 with spaces!"
    text = MINIMAL.replace('password_env = "POP_PW"', f'password_env = "{secret}"')
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert secret not in str(info.value)
    assert "hunter2" not in str(info.value)
    assert str(info.value).startswith("accounts.work.password_env: not an environment variable")


_SAME_MAILBOX = (
    "accounts.copy: same host and username as accounts.work: popsync keeps one record per"
    " mailbox; configure it once"
)


def test_same_mailbox_twice_is_an_error() -> None:
    """Two accounts naming one mailbox (host case ignored) would share one seen-store record."""
    text = MINIMAL + MINIMAL.replace("accounts.work", "accounts.copy").replace(
        "pop.example.com", "POP.example.com"
    )
    assert problems_of(text) == [_SAME_MAILBOX]
    other_dir = MINIMAL + MINIMAL.replace("accounts.work", "accounts.copy").replace(
        "/srv/mail/work", "/srv/mail/copy"
    )
    assert problems_of(other_dir) == [_SAME_MAILBOX]
    other_user = MINIMAL + MINIMAL.replace("accounts.work", "accounts.copy").replace(
        'username = "', 'username = "x'
    )
    assert set(parse_config(other_user).accounts) == {"work", "copy"}


def test_mailbox_key_ignores_the_label_and_host_case() -> None:
    """The seen-store key is user@host, so renaming an account keeps its record."""
    renamed = MINIMAL.replace("accounts.work", "accounts.renamed").replace(
        "pop.example.com", "POP.Example.COM."
    )
    work = parse_config(MINIMAL).accounts["work"]
    assert parse_config(renamed).accounts["renamed"].mailbox == work.mailbox
    starttls = parse_config(MINIMAL + 'tls = "starttls"\n').accounts["work"]
    assert (starttls.port, starttls.mailbox) == (110, work.mailbox)
    other = parse_config(MINIMAL + "port = 1995\n").accounts["work"]
    assert other.mailbox == work.mailbox + ":1995"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["accounts: no accounts configured; add at least one [accounts.NAME] table"]),
        (
            "[accounts]\n",
            ["accounts: no accounts configured; add at least one [accounts.NAME] table"],
        ),
        (
            "accounts = 3\n",
            [
                "accounts: must be a table ([accounts]), got int",
                "accounts: no accounts configured; add at least one [accounts.NAME] table",
            ],
        ),
        ("[accounts]\nwork = 1\n", ["accounts.work: must be a table ([accounts.work])"]),
        ("x = = 1\n", ["test.toml:1:5: invalid TOML: Invalid value"]),
        ("warnings = []\n" + MINIMAL, ["warnings: unknown key"]),
    ],
)
def test_structural_errors(text: str, expected: list[str]) -> None:
    """Empty configs, wrong table types, TOML syntax and reserved names are reported clearly."""
    assert problems_of(text) == expected


@pytest.mark.parametrize(
    ("name", "shown"),
    [("a/b", '"a/b"'), ("..", '".."'), ("x" * 65, "x" * 65), ("sp ace", '"sp ace"'), ("", '""')],
)
def test_invalid_account_names(name: str, shown: str) -> None:
    """Names unsafe in file names are refused, by parse_config and by the model itself."""
    text = MINIMAL.replace("[accounts.work]", f'[accounts."{name}"]')
    assert problems_of(text) == [
        f"accounts.{shown}: invalid account name; use 1-64 letters, digits, '_', '.' or '-'"
    ]
    fields = parse_config(MINIMAL).accounts["work"].model_dump()
    with pytest.raises(ValidationError, match="invalid account name"):
        Account.model_validate({**fields, "name": name})


def test_options_accept_friendly_spellings() -> None:
    """log_level is case-insensitive and pipelining accepts booleans."""
    text = 'log_level = "DEBUG"\n' + MINIMAL + "pipelining = false\n"
    config = parse_config(text)
    assert (config.log_level, config.accounts["work"].pipelining) == ("debug", "off")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'password_command = "pass \'open"',
            "password_command: cannot split into arguments: No closing quotation",
        ),
        (
            'password_env = "1BAD"',
            "password_env: not an environment variable name (letters, digits and '_'; the value "
            "is not shown in case it is a password put here by mistake)",
        ),
        ('host = "pop example"', "host: not a host name (got 'pop example')"),
        (
            'max_message_size = "lots"',
            "max_message_size: invalid size 'lots': expected a number "
            "of bytes or a number with a unit: '512k', '50MB', '1.5GiB'",
        ),
        ("timeout = 0.5", "timeout: must be at least 1s (got 0.5s)"),
        ("port = 70000", "port: Input should be less than or equal to 65535 (got 70000)"),
        ("utf8 = 3", "utf8: Input should be a valid boolean, unable to interpret input (got 3)"),
    ],
)
def test_single_key_errors(line: str, expected: str) -> None:
    """Each key's own validation produces a precise message."""
    base = MINIMAL.replace('password_env = "POP_PW"', 'password_file = "/pw"')
    key = line.split(" = ", maxsplit=1)[0]
    text, replaced = re.subn(rf"^{key} = .*$", line, base, flags=re.MULTILINE)
    text = text if replaced else f"{base}{line}\n"
    assert problems_of(text) == [f"accounts.work.{expected}"]


def test_secret_never_rendered() -> None:
    """An inline password is absent from repr, str and JSON of the config and its errors."""
    text = MINIMAL.replace('password_env = "POP_PW"', f'password = "{SECRET}"')
    config = parse_config(text)
    account = config.accounts["work"]
    assert account.password is not None
    assert account.password.get_secret_value() == SECRET
    for rendered in (repr(config), str(config), config.model_dump_json(), repr(account)):
        assert SECRET not in rendered
    with pytest.raises(ConfigError) as info:
        parse_config(text + "port = 0\n")
    assert SECRET not in str(info.value)


def test_secret_hidden_in_direct_validation_errors() -> None:
    """Pydantic's own error text does not echo a password when models are built directly."""
    with pytest.raises(ValidationError) as info:
        Account.model_validate(
            {
                "name": "a",
                "host": "h",
                "username": "u",
                "maildir": "/m",
                "password": SECRET,
                "tls": "none",
            }
        )
    assert SECRET not in str(info.value)
    assert 'tls: "none" sends everything unencrypted' in str(info.value)


def test_config_model_rejects_shared_maildir_directly() -> None:
    """The cross-account rule also holds when Config is built without parse_config."""
    account = parse_config(MINIMAL).accounts["work"]
    with pytest.raises(ValidationError, match="same host and username"):
        Config.model_validate({"accounts": {"work": account, "copy": account}})


def test_models_are_frozen() -> None:
    """Validated configuration cannot be modified by accident."""
    account = parse_config(MINIMAL).accounts["work"]
    with pytest.raises(ValidationError):
        setattr(account, "port", 1)  # noqa: B010 - mypy does not know the model is frozen


def test_tls_verify_false_warns() -> None:
    """Disabling certificate checks is allowed but produces a warning."""
    config = parse_config(MINIMAL + "tls_verify = false\n")
    assert config.warnings == (
        "accounts.work.tls_verify: certificate verification is disabled; anyone on the network "
        "path can impersonate the server and read the password",
    )


def test_load_config_warns_about_readable_inline_password(tmp_path: Path) -> None:
    """A group/world-readable file with an inline password loads, with a warning."""
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL.replace('password_env = "POP_PW"', f'password = "{SECRET}"'))
    path.chmod(0o644)
    assert load_config(path).warnings == (
        f"{path}: readable by group or others (mode 0644) but holds an inline password "
        f"(accounts: work); run chmod 600 {path} or use password_file",
    )
    path.chmod(0o600)
    assert load_config(path).warnings == ()


def test_load_config_readable_without_inline_password_is_fine(tmp_path: Path) -> None:
    """A world-readable config holding no secret gives no warning."""
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL)
    path.chmod(0o644)
    assert load_config(path).warnings == ()


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    """Unreadable, non-UTF-8 and malformed files are reported with their path."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems == [f"{missing}: cannot read config file: No such file or directory"]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"x = 1\n\xff")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert info.value.problems == [f"{binary}: not valid UTF-8 (byte 6)"]
    broken = tmp_path / "broken.toml"
    broken.write_text("[accounts.work\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{broken}:1:")


def test_example_config_loads_and_documents_every_key() -> None:
    """config.example.toml is valid and mentions every account and top-level key."""
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    config = parse_config(text, "config.example.toml")
    assert len(config.accounts) >= 3
    assert {a.tls for a in config.accounts.values()} >= {"implicit", "starttls"}
    assert any(a.auth == "xoauth2" and a.oauth2_provider for a in config.accounts.values())
    assert "oauth2-token" not in text  # a helper that never existed
    keys = set(Account.model_fields) - {"name"}
    keys |= _TOP_LEVEL_SETTINGS
    missing = {key for key in keys if not re.search(rf"^#? ?{key} = ", text, re.MULTILINE)}
    assert missing == set()


def test_docs_table_lists_every_key() -> None:
    """docs/configuration.md has a table row for every configuration key."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = (set(Account.model_fields) - {"name"}) | _TOP_LEVEL_SETTINGS
    missing = {key for key in keys if f"| `{key}` |" not in text}
    assert missing == set()


def test_tls_ca_file_lists_and_fingerprints() -> None:
    """tls_ca_file takes one path or a list with "system"; tls_fingerprint one or a list."""
    pin = "sha256:" + ":".join(["0A"] * 32)
    one = parse_config(MINIMAL + 'tls_ca_file = "/etc/ca.pem"\n').accounts["work"]
    assert one.tls_ca_file == ("/etc/ca.pem",)
    both = parse_config(MINIMAL + 'tls_ca_file = ["system", "/etc/ca.pem"]\n').accounts["work"]
    assert both.tls_ca_file == ("system", "/etc/ca.pem")
    pinned = parse_config(MINIMAL + f'tls_fingerprint = "{pin.lower()}"\n').accounts["work"]
    assert pinned.tls_fingerprint == (pin,)
    assert problems_of(
        MINIMAL + f'tls_fingerprint = ["{pin}", "sha256:12"]\ntls_ca_file = []\n'
    ) == [
        'accounts.work.tls_ca_file: must name at least one CA bundle, or "system"',
        "accounts.work.tls_fingerprint.1: not a SHA-256 fingerprint (got 'sha256:12'); expected"
        ' "sha256:" and 32 hex bytes separated by colons, as `popsync test` prints it',
    ]
    assert problems_of(MINIMAL + f'tls_fingerprint = "{pin}"\ntls_ca_file = "/ca.pem"\n') == [
        "accounts.work.tls_ca_file: conflicts with tls_fingerprint (a pinned certificate needs "
        "no CA): set only one of them"
    ]


def test_first_run_policy() -> None:
    """first_run is "fetch" or "mark_seen"."""
    assert parse_config(MINIMAL + 'first_run = "mark_seen"\n').accounts["work"].first_run == (
        "mark_seen"
    )
    assert problems_of(MINIMAL + 'first_run = "skip"\n') == [
        "accounts.work.first_run: Input should be 'fetch' or 'mark_seen' (got 'skip')"
    ]


def test_delivery_file_keys_parse_and_inherit() -> None:
    """line_endings, modes (octal strings or integers) and add_headers, also from [defaults]."""
    text = (
        '[defaults]\nfile_mode = "0640"\nadd_headers = ["Received", "x-popsync-uidl"]\n'
        + MINIMAL
        + 'line_endings = "CRLF"\nmaildir_mode = 0o750\n'
    )
    account = parse_config(text).accounts["work"]
    assert (account.file_mode, account.maildir_mode) == (0o640, 0o750)
    assert account.line_endings == "crlf"
    assert account.add_headers == ("received", "x-popsync-uidl")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('file_mode = "0644x"', 'accounts.work.file_mode: must be an octal mode such as "0640"'),
        ('file_mode = "0440"', "accounts.work.file_mode: must let the owner read and write"),
        ("maildir_mode = 0o1777", "accounts.work.maildir_mode: must be a mode between"),
        ('maildir_mode = "0500"', "accounts.work.maildir_mode: must give the owner rwx"),
        ('line_endings = "cr"', "accounts.work.line_endings: Input should be 'lf' or 'crlf'"),
        ('add_headers = ["received", "received"]', "accounts.work.add_headers: lists a header"),
        ('add_headers = ["x-other"]', "accounts.work.add_headers.0: Input should be"),
    ],
)
def test_delivery_file_key_errors(line: str, expected: str) -> None:
    """Bad modes, line ends and header names are reported with their key."""
    problems = problems_of(MINIMAL + line + "\n")
    assert len(problems) == 1
    assert problems[0].startswith(expected), problems


def test_delivery_targets_need_their_keys_and_only_theirs() -> None:
    """Each deliver value needs its keys; another target's keys are refused, inherited dropped."""
    base = '[accounts.a]\nhost = "h"\nusername = "u"\npassword_env = "P"\n'
    lmtp = parse_config(
        '[defaults]\nmaildir = "/m"\n'
        + base
        + 'deliver = "lmtp"\nlmtp = "unix:/run/dovecot/lmtp"\nlmtp_recipient = "me@x.org"\n'
    ).accounts["a"]
    assert (lmtp.deliver, lmtp.maildir, lmtp.lmtp_sessions) == ("lmtp", None, 8)
    assert problems_of(base + 'deliver = "lmtp"\nmbox = "/var/mail/u"\n') == [
        'accounts.a.lmtp: missing required key with deliver = "lmtp"',
        'accounts.a.lmtp_recipient: missing required key with deliver = "lmtp"',
        'accounts.a.mbox: only used with deliver = "mbox" (deliver is "lmtp")',
    ]
    assert problems_of(base + 'maildir = "/m"\nlmtp = "localhost"\n') == [
        'accounts.a.lmtp: expected "unix:/path" or "HOST:PORT" (got \'localhost\')'
    ]
    mda = parse_config(base + 'deliver = "mda"\nmda = ["/usr/bin/procmail", "-a", "{user}"]\n')
    assert mda.accounts["a"].mda == ("/usr/bin/procmail", "-a", "{user}")
    assert problems_of(base + 'deliver = "mda"\nmda = ["procmail", "{nope}"]\n') == [
        "accounts.a.mda: the command must be an absolute path (got 'procmail')"
    ]
    assert problems_of(base + 'deliver = "mda"\nmda = ["/bin/x", "{nope}"]\n')[0].startswith(
        "accounts.a.mda: bad placeholder in '{nope}'"
    )
