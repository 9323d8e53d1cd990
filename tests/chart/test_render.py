"""What the chart renders, with no cluster: lint, each TLS source's objects, the values schema."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from prefect_gpu_operator.domain.injection import WEBHOOK_PATH
from prefect_gpu_sandbox.chart import helm, render_chart
from prefect_gpu_sandbox.paths import CHART
from prefect_gpu_sandbox.tools import K8S_VERSION
from tests.chart.value_sets import NAMESPACE, RELEASE, VALUE_SETS


def test_helm_lint_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize(
    ("source", "kinds", "secret_rendered", "ca_rendered"),
    [
        ("helm", {"Secret"}, True, True),
        ("operator", set(), False, False),
        ("certManager", {"Issuer", "Certificate"}, False, False),
    ],
)
def test_each_certificate_source_renders_its_own_tls(
    source: str, kinds: set[str], secret_rendered: bool, ca_rendered: bool
) -> None:
    docs = render_chart(NAMESPACE, {"webhook": {"tls": {"source": source}}}, release=RELEASE)
    tls_kinds = {doc["kind"] for doc in docs} & {"Secret", "Issuer", "Certificate"}
    assert tls_kinds == kinds
    assert ("PRIVATE KEY" in base64_decoded_secrets(docs)) is secret_rendered
    (configuration,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    has_ca = ["caBundle" in entry["clientConfig"] for entry in configuration["webhooks"]]
    assert set(has_ca) == {ca_rendered}
    annotations = configuration["metadata"].get("annotations", {})
    assert ("cert-manager.io/inject-ca-from" in annotations) is (source == "certManager")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {var["name"] for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert ("PREFECT_GPU_OPERATOR_WEBHOOK_TLS_SECRET" in env) is (source == "operator")


def base64_decoded_secrets(docs: list[dict[str, Any]]) -> str:
    return "".join(
        base64.b64decode(value).decode()
        for doc in docs
        if doc["kind"] == "Secret"
        for value in (doc.get("data") or {}).values()
    )


def test_every_webhook_calls_the_handlers_path(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart cannot import WEBHOOK_PATH, so its literal is checked against it, in every set."""
    paths = {
        (name, entry["clientConfig"]["service"]["path"])
        for name, docs in rendered.items()
        for doc in docs
        if doc["kind"] == "MutatingWebhookConfiguration"
        for entry in doc["webhooks"]
    }
    webhook_on = {
        name
        for name, values in VALUE_SETS.items()
        if values.get("webhook", {}).get("enabled", True)
    }
    assert paths == {(name, WEBHOOK_PATH) for name in webhook_on}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "operator.replicas=two"], "at '/operator/replicas': got string, want integer"),
        (["--set", "operator.typo=1"], "additional properties 'typo' not allowed"),
        (["--set", "webhook.timeoutSeconds=30"], "at '/webhook/timeoutSeconds': maximum"),
        (["--set", "operator.logFormat=xml"], "at '/operator/logFormat'"),
        (["--set", "inferenceWorker.prefectApiUrl=ftp://x"], "at '/inferenceWorker/prefectApiUrl'"),
        (["--set", "operator.extraEnv[0].value=x"], "at '/operator/extraEnv/0'"),
        (
            ["--set", "operator.extraEnv[0].name=A,operator.extraEnv[0].valueFrom.typo.key=k"],
            "at '/operator/extraEnv/0/valueFrom'",
        ),
        (["--set", "operator.extraVolumeMounts[0].name=ca"], "at '/operator/extraVolumeMounts/0'"),
        (["--set", "operator.extraVolumes[0].name=ca"], "at '/operator/extraVolumes/0'"),
    ],
)
def test_invalid_values_fail_with_the_schema_message(values: list[str], message: str) -> None:
    """`helm template` checks values.schema.json as `helm install` does."""
    result = helm(
        "template", "bad-values", str(CHART), "--namespace", "bad-values",
        "--kube-version", K8S_VERSION, *values, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("replicas", "budget"), [(1, False), (2, True), (3, True)])
def test_peering_is_always_on_and_a_disruption_budget_needs_two_replicas(
    replicas: int, budget: bool
) -> None:
    """`kubectl scale` never makes two active writers; one replica never blocks a node drain."""
    docs = render_chart(NAMESPACE, {"operator": {"replicas": replicas}}, release=RELEASE)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_GPU_OPERATOR_PEERING"]["value"] == RELEASE
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs) is budget


def test_cert_manager_renewals_keep_the_ca_bundle() -> None:
    """Without an issuerRef the chart makes root -> CA Issuer -> serving certificate, and the
    webhook trusts the root: a renewed serving certificate needs no new caBundle."""
    docs = render_chart(NAMESPACE, {"webhook": {"tls": {"source": "certManager"}}}, release=RELEASE)
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    certificates = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    root, serving = certificates[f"{RELEASE}-webhook-ca"], certificates[f"{RELEASE}-webhook"]
    assert root["isCA"] is True
    assert root["issuerRef"]["name"] == f"{RELEASE}-selfsigned"
    assert "selfSigned" in issuers[f"{RELEASE}-selfsigned"]
    assert issuers[f"{RELEASE}-ca"] == {"ca": {"secretName": root["secretName"]}}
    assert serving["issuerRef"]["name"] == f"{RELEASE}-ca"
    (configuration,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    annotation = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{NAMESPACE}/{RELEASE}-webhook-ca"


def test_readiness_waits_for_the_webhook_port() -> None:
    docs = render_chart(NAMESPACE, {}, release=RELEASE)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize(("delay", "grace"), [(5, 35), (12, 42), (0, 30)])
def test_a_stopping_replica_serves_on_for_the_shutdown_delay(delay: int, grace: int) -> None:
    """The endpoints drop a pod only after it is told to stop: it sleeps before its SIGTERM, and
    still has Kubernetes' default 30 s to stop in after that."""
    values = {"operator": {"shutdownDelaySeconds": delay}}
    (deployment,) = [d for d in render_chart(NAMESPACE, values) if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == grace
    sleep = {"preStop": {"exec": {"command": ["sleep", str(delay)]}}}
    assert spec["containers"][0].get("lifecycle") == (sleep if delay else None)


def test_extra_env_and_volumes_reach_the_operator_container() -> None:
    """A Prefect API behind an HTTPS proxy and a private CA: the chart's extension points."""
    extra = VALUE_SETS["behind-a-proxy"]["operator"]
    docs = render_chart(NAMESPACE, VALUE_SETS["behind-a-proxy"], release=RELEASE)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["env"][-len(extra["extraEnv"]) :] == extra["extraEnv"]
    assert container["envFrom"] == extra["extraEnvFrom"]
    assert container["volumeMounts"][-1] == extra["extraVolumeMounts"][0]
    assert pod["volumes"][-1] == extra["extraVolumes"][0]
    (plain,) = [
        d for d in render_chart(NAMESPACE, {}, release=RELEASE) if d["kind"] == "Deployment"
    ]
    assert "envFrom" not in plain["spec"]["template"]["spec"]["containers"][0]
