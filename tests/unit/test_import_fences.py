"""Import fences, checked with ``ast``: the protocol core and the planner stay pure.

* ``popsync/pop3/`` and ``popsync/plan.py`` import only the standard library, nothing
  that does I/O or reads the clock, and nothing from popsync outside ``pop3``;
* ``popsync/net.py`` is the only module importing ``socket`` or ``ssl``;
* ``popsync/scheduler.py`` is the only module importing ``apscheduler``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

__all__: list[str] = []

PACKAGE = Path(__file__).resolve().parents[2] / "popsync"
PURE = [*sorted((PACKAGE / "pop3").glob("*.py")), PACKAGE / "plan.py"]
# Doing I/O or reading the clock is the driver's business, never the core's.
FORBIDDEN_IN_PURE = frozenset(
    {"socket", "ssl", "select", "selectors", "asyncio", "logging", "time", "subprocess", "os"}
)
NETWORK = frozenset({"socket", "ssl"})
# sd_notify talks to systemd over an AF_UNIX datagram socket, not to a mail server;
# it may import socket (never ssl). Any other exception must be added here on purpose.
NETWORK_EXCEPTIONS: dict[str, frozenset[str]] = {"notify.py": frozenset({"socket"})}


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every import in the file as (absolute-or-relative module name, relative level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is None:
            # "from .. import config" names modules: check each one.
            found.extend((alias.name, node.level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def resolve(path: Path, module: str, level: int) -> str:
    """The absolute dotted name an import in ``path`` refers to."""
    if level == 0:
        return module
    parts = ["popsync", *path.relative_to(PACKAGE).with_suffix("").parts]
    base = parts[:-level]  # a module's own package is one level up from its name
    return ".".join([*base, module] if module else base)


def top_level_imports(path: Path) -> set[str]:
    return {resolve(path, name, level).split(".")[0] for name, level in imports_of(path)}


def test_fence_covers_the_core() -> None:
    """The pure set holds the pop3 package and the planner (guards against a moved package)."""
    names = {_rel(p) for p in PURE}
    assert {"pop3/connection.py", "pop3/buffer.py", "pop3/sasl.py", "plan.py"} <= names


def test_resolve_relative_imports() -> None:
    """The resolver maps relative imports the way Python does."""
    conn = PACKAGE / "pop3" / "connection.py"
    assert resolve(conn, "buffer", 1) == "popsync.pop3.buffer"
    assert resolve(conn, "", 1) == "popsync.pop3"
    assert resolve(conn, "errors", 2) == "popsync.errors"
    assert resolve(PACKAGE / "pop3" / "__init__.py", "commands", 1) == "popsync.pop3.commands"


def pure_violations(path: Path, location: Path | None = None) -> list[str]:
    """Why each import of ``path`` breaks the fence; ``location`` places it in the package."""
    problems = []
    for name, level in imports_of(path):
        target = resolve(location or path, name, level)
        top = target.split(".")[0]
        if top == "popsync":
            if not (target == "popsync.pop3" or target.startswith("popsync.pop3.")):
                problems.append(f"{target}: popsync outside pop3")
        elif top == "__future__":
            continue
        elif top not in sys.stdlib_module_names:
            problems.append(f"{target}: not in the standard library")
        elif top in FORBIDDEN_IN_PURE:
            problems.append(f"{target}: does I/O or reads the clock")
    return problems


@pytest.mark.parametrize("path", PURE, ids=_rel)
def test_pure_modules_import_only_harmless_stdlib(path: Path) -> None:
    """The core imports stdlib only, no I/O or clock modules, and no popsync outside pop3."""
    assert pure_violations(path) == []


@pytest.mark.parametrize("path", PURE, ids=_rel)
def test_pure_modules_have_no_dynamic_imports(path: Path) -> None:
    """No __import__ or importlib calls that would slip past the fence."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "__import__" not in names
    assert "import_module" not in names | attrs


def _package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _package_modules(), ids=_rel)
def test_only_net_imports_socket_or_ssl(path: Path) -> None:
    """socket and ssl belong to popsync/net.py (plus the listed sd_notify exception)."""
    allowed = NETWORK if _rel(path) == "net.py" else NETWORK_EXCEPTIONS.get(_rel(path), frozenset())
    assert (top_level_imports(path) & NETWORK) - allowed == set()


@pytest.mark.parametrize("path", _package_modules(), ids=_rel)
def test_only_scheduler_imports_apscheduler(path: Path) -> None:
    """APScheduler stays behind popsync/scheduler.py."""
    if _rel(path) != "scheduler.py":
        assert "apscheduler" not in top_level_imports(path)


def test_fence_detects_violations(tmp_path: Path) -> None:
    """The checker flags I/O, clock, third-party and non-pop3 imports and passes the rest."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from __future__ import annotations\n"
        "import socket\nfrom time import monotonic\nfrom .. import config\n"
        "import pydantic.main\nfrom . import buffer\nfrom ..pop3 import errors\nimport re\n"
    )
    problems = pure_violations(probe, location=PACKAGE / "pop3" / "probe.py")
    assert problems == [
        "socket: does I/O or reads the clock",
        "time: does I/O or reads the clock",
        "popsync.config: popsync outside pop3",
        "pydantic.main: not in the standard library",
    ]


#: Heavy optional libraries, each owned by one module that imports it only inside functions,
#: so `popsync --once` and the admin commands never pay for them (start-up time matters).
LAZY_OWNERS = {"prometheus_client": "metrics.py", "authlib": "oauth2.py", "httpx2": "oauth2.py"}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported at module level, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", _package_modules(), ids=_rel)
def test_heavy_libraries_are_imported_lazily_by_their_owner(path: Path) -> None:
    """prometheus_client, authlib and httpx2 are imported only by their owner, inside functions."""
    for library, owner in LAZY_OWNERS.items():
        if _rel(path) != owner:
            assert library not in top_level_imports(path)
        assert library not in _module_level_imports(path)


def test_cold_start_imports_none_of_the_heavy_libraries() -> None:
    """Importing the CLI, daemon, sync engine and config loads no optional heavy library."""
    code = (
        "import sys\n"
        "import popsync.cli, popsync.daemon, popsync.sync, popsync.config, popsync.metrics\n"
        "import popsync.oauth2\n"
        f"print(sorted(m for m in {sorted(LAZY_OWNERS)!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "[]"
