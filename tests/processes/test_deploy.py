"""The deployment files agree with the product and with each other.

Dockerfile, deploy/compose.yaml, deploy/gateway/routes.yaml and deploy/kubernetes/*.yaml are
checked without a Docker engine or a cluster: every file parses, the route table passes the
gateway's own validator (as the containers will expand it), compose and the manifests wire
the same paths and ports, and every Kubernetes field name is one that exists (an allowlist
per kind, so a typo such as `readinesProbe` fails here instead of being ignored by an old
`kubectl apply`). `docker compose config` runs only where the Compose v2 CLI is installed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final, TypeAlias

import pytest
import yaml

from gateway.config.build import LoadResult, load_text

ROOT: Final = Path(__file__).resolve().parents[2]
DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
DEPLOY: Final = ROOT / "deploy"
COMPOSE: Final = DEPLOY / "compose.yaml"
ROUTES: Final = DEPLOY / "gateway" / "routes.yaml"
KUBE: Final = DEPLOY / "kubernetes"

CONFIG_DIR: Final = "/etc/gateway"  # where every container finds routes.yaml
CONFIG_FILE: Final = f"{CONFIG_DIR}/routes.yaml"
PUBLIC_PORT: Final = 8080
ADMIN_PORT: Final = 9080
INVENTORY_PORT: Final = 8001

Doc: TypeAlias = dict[str, Any]


# --- loading ------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


@cache
def _compose() -> Doc:
    [doc] = _load_all(COMPOSE)
    assert isinstance(doc, dict)
    return doc


@cache
def _kube_docs() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(KUBE.glob("*.yaml")):
        docs.extend(_load_all(path))
    return docs


def _kube(kind: str, name: str) -> Doc:
    found = [d for d in _kube_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} in {KUBE}, found {len(found)}"
    return found[0]


def _kube_kind(kind: str) -> list[Doc]:
    return [d for d in _kube_docs() if d["kind"] == kind]


def _gateway_services() -> dict[str, Doc]:
    """The compose services that run the gateway (the image's default entry point)."""
    services: dict[str, Doc] = _compose()["services"]
    return {
        name: svc
        for name, svc in services.items()
        if "build" in svc and "entrypoint" not in svc  # the image's own `python -m gateway`
    }


def _compose_env(service: Doc) -> dict[str, str]:
    """The environment compose gives a container (entries without a value pass through)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: str(value) for key, value in env.items() if value is not None}


def _kube_env(container: Doc) -> dict[str, str]:
    """A container's environment, with Secret references resolved from the manifests."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
            secret = _kube("Secret", ref["name"])
            values = secret.get("stringData") or {}
            assert ref["key"] in values, f"Secret {ref['name']} has no key {ref['key']!r}"
            env[item["name"]] = str(values[ref["key"]])
    return env


def _validate_routes(text: str, file: str, environ: Mapping[str, str]) -> LoadResult:
    result = load_text(text, file, environ=dict(environ))
    assert result.problems == [], "\n".join(str(p) for p in result.problems)
    assert result.config is not None
    return result


def _seconds(text: str) -> float:
    """A compose duration (`40s`, `1m30s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- every file ---------------------------------------------------------------------------


def test_deploy_directory_has_the_expected_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in _yaml_files()}
    assert {"compose.yaml", "gateway/routes.yaml"} <= names
    assert any(n.startswith("kubernetes/") for n in names)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_deploy_file_parses_as_yaml_mappings(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document is a mapping"


# --- the route table ----------------------------------------------------------------------


def test_routes_file_validates_with_compose_environment() -> None:
    for name, service in _gateway_services().items():
        result = _validate_routes(ROUTES.read_text(), str(ROUTES), _compose_env(service))
        assert result.config is not None
        inventory = result.config.services["inventory"]
        assert [t.url for t in inventory.targets] == [f"http://inventory:{INVENTORY_PORT}"], name


def test_routes_file_validates_with_its_defaults() -> None:
    """No variable set (a plain `docker run` of the image) still gives a working table."""
    result = _validate_routes(ROUTES.read_text(), str(ROUTES), {})
    assert result.config is not None
    assert result.config.listen == ("0.0.0.0", PUBLIC_PORT)
    # Probes and health checks reach the admin listener from outside the process's loopback.
    assert result.config.admin == ("0.0.0.0", ADMIN_PORT)


def test_gateway_check_command_accepts_the_routes_file() -> None:
    [service, *_] = _gateway_services().values()
    env = {**os.environ, **_compose_env(service)}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--check", "--config", str(ROUTES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


# --- the Dockerfile -----------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    pairs = [tuple(line.split(None, 1)) for line in logical]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec (JSON) form: {args}"
    return [str(item) for item in value]


def _last(instruction: str) -> str:
    found = [args for name, args in _instructions() if name == instruction]
    assert found, f"the Dockerfile has no {instruction}"
    return found[-1]


def test_dockerfile_uses_a_slim_python_base() -> None:
    bases = [args for name, args in _instructions() if name == "FROM"]
    assert bases
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?( AS \w+)?", bases[-1], re.IGNORECASE)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = _last("USER").split(":")[0]
    assert user not in {"root", "0", ""}
    # The same numeric user the Kubernetes securityContext asks for.
    for deployment in _kube_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == user


def test_dockerfile_health_check_asks_the_admin_healthz() -> None:
    check = _last("HEALTHCHECK")
    assert "CMD" in check
    assert f"127.0.0.1:{ADMIN_PORT}/healthz" in check


def test_dockerfile_entry_point_is_the_gateway_with_the_mounted_config() -> None:
    entrypoint = _exec_form(_last("ENTRYPOINT"))
    cmd = _exec_form(_last("CMD"))
    command = entrypoint + cmd
    assert command[:3] == ["python", "-m", "gateway"]
    assert command[command.index("--config") + 1] == CONFIG_FILE
    assert command[command.index("--admin") + 1] == f"0.0.0.0:{ADMIN_PORT}"


def test_dockerfile_keeps_the_source_layout_the_programs_need() -> None:
    """Both programs load schemas/ next to their package: an editable install in /app."""
    copied = [args.split()[:-1] for name, args in _instructions() if name == "COPY"]
    sources = {src.rstrip("/") for srcs in copied for src in srcs if not src.startswith("--")}
    assert {"gateway", "inventory", "schemas", "pyproject.toml", "constraints.txt"} <= sources
    runs = " ".join(args for name, args in _instructions() if name == "RUN")
    assert "-e ." in runs
    assert "-c constraints.txt" in runs


def test_dockerignore_lets_in_exactly_what_the_image_copies() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is ignored unless listed"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = [args.split()[:-1] for name, args in _instructions() if name == "COPY"]
    for srcs in copied:
        for src in srcs:
            if not src.startswith("--"):
                assert src.rstrip("/") in allowed, f"COPY {src} is not in .dockerignore's list"
    assert not {".venv", ".git", "var", "tests"} & allowed


# --- compose ------------------------------------------------------------------------------

COMPOSE_TOP_KEYS: Final = {"name", "services", "volumes", "networks", "configs", "secrets"}
COMPOSE_SERVICE_KEYS: Final = {
    "build", "cap_add", "cap_drop", "command", "container_name", "depends_on", "deploy",
    "entrypoint", "env_file", "environment", "expose", "healthcheck", "image", "init",
    "labels", "logging", "networks", "ports", "pull_policy", "read_only", "restart",
    "security_opt", "stop_grace_period", "stop_signal", "tmpfs", "ulimits", "user",
    "volumes", "working_dir",
}  # fmt: skip


def test_compose_names_only_known_keys() -> None:
    doc = _compose()
    unknown = {k for k in doc if k not in COMPOSE_TOP_KEYS and not k.startswith("x-")}
    assert not unknown
    for name, service in doc["services"].items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (
            f"{name}: {set(service) - COMPOSE_SERVICE_KEYS}"
        )


def test_compose_runs_inventory_two_gateway_replicas_and_redis() -> None:
    services: dict[str, Doc] = _compose()["services"]
    assert {"inventory", "redis"} <= set(services)
    assert services["redis"]["image"].startswith("redis:")
    gateways = _gateway_services()
    replicas = sum(svc.get("deploy", {}).get("replicas", 1) for svc in gateways.values())
    assert replicas == 2, f"gateway services: {sorted(gateways)}"


def test_compose_builds_one_image_from_the_repository_dockerfile() -> None:
    services: dict[str, Doc] = _compose()["services"]
    built = {name: svc for name, svc in services.items() if "build" in svc}
    assert set(built) == {"inventory", *_gateway_services()}
    assert len({svc["image"] for svc in built.values()}) == 1
    for svc in built.values():
        assert (COMPOSE.parent / svc["build"]["context"]).resolve() == ROOT
        assert svc["build"].get("dockerfile", "Dockerfile") == DOCKERFILE.name


def test_compose_mounts_the_routes_directory_read_only() -> None:
    """A directory mount: an editor that replaces the file is still seen, so edits reload."""
    for name, service in _gateway_services().items():
        mounts = [m for m in service["volumes"] if isinstance(m, dict)]
        [mount] = [m for m in mounts if m["target"] == CONFIG_DIR]
        assert mount["type"] == "bind", name
        assert mount["read_only"] is True, name
        source = (COMPOSE.parent / mount["source"]).resolve()
        assert source == ROUTES.parent, name
        assert source.is_dir(), name
        command = service["command"]
        assert command[command.index("--config") + 1] == CONFIG_FILE


def _published(service: Doc) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each `[IP:]HOST:CONTAINER` entry."""
    out: list[tuple[str, int, int]] = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), f"use [IP:]HOST:CONTAINER, not {entry!r}"
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((ip, int(parts[-2]), int(parts[-1])))
    return out


def test_compose_publishes_the_admin_port_to_localhost_only() -> None:
    host_ports: list[int] = []
    for name, service in _compose()["services"].items():
        for ip, host_port, container_port in _published(service):
            host_ports.append(host_port)
            if container_port == ADMIN_PORT:
                assert ip == "127.0.0.1", f"{name} publishes its admin port on {ip}"
    assert len(host_ports) == len(set(host_ports)), "two services on one host port"
    for name, service in _gateway_services().items():
        assert PUBLIC_PORT in {c for _, _, c in _published(service)}, name
    assert not _published(_compose()["services"]["inventory"]), "reached through the gateway"
    assert not _published(_compose()["services"]["redis"])


def test_compose_inventory_keeps_its_store_on_a_named_volume() -> None:
    compose = _compose()
    inventory = compose["services"]["inventory"]
    assert inventory["entrypoint"] == ["python", "-m", "inventory"]
    command: list[str] = inventory["command"]
    db = Path(command[command.index("--db") + 1])
    assert command[command.index("--listen") + 1] == f"0.0.0.0:{INVENTORY_PORT}"
    [mount] = inventory["volumes"]
    volume, target = mount.split(":")[:2]
    assert volume in compose["volumes"]
    assert db.parent == Path(target)
    # The image's HEALTHCHECK asks the gateway's admin port; the inventory needs its own.
    assert f"127.0.0.1:{INVENTORY_PORT}/healthz" in " ".join(inventory["healthcheck"]["test"])


def test_compose_stop_grace_outlasts_the_gateway_drain() -> None:
    result = _validate_routes(ROUTES.read_text(), str(ROUTES), {})
    assert result.config is not None
    for name, service in _gateway_services().items():
        grace = _seconds(service["stop_grace_period"])
        assert grace > result.config.shutdown_grace, name


def _docker_compose_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        proc = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed: {exc}"
    if proc.returncode != 0:
        return (
            "`docker compose version` failed: the Compose v2 plugin is not installed "
            "(install docker-compose-plugin to run this check; no engine is needed)"
        )
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    reason = _docker_compose_unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# --- Kubernetes: known field names --------------------------------------------------------

# A spec maps each allowed key to the spec of its value; None means "any value" (free-form
# maps such as labels, or scalars). A list value is checked item by item against the spec.
Spec: TypeAlias = "Mapping[str, Spec | None]"

METADATA: Final[Spec] = {"name": None, "namespace": None, "labels": None, "annotations": None}
SELECTOR: Final[Spec] = {"matchLabels": None, "matchExpressions": None}
EXEC: Final[Spec] = {"command": None}
HTTP_GET: Final[Spec] = {
    "path": None, "port": None, "host": None, "scheme": None, "httpHeaders": None,
}  # fmt: skip
PROBE: Final[Spec] = {
    "httpGet": HTTP_GET, "exec": EXEC, "tcpSocket": {"port": None, "host": None},
    "initialDelaySeconds": None, "periodSeconds": None, "timeoutSeconds": None,
    "successThreshold": None, "failureThreshold": None, "terminationGracePeriodSeconds": None,
}  # fmt: skip
HANDLER: Final[Spec] = {"exec": EXEC, "httpGet": HTTP_GET, "sleep": {"seconds": None}}
KEY_REF: Final[Spec] = {"name": None, "key": None, "optional": None}
CONTAINER: Final[Spec] = {
    "name": None, "image": None, "imagePullPolicy": None, "command": None, "args": None,
    "workingDir": None,
    "ports": {"name": None, "containerPort": None, "protocol": None},
    "env": {
        "name": None, "value": None,
        "valueFrom": {
            "secretKeyRef": KEY_REF, "configMapKeyRef": KEY_REF,
            "fieldRef": {"fieldPath": None, "apiVersion": None},
        },
    },
    "readinessProbe": PROBE, "livenessProbe": PROBE, "startupProbe": PROBE,
    "lifecycle": {"preStop": HANDLER, "postStart": HANDLER},
    "resources": {"requests": None, "limits": None},
    "securityContext": {
        "allowPrivilegeEscalation": None, "readOnlyRootFilesystem": None,
        "runAsNonRoot": None, "runAsUser": None, "runAsGroup": None, "privileged": None,
        "capabilities": {"add": None, "drop": None},
        "seccompProfile": {"type": None, "localhostProfile": None},
    },
    "volumeMounts": {"name": None, "mountPath": None, "readOnly": None, "subPath": None},
}  # fmt: skip
POD_SPEC: Final[Spec] = {
    "containers": CONTAINER, "initContainers": CONTAINER,
    "automountServiceAccountToken": None, "serviceAccountName": None,
    "terminationGracePeriodSeconds": None, "enableServiceLinks": None,
    "nodeSelector": None, "affinity": None, "tolerations": None,
    "topologySpreadConstraints": None, "priorityClassName": None,
    "securityContext": {
        "runAsNonRoot": None, "runAsUser": None, "runAsGroup": None, "fsGroup": None,
        "fsGroupChangePolicy": None, "supplementalGroups": None,
        "seccompProfile": {"type": None, "localhostProfile": None},
    },
    "volumes": {
        "name": None,
        "configMap": {"name": None, "items": None, "defaultMode": None, "optional": None},
        "secret": {"secretName": None, "items": None, "defaultMode": None, "optional": None},
        "emptyDir": {"medium": None, "sizeLimit": None},
        "persistentVolumeClaim": {"claimName": None, "readOnly": None},
    },
}  # fmt: skip
HEADER: Final = {"apiVersion": None, "kind": None, "metadata": METADATA}
KINDS: Final[dict[tuple[str, str], Spec]] = {
    ("apps/v1", "Deployment"): {
        **HEADER,
        "spec": {
            "replicas": None, "revisionHistoryLimit": None, "selector": SELECTOR,
            "minReadySeconds": None, "progressDeadlineSeconds": None,
            "strategy": {"type": None, "rollingUpdate": {"maxUnavailable": None, "maxSurge": None}},
            "template": {"metadata": METADATA, "spec": POD_SPEC},
        },
    },
    ("v1", "Service"): {
        **HEADER,
        "spec": {
            "type": None, "selector": None, "clusterIP": None, "externalTrafficPolicy": None,
            "sessionAffinity": None,
            "ports": {
                "name": None, "port": None, "targetPort": None, "protocol": None,
                "nodePort": None, "appProtocol": None,
            },
        },
    },
    ("v1", "ConfigMap"): {**HEADER, "data": None, "binaryData": None, "immutable": None},
    ("v1", "Secret"): {
        **HEADER, "type": None, "data": None, "stringData": None, "immutable": None,
    },
    ("v1", "PersistentVolumeClaim"): {
        **HEADER,
        "spec": {
            "accessModes": None, "storageClassName": None, "volumeMode": None,
            "resources": {"requests": None, "limits": None},
        },
    },
    ("policy/v1", "PodDisruptionBudget"): {
        **HEADER,
        "spec": {
            "minAvailable": None, "maxUnavailable": None, "selector": SELECTOR,
            "unhealthyPodEvictionPolicy": None,
        },
    },
}  # fmt: skip


def _unknown_keys(value: Any, spec: Spec | None, path: str) -> Iterator[str]:
    """The dotted paths of keys that `spec` does not allow, anywhere under `value`."""
    if spec is None:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _unknown_keys(item, spec, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in spec:
                yield where
            else:
                yield from _unknown_keys(item, spec[key], where)


def _doc_id(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def test_kubernetes_manifests_have_kind_and_name() -> None:
    docs = _kube_docs()
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), _doc_id(doc)
        assert doc["metadata"].get("name"), _doc_id(doc)
    ids = [_doc_id(doc) for doc in docs]
    assert len(ids) == len(set(ids)), "a kind and name used twice"


def test_kubernetes_manifests_name_only_known_fields() -> None:
    for doc in _kube_docs():
        spec = KINDS.get((doc["apiVersion"], doc["kind"]))
        assert spec is not None, f"{_doc_id(doc)}: no allowlist for {doc['apiVersion']} kind"
        unknown = list(_unknown_keys(doc, spec, ""))
        assert not unknown, f"{_doc_id(doc)}: unknown fields {unknown}"


def test_field_allowlist_catches_a_typo() -> None:
    doc = copy.deepcopy(_kube("Deployment", "gateway"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    spec = KINDS[("apps/v1", "Deployment")]
    assert list(_unknown_keys(doc, spec, "")) == ["spec.template.spec.containers[0].readinesProbe"]


# --- Kubernetes: the wiring ---------------------------------------------------------------


def _containers(deployment: Doc) -> list[Doc]:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def _port_number(container: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert isinstance(number, int)
    return number


def test_gateway_deployment_probes_the_admin_listener() -> None:
    deployment = _kube("Deployment", "gateway")
    assert deployment["spec"]["replicas"] == 2
    [container] = _containers(deployment)
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert _port_number(container, readiness["port"]) == ADMIN_PORT
    assert _port_number(container, liveness["port"]) == ADMIN_PORT
    assert container["args"][container["args"].index("--admin") + 1] == f"0.0.0.0:{ADMIN_PORT}"


def test_every_deployment_has_probes_and_a_matching_selector() -> None:
    for deployment in _kube_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), _doc_id(deployment)
        for container in _containers(deployment):
            assert "readinessProbe" in container, _doc_id(deployment)
            assert "livenessProbe" in container, _doc_id(deployment)
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_gateway_deployment_mounts_the_route_table_config_map() -> None:
    deployment = _kube("Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][container["args"].index("--config") + 1] == CONFIG_FILE
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = _kube("ConfigMap", volume["configMap"]["name"])
    assert "routes.yaml" in config_map["data"]


def test_config_map_route_table_validates_and_matches_the_compose_one() -> None:
    [container] = _containers(_kube("Deployment", "gateway"))
    [config_map] = [cm for cm in _kube_kind("ConfigMap") if "routes.yaml" in cm.get("data", {})]
    text: str = config_map["data"]["routes.yaml"]
    _validate_routes(text, "configmap.yaml:routes.yaml", _kube_env(container))
    assert text == ROUTES.read_text(), (
        "the ConfigMap's routes.yaml differs from deploy/gateway/routes.yaml: copy it over"
    )


def test_jwt_key_comes_from_a_secret() -> None:
    [container] = _containers(_kube("Deployment", "gateway"))
    refs = [
        item["valueFrom"]["secretKeyRef"]
        for item in container["env"]
        if item["name"] == "GATEWAY_JWT_SECRET"
    ]
    assert len(refs) == 1, "GATEWAY_JWT_SECRET is read from a Secret"
    secret = _kube("Secret", refs[0]["name"])
    assert refs[0]["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}


def test_termination_grace_outlasts_the_gateway_drain() -> None:
    result = _validate_routes(ROUTES.read_text(), str(ROUTES), {})
    assert result.config is not None
    pod = _kube("Deployment", "gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > result.config.shutdown_grace + 5  # + preStop


def test_services_reach_their_pods_and_keep_admin_internal() -> None:
    deployments = _kube_kind("Deployment")
    for service in _kube_kind("Service"):
        selector = service["spec"]["selector"]
        [deployment] = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        [container] = _containers(deployment)
        for port in service["spec"]["ports"]:
            number = _port_number(container, port["targetPort"])
            is_admin = deployment["metadata"]["name"] == "gateway" and number == ADMIN_PORT
            # Only the admin Service may route to the admin listener, and only in-cluster.
            if is_admin:
                assert service["metadata"]["name"].endswith("-admin"), _doc_id(service)
                assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    public = _kube("Service", "gateway")
    [container] = _containers(_kube("Deployment", "gateway"))
    [port] = public["spec"]["ports"]
    assert port["port"] == 80
    assert _port_number(container, port["targetPort"]) == PUBLIC_PORT


def test_inventory_is_a_single_writer_on_a_persistent_volume() -> None:
    deployment = _kube("Deployment", "inventory")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "inventory"]
    args: list[str] = container["args"]
    db = Path(args[args.index("--db") + 1])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == db.parent]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    _kube("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # The gateway's INVENTORY_URL names the inventory Service.
    service = _kube("Service", "inventory")
    [gateway] = _containers(_kube("Deployment", "gateway"))
    assert _kube_env(gateway)["INVENTORY_URL"] == (
        f"http://inventory:{service['spec']['ports'][0]['port']}"
    )
