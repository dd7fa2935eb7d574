"""Tests for popsync.secrets: every secret source, permission refusal, no secret in errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from popsync import secrets
from popsync.config import Account
from popsync.errors import ExitCode, SecretError
from popsync.secrets import resolve_secret

__all__: list[str] = []

SECRET = "s3cr3t-Tok€n"


def make_account(**source: Any) -> Account:
    """An account whose secret comes from `source` (one of the password_* keys)."""
    return Account.model_validate(
        {"name": "work", "host": "pop.example.com", "username": "me", "maildir": "/m", **source}
    )


def write_secret(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write `data` to `path` with `mode` and return the path."""
    path.write_bytes(data)
    path.chmod(mode)
    return path


def python_command(code: str) -> str:
    """A password_command running `code` with this interpreter."""
    return f"{sys.executable} -c '{code}'"


def problems(info: pytest.ExceptionInfo[SecretError]) -> list[str]:
    """The problem lines of a caught SecretError, after checking they hide the secret."""
    assert SECRET not in str(info.value)
    assert info.value.exit_code == ExitCode.CONFIG
    return info.value.problems


def test_inline_password() -> None:
    """An inline password is returned as written."""
    assert resolve_secret(make_account(password=SECRET), env={}) == SECRET


def test_password_file_strips_one_newline(tmp_path: Path) -> None:
    """Exactly one trailing newline is removed; other whitespace belongs to the secret."""
    path = write_secret(tmp_path / "pw", f" {SECRET}\n\n".encode())
    assert resolve_secret(make_account(password_file=str(path)), env={}) == f" {SECRET}\n"


def test_password_file_strips_crlf(tmp_path: Path) -> None:
    """A CRLF line end written by a Windows editor is removed as one newline."""
    path = write_secret(tmp_path / "pw", f"{SECRET}\r\n".encode())
    assert resolve_secret(make_account(password_file=str(path)), env={}) == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_password_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A secret file readable by group or others is refused with a chmod hint."""
    path = write_secret(tmp_path / "pw", SECRET.encode(), mode)
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_file=str(path)), env={})
    assert problems(info) == [
        f"accounts.work.password_file: {path} is readable by group or others "
        f"(mode {mode:04o}); run chmod 600 {path}"
    ]


def test_credentials_directory_is_trusted(tmp_path: Path) -> None:
    """A relative name is found in $CREDENTIALS_DIRECTORY, whose modes systemd manages."""
    write_secret(tmp_path / "work", f"{SECRET}\n".encode(), 0o644)
    account = make_account(password_file="work")
    assert resolve_secret(account, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == SECRET


def test_symlink_out_of_credentials_directory_is_not_trusted(tmp_path: Path) -> None:
    """A link leaving $CREDENTIALS_DIRECTORY gets the normal permission check."""
    outside = write_secret(tmp_path / "outside", SECRET.encode(), 0o644)
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "work").symlink_to(outside)
    with pytest.raises(SecretError, match="readable by group or others"):
        resolve_secret(
            make_account(password_file="work"), env={"CREDENTIALS_DIRECTORY": str(credentials)}
        )


def test_relative_password_file_without_credentials_directory() -> None:
    """A relative password_file outside systemd is an error, not a lookup in the cwd."""
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_file="work"), env={})
    assert problems(info) == [
        "accounts.work.password_file: a relative name needs $CREDENTIALS_DIRECTORY "
        "(systemd LoadCredential=); use an absolute path otherwise"
    ]


@pytest.mark.parametrize("credentials", [None, "exists"])
def test_password_put_in_password_file_is_not_echoed(
    tmp_path: Path, credentials: str | None
) -> None:
    """A password mistaken for a relative file name stays out of the error, systemd or not."""
    env = {} if credentials is None else {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_file="Hunter2-not-a-file"), env=env)
    assert "Hunter2" not in str(info.value)
    assert str(info.value).startswith("accounts.work.password_file: ")


def test_missing_password_file(tmp_path: Path) -> None:
    """A missing file is reported with the OS reason."""
    path = tmp_path / "nope"
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_file=str(path)), env={})
    assert problems(info) == [
        f"accounts.work.password_file: cannot read {path}: No such file or directory"
    ]


@pytest.mark.parametrize(("data", "reason"), [(b"\n", "is empty"), (b"\xff\xfe", "UTF-8")])
def test_unusable_password_file(tmp_path: Path, data: bytes, reason: str) -> None:
    """An empty or undecodable secret file is refused."""
    path = write_secret(tmp_path / "pw", data)
    with pytest.raises(SecretError, match=reason):
        resolve_secret(make_account(password_file=str(path)), env={})


def test_password_file_directory_is_refused(tmp_path: Path) -> None:
    """A directory is not a secret file."""
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(SecretError, match="Is a directory"):
        resolve_secret(make_account(password_file=str(tmp_path / "dir")), env={})


@pytest.mark.timeout(10)
def test_password_file_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO is refused at once instead of waiting for a writer."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretError, match="is not a regular file"):
        resolve_secret(make_account(password_file=str(fifo)), env={})


def test_password_env() -> None:
    """password_env reads the named variable from the given environment."""
    assert resolve_secret(make_account(password_env="POP_PW"), env={"POP_PW": SECRET}) == SECRET


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "accounts.work.password_env: the environment variable it names is not set"),
        ({"POP_PW": ""}, "accounts.work.password_env: the environment variable it names is empty"),
    ],
)
def test_password_env_missing(env: dict[str, str], message: str) -> None:
    """An unset or empty variable is an error that does not repeat the name."""
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_env="POP_PW"), env=env)
    assert problems(info) == [message]


def test_password_command_first_line() -> None:
    """password_command yields the first line of stdout."""
    command = python_command(f'print("{SECRET}"); print("second line")')
    assert resolve_secret(make_account(password_command=command)) == SECRET


def test_password_command_is_not_run_by_a_shell(tmp_path: Path) -> None:
    """Shell syntax in password_command is passed as literal arguments, never interpreted."""
    marker = tmp_path / "marker"
    command = python_command("import sys; print(sys.argv[1:])") + f" ; touch {marker}"
    assert resolve_secret(make_account(password_command=command)) == f"[';', 'touch', '{marker}']"
    assert not marker.exists()


def test_password_in_password_env_is_not_echoed() -> None:
    """A password that happens to be a valid variable name is not shown when unset."""
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_env="Hunter2Secret"), env={})
    assert "Hunter2Secret" not in str(info.value)


def test_password_command_gets_a_minimal_environment() -> None:
    """The command sees PATH, HOME, LANG and POPSYNC_*, never other accounts' secrets."""
    command = python_command("import os, json; print(json.dumps(dict(os.environ)))")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/me",
        "LANG": "C.UTF-8",
        "OTHER_ACCOUNT_PW": SECRET,
        "CREDENTIALS_DIRECTORY": "/run/credentials/popsync.service",
    }
    printed = resolve_secret(make_account(password_command=command), env=env)
    seen = json.loads(printed)
    seen.pop("LC_CTYPE", None)  # the interpreter itself may set it (PEP 538)
    assert seen == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/me",
        "LANG": "C.UTF-8",
        "POPSYNC_ACCOUNT": "work",
        "POPSYNC_USER": "me",
    }


def test_password_command_inherits_not_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without an explicit env, popsync's own environment is filtered the same way."""
    monkeypatch.setenv("WORK_PASSWORD", SECRET)
    command = python_command('import os; print(os.environ.get("WORK_PASSWORD", "absent"))')
    assert resolve_secret(make_account(password_command=command)) == "absent"


def test_password_command_output_is_capped() -> None:
    """A command printing more than MAX_SECRET_BYTES is killed and refused."""
    code = 'import sys; sys.stdout.write("x" * (8 << 20))'
    with pytest.raises(SecretError, match=r"printed more than 1048576 bytes; killed it$"):
        resolve_secret(make_account(password_command=python_command(code)))


def test_password_command_output_up_to_the_cap_is_read() -> None:
    """Output of exactly MAX_SECRET_BYTES is still accepted (first line is the secret)."""
    code = f'import sys; sys.stdout.write("{SECRET}\\n" + "x" * ((1 << 20) - 20))'
    assert resolve_secret(make_account(password_command=python_command(code))) == SECRET


def test_password_command_failure_shows_stderr_not_stdout() -> None:
    """A failing command is reported with its status and stderr tail, never its stdout."""
    code = f'import sys; print("{SECRET}"); sys.stderr.write("token expired\\n"); sys.exit(3)'
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_command=python_command(code)))
    assert problems(info) == [
        f"accounts.work.password_command: command {sys.executable!r} exited with status 3: "
        "token expired"
    ]


def test_password_command_killed_by_signal() -> None:
    """A command killed by a signal is reported by the signal's name."""
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    with pytest.raises(SecretError, match=r"was killed by SIGTERM$"):
        resolve_secret(make_account(password_command=python_command(code)))


def test_password_command_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command running longer than COMMAND_TIMEOUT is killed and reported."""
    monkeypatch.setattr(secrets, "COMMAND_TIMEOUT", 0.5)
    command = python_command("import time; time.sleep(30)")
    with pytest.raises(SecretError, match=r"timed out after 0\.5s$"):
        resolve_secret(make_account(password_command=command))


def test_password_command_not_found(tmp_path: Path) -> None:
    """A command that does not exist is reported with the OS reason."""
    missing = tmp_path / "no-such-helper"
    with pytest.raises(SecretError) as info:
        resolve_secret(make_account(password_command=f"{missing} --token"))
    assert problems(info) == [
        f"accounts.work.password_command: cannot run command '{missing}': No such file or directory"
    ]


def test_password_command_empty_output() -> None:
    """A command that prints nothing is an error, not an empty password."""
    with pytest.raises(SecretError, match="printed nothing on its first line"):
        resolve_secret(make_account(password_command=python_command("pass")))
