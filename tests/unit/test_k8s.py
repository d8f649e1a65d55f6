"""deploy/k8s checked offline: rendered with kustomize, validated against the Kubernetes and KEDA schemas.

No cluster is needed: ``kubectl kustomize`` (client side only; the machine's
kubectl ships kustomize v5) renders the base and the example overlay, every
built-in object is checked by kubernetes-validate at ``K8S_VERSION``, the KEDA
objects by jsonschema against the CRD schemas vendored in deploy/k8s/schemas,
and the rest against what the code expects: settings, ports, queue names.
"""

from __future__ import annotations

import base64
import copy
import functools
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bridges.clients.rabbitmq import RabbitClient
from inferstream.routes import parse_routes
from inferstream.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = ("base", "overlays/example")
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests must apply to
KEDA_SCHEMAS = {
    "ScaledObject": K8S / "schemas" / "keda-v2.20.2-scaledobject.json",
    "TriggerAuthentication": K8S / "schemas" / "keda-v2.20.2-triggerauthentication.json",
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
SHUTDOWN_MARGIN_S = 15  # results' confirms and the stop itself, after the ML grace
POD_IP = "192.0.2.10"  # stands in for status.podIP (TEST-NET-1: never contacted)

Doc = dict[str, Any]


@functools.cache
def rendered(variant: str) -> tuple[Doc, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize v5) is needed to render deploy/k8s")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kustomize failed on {variant}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...], kind: str, name: str) -> Doc | None:
    return next((d for d in of_kind(docs, kind) if d["metadata"]["name"] == name), None)


def workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def data_of(docs: tuple[Doc, ...], kind: str, name: str) -> dict[str, str]:
    obj = named(docs, kind, name)
    assert obj is not None, f"{kind} {name} is referenced but not in the rendered output"
    if kind == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def container_env(docs: tuple[Doc, ...], workload: Doc, container: Doc) -> dict[str, str]:
    """The environment the container starts with: envFrom, then env with $(VAR) expanded."""
    meta = workload["metadata"]
    pod_name = f"{meta['name']}-0"
    fields = {
        "metadata.name": pod_name,
        "metadata.namespace": meta.get("namespace", "default"),
        "status.podIP": POD_IP,
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key in source:
                env.update(data_of(docs, kind, source[key]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), var["value"]
            )
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if key in ref:
                env[var["name"]] = data_of(docs, kind, ref[key]["name"])[ref[key]["key"]]
    return env


def faust_containers(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc, dict[str, str]]]:
    """(workload, container, environment) of every container that runs ``faust -A streams``."""
    for w in workloads(docs):
        for c in all_containers(w):
            if c.get("command", [])[:3] == ["faust", "-A", "streams"]:
                yield w, c, container_env(docs, w, c)


def workers(docs: tuple[Doc, ...], role: str) -> list[tuple[Doc, Doc, dict[str, str]]]:
    return [
        (w, c, env)
        for w, c, env in faust_containers(docs)
        if c["command"][3:4] == ["worker"] and Settings.from_env(env).role_set == {role}
    ]


def port_of(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    return int(numbers[0])


def work_queues(docs: tuple[Doc, ...]) -> set[str]:
    """The queues the ML workers consume: RabbitClient's names for the routes they load."""
    ((_, _, env),) = workers(docs, "ml")
    settings = Settings.from_env(env)
    text = routes_configmap(docs)
    table = parse_routes(
        text, source="routes ConfigMap", fmt="yaml", settings=settings, environ=env
    )
    client = RabbitClient(settings)
    return {client.work_queue_name(task, model) for task, model in (route.key for route in table)}


def routes_configmap(docs: tuple[Doc, ...]) -> str:
    ((_, _, env),) = workers(docs, "ml")
    path = Path(env[f"{PREFIX}ROUTES_FILE"])
    return data_of(docs, "ConfigMap", "inferstream-routes")[path.name]


def scaler_problems(docs: tuple[Doc, ...]) -> list[str]:
    """Where the ScaledObject disagrees with the ML workers it scales (empty: nowhere)."""
    (so,) = of_kind(docs, "ScaledObject")
    problems: list[str] = []
    target = so["spec"]["scaleTargetRef"]
    ml = {w["metadata"]["name"] for w, _, _ in workers(docs, "ml") if w["kind"] == "Deployment"}
    if target.get("kind") != "Deployment" or target["name"] not in ml:
        problems.append(f"scales {target}, not the ML worker Deployment {sorted(ml)}")
    triggers = so["spec"]["triggers"]
    queues = {t["metadata"].get("queueName") for t in triggers if t["type"] == "rabbitmq"}
    if queues != work_queues(docs):
        problems.append(
            f"trigger queues {sorted(map(str, queues))} != work queues {sorted(work_queues(docs))}"
        )
    return problems


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(variant: str) -> tuple[Doc, ...]:
    return rendered(variant)


def test_every_builtin_object_validates_against_kubernetes(docs: tuple[Doc, ...]) -> None:
    builtin = [d for d in docs if d["kind"] not in KEDA_SCHEMAS]
    assert {
        "StatefulSet",
        "Deployment",
        "Job",
        "ConfigMap",
        "Secret",
        "Service",
        "PodDisruptionBudget",
    } <= {d["kind"] for d in builtin}
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )


def closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def test_keda_objects_validate_against_the_crd_schemas(docs: tuple[Doc, ...]) -> None:
    for kind, path in KEDA_SCHEMAS.items():
        objs = of_kind(docs, kind)
        assert len(objs) == 1, f"expected one {kind}, found {len(objs)}"
        schema = closed(json.loads(path.read_text()))
        for obj in objs:
            assert obj["apiVersion"] == "keda.sh/v1alpha1"
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
            assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_scaledobject_follows_kedas_own_rules(docs: tuple[Doc, ...]) -> None:
    (so,) = of_kind(docs, "ScaledObject")
    spec = so["spec"]
    assert spec["minReplicaCount"] == 0, "scale to zero"
    assert spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)
    # KEDA's webhook: the HPA's name is a label value.
    assert len(f"keda-hpa-{so['metadata']['name']}") <= 63
    names = [t["name"] for t in spec["triggers"]]
    assert len(names) == len(set(names)), f"trigger names repeat: {names}"
    auth = {a["metadata"]["name"]: a for a in of_kind(docs, "TriggerAuthentication")}
    ((_, _, env),) = workers(docs, "ml")
    amqp = urlsplit(env[f"{PREFIX}RABBITMQ_URL"])
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "rabbitmq" and meta["protocol"] in ("amqp", "http")
        assert (
            meta["mode"] == "QueueLength"
            and float(meta["value"]) > 0
            and float(meta["activationValue"]) >= 0
        )
        ref = auth[trigger["authenticationRef"]["name"]]
        (host_ref,) = [r for r in ref["spec"]["secretTargetRef"] if r["parameter"] == "host"]
        host = urlsplit(data_of(docs, "Secret", host_ref["name"])[host_ref["key"]])
        assert (
            host.scheme == ("http" if meta["protocol"] == "http" else "amqp")
            or host.scheme == meta["protocol"] + "s"
        )
        # The scaler must read the vhost and user the workers use.
        assert (host.username, host.path.strip("/") or "/") == (
            amqp.username,
            amqp.path.strip("/") or "/",
        )


def test_scaledobject_queues_are_the_ml_workers_queues(docs: tuple[Doc, ...]) -> None:
    assert work_queues(docs) == {
        "inferstream.work.embed.all-MiniLM-L6-v2",
        "inferstream.work.generate.sim-gpt",
        "inferstream.work.generate.sim-gpt-large",
    }
    assert scaler_problems(docs) == []


def test_the_queue_check_notices_a_namespace_change() -> None:
    docs = copy.deepcopy(rendered("base"))
    (settings,) = [
        d for d in of_kind(docs, "ConfigMap") if f"{PREFIX}NAMESPACE" in d.get("data", {})
    ]
    settings["data"][f"{PREFIX}NAMESPACE"] = "inferstream-staging"
    (problem,) = scaler_problems(docs)
    assert "inferstream-staging.work.generate.sim-gpt" in problem


def test_routes_configmap_is_deploy_routes_yaml() -> None:
    routes = (ROOT / "deploy" / "routes.yaml").read_text()
    assert (K8S / "base" / "routes.yaml").read_text() == routes, (
        "copy deploy/routes.yaml to deploy/k8s/base/"
    )
    for variant in VARIANTS:
        assert routes_configmap(rendered(variant)) == routes


def test_every_inferstream_variable_is_a_known_setting(docs: tuple[Doc, ...]) -> None:
    names = {
        k for d in of_kind(docs, "ConfigMap") + of_kind(docs, "Secret") for k in d.get("data", {})
    }
    names |= {
        v["name"] for w in workloads(docs) for c in all_containers(w) for v in c.get("env", [])
    }
    ours = {n for n in names if n.startswith(PREFIX)}
    assert ours and ours <= Settings.env_names(), (
        f"unknown settings: {sorted(ours - Settings.env_names())}"
    )


def test_secret_settings_come_from_secrets(docs: tuple[Doc, ...]) -> None:
    secret = {
        PREFIX + n.upper()
        for n, v in Settings.__dataclass_fields__.items()
        if v.metadata.get("secret")
    }
    for cm in of_kind(docs, "ConfigMap"):
        assert not secret & set(cm.get("data", {})), (
            f"ConfigMap {cm['metadata']['name']} holds a secret setting"
        )
    for _, c, _ in faust_containers(docs):
        for var in c.get("env", []):
            assert var["name"] not in secret or "secretKeyRef" in var.get("valueFrom", {}), var


def test_worker_settings_build_and_only_the_overlay_may_serve(
    variant: str, docs: tuple[Doc, ...]
) -> None:
    overlay = variant != "base"
    for w, _, env in faust_containers(docs):
        settings = Settings.from_env(env)  # raises on a value of the wrong type
        insecure = settings.insecure_defaults(bind="0.0.0.0")
        # The base keeps the published secrets on purpose: alone, it refuses to serve.
        assert (insecure == []) is overlay, f"{w['metadata']['name']}: {insecure}"


def test_every_container_has_probes_and_resources(docs: tuple[Doc, ...]) -> None:
    for w in workloads(docs):
        for c in all_containers(w):
            where = f"{w['kind']} {w['metadata']['name']}/{c['name']}"
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}: requests {requests}"
            assert "memory" in c["resources"].get("limits", {}), f"{where}: no memory limit"
            if w["kind"] == "Job" or c in pod_spec(w).get("initContainers", []):
                continue  # runs to completion: nothing to probe
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert "httpGet" in c.get(probe, {}), f"{where}: no HTTP {probe}"


def test_worker_probes_ports_and_bind_follow_the_web_port_conventions(
    docs: tuple[Doc, ...],
) -> None:
    pipeline, ml = workers(docs, "pipeline"), workers(docs, "ml")
    assert len(pipeline) == 1 and len(ml) == 1
    web_port = Settings().web_port
    # scripts/up: the ML worker's port is the pipeline's + 1 (INFERSTREAM_ML_WEB_PORT); compose agrees.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert [
        int(compose[name]["environment"][f"{PREFIX}WEB_PORT"])
        for name in ("pipeline-worker", "ml-worker")
    ] == [web_port, web_port + 1]
    for (w, c, env), expected in ((pipeline[0], web_port), (ml[0], web_port + 1)):
        settings = Settings.from_env(env)
        assert settings.web_port == expected == port_of(c, "http")
        assert (
            c["livenessProbe"]["httpGet"]["path"]
            == c["startupProbe"]["httpGet"]["path"]
            == "/healthz"
        )
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert port_of(c, c[probe]["httpGet"]["port"]) == settings.web_port
        annotations = w["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(settings.web_port)
        # The kubelet probes the pod IP: the worker must not bind loopback only.
        args = c["command"]
        bind = args[args.index("--web-bind") + 1] if "--web-bind" in args else settings.web_host
        assert not ipaddress.ip_address(bind).is_loopback


def test_pipeline_workers_advertise_their_own_stable_name(docs: tuple[Doc, ...]) -> None:
    ((sts, _, env),) = workers(docs, "pipeline")
    assert sts["kind"] == "StatefulSet"
    svc = named(docs, "Service", sts["spec"]["serviceName"])
    assert (
        svc is not None
        and svc["spec"]["clusterIP"] == "None"
        and svc["spec"]["publishNotReadyAddresses"]
    )
    namespace = sts["metadata"].get("namespace", "default")
    expected = f"{sts['metadata']['name']}-0.{svc['metadata']['name']}.{namespace}.svc"
    assert env[f"{PREFIX}WEB_HOST"] == expected
    assert (
        Settings.from_env(env).canonical_url
        == f"http://{expected}:{Settings.from_env(env).web_port}"
    )


def test_termination_grace_outlasts_the_ml_shutdown_grace(docs: tuple[Doc, ...]) -> None:
    for w, c, env in faust_containers(docs):
        if c["command"][3:4] != ["worker"]:
            continue  # the migrations: a Job, or an init container before the worker
        settings = Settings.from_env(env)
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        paused = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
        grace = pod_spec(w)["terminationGracePeriodSeconds"] - paused
        assert grace >= settings.ml_shutdown_grace_s + SHUTDOWN_MARGIN_S, (
            f"{w['metadata']['name']}: {grace} s"
        )


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_services_and_disruption_budgets_find_their_pods(docs: tuple[Doc, ...]) -> None:
    pods = [
        (w, w["spec"]["template"]["metadata"]["labels"])
        for w in workloads(docs)
        if w["kind"] != "Job"
    ]
    for svc in of_kind(docs, "Service"):
        matched = [
            (w, c)
            for w, labels in pods
            if selects(svc["spec"]["selector"], labels)
            for c in pod_spec(w)["containers"]
        ]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            assert all(port_of(c, port["targetPort"]) for _, c in matched)
    for w, labels in pods:
        budgets = [
            p
            for p in of_kind(docs, "PodDisruptionBudget")
            if selects(p["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(budgets) == 1, f"{w['metadata']['name']}: {len(budgets)} PodDisruptionBudgets"


def test_routes_are_mounted_where_the_setting_points(docs: tuple[Doc, ...]) -> None:
    for w, c, env in faust_containers(docs):
        if c["command"][3:4] != ["worker"]:
            continue  # the migrations read no routes
        path = Path(env[f"{PREFIX}ROUTES_FILE"])
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
        # A subPath mount would never see an edit of the ConfigMap (no reload).
        assert (
            "subPath" not in mount
            and volumes[mount["name"]]["configMap"]["name"] == "inferstream-routes"
        )


def test_every_container_runs_the_one_image_as_its_user(docs: tuple[Doc, ...]) -> None:
    uid = re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    images = {c["image"] for w in workloads(docs) for c in all_containers(w)}
    assert len(images) == 1, images
    for w in workloads(docs):
        assert pod_spec(w)["securityContext"]["runAsUser"] == int(uid[1])


def test_every_pod_meets_the_restricted_pod_security_standard(docs: tuple[Doc, ...]) -> None:
    for w in workloads(docs):
        pod = pod_spec(w)["securityContext"]
        assert pod["runAsNonRoot"] and pod["seccompProfile"]["type"] == "RuntimeDefault"
        for c in all_containers(w):
            sc = c.get("securityContext", {})
            where = f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("privileged") and "runAsUser" not in sc, where
        kinds = {k for v in pod_spec(w).get("volumes", []) for k in v if k != "name"}
        assert kinds <= {"configMap", "emptyDir", "secret", "persistentVolumeClaim", "projected"}
