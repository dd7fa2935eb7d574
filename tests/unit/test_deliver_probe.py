"""check-config's delivery probes that need no connection: MDA command and mbox location."""

from __future__ import annotations

from pathlib import Path

import pytest

from popsync.cli import main
from popsync.deliver.probe import static_problems
from popsync.errors import ExitCode

__all__: list[str] = []


def _config(tmp_path: Path, target: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[accounts.a]\nhost = "h"\nusername = "u"\n'
        f'password = "p"\n{target}\n'
    )
    path.chmod(0o600)
    return path


def test_missing_mda_command_is_a_config_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An MDA command that does not exist fails check-config with 78 and the key."""
    path = _config(tmp_path, f'deliver = "mda"\nmda = ["{tmp_path}/no-procmail", "-d", "me"]')
    assert main(["check-config", "-c", str(path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert f"  accounts.a.mda: the command {tmp_path}/no-procmail does not exist" in err


def test_mda_command_must_be_executable(tmp_path: Path) -> None:
    """A command file without any execute bit, or a directory, is reported."""
    script = tmp_path / "filter"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    (problem,) = static_problems("a", {"deliver": "mda", "mda": [str(script)]})
    assert problem.startswith(f"accounts.a.mda: the command {script} is not executable by ")
    (problem,) = static_problems("a", {"deliver": "mda", "mda": [str(tmp_path)]})
    assert "is not executable" in problem
    script.chmod(0o755)
    assert static_problems("a", {"deliver": "mda", "mda": [str(script), "{user}"]}) == []


def test_mbox_needs_an_existing_directory_and_a_file(tmp_path: Path) -> None:
    """The mbox's directory must exist (popsync creates only the file); a directory is no mbox."""
    (gone,) = static_problems("a", {"deliver": "mbox", "mbox": f"{tmp_path}/nope/inbox"})
    assert gone == (
        f"accounts.a.mbox: directory {tmp_path}/nope does not exist "
        "(popsync creates only the mbox file)"
    )
    (tmp_path / "box").mkdir()
    (folder,) = static_problems("a", {"deliver": "mbox", "mbox": str(tmp_path / "box")})
    assert folder.startswith(f"accounts.a.mbox: {tmp_path / 'box'} is not a file ")
    assert static_problems("a", {"deliver": "mbox", "mbox": str(tmp_path / "inbox")}) == []


def test_keys_of_a_target_not_chosen_are_not_probed(tmp_path: Path) -> None:
    """Only the chosen target is probed (the parser flags the stray key itself)."""
    keys = {"deliver": "maildir", "mda": [f"{tmp_path}/none"], "mbox": f"{tmp_path}/x/y"}
    assert static_problems("a", keys) == []
