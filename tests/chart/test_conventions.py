"""What users of well-kept charts expect: security contexts and pull secrets from values on every
pod, the worker report switch, a `helm test` hook, NOTES that say what was installed, and a GPU
worker per GPU node. Rendered only: no cluster."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from prefect_gpu_operator.settings import OperatorSettings
from prefect_gpu_sandbox.chart import render_chart, render_notes
from prefect_gpu_sandbox.paths import CHART
from tests.chart.value_sets import NAMESPACE, RELEASE, VALUE_SETS

ENV_PREFIX = OperatorSettings.model_config["env_prefix"]


def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart makes, by the name of the object that holds it."""
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if "template" in d.get("spec", {})
    }
    pods.update({d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Pod"})
    return pods


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {v["name"]: v.get("value") for v in container["env"]}


ALL_PODS = {"inferenceWorker": {"enabled": True}}


def test_every_pod_gets_the_security_contexts_and_pull_secrets_from_values() -> None:
    values = {
        **ALL_PODS,
        "imagePullSecrets": [{"name": "shared"}],
        "operator": {"imagePullSecrets": [{"name": "operator-only"}]},
        # OpenShift: the namespace's SecurityContextConstraints choose the ids.
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "containerSecurityContext": {"readOnlyRootFilesystem": False},
    }
    pods = _pods(render_chart(NAMESPACE, values, release=RELEASE))
    assert set(pods) == {RELEASE, f"{RELEASE}-inference-worker", f"{RELEASE}-test"}
    for name, pod in pods.items():
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, name
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is False, name
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, name
        secrets = [s["name"] for s in pod["imagePullSecrets"]]
        own = ["operator-only"] if name != f"{RELEASE}-inference-worker" else []
        assert secrets == ["shared", *own], name


def test_by_default_every_pod_is_restricted_and_pulls_without_secrets() -> None:
    for name, pod in _pods(render_chart(NAMESPACE, ALL_PODS, release=RELEASE)).items():
        assert pod["securityContext"]["runAsUser"] == 65532, name
        assert "imagePullSecrets" not in pod, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_each_operator_variable_the_chart_sets_is_a_setting(name: str) -> None:
    """The chart's values reach the operator only through settings it reads: a renamed
    setting fails here, not silently in a cluster."""
    docs = render_chart(NAMESPACE, VALUE_SETS[name], release=RELEASE)
    settings = {ENV_PREFIX.upper() + field.upper() for field in OperatorSettings.model_fields}
    ours = {variable for variable in _operator_env(docs) if variable.startswith(ENV_PREFIX.upper())}
    assert ours - settings == set()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_worker_report_switch_sets_the_pod_watch_and_its_rbac(enabled: bool) -> None:
    docs = render_chart(
        NAMESPACE, {"operator": {"workerReport": {"enabled": enabled}}}, release=RELEASE
    )
    assert _operator_env(docs)[f"{ENV_PREFIX.upper()}WATCH_WORKER_PODS"] == str(enabled).lower()
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    readable = {
        resource
        for rule in role["rules"]
        for resource in rule["resources"]
        if "watch" in rule["verbs"]
    }
    assert ("pods" in readable) is enabled
    assert "nodes" in readable


def test_the_gpu_worker_is_one_pod_per_gpu_node_requesting_its_gpus() -> None:
    docs = render_chart(
        NAMESPACE, {"inferenceWorker": {"enabled": True, "gpus": 4}}, release=RELEASE
    )
    (worker,) = [d for d in docs if d["metadata"]["name"] == f"{RELEASE}-inference-worker"]
    assert worker["kind"] == "DaemonSet"
    pod = worker["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert labels["prefectgpu.io/has-worker-id"] == "true"


@pytest.mark.parametrize(
    ("values", "check"),
    [
        ({"metrics": {"port": 9191}}, "/metrics"),
        ({"metrics": {"enabled": False}}, "wrap_socket"),
    ],
)
def test_helm_test_asks_the_operator_through_its_service(
    values: dict[str, Any], check: str
) -> None:
    docs = render_chart(NAMESPACE, values, release=RELEASE)
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    (script,) = container["args"]
    assert f"{RELEASE}.{NAMESPACE}.svc" in script
    assert check in script
    if values["metrics"].get("enabled", True):
        assert ":9191/metrics" in script
    assert container["image"].startswith("ghcr.io/prefect-gpu-operator/prefect-gpu-operator:")


def test_no_helm_test_without_a_service() -> None:
    values = {"metrics": {"enabled": False}, "webhook": {"enabled": False}}
    assert not [d for d in render_chart(NAMESPACE, values, release=RELEASE) if d["kind"] == "Pod"]


def test_notes_say_what_was_installed() -> None:
    plain = render_notes(NAMESPACE, {}, release=RELEASE)
    assert "2 replica(s), one active and the others standing by" in plain
    assert "certificate from helm" in plain
    assert "kind: GPULimitPolicy" in plain  # no default policy: how to apply one
    assert "inference worker" not in plain
    assert f"helm test {RELEASE} --namespace {NAMESPACE}" in plain

    everything = render_notes(
        NAMESPACE,
        {
            "operator": {"replicas": 1},
            "webhook": {"tls": {"source": "operator"}},
            "defaultPolicy": {"enabled": True},
            "inferenceWorker": {"enabled": True, "gpus": 2},
        },
        release=RELEASE,
    )
    assert "1 replica(s)\n" in everything
    assert f"Secret {RELEASE}-webhook-tls-operator, which `helm uninstall` leaves" in everything
    assert 'the GPULimitPolicy "default"' in everything
    assert "kind: GPULimitPolicy" not in everything
    assert f"daemonset/{RELEASE}-inference-worker" in everything
    assert "2 GPU(s) each" in everything

    no_webhook = render_notes(NAMESPACE, {"webhook": {"enabled": False}}, release=RELEASE)
    assert "no webhook: set WORKER_ID" in no_webhook


RECIPE = CHART.parent / "recipes/prefect-worker-gpu-values.yaml"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's verdict on ``labels`` (matchLabels and the Exists/In operators)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for requirement in selector.get("matchExpressions", []):
        key, operator = requirement["key"], requirement["operator"]
        if operator == "Exists" and key not in labels:
            return False
        if operator == "In" and labels.get(key) not in requirement["values"]:
            return False
    return True


def test_the_prefect_worker_recipe_runs_the_chart_workers_shape() -> None:
    """The recipe for PrefectHQ's chart and this chart's GPU worker say the same things: one
    process worker per GPU node, where the webhook gives it WORKER_ID."""
    recipe = yaml.safe_load(RECIPE.read_text())["worker"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ours = values["inferenceWorker"]
    # prefect-worker labels its pods with its chart name.
    pod_labels = {"app.kubernetes.io/name": "prefect-worker", **recipe.get("podLabels", {})}
    assert any(_selects(s, pod_labels) for s in values["webhook"]["podSelectors"])
    assert recipe["config"]["type"] == "process"
    assert recipe["config"]["workPool"] == ours["workPool"]
    assert recipe["nodeSelector"] == ours["nodeSelector"]
    assert recipe["tolerations"] == ours["tolerations"]
    assert recipe["image"]["repository"] == ours["image"]["repository"]
    assert recipe["image"]["prefectTag"] == f"{chart['appVersion']}-cuda"
    assert int(recipe["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    (spread,) = recipe["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(spread["labelSelector"], pod_labels)


def test_the_service_monitor_scrapes_the_operators_metrics_service() -> None:
    docs = render_chart(NAMESPACE, VALUE_SETS["service-monitor"], release=RELEASE)
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in ports
    no_metrics = {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}
    assert not [
        d
        for d in render_chart(NAMESPACE, no_metrics, release=RELEASE)
        if d["kind"] == "ServiceMonitor"
    ]


def test_the_slots_metrics_sidecar_reads_the_workers_lock_directory_and_is_scraped() -> None:
    docs = render_chart(NAMESPACE, VALUE_SETS["slots-metrics"], release=RELEASE)
    (worker,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = worker["spec"]["template"]["spec"]
    main, sidecar = pod["containers"]
    assert sidecar["name"] == "slots-metrics"
    assert sidecar["image"] == main["image"]
    assert sidecar["args"] == ["prefect-gpu-slots", "$(WORKER_ID)", "--serve", "0.0.0.0:9500"]
    env = {v["name"]: v for v in sidecar["env"]}
    assert env["WORKER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    locks = {v["name"]: v["value"] for v in main["env"] if "value" in v}["PREFECT_GPU_LOCK_DIR"]
    assert env["PREFECT_GPU_LOCK_DIR"]["value"] == locks
    (mount,) = sidecar["volumeMounts"]
    assert mount == {"name": "gpu-locks", "mountPath": locks, "readOnly": True}
    assert {"name": "gpu-locks", "mountPath": locks} in main["volumeMounts"]
    assert sidecar["securityContext"] == main["securityContext"]
    assert pod["shareProcessNamespace"] is True  # it checks holders' processes are alive
    assert "nvidia.com/gpu" not in str(sidecar["resources"])  # the worker's GPUs stay its own
    assert sidecar["ports"] == [{"name": "slots-metrics", "containerPort": 9500}]
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9500"
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["slots-metrics"]


@pytest.mark.parametrize(
    "values",
    [
        {"inferenceWorker": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
        {"inferenceWorker": {"enabled": True, "slotsMetrics": {"enabled": True}}},
    ],
)
def test_no_pod_monitor_without_the_sidecar_and_the_prometheus_operator(
    values: dict[str, Any],
) -> None:
    docs = render_chart(NAMESPACE, values, release=RELEASE)
    assert not [d for d in docs if d["kind"] == "PodMonitor"]
    (worker,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = worker["spec"]["template"]["spec"]
    sidecar = "slotsMetrics" in values["inferenceWorker"]
    assert [c["name"] for c in pod["containers"]] == ["worker", "slots-metrics"][: 1 + sidecar]
    assert pod.get("shareProcessNamespace", False) is sidecar


def test_the_write_concurrency_reaches_the_operator() -> None:
    docs = render_chart(NAMESPACE, {"operator": {"prefectWriteConcurrency": 32}}, release=RELEASE)
    assert _operator_env(docs)[f"{ENV_PREFIX.upper()}PREFECT_WRITE_CONCURRENCY"] == "32"
    default = OperatorSettings.model_fields["prefect_write_concurrency"].default
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["prefectWriteConcurrency"] == default  # one default, not two
