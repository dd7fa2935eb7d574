"""No test that needs Dovecot, mpop or a tmpfs may skip silently in CI (issue 8, 9e)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

#: Skips that do not hide a missing server, tool or tmpfs, with the reason they are fine.
ALLOWED = {
    ("unit/test_cli.py", "this machine has /etc/popsync/config.toml"),  # a host's own config
    ("unit/test_client_fake.py", "no IPv6 loopback"),  # a kernel without IPv6
    ("unit/test_deploy_files.py", "systemd-analyze security --offline needs systemd 250"),
}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    attr = name.rpartition(".")[2]
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attr
        and ast.unparse(node.func) == name
    ]


def _guarded_by_ci(function: ast.AST) -> bool:
    """The function fails first when CI is set: ``if in_ci(): pytest.fail(...)``."""
    for node in ast.walk(function):
        if (
            isinstance(node, ast.If)
            and ast.unparse(node.test) in ("in_ci()", "IN_CI")
            and any(_calls(stmt, "pytest.fail") for stmt in node.body)
        ):
            return True
    return False


def _unguarded_skips(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if "skip" not in text:
        return []
    tree = ast.parse(text)
    where = path.relative_to(TESTS).as_posix()
    found: list[str] = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for call in _calls(function, "pytest.skip"):
            text = ast.unparse(call.args[0]) if call.args else ""
            if any(where == f and reason in text for f, reason in ALLOWED):
                continue
            if not _guarded_by_ci(function):
                found.append(f"{where}:{call.lineno}: pytest.skip({text}) without a CI guard")
    for name in ("pytest.importorskip", "pytest.mark.skip", "pytest.mark.skipif"):
        found += [f"{where}:{c.lineno}: {name} cannot fail in CI" for c in _calls(tree, name)]
    found += [
        f"{where}:{node.lineno}: @pytest.mark.skip(if) cannot fail in CI"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and ast.unparse(node) in ("pytest.mark.skip", "pytest.mark.skipif")
    ]
    return found


def test_every_skip_fails_in_ci() -> None:
    """Every pytest.skip in tests/ is CI-guarded (pytest.fail under in_ci()) or allowlisted."""
    problems = [p for path in sorted(TESTS.rglob("*.py")) for p in _unguarded_skips(path)]
    assert problems == []


def test_the_audit_catches_a_bare_skip(tmp_path: Path) -> None:
    """A bare skip or skipif is reported; the guarded form is not."""
    bad = TESTS / "unit" / "_audit_probe.py"
    source = (
        "import pytest\n"
        "def test_a():\n    pytest.skip('no dovecot')\n"
        "@pytest.mark.skipif(True, reason='x')\ndef test_b():\n    pass\n"
        "def test_c():\n    if in_ci():\n        pytest.fail('x')\n    pytest.skip('no mpop')\n"
    )
    bad.write_text(source, encoding="utf-8")
    try:
        problems = _unguarded_skips(bad)
    finally:
        bad.unlink()
    assert len([p for p in problems if "'no dovecot'" in p]) == 1
    assert any("skipif" in p for p in problems)
    assert not any("'no mpop'" in p for p in problems)


def _pytest_in(where: Path, ci: str) -> str:
    env = {
        **os.environ,
        "CI": ci,
        "PYTHONPATH": str(TESTS.parent),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout.strip().splitlines()[-1]


def test_ci_turns_a_skipped_dovecot_test_into_a_failure(tmp_path: Path) -> None:
    """Under CI=true the conftest hook fails a skipped test marked dovecot, not others."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "@pytest.mark.dovecot\n"
        "def test_needs_dovecot():\n    pytest.skip('pretend Dovecot is missing')\n"
        "def test_other():\n    pytest.skip('unrelated')\n"
    )
    assert "1 failed, 1 skipped" in _pytest_in(tmp_path, "true")
    assert "2 skipped" in _pytest_in(tmp_path, "")
