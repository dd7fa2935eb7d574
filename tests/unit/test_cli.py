"""The command line: help text, check-config, status, healthcheck and the exit-code ladder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from popsync.cli import config_search_path, main, worst_exit_code
from popsync.errors import ExitCode
from popsync.seen import RunRecord, SeenStore


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n' + body)
    path.chmod(0o600)
    return path


def _good(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        '[defaults]\nusername = "u"\npassword = "pw-Secret-42"\n'
        f'[accounts.home]\nhost = "pop.home.invalid"\nmaildir = "{tmp_path / "h"}"\n'
        f'[accounts.work]\nhost = "pop.work.invalid"\nmaildir = "{tmp_path / "w"}"\n',
    )


def _record(path: Path, account: str, outcome: str, age: float = 5.0) -> None:
    with SeenStore.open(path.parent / "state" / "popsync.sqlite3") as store:
        now = time.time() - age
        store.record_run(
            f"u@pop.{account}.invalid", RunRecord(started=now - 1, finished=now, outcome=outcome)
        )


def test_help_mentions_every_subcommand_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the subcommands, --once and the sysexits ladder."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("check-config", "status", "healthcheck", "--once", "-c FILE", "--account"):
        assert word in text
    for code in ("0 ok", "64 usage", "74 local I/O", "75 temporary", "76 protocol", "77 auth"):
        assert code in text
    assert "78 configuration" in text


def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option is a usage error (argparse's 2 would break the sysexits ladder)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such-option"])
    assert exit_info.value.code == ExitCode.USAGE
    assert "unrecognized arguments" in capsys.readouterr().err


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid config prints one ok line naming the accounts and exits 0."""
    path = _good(tmp_path)
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: ok, 2 account(s): home, work\n"
    assert "pw-Secret-42" not in out.out + out.err


def test_check_config_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each problem is reported with its key path and the exit code is 78."""
    path = _write(
        tmp_path,
        f'[accounts.a]\nhost = "h"\nusername = "u"\npassword = "p"\nmaildir = "{tmp_path}"\n'
        'interval = "1s"\nprot = 1\n',
    )
    assert main(["check-config", "-c", str(path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"popsync: {path}: configuration error:\n")
    assert "  accounts.a.prot: unknown key; did you mean 'port'?" in err
    assert "  accounts.a.interval: must be at least 10s (got 1s)" in err


def test_check_config_resolves_password_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A password file that does not exist is a config problem, found without connecting."""
    path = _write(
        tmp_path,
        f'[accounts.a]\nhost = "h"\nusername = "u"\npassword_file = "{tmp_path / "nope"}"\n'
        f'maildir = "{tmp_path}"\n',
    )
    assert main(["check-config", "-c", str(path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert f"  accounts.a.password_file: cannot read {tmp_path / 'nope'}: No such file" in err


def test_missing_config_file_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command, the daemon included, refuses a config it cannot read."""
    missing = str(tmp_path / "missing.toml")
    for argv in (["check-config"], ["status"], ["healthcheck"], ["--once"], []):
        assert main([*argv, "-c", missing]) == ExitCode.CONFIG, argv
        assert "cannot read config file" in capsys.readouterr().err


def test_config_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without -c the config path comes from $POPSYNC_CONFIG."""
    monkeypatch.setenv("POPSYNC_CONFIG", str(_good(tmp_path)))
    assert main(["check-config"]) == 0
    assert "2 account(s)" in capsys.readouterr().out


def test_daemon_refuses_unknown_account(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon with --account naming no account exits 78 before scheduling anything."""
    assert main(["-c", str(_good(tmp_path)), "--account", "nope"]) == ExitCode.CONFIG
    assert "--account nope: no such account" in capsys.readouterr().err


def test_status_plain_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status prints a plain table off a terminal, and a JSON list with --json."""
    path = _good(tmp_path)
    _record(path, "home", "ok")
    assert main(["status", "-c", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("account")
    assert [line.split()[0] for line in lines[1:]] == ["home", "work"]
    assert "never" in lines[2]
    assert main(["status", "--json", "-c", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["account"], r["outcome"]) for r in rows] == [("home", "ok"), ("work", None)]


def test_healthcheck_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """healthcheck: 75 before any run, 0 after a good run, 75 when all fail or it is stale."""
    path = _good(tmp_path)
    assert main(["healthcheck", "-c", str(path)]) == ExitCode.TEMPORARY
    assert "no account has run yet" in capsys.readouterr().err
    _record(path, "home", "ok")
    assert main(["healthcheck", "-c", str(path)]) == 0
    assert capsys.readouterr().out.startswith("healthy")
    assert main(["healthcheck", "-c", str(path), "--max-age", "1"]) == ExitCode.TEMPORARY
    assert "no run for" in capsys.readouterr().err
    _record(path, "home", "auth")
    _record(path, "work", "temporary")
    assert main(["healthcheck", "-c", str(path)]) == ExitCode.TEMPORARY
    assert "every account is failing" in capsys.readouterr().err


def test_worst_exit_code_prefers_what_needs_a_human() -> None:
    """Config and auth problems outrank a passing network blip; none is OK."""
    assert worst_exit_code([]) == ExitCode.OK
    assert worst_exit_code([ExitCode.TEMPORARY, ExitCode.AUTH]) == ExitCode.AUTH
    assert worst_exit_code([ExitCode.OK, ExitCode.TEMPORARY]) == ExitCode.TEMPORARY
    assert worst_exit_code([ExitCode.AUTH, ExitCode.CONFIG]) == ExitCode.CONFIG


def test_config_search_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without -c: $POPSYNC_CONFIG, else $XDG_CONFIG_HOME/popsync/config.toml, else /etc."""
    monkeypatch.delenv("POPSYNC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_search_path() == [
        tmp_path / "xdg" / "popsync" / "config.toml",
        Path("/etc/popsync/config.toml"),
    ]
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_search_path()[0] == tmp_path / "home" / ".config" / "popsync" / "config.toml"
    (tmp_path / "home" / ".config" / "popsync").mkdir(parents=True)
    _good(tmp_path).rename(tmp_path / "home" / ".config" / "popsync" / "config.toml")
    assert main(["check-config"]) == 0
    assert str(tmp_path / "home" / ".config" / "popsync" / "config.toml") in capsys.readouterr().out
    monkeypatch.setenv("POPSYNC_CONFIG", str(tmp_path / "other.toml"))
    assert config_search_path() == [tmp_path / "other.toml"]


def test_no_config_found_names_the_search_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When no config exists anywhere, the error lists where popsync looked."""
    monkeypatch.delenv("POPSYNC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    if Path("/etc/popsync/config.toml").exists():
        pytest.skip("this machine has /etc/popsync/config.toml")
    assert main(["status"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert f"none found (looked for {tmp_path / 'xdg' / 'popsync' / 'config.toml'}, " in err
    assert "/etc/popsync/config.toml); use -c FILE" in err


def test_healthcheck_max_age_takes_durations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-age accepts "5m" like the config does, and rejects nonsense as a usage error."""
    path = _good(tmp_path)
    _record(path, "home", "ok", age=120)
    assert main(["healthcheck", "-c", str(path), "--max-age", "5m"]) == 0
    assert main(["healthcheck", "-c", str(path), "--max-age", "1m"]) == ExitCode.TEMPORARY
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["healthcheck", "-c", str(path), "--max-age", "soon"])
    assert info.value.code == ExitCode.USAGE
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_check_config_reports_everything_in_one_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key errors, secrets, CA bundles and Maildir parents: all at once, each key once."""
    monkeypatch.delenv("POPSYNC_UNSET_PW", raising=False)
    loose = tmp_path / "loose.pw"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    head = 'host = "h"\nusername = "u-{}"\n'  # one mailbox per account
    path = _write(
        tmp_path,
        f"[accounts.a]\n{head.format('a')}prot = 1\n"
        f'password_file = "{tmp_path / "missing.pw"}"\nmaildir = "{tmp_path / "a"}"\n'
        f'[accounts.b]\n{head.format("b")}password_env = "POPSYNC_UNSET_PW"\n'
        f'maildir = "{tmp_path / "b"}"\n'
        f'[accounts.c]\n{head.format("c")}password_command = "no-such-program-xyz --token"\n'
        f'maildir = "{tmp_path / "no" / "parent" / "c"}"\n'
        f'tls_ca_file = ["system", "{tmp_path / "ca.pem"}"]\n'
        f'[accounts.d]\n{head.format("d")}password_file = "{loose}"\n'
        f'maildir = "{tmp_path / "d"}"\n',
    )
    assert main(["check-config", "-c", str(path)]) == ExitCode.CONFIG
    lines = capsys.readouterr().err.splitlines()[1:]
    assert lines == [
        "  accounts.a.prot: unknown key; did you mean 'port'?",
        f"  accounts.a.password_file: cannot read {tmp_path / 'missing.pw'}: No such file or "
        "directory",
        "  accounts.b.password_env: the environment variable it names is not set",
        "  accounts.c.password_command: 'no-such-program-xyz' not found in $PATH",
        f"  accounts.c.tls_ca_file: {tmp_path / 'ca.pem'} does not exist",
        f"  accounts.c.maildir: parent directory {tmp_path / 'no' / 'parent'} does not exist "
        "(popsync creates only the Maildir)",
        f"  accounts.d.password_file: {loose} is readable by group or others (mode 0644); "
        f"run chmod 600 {loose}",
    ]


def test_help_lists_the_switching_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """--help names test, ls, mark-seen, import-state and --dry-run; --dry-run needs --once."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for word in ("test", "ls", "mark-seen", "import-state", "--dry-run"):
        assert word in text
    assert main(["--dry-run", "-c", "/nonexistent.toml"]) == ExitCode.USAGE
    assert "--dry-run needs --once" in capsys.readouterr().err


def test_secrets_a_command_registers_end_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret registered for scrubbing during one main() call is not scrubbed after it."""
    from popsync import cli
    from popsync.textsafe import REDACTED, add_secrets, scrub

    during: list[str] = []

    def dispatch(args: object) -> int:
        add_secrets(["s3cr3t-of-one-run"])
        during.append(scrub("s3cr3t-of-one-run"))
        return 0

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["status"]) == 0
    assert during == [REDACTED]
    assert scrub("s3cr3t-of-one-run") == "s3cr3t-of-one-run"
