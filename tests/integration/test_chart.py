"""The Helm chart and manifests/ on the real API server: install, upgrade, RBAC, PSS.

What needs no server (lint, rendering, the values schema, kubeconform) is in tests/chart."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.domain.injection import WEBHOOK_PATH
from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.tools import tools_bin
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, pool_spec
from tests.support.webhook import WORKER_ID_VAR, Pods, WebhookEndpoint, made_tls_files, worker_ids

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "prefect-gpu-operator"
RELEASE = "prefect-gpu-operator"
NAMESPACE = "prefect-gpu-operator"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def run(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Run kubectl or helm against the test cluster; never the user's ~/.kube or helm config."""
    home = tmp_path_factory.mktemp("tool-home")
    env = {
        "HOME": str(home),
        "KUBECONFIG": str(kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "PATH": "/usr/bin:/bin",
    }

    def execute(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(tools_bin() / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    return execute


@pytest.fixture(scope="module")
def installed(run: Run, crd: Path) -> Iterator[str]:
    """The chart installed with defaults (plus the default policy) into the test cluster."""
    run(
        "helm",
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "defaultPolicy.enabled=true",
        "--set",
        "defaultPolicy.spec.nodeSelector.matchLabels.pool=chart-default",
    )
    yield RELEASE
    run("helm", "uninstall", RELEASE, "--namespace", NAMESPACE, check=False)


def _documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_install_creates_the_objects(installed: str, run: Run) -> None:
    objects = run(
        "kubectl",
        "get",
        "-n",
        NAMESPACE,
        "deployment,service,serviceaccount,role,rolebinding,secret,poddisruptionbudget",
        "-o",
        "name",
    ).stdout.split()
    for expected in (
        f"deployment.apps/{RELEASE}",
        f"service/{RELEASE}",
        f"serviceaccount/{RELEASE}",
        f"role.rbac.authorization.k8s.io/{RELEASE}",
        f"secret/{RELEASE}-webhook-tls",
        f"poddisruptionbudget.policy/{RELEASE}",
    ):
        assert expected in objects
    cluster = run(
        "kubectl",
        "get",
        "clusterrole,clusterrolebinding,mutatingwebhookconfiguration,"
        "clusterkopfpeering,gpulimitpolicy",
        "-o",
        "name",
    ).stdout.split()
    assert f"mutatingwebhookconfiguration.admissionregistration.k8s.io/{RELEASE}" in cluster
    assert "gpulimitpolicy.prefectgpu.io/default" in cluster
    webhook = json.loads(
        run("kubectl", "get", "mutatingwebhookconfiguration", RELEASE, "-o", "json").stdout
    )
    for entry in webhook["webhooks"]:
        assert entry["clientConfig"]["service"]["path"] == WEBHOOK_PATH
        assert entry["failurePolicy"] == "Ignore"
        assert entry["timeoutSeconds"] <= 5
        assert entry["sideEffects"] == "None"
        excluded = entry["namespaceSelector"]["matchExpressions"][0]["values"]
        assert {"kube-system", NAMESPACE} <= set(excluded)
        ca = base64.b64decode(entry["clientConfig"]["caBundle"]).decode()
        assert ca.startswith("-----BEGIN CERTIFICATE-----")


def test_webhook_certificate_survives_upgrades(installed: str, run: Run) -> None:
    def ca() -> str:
        secret = json.loads(
            run(
                "kubectl", "get", "secret", "-n", NAMESPACE, f"{RELEASE}-webhook-tls", "-o", "json"
            ).stdout
        )
        return str(secret["data"]["ca.crt"])

    before = ca()
    run("helm", "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values")
    assert ca() == before


def test_the_documented_crd_upgrade_keeps_the_policies(installed: str, run: Run) -> None:
    """Helm never upgrades crds/: docs/upgrading.md applies them server-side first."""
    guide = (REPO / "docs/upgrading.md").read_text()
    apply = ["kubectl", "apply", "--server-side", "--force-conflicts", "-f"]
    assert f"{' '.join(apply)} charts/prefect-gpu-operator/crds/" in guide
    assert "| kubectl apply --server-side --force-conflicts -f -" in guide

    def uid() -> str:
        policy = json.loads(run("kubectl", "get", "glp", "default", "-o", "json").stdout)
        return str(policy["metadata"]["uid"])

    before = uid()
    applied = run(*apply, str(CHART / "crds"))
    assert "serverside-applied" in applied.stdout
    crds = run("helm", "show", "crds", str(CHART)).stdout
    assert "gpulimitpolicies.prefectgpu.io" in crds
    run("helm", "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values")
    assert uid() == before


def test_manifests_pass_server_side_dry_run(installed: str, run: Run) -> None:
    result = run("kubectl", "apply", "--dry-run=server", "-f", str(REPO / "manifests"))
    assert "(server dry run)" in result.stdout


def _pod_templates(run: Run) -> list[tuple[str, dict[str, Any]]]:
    rendered = run(
        "helm",
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        "v1.37.1",
        "--set",
        "inferenceWorker.enabled=true",
    ).stdout
    documents = _documents(rendered)
    templates = [
        (doc["metadata"]["name"], doc["spec"]["template"])
        for doc in documents
        if doc["kind"] in {"Deployment", "DaemonSet"}
    ]
    tests = [
        (
            doc["metadata"]["name"],
            {"metadata": {"labels": doc["metadata"]["labels"]}, "spec": doc["spec"]},
        )
        for doc in documents
        if doc["kind"] == "Pod"
    ]
    return templates + tests


def test_every_pod_passes_the_restricted_pod_security_standard(
    run: Run, core_v1: client.CoreV1Api
) -> None:
    namespace = "pss-restricted"
    core_v1.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(
                name=namespace, labels={"pod-security.kubernetes.io/enforce": "restricted"}
            )
        )
    )
    try:
        templates = _pod_templates(run)
        assert len(templates) == 3  # the operator, the inference worker and the helm test
        for name, template in templates:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, **template["metadata"]},
                "spec": template["spec"],
            }
            pod["spec"].pop("serviceAccountName", None)
            # Admission enforces the standard on creation; a violation is a 403 naming it.
            core_v1.create_namespaced_pod(namespace, pod, dry_run="All")
    finally:
        core_v1.delete_namespace(namespace)


def _can_i(run: Run, *args: str, namespace: str = NAMESPACE) -> bool:
    result = run(
        "kubectl", "auth", "can-i", *args, "--as", SERVICE_ACCOUNT, "-n", namespace, check=False
    )
    return result.stdout.strip() == "yes"


def test_rbac_is_least_privilege(installed: str, run: Run) -> None:
    assert _can_i(run, "watch", "nodes")
    assert not _can_i(run, "patch", "nodes")
    assert not _can_i(run, "update", "nodes")
    assert not _can_i(run, "delete", "nodes")
    assert not _can_i(run, "patch", "nodes/status")
    assert _can_i(run, "get", "secrets")
    assert not _can_i(run, "get", "secrets", namespace="default")
    assert not _can_i(run, "list", "secrets")
    # ConfigMaps a policy names (a CA bundle, header values): get, in its namespace only.
    assert _can_i(run, "get", "configmaps")
    assert not _can_i(run, "get", "configmaps", namespace="default")
    assert not _can_i(run, "list", "configmaps")
    assert not _can_i(run, "update", "configmaps")
    assert not _can_i(run, "create", "pods")
    assert not _can_i(run, "patch", "pods")
    assert not _can_i(run, "patch", "mutatingwebhookconfigurations")
    assert not _can_i(run, "create", "validatingwebhookconfigurations")
    assert _can_i(run, "patch", "gpulimitpolicies/status")


def _service_account_kubeconfig(run: Run, control_plane: ControlPlane, path: Path) -> Path:
    token = run(
        "kubectl", "create", "token", RELEASE, "-n", NAMESPACE, "--duration=1h"
    ).stdout.strip()
    ca = (control_plane.pki / "serving-ca.crt").read_bytes()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": control_plane.url,
                    "certificate-authority-data": base64.b64encode(ca).decode(),
                },
            }
        ],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_runs_with_the_charts_service_account(
    installed: str,
    run: Run,
    control_plane: ControlPlane,
    kube_api: client.ApiClient,
    gpu_nodes: NodeFactory,
    prefect_api_url: str,
    tmp_path: Path,
) -> None:
    """Everything the operator does, done with the chart's ServiceAccount token only."""
    kubeconfig = _service_account_kubeconfig(run, control_plane, tmp_path / "sa-kubeconfig")
    endpoint = WebhookEndpoint(tmp_path, name="chart-rbac-test")
    operator = OperatorProcess(
        kubeconfig,
        tmp_path / "operator.log",
        namespace=NAMESPACE,
        extra_env={"PREFECT_GPU_OPERATOR_PEERING": RELEASE, **endpoint.operator_env()},
    ).start()
    policies = Policies(kube_api)
    pods = Pods(kube_api)
    reader = PrefectLimitsReader(prefect_api_url)
    try:
        operator.process.wait_ready(endpoint.serving, timeout=30)
        gpu_nodes.create("rbac-a", 4, labels={"pool": "rbac"})
        policies.create(
            "rbac",
            pool_spec(prefect_api_url, "rbac"),
        )
        expect_limits(reader, "gpu:rbac-", {"gpu:rbac-a": 4}, timeout=30)
        gpu_nodes.set_gpus("rbac-a", 2)
        expect_limits(reader, "gpu:rbac-", {"gpu:rbac-a": 2})

        # The webhook it serves injects WORKER_ID; its read-only pod watch reports the worker.
        endpoint.register(kube_api, NAMESPACE)
        worker = {"app.kubernetes.io/name": "prefect-worker"}

        def injected() -> None:
            pod = pods.create(f"rbac-worker-{len(pods.created)}", worker, node="rbac-a")
            assert worker_ids(pod)["main"] == [WORKER_ID_VAR]

        eventually(injected, timeout=20, interval=0.5)
        eventually(lambda: _reports_worker(policies, "rbac", "rbac-a"), timeout=15)

        policies.delete_all()
        assert reader.limits("gpu:rbac-") == {}
        # The chart's default policy (its server is unreachable here) owns nothing, so the
        # operator lets it go at once: no finalizer is left behind for `helm uninstall`.
        policies.delete("default")
        forbidden = [
            line for line in operator.log().splitlines() if re.search(r"\b403\b|[Ff]orbidden", line)
        ]
        assert forbidden == []
    finally:
        endpoint.unregister(kube_api)
        pods.delete_all()
        policies.delete_all()
        operator.stop()
        reader.close()


def _reports_worker(policies: Policies, name: str, node: str) -> None:
    workers = policies.status(name).get("workers") or []
    assert node in [entry["node"] for entry in workers]


def test_operator_made_certificate_works_with_the_charts_rbac(
    installed: str,
    run: Run,
    control_plane: ControlPlane,
    kube_api: client.ApiClient,
    tmp_path: Path,
) -> None:
    """``webhook.tls.source=operator`` (what manifests/ use): with only the chart's token, the
    operator makes its Secret and injects the CA into the chart's webhook configuration."""
    secret = f"{RELEASE}-webhook-tls-operator"
    core = client.CoreV1Api(kube_api)
    operator_mode = ["--reuse-values", "--set", "webhook.tls.source=operator"]
    run("helm", "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, *operator_mode)
    operator = None
    try:
        assert _can_i(run, "patch", f"mutatingwebhookconfigurations/{RELEASE}")
        assert not _can_i(run, "patch", "mutatingwebhookconfigurations/another")
        assert _can_i(run, "create", "secrets")
        assert _can_i(run, "update", f"secrets/{secret}")
        assert not _can_i(run, "update", "secrets/another")
        assert not _can_i(run, "create", "secrets", namespace="default")
        assert not _can_i(run, "list", "secrets")
        webhook = json.loads(
            run("kubectl", "get", "mutatingwebhookconfiguration", RELEASE, "-o", "json").stdout
        )
        assert all("caBundle" not in entry["clientConfig"] for entry in webhook["webhooks"])

        # The operator's environment as the chart renders it, but out of cluster.
        deployment = json.loads(
            run("kubectl", "get", "deployment", RELEASE, "-n", NAMESPACE, "-o", "json").stdout
        )
        rendered = {
            var["name"]: var["value"]
            for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if var["name"].startswith("PREFECT_GPU_OPERATOR_WEBHOOK_TLS")
            or var["name"] == "PREFECT_GPU_OPERATOR_WEBHOOK_CONFIGURATION"
        }
        assert rendered["PREFECT_GPU_OPERATOR_WEBHOOK_TLS_SECRET"] == secret
        assert f"{RELEASE}.{NAMESPACE}.svc" in json.loads(
            rendered["PREFECT_GPU_OPERATOR_WEBHOOK_TLS_HOSTS"]
        )
        kubeconfig = _service_account_kubeconfig(run, control_plane, tmp_path / "sa-kubeconfig")
        endpoint = WebhookEndpoint(tmp_path / "unused", name="unused")
        operator = OperatorProcess(
            kubeconfig,
            tmp_path / "operator.log",
            namespace=NAMESPACE,
            extra_env={
                **endpoint.operator_env(),
                **rendered,
                **made_tls_files(tmp_path),
            },
        ).start()

        def injected() -> bytes:
            data = core.read_namespaced_secret(secret, NAMESPACE).data
            live = json.loads(
                run("kubectl", "get", "mutatingwebhookconfiguration", RELEASE, "-o", "json").stdout
            )
            bundles = {entry["clientConfig"].get("caBundle") for entry in live["webhooks"]}
            assert bundles == {data["ca.crt"]}
            return base64.b64decode(data["tls.crt"])

        cert = eventually(injected, timeout=30, interval=0.5)
        assert (tmp_path / "tls" / "tls.crt").read_bytes() == cert
        forbidden = [
            line for line in operator.log().splitlines() if re.search(r"\b403\b|[Ff]orbidden", line)
        ]
        assert forbidden == []
    finally:
        if operator is not None:
            operator.stop()
        helm_mode = ["--reuse-values", "--set", "webhook.tls.source=helm"]
        run("helm", "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, *helm_mode)
        with contextlib.suppress(ApiException):  # absent if the operator never made it
            core.delete_namespaced_secret(secret, NAMESPACE)
