"""Fleet deployment files (deploy/): Kubernetes schemas and promises, the systemd worker unit."""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import unavailable
from tests.unit.test_deploy_files import BINARY, HARDENING, ROOT, _require, _verify

K8S = ROOT / "deploy" / "kubernetes"
UNIT_DIR = ROOT / "deploy" / "systemd"
WORKER_UNIT = "popsync-fleet@.service"
#: The oldest Kubernetes the manifests must still fit, and the newest the validator knows.
K8S_VERSIONS = ("1.28.0", "latest")

Doc = dict[str, Any]


def _validator() -> Any:
    """The kubernetes_validate module (offline JSON schemas); skip locally, fail in CI."""
    try:
        import kubernetes_validate
    except ImportError:
        unavailable("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kubernetes_validate


def _manifests() -> list[Path]:
    """Every Kubernetes object file (kustomization.yaml is kustomize's, not the API's)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def _parsed(path: Path) -> str:
    """The file as JSON text: parsed once, and every caller gets its own copy."""
    return json.dumps([doc for doc in yaml.safe_load_all(path.read_text()) if doc])


def _docs(path: Path) -> list[Doc]:
    docs: list[Doc] = json.loads(_parsed(path))
    return docs


def _object(kind: str, name: str) -> Doc:
    """The one object of this kind and name in deploy/kubernetes."""
    found = [
        doc
        for path in _manifests()
        for doc in _docs(path)
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def _worker() -> Doc:
    """The popsync container of the worker Deployment."""
    pod = _object("Deployment", "popsync")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    return container


def _pod() -> Doc:
    spec = _object("Deployment", "popsync")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def _fleet_config() -> dict[str, Any]:
    """The config.toml of the ConfigMap, parsed as TOML."""
    return tomllib.loads(_object("ConfigMap", "popsync-config")["data"]["config.toml"])


def _env(container: Doc) -> dict[str, Doc]:
    return {item["name"]: item for item in container.get("env", [])}


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_the_kubernetes_schema(version: str) -> None:
    """Every object in deploy/kubernetes passes the schema strictly (no unknown field)."""
    kv = _validator()
    target = kv.latest_version() if version == "latest" else version
    checked = 0
    for path in _manifests():
        for doc in _docs(path):
            kv.validate(doc, target, strict=True)
            checked += 1
    assert checked >= 8


def test_schema_check_rejects_broken_manifests() -> None:
    """The validator catches a misspelt field and a wrong type, so passing above means something."""
    kv = _validator()
    deployment = _object("Deployment", "popsync")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(misspelt, "1.28.0", strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, "1.28.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """kubectl apply -k deploy/kubernetes applies every file, and only files that exist."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifests())


def test_worker_pod_runs_non_root_on_a_read_only_root() -> None:
    """The worker runs as uid 10001 without privileges; only emptyDir volumes are writable."""
    pod, container = _pod(), _worker()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"]
                if not m.get("readOnly")}  # fmt: skip
    # /data holds $STATE_DIRECTORY (/data/state, the image's) and the config cache.
    assert set(writable) == {"/data", "/tmp"}
    for name in writable.values():
        assert "emptyDir" in volumes[name]
    assert _fleet_config()["state_dir"] == "/data/state"


def test_worker_has_probes_and_resources() -> None:
    """Liveness hits the metrics port the config serves; readiness runs popsync healthcheck."""
    container = _worker()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen = _fleet_config()["metrics_listen"]
    assert ports["metrics"] == int(listen.rpartition(":")[2])
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/metrics", "metrics")
    ready = container["readinessProbe"]["exec"]["command"]
    assert ready[:2] == ["popsync", "healthcheck"]
    assert container["args"] == ["-c", "/config/config.toml"]
    assert "-c" in ready
    assert ready[ready.index("-c") + 1] == "/config/config.toml"
    resources = container["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_secrets_reach_the_worker_only_through_the_secret() -> None:
    """The DB password is an env var from the Secret, POP3 passwords are Secret files."""
    container, config = _worker(), _fleet_config()
    secret = _object("Secret", "popsync-secrets")["stringData"]
    store = urlsplit(config["store"])
    assert store.scheme == "postgresql"
    assert store.password is None
    env = _env(container)
    ref = env[config["store_password_env"]]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "popsync-secrets"
    assert ref["key"] in secret
    # Bare password_file names resolve against $CREDENTIALS_DIRECTORY: the Secret's mount.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_volume = next(v for v in _pod()["volumes"] if "secret" in v)
    assert secret_volume["secret"]["secretName"] == "popsync-secrets"
    assert env["CREDENTIALS_DIRECTORY"]["value"] == mounts[secret_volume["name"]]
    accounts = config["accounts"]
    assert accounts
    for account in accounts.values():
        assert "/" not in account["password_file"]
        assert account["password_file"] in secret
        assert "password" not in account


def test_configmap_config_is_a_valid_fleet_config() -> None:
    """popsync's own parser accepts the ConfigMap's config: PostgreSQL store, LMTP delivery."""
    from popsync.config import parse_config

    text = _object("ConfigMap", "popsync-config")["data"]["config.toml"]
    config = parse_config(text, "deploy/kubernetes/configmap.yaml")
    assert config.store is not None
    assert config.store.startswith("postgresql://")
    assert config.warnings == ()
    assert config.accounts
    assert {a.deliver for a in config.accounts.values()} == {"lmtp"}


def test_store_url_matches_the_postgres_example() -> None:
    """The config's store names the Service, port, role and database postgres.yaml creates."""
    store = urlsplit(_fleet_config()["store"])
    service = _object("Service", "popsync-postgres")
    assert store.hostname == f"popsync-postgres.{service['metadata']['namespace']}.svc"
    assert store.port == service["spec"]["ports"][0]["port"]
    pod = _object("StatefulSet", "popsync-postgres")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert store.username == env["POSTGRES_USER"]["value"]
    assert store.path.lstrip("/") == env["POSTGRES_DB"]["value"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "db-password"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_every_object_is_in_the_popsync_namespace() -> None:
    """Namespaced objects all say namespace: popsync, which namespace.yaml creates."""
    _object("Namespace", "popsync")
    for path in _manifests():
        for doc in _docs(path):
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "popsync", f"{path.name}: {doc['kind']}"


# --- systemd ---------------------------------------------------------------------------------


def _worker_unit() -> dict[str, list[str]]:
    """Map "Section.Key" to every value it is given in the fleet worker template."""
    result: dict[str, list[str]] = {}
    section = ""
    for raw in (UNIT_DIR / WORKER_UNIT).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        result.setdefault(f"{section}.{key}", []).append(value)
    return result


def _staged_worker(tmp_path: Path) -> Path:
    """The template in tmp_path with ExecStart pointing at a stub, as systemd-analyze needs."""
    stub = tmp_path / "popsync"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    staged = tmp_path / WORKER_UNIT
    staged.write_text((UNIT_DIR / WORKER_UNIT).read_text().replace(BINARY, str(stub)))
    return tmp_path / "popsync-fleet@1.service"


def test_worker_unit_verifies_clean(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing for an instance of the fleet worker template."""
    assert _verify(_staged_worker(tmp_path)) == ""


def test_worker_unit_security_rating(tmp_path: Path) -> None:
    """systemd-analyze security --offline rates the worker's exposure OK or better."""
    tool = _require("systemd-analyze", "apt-get install systemd")
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(_staged_worker(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert "Overall exposure level" in last, result.stdout + result.stderr
    score = float(last.split(":")[1].split()[0])
    assert score <= 2.0, last


def test_worker_unit_hardening_and_database_credential() -> None:
    """Same sandbox as popsync.service; the DB password is a credential read through PGPASSFILE."""
    unit = _worker_unit()
    for key, value in HARDENING.items():
        assert unit.get(f"Service.{key}") == [value], key
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.User"] == ["popsync"]
    assert unit["Service.StateDirectory"] == ["popsync"]
    assert shlex.split(unit["Service.ExecStart"][0]) == [BINARY, "-c", "/etc/popsync/config.toml"]
    (credential,) = unit["Service.LoadCredential"]
    name, _, source = credential.partition(":")
    assert source.startswith("/etc/popsync/credentials/")
    assert unit["Service.Environment"] == [f"PGPASSFILE=%d/{name}"]
    # Maildirs on shared storage are writable and mounted before the worker starts.
    assert unit["Service.ReadWritePaths"] == unit["Unit.RequiresMountsFor"]


def test_worker_unit_keeps_restarting_through_a_database_outage() -> None:
    """A worker started while PostgreSQL is down exits 75 (tests/integration/test_pgstore_once.py
    shows the same exit for --once); systemd must retry it for as long as the outage lasts, but
    not a refused database login (77), a usage error (64) or a bad config (78)."""
    unit = _worker_unit()
    assert unit["Unit.StartLimitIntervalSec"] == ["0"]  # no start limit: never gives up
    assert unit["Service.Restart"] == ["on-failure"]
    prevented = set(unit["Service.RestartPreventExitStatus"][0].split())
    assert prevented == {"64", "77", "78"}
    assert "75" not in prevented
