"""A private, throwaway Dovecot POP3 server for tests and demos.

Everything (config, base_dir, state_dir, log, TLS files, Maildirs) lives under one root
directory; the server listens on free loopback ports and never touches the system Dovecot.
As root the mail processes run as ``nobody``, so ``root`` must be traversable by others
(mode ``0711`` on it and its parents); as a normal user every process runs as that user.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import pwd
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import trustme

__all__ = [
    "DOVECOT_BIN",
    "Dovecot",
    "DovecotError",
    "DovecotLmtp",
    "MailUser",
    "dovecot_available",
    "lmtp_available",
]

DOVECOT_BIN = Path("/usr/sbin/dovecot")
_LIBEXEC = Path("/usr/lib/dovecot")
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5
# A fixed timestamp prefix plus a zero-padded counter makes Dovecot's maildir sort
# (timestamp, then base name) follow delivery order exactly.
_NAME_FORMAT = "{stamp}.M{seq:09d}P{pid}.popsync-test"


class DovecotError(RuntimeError):
    """Dovecot could not be started or stopped; the message carries its log tail."""


@dataclass(frozen=True)
class MailUser:
    """One mailbox on the test server: log in as ``name`` with ``password``."""

    name: str
    password: str
    maildir: Path


def dovecot_available() -> bool:
    """Return True when the dovecot binary and its POP3 programs are installed."""
    return all(p.is_file() for p in (DOVECOT_BIN, _LIBEXEC / "pop3", _LIBEXEC / "pop3-login"))


def lmtp_available() -> bool:
    """Return True when Dovecot's LMTP server and the Pigeonhole Sieve plugin are installed."""
    return (
        DOVECOT_BIN.is_file()
        and (_LIBEXEC / "lmtp").is_file()
        and (_LIBEXEC / "modules" / "lib90_sieve_plugin.so").is_file()
    )


@dataclass(frozen=True)
class _Identity:
    """Who the mail processes run as, and who service processes run as."""

    uid: int
    gid: int
    user: str
    group: str
    as_root: bool


def _identity() -> _Identity:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return _Identity(
            nobody.pw_uid, nobody.pw_gid, "nobody", grp.getgrgid(nobody.pw_gid).gr_name, True
        )
    uid, gid = os.getuid(), os.getgid()
    return _Identity(uid, gid, pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name, False)


def _free_ports(count: int) -> list[int]:
    """Return distinct free loopback ports (held together so they cannot repeat)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _live_group_members(pgid: int) -> list[int]:
    """PIDs of non-zombie processes in process group ``pgid`` (Linux /proc scan)."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised comm: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


class Dovecot:
    """A Dovecot POP3/POP3S server under ``root``; see the module docstring."""

    host = "127.0.0.1"

    def __init__(
        self,
        root: Path,
        *,
        password: str = "secret",
        extra_config: str = "",
        lock_session: bool = False,
    ) -> None:
        """``lock_session`` turns on ``pop3_lock_session``: one POP3 session per mailbox.

        A second session then waits about 10 s for the lock (a fixed Dovecot dotlock
        timeout) and is refused with ``-ERR [IN-USE]``.
        """
        self.root = Path(root).resolve()
        self.password = password
        self.extra_config = extra_config
        self.lock_session = lock_session
        self.instance = f"popsync-{secrets.token_hex(4)}"
        self.pop3_port = 0
        self.pop3s_port = 0
        self.base_dir = self.root / "base"
        self.state_dir = self.root / "state"
        self.mail_dir = self.root / "mail"
        self.config_file = self.root / "dovecot.conf"
        self.log_file = self.root / "dovecot.log"
        self.ca_file = self.root / "ca.pem"
        self._out_file = self.root / "dovecot.out"
        self._cert_file = self.root / "server-cert.pem"
        self._key_file = self.root / "server-key.pem"
        self._identity = _identity()
        self._proc: subprocess.Popen[bytes] | None = None
        self._users = itertools.count(1)
        self._seq = itertools.count(1)
        self._stamp = int(time.time())

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
        """True while the master process started by :meth:`start` is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start Dovecot and wait until both listeners answer; retry on port collisions."""
        if self.running:
            return
        self._prepare_root()
        for _attempt in range(_PORT_ATTEMPTS):
            self.pop3_port, self.pop3s_port = _free_ports(2)
            self.config_file.write_text(self._config())
            if self._launch():
                return
        raise DovecotError(
            f"dovecot kept colliding on ports after {_PORT_ATTEMPTS} attempts\n"
            + _tail(self.log_file)
        )

    def stop(self) -> None:
        """Terminate the master (PID from base_dir/master.pid) and every child; wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pid = self._master_pid() or proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_TIMEOUT)
        self._reap_group(proc.pid)

    def _master_pid(self) -> int | None:
        try:
            return int((self.base_dir / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _reap_group(pgid: int) -> None:
        """SIGKILL what outlives the master (log, stats, busy pop3 children); wait for it.

        The master does not wait for children serving a connection, and the server
        is throwaway, so there is nothing to be gentle about.
        """
        deadline = time.monotonic() + _STOP_TIMEOUT
        while _live_group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise DovecotError(f"dovecot processes in group {pgid} survived SIGKILL")
            time.sleep(0.01)

    def _launch(self) -> bool:
        """Run one start attempt; False means a port collision worth retrying."""
        with self._out_file.open("ab") as out:
            # -F keeps the master in the foreground so we own (and reap) it; its own
            # session makes every child killable as one process group.
            proc = subprocess.Popen(
                [str(DOVECOT_BIN), "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                output = _tail(self._out_file) + "\n" + _tail(self.log_file)
                if "Address already in use" in output:
                    return False
                raise DovecotError(f"dovecot exited with status {proc.returncode}:\n{output}")
            if self._ready():
                return True
            time.sleep(0.05)
        self.stop()
        raise DovecotError(
            f"dovecot did not become ready within {_START_TIMEOUT}s:\n" + _tail(self.log_file)
        )

    def _ready(self) -> bool:
        """Both ports accept, and the plain port greets (so login processes run)."""
        try:
            with socket.create_connection((self.host, self.pop3s_port), timeout=2):
                pass
            with socket.create_connection((self.host, self.pop3_port), timeout=5) as sock:
                return sock.recv(512).startswith(b"+OK")
        except OSError:
            return False

    # -- files -------------------------------------------------------------------

    def _prepare_root(self) -> None:
        ident = self._identity
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.base_dir, self.state_dir, self.mail_dir):
            d.mkdir(exist_ok=True)
        if ident.as_root:
            # nobody must reach the Maildirs; nothing secret lives outside the 0600 files.
            for d in (self.root, self.mail_dir):
                d.chmod(0o711)
            self._check_traversable()
        if not self.ca_file.exists():
            ca = trustme.CA()
            cert = ca.issue_cert("localhost", "127.0.0.1")
            ca.cert_pem.write_to_path(str(self.ca_file))
            cert.private_key_pem.write_to_path(str(self._key_file))
            cert.cert_chain_pems[0].write_to_path(str(self._cert_file))
            self._key_file.chmod(0o600)

    def _check_traversable(self) -> None:
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise DovecotError(
                    f"{parent} is not traversable by others (mode "
                    f"{parent.stat().st_mode & 0o777:o}); Dovecot's mail processes run as "
                    f"nobody and could not reach {self.mail_dir}"
                )

    def _config(self) -> str:
        ident = self._identity
        service_users = (
            ""
            if ident.as_root
            else (
                f"default_login_user = {ident.user}\n"
                f"default_internal_user = {ident.user}\n"
                f"default_internal_group = {ident.group}\n"
            )
        )
        return f"""\
# Generated by devtools/dovecot.py: a throwaway POP3 server for tests.
instance_name = {self.instance}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_file}
info_log_path = {self.log_file}
{service_users}listen = 127.0.0.1
protocols = pop3
ssl = yes
ssl_cert = <{self._cert_file}
ssl_key = <{self._key_file}
disable_plaintext_auth = no
# apop puts the <timestamp> into the greeting; all (scram-sha-256 too) need a plaintext passdb.
auth_mechanisms = plain login cram-md5 scram-sha-256 apop
auth_verbose = yes
auth_failure_delay = 0
mail_location = maildir:{self.mail_dir}/%u
pop3_uidl_format = %08Xu%08Xv
mail_fsync = never
mail_max_userip_connections = 1000
pop3_lock_session = {"yes" if self.lock_session else "no"}
first_valid_uid = {min(ident.uid, 500)}
first_valid_gid = {min(ident.gid, 1)}
passdb {{
  driver = static
  args = password={self.password}
}}
userdb {{
  driver = static
  args = uid={ident.uid} gid={ident.gid} home={self.mail_dir}/%u
}}
service pop3-login {{
  chroot =
  # One long-lived login process instead of a fork per connection: faster tests.
  service_count = 0
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
  # Moving the penalty socket disables the auth penalty (up to 15 s per login after a
  # failed one), which would make every test after a wrong-password test slow.
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
}}
{self.extra_config}
"""

    # -- mailboxes ---------------------------------------------------------------

    def _own(self, path: Path | int) -> None:
        if self._identity.as_root:
            if isinstance(path, int):
                os.fchown(path, self._identity.uid, self._identity.gid)
            else:
                os.chown(path, self._identity.uid, self._identity.gid)

    def new_user(self, prefix: str = "u") -> MailUser:
        """Create a fresh user with an empty Maildir owned by the mail uid."""
        name = f"{prefix}{next(self._users):04d}"
        maildir = self.mail_dir / name
        maildir.mkdir(mode=0o700)
        self._own(maildir)
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700)
            self._own(maildir / sub)
        return MailUser(name=name, password=self.password, maildir=maildir)

    def deliver(self, user: MailUser, message: bytes) -> str:
        """Drop ``message`` into the user's ``new/`` (atomically); return its file name."""
        name = _NAME_FORMAT.format(stamp=self._stamp, seq=next(self._seq), pid=os.getpid())
        tmp = user.maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(message)
            while view:
                view = view[os.write(fd, view) :]
            self._own(fd)
        finally:
            os.close(fd)
        os.rename(tmp, user.maildir / "new" / name)
        return name

    def deliver_many(self, user: MailUser, messages: Iterable[bytes]) -> None:
        """Deliver many messages in order (no fsync: the server is throwaway)."""
        for message in messages:
            self.deliver(user, message)

    def messages(self, user: MailUser) -> list[bytes]:
        """Return the messages on the server now (new/ and cur/), in delivery order."""
        for _attempt in range(10):
            files = [p for sub in ("new", "cur") for p in (user.maildir / sub).iterdir()]
            # cur/ names carry a ":2,FLAGS" suffix; the base name keeps the order.
            files.sort(key=lambda p: p.name.split(":", 1)[0])
            try:
                return [p.read_bytes() for p in files]
            except FileNotFoundError:
                continue  # Dovecot moved a file from new/ to cur/ meanwhile; list again
        raise DovecotError(f"{user.maildir} kept changing while being read")


class DovecotLmtp(Dovecot):
    """A Dovecot LMTP server (and optionally Pigeonhole Sieve) under its own ``root``.

    It listens on a unix socket (`socket_path`) and a free loopback port (`lmtp_port`);
    recipients are ``NAME@any.domain`` for a user made by :meth:`new_user`, whose Maildir
    (Maildir++ folders as ``.Folder``) is ``mail/NAME``. :meth:`set_sieve` installs a
    user's Sieve script; folders named by ``fileinto`` are created on demand.
    """

    def __init__(self, root: Path, *, sieve: bool = True, fsync: bool = False) -> None:
        super().__init__(root)
        self.sieve = sieve
        self.fsync = fsync
        self.lmtp_port = 0
        self.sieve_dir = self.root / "sieve"

    @property
    def socket_path(self) -> Path:
        """The LMTP unix socket."""
        return self.base_dir / "lmtp"

    def start(self) -> None:
        """Start the LMTP server and wait until it greets on the port and the socket."""
        if self.running:
            return
        self._prepare_root()
        self.sieve_dir.mkdir(exist_ok=True)
        self._own(self.sieve_dir)
        for _attempt in range(_PORT_ATTEMPTS):
            (self.lmtp_port,) = _free_ports(1)
            self.config_file.write_text(self._config())
            if self._launch():
                return
        raise DovecotError("dovecot lmtp kept colliding on ports\n" + _tail(self.log_file))

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.lmtp_port), timeout=5) as sock:
                if not sock.recv(512).startswith(b"220"):
                    return False
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket_path))
                return sock.recv(512).startswith(b"220")
        except OSError:
            return False

    def _config(self) -> str:
        ident = self._identity
        service_users = (
            ""
            if ident.as_root
            else (
                f"default_login_user = {ident.user}\n"
                f"default_internal_user = {ident.user}\n"
                f"default_internal_group = {ident.group}\n"
            )
        )
        sieve = (
            "protocol lmtp {\n  mail_plugins = $mail_plugins sieve\n}\n"
            "protocol lda {\n  mail_plugins = $mail_plugins sieve\n}\n"
            f"plugin {{\n  sieve = file:{self.sieve_dir}/%n;active={self.sieve_dir}/%n.sieve\n}}\n"
            if self.sieve
            else ""
        )
        return f"""\
# Generated by devtools/dovecot.py: a throwaway LMTP server for tests.
instance_name = {self.instance}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_file}
info_log_path = {self.log_file}
{service_users}listen = 127.0.0.1
protocols = lmtp
ssl = no
auth_username_format = %Ln
mail_location = maildir:{self.mail_dir}/%n
mail_fsync = {"optimized" if self.fsync else "never"}
lda_mailbox_autocreate = yes
lmtp_rcpt_check_quota = no
first_valid_uid = {min(ident.uid, 500)}
first_valid_gid = {min(ident.gid, 1)}
passdb {{
  driver = static
  args = password={self.password}
}}
userdb {{
  driver = static
  args = uid={ident.uid} gid={ident.gid} home={self.mail_dir}/%n allow_all_users=yes
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service anvil {{
  chroot =
}}
{sieve}{self.extra_config}
"""

    def set_sieve(self, user: MailUser, script: str) -> None:
        """Make ``script`` the user's active Sieve script."""
        path = self.sieve_dir / f"{user.name}.sieve"
        path.write_text(script)
        self._own(path)
        folder = self.sieve_dir / user.name
        folder.mkdir(exist_ok=True)
        self._own(folder)

    def folder(self, user: MailUser, name: str | None = None) -> Path:
        """The Maildir of INBOX (``None``) or of a Maildir++ folder."""
        return user.maildir if name is None else user.maildir / f".{name}"

    def folder_messages(self, user: MailUser, name: str | None = None) -> list[bytes]:
        """The messages in a folder (new/ and cur/), in name order."""
        where = self.folder(user, name)
        files = sorted(
            p for sub in ("new", "cur") if (where / sub).is_dir() for p in (where / sub).iterdir()
        )
        return [p.read_bytes() for p in files]
