"""The operator makes its webhook certificate: Secret, CA injection, and admission through it.

This is the chart's ``webhook.tls.source=operator`` (and so ``manifests/``): nothing secret is
rendered, the first replica mints a CA and a serving certificate into a Secret, injects the CA into
the MutatingWebhookConfiguration and serves it; the API server verifies that chain on every call.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.adapters.webhook_tls import WebhookTLS, ensure_webhook_tls
from prefect_gpu_sandbox.waiting import eventually
from tests.support.operator import OperatorProcess
from tests.support.webhook import WORKER_ID_VAR, Pods, WebhookEndpoint, made_tls_files, worker_ids

pytestmark = pytest.mark.integration

SECRET = "tls-test-webhook-tls"
WORKER = {"app.kubernetes.io/name": "prefect-worker"}


@pytest.fixture
def core(kube_api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube_api)


@pytest.fixture
def secret_name(core: client.CoreV1Api, operator_namespace: str) -> Iterator[str]:
    yield SECRET
    try:
        core.delete_namespaced_secret(SECRET, operator_namespace)
    except ApiException as error:
        if error.status != 404:
            raise


@pytest.fixture
def endpoint(kube_api: client.ApiClient, tmp_path: Path) -> Iterator[WebhookEndpoint]:
    """A webhook configuration like the rendered manifests': no caBundle until the operator's."""
    endpoint = WebhookEndpoint(tmp_path / "unused", name="tls-test")
    configuration = endpoint.configuration("prefect-gpu-operator")
    for webhook in configuration["webhooks"]:
        del webhook["clientConfig"]["caBundle"]
    admission = client.AdmissionregistrationV1Api(kube_api)
    admission.create_mutating_webhook_configuration(configuration)  # type: ignore[arg-type]
    yield endpoint
    endpoint.unregister(kube_api)


def _secret(core: client.CoreV1Api, namespace: str) -> WebhookTLS | None:
    try:
        secret = core.read_namespaced_secret(SECRET, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return WebhookTLS.from_secret_data(secret.data)


def _ca_bundles(api: client.ApiClient, name: str) -> list[bytes | None]:
    admission = client.AdmissionregistrationV1Api(api)
    response = admission.read_mutating_webhook_configuration(name, _preload_content=False)
    configuration: dict[str, Any] = json.loads(response.data)
    return [
        base64.b64decode(bundle) if (bundle := webhook["clientConfig"].get("caBundle")) else None
        for webhook in configuration["webhooks"]
    ]


def _operator(
    kubeconfig: Path, namespace: str, endpoint: WebhookEndpoint, directory: Path
) -> OperatorProcess:
    directory.mkdir(parents=True, exist_ok=True)
    return OperatorProcess(
        kubeconfig,
        directory / "operator.log",
        namespace=namespace,
        extra_env={
            **endpoint.operator_env(),
            **made_tls_files(directory),
            "PREFECT_GPU_OPERATOR_WEBHOOK_TLS_SECRET": SECRET,
            "PREFECT_GPU_OPERATOR_WEBHOOK_TLS_HOSTS": '["127.0.0.1"]',
            "PREFECT_GPU_OPERATOR_WEBHOOK_CONFIGURATION": endpoint.name,
        },
    )


def test_operator_makes_the_certificate_injects_its_ca_and_serves_it(
    crd: Path,
    kubeconfig: Path,
    kube_api: client.ApiClient,
    core: client.CoreV1Api,
    operator_namespace: str,
    secret_name: str,
    endpoint: WebhookEndpoint,
    tmp_path: Path,
) -> None:
    assert _secret(core, operator_namespace) is None
    bundles = _ca_bundles(kube_api, endpoint.name)
    assert bundles
    assert set(bundles) == {None}
    pods = Pods(kube_api)
    operator = _operator(kubeconfig, operator_namespace, endpoint, tmp_path / "first").start()
    try:
        made = eventually(lambda: _made(core, operator_namespace), timeout=30)
        assert made.serves(["127.0.0.1"], _now())
        eventually(lambda: _has_bundles(kube_api, endpoint.name, made.ca_pem), timeout=30)
        assert (tmp_path / "first" / "tls" / "tls.crt").read_bytes() == made.cert_pem
        assert oct((tmp_path / "first" / "tls" / "tls.key").stat().st_mode & 0o777) == "0o600"

        # The API server calls the webhook through the chain it was just given.
        def injected() -> None:
            pod = pods.create(f"tls-worker-{len(pods.created)}", WORKER)
            assert worker_ids(pod)["main"] == [WORKER_ID_VAR]

        eventually(injected, timeout=30, interval=0.5)

        # A later `helm upgrade` adds a webhook entry, without caBundle (Helm never sets it).
        admission = client.AdmissionregistrationV1Api(kube_api)
        live = admission.read_mutating_webhook_configuration(endpoint.name)
        added = kube_api.sanitize_for_serialization(live.webhooks[0])
        added["name"] = "inject-worker-id-added.prefectgpu.io"
        del added["clientConfig"]["caBundle"]
        admission.patch_mutating_webhook_configuration(
            endpoint.name, [{"op": "add", "path": "/webhooks/-", "value": added}]
        )
        assert None in _ca_bundles(kube_api, endpoint.name)
        eventually(lambda: _has_bundles(kube_api, endpoint.name, made.ca_pem), timeout=20)
        log = operator.log()
        assert "PRIVATE KEY" not in log
        assert base64.b64encode(made.key_pem).decode() not in log
    finally:
        operator.stop()

    # A restart keeps the certificate: same Secret, same CA, still injecting.
    operator = _operator(kubeconfig, operator_namespace, endpoint, tmp_path / "second").start()
    try:
        eventually(lambda: (tmp_path / "second" / "tls" / "tls.crt").exists(), timeout=30)
        assert _secret(core, operator_namespace) == made
        assert (tmp_path / "second" / "tls" / "tls.crt").read_bytes() == made.cert_pem
        pod = eventually(
            lambda: _injected_pod(pods, f"tls-again-{len(pods.created)}"), timeout=30, interval=0.5
        )
        assert worker_ids(pod)["main"] == [WORKER_ID_VAR]
    finally:
        operator.stop()
        pods.delete_all()


def _made(core: client.CoreV1Api, namespace: str) -> WebhookTLS:
    made = _secret(core, namespace)
    assert made is not None
    return made


def _has_bundles(api: client.ApiClient, name: str, ca_pem: bytes) -> None:
    bundles = _ca_bundles(api, name)
    assert bundles
    assert set(bundles) == {ca_pem}


def _injected_pod(pods: Pods, name: str) -> dict[str, Any]:
    pod = pods.create(name, WORKER)
    assert worker_ids(pod)["main"] == [WORKER_ID_VAR]
    return pod


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_racing_replicas_settle_on_one_certificate(
    kube_api: client.ApiClient,
    core: client.CoreV1Api,
    operator_namespace: str,
    secret_name: str,
) -> None:
    results: list[WebhookTLS] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def replica() -> None:
        try:
            start.wait()
            tls = ensure_webhook_tls(
                kube_api,
                namespace=operator_namespace,
                secret_name=secret_name,
                hosts=["svc.ns.svc"],
                configuration=None,
            )
            results.append(tls)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    stored = _secret(core, operator_namespace)
    assert stored is not None
    assert results == [stored] * 4


def test_a_certificate_for_other_hosts_is_replaced(
    kube_api: client.ApiClient,
    core: client.CoreV1Api,
    operator_namespace: str,
    secret_name: str,
) -> None:
    def ensure(hosts: list[str]) -> WebhookTLS:
        return ensure_webhook_tls(
            kube_api,
            namespace=operator_namespace,
            secret_name=secret_name,
            hosts=hosts,
            configuration=None,
        )

    first = ensure(["old.ns.svc"])
    assert ensure(["old.ns.svc"]) == first  # fits: kept
    second = ensure(["new.ns.svc"])  # the Service was renamed: made anew
    assert second != first
    assert second.serves(["new.ns.svc"], _now())
    assert _secret(core, operator_namespace) == second
