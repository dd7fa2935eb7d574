"""Configurations and command lines for every benchmarked tool.

Common ground for all tools: plain POP3 on loopback (TLS off: the benchmark measures fetching and
delivery, not the TLS library, and every tool would pay the same handshake), password login with
USER/PASS, mail kept on the server, delivery into a Maildir, state (which UIDLs were seen) in the
tool's own state file, default settings otherwise. Run as root, the tools run as the unprivileged
system user ``popbench`` (via ``setpriv``) and own their work directories.

Layout of one tool's work directory: its config files at the top, ``Maildir/`` and ``state/``
below; :func:`reset` empties the latter two so the next run is a first fetch again.
"""

from __future__ import annotations

import importlib
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PEERS",
    "TOOLS",
    "Owner",
    "Server",
    "ToolRun",
    "ensure_peers_installed",
    "ensure_user",
    "popsync_available",
    "reset",
    "setup_tool",
    "tool_python",
    "tool_versions",
]

REPO = Path(__file__).resolve().parent.parent
PEERS = ("mpop", "getmail6", "fetchmail", "naive-poplib")
TOOLS = (*PEERS, "popsync")
_PACKAGES = {
    "mpop": "mpop",
    "getmail": "getmail6",
    "fetchmail": "fetchmail",
    "maildrop": "maildrop",
}
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the installed console script runs (pyproject's [project.scripts]).
_POPSYNC_MAIN = "import sys; from popsync.cli import run; sys.argv[0] = 'popsync'; run()"


@dataclass(frozen=True)
class Server:
    """Where a tool fetches from."""

    host: str
    port: int
    username: str
    password: str


@dataclass(frozen=True)
class Owner:
    """The user the tools run as; ``prefix`` drops privileges (empty when not root)."""

    name: str
    uid: int
    gid: int
    prefix: tuple[str, ...] = ()

    def chown(self, path: Path) -> None:
        """Give ``path`` (recursively) to this user when we are root."""
        if os.geteuid() != 0:
            return
        os.chown(path, self.uid, self.gid)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), self.uid, self.gid)


@dataclass
class ToolRun:
    """One tool prepared for one scenario: what to run and where its mail lands."""

    tool: str
    work: Path
    argv: list[str]
    env: dict[str, str]
    owner: Owner
    daemon_argv: list[str] | None = None
    maildir: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.maildir = self.work / "Maildir"
        self.state = self.work / "state"


def ensure_user(name: str = "popbench") -> Owner:
    """Return the unprivileged user to run tools as (created when root), or the current user."""
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return Owner(pw.pw_name, pw.pw_uid, pw.pw_gid)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
        pw = pwd.getpwnam(name)
    prefix = ("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--")
    return Owner(name, pw.pw_uid, pw.pw_gid, prefix)


def ensure_peers_installed(*, install: bool = True) -> list[str]:
    """Install missing peer packages with apt-get when root; return the packages still missing."""
    missing = [pkg for exe, pkg in _PACKAGES.items() if shutil.which(exe) is None]
    if missing and install and os.geteuid() == 0:
        print(f"installing {' '.join(missing)} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=False, env=env)
        missing = [pkg for exe, pkg in _PACKAGES.items() if shutil.which(exe) is None]
    return missing


def tool_python(owner: Owner) -> tuple[str, dict[str, str]]:
    """Return the interpreter the Python tools run under and the PYTHONPATH they need.

    The venv's interpreter may live under a directory the unprivileged user cannot enter (e.g.
    /root/.pyenv); then the system python3 of the same minor version runs with the venv's
    site-packages on PYTHONPATH. The repo is always on PYTHONPATH for ``import popsync``.
    """
    site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    paths = [str(REPO), *site]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    probe = subprocess.run(
        [*owner.prefix, sys.executable, "-c", "import pydantic"],
        capture_output=True,
        check=False,
        env={"PATH": _PATH, **env},
    )
    if probe.returncode == 0:
        return sys.executable, env
    system = shutil.which("python3") or "/usr/bin/python3"
    return system, env


def popsync_available() -> str | None:
    """Return None when popsync can sync (its CLI and sync engine import), else why not."""
    for module in ("popsync.cli", "popsync.sync", "popsync.client", "popsync.net"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"{module} not importable ({type(exc).__name__}: {exc})"
    if not callable(getattr(sys.modules["popsync.cli"], "main", None)):
        return "popsync.cli has no main()"
    return None


def _base_env(run_home: Path, owner: Owner) -> dict[str, str]:
    return {
        "PATH": _PATH,
        "HOME": str(run_home),
        "USER": owner.name,
        "LOGNAME": owner.name,
        "LANG": "C.UTF-8",
    }


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


def _mpop(work: Path, srv: Server, owner: Owner, py: tuple[str, dict[str, str]]) -> ToolRun:
    rc = work / "mpoprc"
    _write(
        rc,
        f"""defaults
tls off
auth user
pipelining auto
keep on

account bench
host {srv.host}
port {srv.port}
user {srv.username}
password {srv.password}
delivery maildir {work / "Maildir"}
uidls_file {work / "state" / "mpop_uidls"}
""",
    )
    argv = ["mpop", f"--file={rc}", "--quiet", "bench"]
    return ToolRun("mpop", work, argv, _base_env(work, owner), owner)


def _getmail(work: Path, srv: Server, owner: Owner, py: tuple[str, dict[str, str]]) -> ToolRun:
    rc = work / "getmailrc"
    _write(
        rc,
        f"""[retriever]
type = SimplePOP3Retriever
server = {srv.host}
port = {srv.port}
username = {srv.username}
password = {srv.password}

[destination]
type = Maildir
path = {work / "Maildir"}/

[options]
delete = false
read_all = false
verbose = 0
""",
    )
    argv = ["getmail", "--quiet", f"--getmaildir={work / 'state'}", f"--rcfile={rc}"]
    return ToolRun("getmail6", work, argv, _base_env(work, owner), owner)


def _fetchmail(work: Path, srv: Server, owner: Owner, py: tuple[str, dict[str, str]]) -> ToolRun:
    filt = work / "mailfilter"
    _write(filt, f'to "{work / "Maildir"}/"\n')
    rc = work / "fetchmailrc"
    # sslproto '' stops 6.4's opportunistic STARTTLS: every tool speaks plain POP3 here
    _write(
        rc,
        f"""set no syslog
poll {srv.host} service {srv.port} protocol pop3 uidl auth password
    user "{srv.username}" there password "{srv.password}" keep
    sslproto ''
    mda "/usr/bin/maildrop {filt}"
""",
    )
    state = work / "state"
    argv = [
        "fetchmail",
        "--silent",
        "--nodetach",
        f"--fetchmailrc={rc}",
        f"--idfile={state / 'fetchids'}",
        f"--pidfile={state / 'fetchmail.pid'}",
    ]
    env = {**_base_env(work, owner), "FETCHMAILHOME": str(state)}
    return ToolRun("fetchmail", work, argv, env, owner)


def _naive(work: Path, srv: Server, owner: Owner, py: tuple[str, dict[str, str]]) -> ToolRun:
    script = Path(__file__).resolve().parent / "naive_poplib.py"
    argv = [py[0], str(script), srv.host, str(srv.port), srv.username, srv.password]
    argv += [str(work / "Maildir"), str(work / "state" / "seen.json")]
    return ToolRun("naive-poplib", work, argv, _base_env(work, owner), owner)


def popsync_config(
    state_dir: Path, accounts: dict[str, tuple[Server, Path]], *, interval: float | None = None
) -> str:
    """Return popsync TOML for ``accounts`` (name -> (server, maildir))."""
    lines = [f'state_dir = "{state_dir}"', ""]
    for name, (srv, maildir) in accounts.items():
        lines += [
            f"[accounts.{name}]",
            f'host = "{srv.host}"',
            f"port = {srv.port}",
            'tls = "none"',
            "allow_plaintext = true",
            # USER/PASS like mpop ("auth user") and fetchmail: over clear text "auto" would
            # use SCRAM-SHA-256 (one more round trip and PBKDF2 on both sides).
            'auth = "user"',
            f'username = "{srv.username}"',
            f'password = "{srv.password}"',
            f'maildir = "{maildir}"',
        ]
        if interval is not None:
            lines.append(f"interval = {interval}")
        lines.append("")
    return "\n".join(lines)


def _popsync(work: Path, srv: Server, owner: Owner, py: tuple[str, dict[str, str]]) -> ToolRun:
    cfg = work / "popsync.toml"
    accounts = {"bench": (srv, work / "Maildir")}
    _write(cfg, popsync_config(work / "state", accounts))
    daemon_cfg = work / "popsync-daemon.toml"
    _write(daemon_cfg, popsync_config(work / "state", accounts, interval=86400))
    env = {**_base_env(work, owner), **py[1]}
    argv = [py[0], "-c", _POPSYNC_MAIN, "--once", "-c", str(cfg)]
    daemon = [py[0], "-c", _POPSYNC_MAIN, "-c", str(daemon_cfg)]
    return ToolRun("popsync", work, argv, env, owner, daemon_argv=daemon)


_SETUP: dict[str, Callable[[Path, Server, Owner, tuple[str, dict[str, str]]], ToolRun]] = {
    "mpop": _mpop,
    "getmail6": _getmail,
    "fetchmail": _fetchmail,
    "naive-poplib": _naive,
    "popsync": _popsync,
}


def setup_tool(
    tool: str, work: Path, srv: Server, owner: Owner, py: tuple[str, dict[str, str]]
) -> ToolRun:
    """Write ``tool``'s configuration under ``work`` and return how to run it (state is empty)."""
    work.mkdir(parents=True, exist_ok=True)
    run = _SETUP[tool](work, srv, owner, py)
    reset(run)
    return run


def reset(run: ToolRun) -> None:
    """Empty the tool's Maildir and state so the next run is a first fetch."""
    for path in (run.maildir, run.state):
        shutil.rmtree(path, ignore_errors=True)
    for sub in ("tmp", "new", "cur"):
        (run.maildir / sub).mkdir(parents=True)
    run.state.mkdir()
    run.owner.chown(run.work)


def _first_line(argv: list[str], pattern: str = "") -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (proc.stdout + proc.stderr).splitlines():
        if re.search(pattern, line):
            return line.strip()
    return "unknown"


def tool_versions(py: str) -> dict[str, str]:
    """Return a version line for every peer, the Python the Python tools use, and Dovecot."""
    return {
        "mpop": _first_line(["mpop", "--version"], "version"),
        "getmail6": _first_line(["getmail", "--version"], "getmail"),
        "fetchmail": _first_line(["fetchmail", "--version"], "release"),
        "maildrop": _first_line(["maildrop", "-v"], "maildrop"),
        "dovecot": _first_line(["dovecot", "--version"]),
        "python (naive-poplib, popsync)": f"{py}: "
        + _first_line([py, "-c", "import sys; print(sys.version.split()[0])"]),
    }
