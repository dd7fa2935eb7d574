"""Fetch an account's password or token at job time, from wherever the config says it lives.

Secrets are read per run (not at start-up) so that rotated files and short-lived OAuth tokens
work. Every error names the account and the source; none ever contains the secret, and a failing
`password_command` reports its stderr but never its stdout. Nor does an error show the value of
`password_env`: a password put there by mistake would end up in the log.

`password_command` runs with a minimal environment (`COMMAND_ENV`, plus `POPSYNC_ACCOUNT` and
`POPSYNC_USER`), never popsync's own: that may hold other accounts' `password_env` secrets. Its
output is read up to `MAX_SECRET_BYTES`, like a password file; more is refused.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from popsync.errors import SecretError, describe_exit
from popsync.textsafe import safe_text

if TYPE_CHECKING:  # at run time the account may be a configcache.Record: no pydantic import
    from popsync.config import Account

# subprocess, selectors, shlex and shutil are imported in the functions that run
# password_command: a short run with an inline or file password does not load them.

__all__ = [
    "COMMAND_ENV",
    "COMMAND_TIMEOUT",
    "MAX_SECRET_BYTES",
    "check_secret_source",
    "command_env",
    "resolve_secret",
    "resolve_store_password",
]

#: Seconds a password_command may run before it is killed.
COMMAND_TIMEOUT = 30.0
#: Larger secret files are refused: a token is a few kB, a mistaken path may be gigabytes.
MAX_SECRET_BYTES = 1 << 20
_STDERR_TAIL = 400
#: Variables password_command inherits from popsync's environment: where programs, the home
#: directory and the locale are, and where the user's keyring and agents listen (secret-tool
#: finds them there). Nothing that holds a secret.
COMMAND_ENV = ("PATH", "HOME", "LANG", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")


def resolve_secret(account: Account, *, env: Mapping[str, str] | None = None) -> str:
    """Return the account's password or token; raise `SecretError` if it cannot be obtained.

    `env` replaces `os.environ` for password_env, $CREDENTIALS_DIRECTORY and what
    password_command inherits (see `command_env`).
    """
    if account.password is not None:
        return account.password.get_secret_value()
    if account.password_file is not None:
        return _from_file(account.name, account.password_file, os.environ if env is None else env)
    if account.password_env is not None:
        return _from_env(account.name, account.password_env, os.environ if env is None else env)
    if account.password_command is not None:
        command_environment = command_env(account.name, account.username, env)
        return _from_command(account.name, account.password_command, command_environment)
    raise SecretError([f"accounts.{account.name}: no password source configured"])


def resolve_store_password(
    variable: str | None, command: str | None, *, env: Mapping[str, str] | None = None
) -> str | None:
    """The PostgreSQL store's password from ``store_password_env`` or ``_command``, else None.

    The same rules and messages as an account's password_env/password_command, named after
    the top-level keys. None leaves it to libpq (the URL, PGPASSWORD, PGPASSFILE).
    """
    source = os.environ if env is None else env
    try:
        if variable is not None:
            return _from_env("", variable, source)
        if command is not None:
            return _from_command("", command, command_env("", "", source))
    except SecretError as exc:
        # _fail() names "accounts.<name>.password_…"; with no name that is the store's key.
        raise SecretError(
            [p.replace("accounts..password_", "store_password_", 1) for p in exc.problems]
        ) from None
    return None


def check_secret_source(
    name: str, key: str, value: object, *, env: Mapping[str, str] | None = None
) -> list[str]:
    """Problems with one secret source of account ``name``, found without running anything.

    A file is opened and checked as at sync time (exists, regular, safe mode, not empty), an
    environment variable must be set and non-empty, a command's program must be executable
    (it is not run: it may prompt, cost money or rotate a token). The secret is never returned.
    """
    env = os.environ if env is None else env
    try:
        if key == "password_file" and isinstance(value, str | Path):
            _from_file(name, Path(os.path.expanduser(str(value))), env)
        elif key == "password_env" and isinstance(value, str):
            _from_env(name, value, env)
        elif key == "password_command" and isinstance(value, str):
            _command_runnable(name, value, env)
    except SecretError as exc:
        return exc.problems
    return []


def _command_runnable(name: str, command: str, env: Mapping[str, str]) -> None:
    import shlex
    import shutil

    try:
        argv = shlex.split(command)
    except ValueError:
        return  # the config parser reports it
    if not argv:
        return
    program = argv[0]
    if "/" in program:
        if not os.access(program, os.X_OK) or not os.path.isfile(program):
            raise _fail(name, "password_command", f"{program} is not an executable file")
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise _fail(name, "password_command", f"{program!r} not found in $PATH")


def _fail(name: str, key: str, message: str) -> SecretError:
    return SecretError([f"accounts.{name}.{key}: {message}"])


def _from_env(name: str, variable: str, env: Mapping[str, str]) -> str:
    # The name is not shown: if it is a password put in password_env by mistake, this
    # message would carry it into the log (and the SIGHUP reload log) for everyone to read.
    value = env.get(variable)
    if value is None:
        raise _fail(name, "password_env", "the environment variable it names is not set")
    if not value:
        raise _fail(name, "password_env", "the environment variable it names is empty")
    return value


def _secret_path(name: str, path: Path, env: Mapping[str, str]) -> tuple[Path, bool]:
    """Resolve a relative name against $CREDENTIALS_DIRECTORY; say whether systemd manages it."""
    credentials = env.get("CREDENTIALS_DIRECTORY", "")
    if not path.is_absolute():
        if not credentials:
            raise _fail(
                name,
                "password_file",
                # Not shown: a relative "path" may well be a password put here by mistake.
                "a relative name needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=); use "
                "an absolute path otherwise",
            )
        path = Path(credentials) / path
    # resolve() follows symlinks, so a link out of the credentials directory is not trusted.
    managed = bool(credentials) and path.resolve().is_relative_to(Path(credentials).resolve())
    return path, managed


def _from_file(name: str, configured: Path, env: Mapping[str, str]) -> str:
    path, managed = _secret_path(name, configured, env)
    # A relative name is never shown (it may be a password put here by mistake); an absolute
    # path is, since a password rarely starts with "/" and the path is what a user must fix.
    shown = str(path) if configured.is_absolute() else "the credential it names"
    try:
        # O_NONBLOCK: opening a FIFO by mistake must not hang the job; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise _fail(name, "password_file", f"{shown} is not a regular file")
            if mode & (stat.S_IRGRP | stat.S_IROTH) and not managed:
                raise _fail(
                    name,
                    "password_file",
                    f"{shown} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                    f"run chmod 600 {shown if configured.is_absolute() else 'on it'}",
                )
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise _fail(name, "password_file", f"cannot read {shown}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise _fail(name, "password_file", f"{shown} is larger than {MAX_SECRET_BYTES} bytes")
    text = _decode(name, "password_file", data, shown)
    # Editors and `echo` add one newline; anything else is part of the secret.
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise _fail(name, "password_file", f"{shown} is empty")
    return text


def _decode(name: str, key: str, data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(name, key, f"{what} is not valid UTF-8") from None


def command_env(name: str, username: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of account ``name``'s password_command (see `COMMAND_ENV`)."""
    source = os.environ if env is None else env
    kept = {key: source[key] for key in COMMAND_ENV if source.get(key)}
    kept.setdefault("PATH", os.defpath)
    kept["POPSYNC_ACCOUNT"] = name
    kept["POPSYNC_USER"] = username
    return kept


class _TooMuchOutput(Exception):
    """password_command printed more than MAX_SECRET_BYTES."""


def _run_capped(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run ``argv``; return (status, stdout, stderr tail); stdout capped, whole run timed."""
    import selectors
    import subprocess

    # No shell: the command line is split like a shell would, but nothing is expanded.
    proc = subprocess.Popen(  # noqa: S603
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    deadline = time.monotonic() + COMMAND_TIMEOUT
    out, err = bytearray(), bytearray()
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ, out)
            selector.register(proc.stderr, selectors.EVENT_READ, err)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(argv, COMMAND_TIMEOUT)
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer: bytearray = key.data
                    buffer += chunk
                    if buffer is out and len(out) > MAX_SECRET_BYTES:
                        raise _TooMuchOutput
                    if buffer is err and len(err) > 4 * _STDERR_TAIL:
                        del err[: -2 * _STDERR_TAIL]
        status = proc.wait(max(0.0, deadline - time.monotonic()))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    return status, bytes(out), bytes(err)


def _from_command(name: str, command: str, env: dict[str, str]) -> str:
    import shlex
    import subprocess

    argv = shlex.split(command)
    what = f"command {argv[0]!r}" if argv else "command"
    try:
        status, stdout, stderr = _run_capped(argv, env)
    except subprocess.TimeoutExpired:
        message = f"{what} timed out after {COMMAND_TIMEOUT:g}s"
        raise _fail(name, "password_command", message) from None
    except _TooMuchOutput:
        message = f"{what} printed more than {MAX_SECRET_BYTES} bytes; killed it"
        raise _fail(name, "password_command", message) from None
    except OSError as exc:
        raise _fail(name, "password_command", f"cannot run {what}: {exc.strerror}") from None
    if status != 0:
        message = f"{what} {describe_exit(status)}{_stderr_tail(stderr)}"
        raise _fail(name, "password_command", message)
    first_line = stdout.split(b"\n", 1)[0].removesuffix(b"\r")
    secret = _decode(name, "password_command", first_line, f"output of {what}")
    if not secret:
        raise _fail(name, "password_command", f"{what} printed nothing on its first line")
    return secret


def _stderr_tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", errors="replace")
    lines = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return ": " + safe_text(lines, _STDERR_TAIL, cut="tail") if lines else ""
