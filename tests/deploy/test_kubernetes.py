"""deploy/kubernetes: schema validation (kubernetes-validate, offline) and cross-checks with real values.

The core manifests (everything kustomization.yaml lists, and the core-API objects of the InferencePool example)
are validated strictly against the Kubernetes OpenAPI schemas that kubernetes-validate bundles. The rest checks
what a schema cannot: probes, the shutdown budget against the drain timeout, the security context, Secret and
ConfigMap references, label selectors across Deployment, Service, PDB, HPA and InferencePool, and that the metric
names the HPA and the endpoint picker read are ones the server exports.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
# oldest and newest Kubernetes minor versions the manifests are checked against (kubernetes-validate ships both)
K8S_VERSIONS = ("1.33.0", "1.37.0")
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2", "rbac.authorization.k8s.io/v1"}
# the model-server protocol gauges the endpoint picker reads (issue 11 part 5)
EPP_METRICS = {
    "queuedRequestsSpec": "softprompt_waiting_requests",
    "runningRequestsSpec": "softprompt_running_requests",
    "kvUsageSpec": "softprompt_kv_cache_usage_perc",
    "loraSpec": "softprompt_task_requests_info",
}
LORA_INFO_LABELS = {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}


def _docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _kustomization() -> dict:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text())


def _core_objects() -> list[dict]:
    return [d for res in _kustomization()["resources"] for d in _docs(KUBE / res)]


def _pool_objects() -> list[dict]:
    return _docs(KUBE / "inference-pool.yaml")


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return obj


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def core() -> list[dict]:
    """Every object kustomization.yaml applies."""
    return _core_objects()


@pytest.fixture(scope="module")
def deployment(core) -> dict:
    """The server Deployment."""
    return _one(core, "Deployment", "softprompt-server")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    """The server container."""
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def pool_objects() -> list[dict]:
    """The objects of the InferencePool example."""
    return _pool_objects()


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in container["ports"]}, port
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


# --- schema validation --------------------------------------------------------------------------------------


def _validation_cases() -> list:
    objs = [("kustomization", o) for o in _core_objects()]
    objs += [("inference-pool.yaml", o) for o in _pool_objects() if o["apiVersion"] in CORE_API_VERSIONS]
    return [
        pytest.param(obj, version, id=f"{where}-{obj['kind']}-{obj['metadata']['name']}-{version}")
        for where, obj in objs for version in K8S_VERSIONS
    ]


@pytest.mark.parametrize(("obj", "version"), _validation_cases())
def test_manifest_validates_against_the_kubernetes_schema(obj, version):
    # returns the major.minor of the schema it validated against
    assert kubernetes_validate.validate(obj, version, strict=True) == version.rsplit(".", 1)[0]


def test_the_validator_rejects_broken_manifests(deployment):
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # unknown field: only strict mode sees it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_the_core_files_and_keeps_the_crd_example_out(core):
    resources = _kustomization()["resources"]
    assert all((KUBE / r).is_file() for r in resources)
    assert "inference-pool.yaml" not in resources
    not_applied = {"kustomization.yaml", "inference-pool.yaml", "prometheus-adapter-values.yaml"}
    assert {p.name for p in KUBE.glob("*.yaml")} - not_applied == set(resources)
    assert sorted(o["kind"] for o in core) == sorted(
        ["ConfigMap", "Secret", "Secret", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    )
    assert {o["apiVersion"] for o in core} <= CORE_API_VERSIONS
    [image] = _kustomization()["images"]
    assert image["name"] + ":" + image["newTag"] == "softprompt-server:cpu"


# --- the server Deployment ----------------------------------------------------------------------------------


def test_probes(container):
    port = _env(container)["SOFTPROMPT_PORT"]["value"]
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert {kind: p["path"] for kind, p in probes.items()} == {
        "readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health",
    }
    for p in probes.values():
        assert _container_port(container, p["port"]) == int(port) == 8000
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the first start converts the model


def test_termination_grace_outlasts_the_drain(deployment, container):
    spec = deployment["spec"]["template"]["spec"]
    env = _env(container)
    drain = float(env["SOFTPROMPT_DRAIN_TIMEOUT"]["value"]) if "SOFTPROMPT_DRAIN_TIMEOUT" in env else (
        Settings.model_fields["drain_timeout"].default
    )
    assert drain == 30
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    from server.cli import SHUTDOWN_SLACK_SECONDS

    assert spec["terminationGracePeriodSeconds"] == 65
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + SHUTDOWN_SLACK_SECONDS


def test_security_context(deployment, container):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0 and pod["securityContext"]["runAsGroup"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # the read-only root leaves writable only the mounted volumes: the cache and temp dirs must be under them
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = _env(container)
    for var in ("XDG_CACHE_HOME", "TMPDIR", "HOME"):
        path = env[var]["value"]
        [mount] = [m for m in mounts if path == m or path.startswith(m + "/")]
        assert "emptyDir" in volumes[mounts[mount]], var


def test_resources_are_bounded(container):
    res = container["resources"]
    for key in ("cpu", "memory"):
        assert res["requests"][key] == res["limits"][key]  # Guaranteed QoS: no CPU throttling surprises
    assert _env(container)["SOFTPROMPT_TORCH_THREADS"]["value"] == res["requests"]["cpu"]
    # the server's resident memory with the default model and KV pool: 4,459 MiB under load (README "Reliability")
    assert res["limits"]["memory"] == "6Gi" and 6 * 1024 > 4459 * 1.2


def test_settings_and_references_exist(core, container):
    fields = set(Settings.model_fields)
    configmaps = {o["metadata"]["name"]: o["data"] for o in core if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o.get("stringData", o.get("data", {})) for o in core if o["kind"] == "Secret"}
    env_names = set(_env(container))
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]], ref
    for src in container["envFrom"]:
        if "configMapRef" in src:
            env_names |= set(configmaps[src["configMapRef"]["name"]])
        else:
            env_names |= set(secrets[src["secretRef"]["name"]])
    for name in env_names:
        if name.startswith("SOFTPROMPT_"):
            assert name.removeprefix("SOFTPROMPT_").lower() in fields, name
    assert _env(container)["SOFTPROMPT_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "softprompt-admin", "key": "admin-token",
    }
    assert secrets["softprompt-admin"]["admin-token"] == ""  # the placeholder never enables a known token
    store = configmaps["softprompt-prompt-store"]
    assert store["SOFTPROMPT_PROMPTS"] == "s3://softprompt-prompts/prod"
    assert {"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"} <= set(store)
    assert set(secrets["softprompt-s3-credentials"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SOFTPROMPT_ADMIN_TOKEN"} & set(store)
    assert "--prompts" not in container["args"]  # a flag would win over SOFTPROMPT_PROMPTS


def test_prometheus_annotations(deployment, container):
    ann = deployment["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert _container_port(container, int(ann["prometheus.io/port"])) == 8000


# --- labels and selectors -----------------------------------------------------------------------------------


def test_selectors_match_the_server_pods(core, deployment, container):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = _one(core, "Service")
    assert _selects(service["spec"]["selector"], pod_labels)
    [port] = service["spec"]["ports"]
    assert _container_port(container, port["targetPort"]) == port["port"] == 8000
    pdb = _one(core, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = _one(core, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"]
    )
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_hpa_scales_on_an_exported_gauge_the_adapter_serves(core, exported):
    hpa = _one(core, "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "softprompt_waiting_requests" and name in exported
    adapter = yaml.safe_load((KUBE / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- the InferencePool example ------------------------------------------------------------------------------


def test_inference_pool_selects_the_server_pods(pool_objects, deployment, container):
    pool = _one(pool_objects, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(pool["spec"]["selector"]["matchLabels"], pod_labels)
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [_container_port(container, "http")]
    # the endpoint picker: its Service and port, and it is not selected by the pool or the server Service
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = _one(pool_objects, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    assert ref["failureMode"] in {"FailOpen", "FailClose"}
    epp = _one(pool_objects, "Deployment", "softprompt-epp")
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    assert _selects(epp_service["spec"]["selector"], epp_labels)
    assert not _selects(pool["spec"]["selector"]["matchLabels"], epp_labels)
    [epp_container] = epp["spec"]["template"]["spec"]["containers"]
    [svc_port] = [p for p in epp_service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert _container_port(epp_container, svc_port["targetPort"]) == 9002
    args = epp_container["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == "inference.networking.k8s.io"
    route = _one(pool_objects, "HTTPRoute")
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    assert _one(pool_objects, "RoleBinding")["subjects"][0]["name"] == epp["spec"]["template"]["spec"][
        "serviceAccountName"]


def _epp_config(pool_objects: list[dict]) -> tuple[dict, dict]:
    epp = _one(pool_objects, "Deployment", "softprompt-epp")
    [c] = epp["spec"]["template"]["spec"]["containers"]
    config_file = Path(c["args"][c["args"].index("--config-file") + 1])
    [mount] = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_file.parent]
    [volume] = [v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = _one(pool_objects, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(configmap["data"][config_file.name]), c


def test_endpoint_picker_config_names_the_protocol_metrics(pool_objects):
    config, epp_container = _epp_config(pool_objects)
    assert config["kind"] == "EndpointPickerConfig"
    assert config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    [engine] = extractor["engineConfigs"]
    assert extractor["defaultEngine"] == engine["name"]
    assert {k: engine[k] for k in EPP_METRICS} == EPP_METRICS
    # every plugin the data layer and the profiles refer to is defined
    [source] = config["dataLayer"]["sources"]
    assert source["pluginRef"] == "metrics-data-source" and plugins["metrics-data-source"]["parameters"]["path"] == (
        "/metrics"
    )
    assert [e["pluginRef"] for e in source["extractors"]] == ["core-metrics-extractor"]
    [profile] = config["schedulingProfiles"]
    refs = [p["pluginRef"] for p in profile["plugins"]]
    assert set(refs) <= set(plugins) and "lora-affinity-scorer" in refs
    # EPP >= 1.4 refuses the old metric flags; the names go through engineConfigs only
    assert not [a for a in epp_container["args"] if a.startswith(("--total-", "--kv-cache-", "--lora-info"))]


def test_endpoint_picker_reads_gauges_the_server_exports(pool_objects, exported):
    assert set(EPP_METRICS.values()) <= set(exported), sorted(set(EPP_METRICS.values()) - set(exported))
    assert exported["softprompt_waiting_requests"] == exported["softprompt_running_requests"] == frozenset()
    assert LORA_INFO_LABELS <= exported["softprompt_task_requests_info"]
