"""ops/k8s/ checked the way a cluster would check it, and against what agentos really does.

No cluster runs here, so two kinds of mistakes would only show on someone's cluster:
objects the API server refuses (every object is validated against the Kubernetes
OpenAPI schemas of a pinned version by ``kubernetes-validate``, in strict mode, where
an unknown field such as ``replicas`` inside a container fails instead of being
dropped), and objects the API server accepts that do not fit the daemon (a probe on
another port, a grace period the kubelet cuts short, a token as a literal, a Job that
applies a file the ConfigMap does not hold). The daemon's and the Job's arguments are
parsed by the real CLI, the specs loaded by agentos's own loader from a directory laid
out like a ConfigMap volume.
"""

from __future__ import annotations

import copy
import inspect
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import typer
import yaml

from agentos.cli import app
from agentos.client import Client
from agentos.core.durations import parse_duration
from agentos.core.models import model_issues
from agentos.core.modelspec import ModelResource
from agentos.core.spec import canonical, load_paths
from agentos.ingress import build_app, is_loopback
from agentos.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "ops" / "k8s"
# The oldest version the manifests support (policy/v1 PDBs, Job TTLs and everything else
# used are older), and the newest the validator knows.
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())
NAMESPACE = "agentos"
# Files in ops/k8s that are not kustomize inputs, and why.
NOT_APPLIED = {
    "README.md",
    "Dockerfile",
    "Dockerfile.dockerignore",
    "kustomization.yaml",
    "secret.example.yaml",  # applying placeholders would overwrite the real Secret
}
SECRET_LOOKING = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|REDIS_URL", re.I)
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "labels",
}

Obj = dict[str, Any]


def _docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization() -> Obj:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _generated(kust: Obj) -> list[Obj]:
    """The ConfigMaps kustomize's configMapGenerator makes (names without a hash suffix)."""
    options = kust.get("generatorOptions", {})
    maps = []
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (K8S / f).read_text() for f in gen["files"]}
        meta = {"name": gen["name"], "namespace": kust["namespace"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return maps


def _objects() -> list[Obj]:
    """What `kubectl apply -k ops/k8s` creates, read from the files themselves."""
    kust = _kustomization()
    found = [d for f in kust["resources"] for d in _docs(K8S / f)]
    return found + _generated(kust)


def _one(kind: str, name: str) -> Obj:
    matches = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _pod(workload: Obj) -> Obj:
    return cast(Obj, workload["spec"]["template"]["spec"])


def _container(workload: Obj, name: str) -> Obj:
    (found,) = [c for c in _pod(workload)["containers"] if c["name"] == name]
    return cast(Obj, found)


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def _parse(command: str, args: list[str]) -> dict[str, Any]:
    """The options ``agentos COMMAND args`` would run with, parsed by the real CLI."""
    root = typer.main.get_command(app)
    sub = root.commands[command]  # type: ignore[attr-defined]
    return cast(dict[str, Any], sub.make_context(command, list(args)).params)


def _daemon() -> tuple[Obj, Obj, dict[str, Any]]:
    deployment = _one("Deployment", "agentos")
    container = _container(deployment, "daemon")
    args = container["args"]
    assert args[0] == "daemon"
    return deployment, container, _parse("daemon", args[1:])


def _all_containers() -> Iterator[tuple[str, Obj]]:
    for obj in _objects():
        if obj["kind"] in ("Deployment", "Job"):
            for c in _pod(obj)["containers"]:
                yield f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c


# ---------------------------------------------------------------- the schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_the_kubernetes_schemas_in_strict_mode(version: str) -> None:
    objects = [*_objects(), *_docs(K8S / "secret.example.yaml")]
    assert {o["kind"] for o in objects} >= {
        "Namespace",
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Job",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize(
    ("where", "field"),
    [
        (("spec", "template", "spec", "containers", 0), {"replicas": 3}),  # wrong level
        (("spec", "template", "spec"), {"terminationGracePeriod": 30}),  # misspelt
        (("spec",), {"replicas": "three"}),  # wrong type
    ],
)
def test_the_schema_check_catches_a_bad_field(where: tuple[str | int, ...], field: Obj) -> None:
    bad = copy.deepcopy(_one("Deployment", "agentos"))
    node: Any = bad
    for step in where:
        node = node[step]
    node.update(field)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_and_config_file() -> None:
    kust = _kustomization()
    assert set(kust) <= KUSTOMIZATION_FIELDS, "a misspelt kustomization field is ignored"
    listed = set(kust["resources"]) | {
        f for gen in kust.get("configMapGenerator", []) for f in gen["files"]
    }
    on_disk = {str(p.relative_to(K8S)) for p in K8S.rglob("*") if p.is_file()} - NOT_APPLIED
    assert listed == on_disk
    assert kust["namespace"] == NAMESPACE
    # Stable ConfigMap names: the Job and the collector refer to them by name.
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True
    images = {i["name"] for i in kust["images"]}
    used = {c["image"].split(":")[0] for _, c in _all_containers()}
    assert "agentos" in images & used


def test_every_object_lives_in_the_agentos_namespace() -> None:
    for obj in _objects():
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_same_objects() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    objects = [d for d in yaml.safe_load_all(rendered) if d is not None]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert names == sorted((o["kind"], o["metadata"]["name"]) for o in _objects())
    (specs,) = [o for o in objects if o["metadata"]["name"] == "agentos-specs"]
    assert specs["data"] == _one("ConfigMap", "agentos-specs")["data"]


# ---------------------------------------------------------------- the daemon


def test_the_grace_period_outlasts_the_daemons_graceful_stop() -> None:
    deployment, _, params = _daemon()
    grace_s = parse_duration(params["grace"])
    assert grace_s < parse_duration(params["lease_ttl"])  # or the CLI refuses to start
    flush_s = inspect.signature(Telemetry.shutdown).parameters["timeout_s"].default
    # Agents stop within grace_s, then leases, heartbeat and the telemetry flush; SIGKILL
    # before that loses the agents' saves. 5 s for Redis round trips and the engine.
    assert _pod(deployment)["terminationGracePeriodSeconds"] >= grace_s + flush_s + 5


def test_the_grace_default_is_what_the_manifest_assumes() -> None:
    """Leaving --grace out of the manifest would mean the CLI's default."""
    _, _, params = _daemon()
    default = _parse("daemon", [])["grace"]
    assert parse_duration(default) <= parse_duration(params["grace"])


def test_probes_hit_the_endpoints_on_the_port_the_daemon_listens_on() -> None:
    _, container, params = _daemon()
    host, _, port = params["http"].rpartition(":")
    assert not is_loopback(host), "the kubelet probes the pod's IP, not its loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        number = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], number

    assert target("readinessProbe") == ("/readyz", int(port))
    assert target("livenessProbe") == ("/healthz", int(port))
    assert target("startupProbe") == ("/healthz", int(port))
    service = _one("Service", "agentos")
    (svc_port,) = service["spec"]["ports"]
    assert ports[svc_port["targetPort"]] == int(port)


@pytest.mark.anyio
async def test_the_probed_paths_exist_and_need_no_token() -> None:
    """The kubelet sends no bearer token: /healthz and /readyz must not ask for one."""
    app_ = build_app(cast(Client, None), token="secret", ready=lambda: False)
    routes = {getattr(r, "path", None) for r in app_.routes}
    assert {"/healthz", "/readyz"} <= routes
    transport = httpx.ASGITransport(app=app_)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod") as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/v1/agents")).status_code == 401


def test_off_loopback_http_has_its_token_from_the_secret() -> None:
    _, container, params = _daemon()
    assert params["http_token_file"] is None
    ref = _env(container)["AGENTOS_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "agentos"
    assert not ref.get("optional", False)


def test_secret_looking_variables_come_from_secret_refs() -> None:
    seen = set()
    for where, container in _all_containers():
        for name, entry in _env(container).items():
            if SECRET_LOOKING.search(name):
                seen.add(name)
                assert "value" not in entry, f"{where}: {name} is a literal"
                assert "secretKeyRef" in entry["valueFrom"], f"{where}: {name}"
            value = str(entry.get("value", ""))
            assert urlsplit(value).password is None, f"{where}: {name} carries a password"
    assert {"AGENTOS_REDIS_URL", "AGENTOS_HTTP_TOKEN", "OPENAI_API_KEY"} <= seen


def test_every_secret_ref_names_a_key_of_the_documented_secret() -> None:
    (template,) = _docs(K8S / "secret.example.yaml")
    keys = set(template["stringData"])
    assert all("REPLACE_ME" in v for v in template["stringData"].values())
    for where, container in _all_containers():
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == template["metadata"]["name"], where
                assert ref["key"] in keys, f"{where}: {ref['key']}"


def test_model_credentials_reach_the_daemon_from_the_secret() -> None:
    _, container, _ = _daemon()
    env = _env(container)
    docs = load_paths([K8S / "specs"])
    wanted = [
        d.resource.spec.credentials.api_key.env
        for d in docs
        if isinstance(d.resource, ModelResource)
        and d.resource.spec.credentials is not None
        and d.resource.spec.credentials.api_key is not None
    ]
    assert wanted
    for name in wanted:
        assert name is not None
        assert "secretKeyRef" in env[name]["valueFrom"]


def test_the_daemon_exports_to_the_collector_service() -> None:
    _, container, params = _daemon()
    assert params["otel"].value == "auto"  # OTLP because the endpoint is set
    endpoint = urlsplit(_env(container)["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"])
    protocol = _env(container).get("OTEL_EXPORTER_OTLP_PROTOCOL", {}).get("value", "http")
    service = _one("Service", "otel-collector")
    assert endpoint.hostname == service["metadata"]["name"]
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == endpoint.port]
    collector = _container(_one("Deployment", "otel-collector"), "otel-collector")
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    config = yaml.safe_load(_one("ConfigMap", "otel-collector")["data"]["config.yaml"])
    receiver = config["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
    assert int(receiver.rpartition(":")[2]) == ports[svc_port["targetPort"]]
    for pipeline in config["service"]["pipelines"].values():
        assert "otlp" in pipeline["receivers"]
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"{kind} {name} is used but not defined"
    (arg,) = collector["args"]
    mount = {m["name"]: m["mountPath"] for m in collector["volumeMounts"]}["config"]
    assert arg == f"--config={mount}/config.yaml"


def test_the_disruption_budget_and_service_select_the_daemon_pods() -> None:
    deployment, _, _ = _daemon()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] == 3
    pdb = _one("PodDisruptionBudget", "agentos")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert _one("Service", "agentos")["spec"]["selector"].items() <= labels.items()


def test_pods_run_unprivileged_and_write_only_to_their_volumes() -> None:
    for where, container in _all_containers():
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
    for obj in _objects():
        if obj["kind"] in ("Deployment", "Job"):
            assert _pod(obj)["securityContext"]["runAsNonRoot"] is True
            assert _pod(obj)["automountServiceAccountToken"] is False
    _, container, _ = _daemon()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    home = _env(container)["AGENTOS_HOME"]["value"]
    # The model and slot files, the example agents' ./var outboxes, temporary files.
    assert {home, f"{container['workingDir']}/var", "/tmp"} <= mounts


def test_the_image_matches_the_pods() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    _, container, _ = _daemon()
    assert f"WORKDIR {container['workingDir']}" in dockerfile
    uid = _pod(_one("Deployment", "agentos"))["securityContext"]["runAsUser"]
    assert f"USER {uid}:" in dockerfile  # numeric, so runAsNonRoot can check it
    assert 'ENTRYPOINT ["agentos"]' in dockerfile
    assert "COPY examples" in dockerfile  # the specs' entrypoints import from there


# ---------------------------------------------------------------- specs and the apply Job


def _mount_like_kubelet(configmap: Obj, target: Path) -> Path:
    """Lay out ``configmap`` as a ConfigMap volume: data in a hidden timestamped folder,
    ``..data`` linking to it, and one link per key."""
    stamp = target / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, text in configmap["data"].items():
        (stamp / key).write_text(text)
    (target / "..data").symlink_to(stamp.name)
    for key in configmap["data"]:
        (target / key).symlink_to(f"..data/{key}")
    return target


def test_the_apply_job_applies_what_the_configmap_holds(tmp_path: Path) -> None:
    job = _one("Job", "agentos-apply")
    container = _container(job, "apply")
    command = container["command"]
    assert command[:2] == ["agentos", "apply"]
    files = _parse("apply", command[2:])["files"]
    volumes = {v["name"]: v for v in _pod(job)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for file in files:
        path = Path(file)
        mount = path if str(path) in mounts else path.parent
        name = mounts[str(mount)]["configMap"]["name"]
        configmap = _one("ConfigMap", name)
        if path != mount:
            assert path.name in configmap["data"]
        local = _mount_like_kubelet(configmap, tmp_path / name)
        docs = load_paths([local if path == mount else local / path.name])
        # Every file once: the ..data copies are hidden from the loader.
        assert len(docs) == sum(len(_docs(local / key)) for key in configmap["data"])
        assert model_issues(docs, stored=()) == []
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_the_job_and_the_daemons_share_one_fleet() -> None:
    _, daemon, _ = _daemon()
    apply = _container(_one("Job", "agentos-apply"), "apply")
    for name in ("AGENTOS_REDIS_URL", "AGENTOS_NAMESPACE"):
        assert _env(apply)[name] == _env(daemon)[name]
    assert _container(_one("Job", "agentos-apply"), "apply")["image"] == daemon["image"]


def test_the_specs_are_the_repository_examples() -> None:
    """Agents and policies in the ConfigMap are the examples'; only the Model differs."""
    ours = load_paths([K8S / "specs"])
    theirs = {(d.kind, d.name): d for d in load_paths([ROOT / "examples", ROOT / "policies"])}
    kinds = set()
    for doc in ours:
        kinds.add(doc.kind)
        if doc.kind != "Model":
            assert canonical(doc.resource) == canonical(theirs[doc.kind, doc.name].resource)
    assert kinds == {"Agent", "Model", "QuotaPolicy"}
