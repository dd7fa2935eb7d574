"""A private, throwaway PostgreSQL server for tests and benchmarks.

``initdb`` + ``pg_ctl`` in one root directory: the cluster listens on a free 127.0.0.1 port
and a Unix socket inside that root, trusts loopback connections (nothing else can reach it),
and runs with ``fsync=off`` because its data is thrown away. initdb and the postmaster refuse
to run as root, so as root both run as the ``postgres`` system user through ``runuser`` and
the root directory is handed to that user; as a normal user they run as that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from devtools.dovecot import _free_ports, _tail

__all__ = ["Postgres", "PostgresError", "postgres_available", "postgres_bindir"]

_BIN_ROOT = Path("/usr/lib/postgresql")
_SERVICE_USER = "postgres"
_SUPERUSER = "popsync"
_START_TIMEOUT = 30
_STOP_TIMEOUT = 15
_PORT_ATTEMPTS = 5
# Throwaway data: durability costs time and buys nothing here.
_SETTINGS = """\
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 16MB
dynamic_shared_memory_type = mmap
logging_collector = off
log_min_messages = warning
"""
_HBA = """\
local all all trust
host all all 127.0.0.1/32 trust
"""


class PostgresError(RuntimeError):
    """The cluster could not be created, started or stopped; the message carries its log tail."""


def postgres_bindir() -> Path | None:
    """Return the newest installed ``/usr/lib/postgresql/N/bin`` with initdb and pg_ctl."""
    versions: list[tuple[int, Path]] = []
    if _BIN_ROOT.is_dir():
        for entry in _BIN_ROOT.iterdir():
            bindir = entry / "bin"
            if re.fullmatch(r"\d+", entry.name) and (bindir / "initdb").is_file():
                versions.append((int(entry.name), bindir))
    if not versions:
        return None
    bindir = max(versions)[1]
    return bindir if (bindir / "pg_ctl").is_file() else None


def postgres_available() -> bool:
    """True when initdb and pg_ctl are installed (and, as root, the ``postgres`` user exists)."""
    if postgres_bindir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        return False
    return shutil.which("runuser") is not None


class Postgres:
    """A PostgreSQL cluster under ``root``; see the module docstring."""

    host = "127.0.0.1"

    def __init__(self, root: Path, *, password: str | None = None) -> None:
        """``password``: the superuser needs it (SCRAM) on every connection; None trusts all."""
        bindir = postgres_bindir()
        if bindir is None:
            raise PostgresError("PostgreSQL (initdb, pg_ctl) is not installed")
        self.bindir = bindir
        self.root = Path(root).resolve()
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log_file = self.root / "postgres.log"
        self.port = 0
        self.user = _SUPERUSER
        self.password = password
        self._as_root = os.geteuid() == 0
        self._started = False

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the postmaster started by :meth:`start` is alive."""
        pid = self._postmaster_pid()
        return pid is not None and _alive(pid)

    def start(self) -> None:
        """Create the cluster on first use, then start it; retry on port collisions."""
        if self._started and self.running:
            return
        self._prepare_root()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        for attempt in range(_PORT_ATTEMPTS):
            # Started again after stop(): the same port first, so clients' URLs stay valid.
            if attempt or not self.port:
                (self.port,) = _free_ports(1)
            self._write_settings()
            if self._pg_ctl("start", "-w", "-t", str(_START_TIMEOUT), "-l", str(self.log_file)):
                self._started = True
                return
            if "could not bind" not in _tail(self.log_file, 10):
                break
        raise PostgresError("PostgreSQL did not start\n" + _tail(self.log_file))

    def stop(self) -> None:
        """Stop the cluster (fast shutdown, then immediate, then SIGKILL); wait for it."""
        if not self._started:
            return
        self._started = False
        pid = self._postmaster_pid()
        for mode in ("fast", "immediate"):
            # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
            if self._pg_ctl("stop", "-w", "-t", str(_STOP_TIMEOUT), "-m", mode) and (
                pid is None or _wait_gone(pid, _STOP_TIMEOUT)
            ):
                return
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, _STOP_TIMEOUT):
                raise PostgresError(f"postmaster {pid} survived SIGKILL")

    def restart(self) -> None:
        """Stop and start again on the same port (for reconnect tests)."""
        self._started = False
        self._pg_ctl("stop", "-w", "-t", str(_STOP_TIMEOUT), "-m", "fast")
        if not self._pg_ctl("start", "-w", "-t", str(_START_TIMEOUT), "-l", str(self.log_file)):
            raise PostgresError("PostgreSQL did not restart\n" + _tail(self.log_file))
        self._started = True

    # -- databases ---------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection URI for ``dbname`` over TCP loopback."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database with a fresh name and return its connection URI."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def new_schema(self, prefix: str = "t") -> str:
        """Create an empty schema and return a URI whose ``search_path`` is just that schema.

        Much cheaper than a database (a catalog row instead of a copied template): tests
        that need an empty namespace of their own use this.
        """
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.dsn()}?options=-csearch_path%3D{name}"

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser, outside a transaction."""
        import psycopg

        with psycopg.connect(
            self.dsn(dbname), autocommit=True, connect_timeout=10, password=self.password
        ) as conn:
            conn.execute(sql.encode())

    # -- internals ---------------------------------------------------------------

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._as_root:
            # The service user must reach the root through its parents (mkdtemp gives 0700).
            os.chmod(self.root, 0o711)
            entry = pwd.getpwnam(_SERVICE_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            if not self.log_file.exists():
                self.log_file.touch()
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)

    def _argv(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        return ["runuser", "-u", _SERVICE_USER, "--", *argv] if self._as_root else argv

    def _initdb(self) -> None:
        auth = "trust" if self.password is None else "scram-sha-256"
        options = ["-A", auth]
        pwfile = self.root / "superuser.pw"
        if self.password is not None:
            pwfile.write_text(self.password + "\n")
            if self._as_root:
                entry = pwd.getpwnam(_SERVICE_USER)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            pwfile.chmod(0o600)
            options.append(f"--pwfile={pwfile}")
        argv = self._argv(
            "initdb", "-D", str(self.data_dir), "-U", _SUPERUSER, *options,
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise PostgresError(f"initdb failed ({proc.returncode}): {proc.stderr[-2000:]}")
        (self.data_dir / "pg_hba.conf").write_text(_HBA.replace("trust", auth))

    def _write_settings(self) -> None:
        settings = _SETTINGS.format(port=self.port, socket_dir=self.socket_dir)
        (self.data_dir / "postgresql.auto.conf").write_text(settings)

    def _pg_ctl(self, *args: str) -> bool:
        argv = self._argv("pg_ctl", "-D", str(self.data_dir), *args)
        # pg_ctl start leaves the postmaster behind with our pipes: send its output to the log.
        with open(os.devnull, "rb") as devnull:
            proc = subprocess.run(
                argv,
                stdin=devnull,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_START_TIMEOUT + _STOP_TIMEOUT,
                check=False,
                start_new_session=True,
            )
        return proc.returncode == 0

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (orphans are reaped by whoever is PID 1)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` no longer runs; True when it went away in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False
