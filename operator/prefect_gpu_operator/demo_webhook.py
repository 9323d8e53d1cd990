"""The demo's admission webhook: a certificate for 127.0.0.1, the MutatingWebhookConfiguration the
chart would register (a URL instead of a Service), and Prefect worker pods that get ``WORKER_ID``.

No kubelet runs in the demo, so the worker pods stay Pending on their simulated nodes; the demo
then resolves their ``WORKER_ID`` the way a kubelet would (``fieldRef: spec.nodeName``) and starts
each worker as a local process with it.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.pki import CertificateAuthority
from prefect_gpu_operator.sandbox.processes import free_port, wait_until
from prefect_gpu_operator.webhook import OPT_LABEL, WEBHOOK_PATH, WORKER_ID

__all__ = [
    "POD_SELECTORS",
    "WORKER_POD_LABELS",
    "WebhookEndpoint",
    "WorkerPod",
    "create_worker_pod",
]

# The labels of the pods of PrefectHQ's prefect-worker Helm chart.
WORKER_POD_LABELS = {"app.kubernetes.io/name": "prefect-worker"}
# The chart's default webhook.podSelectors: one webhook per selector, so they are ORed.
POD_SELECTORS: list[dict[str, Any]] = [
    {"matchLabels": {"app.kubernetes.io/name": "prefect-worker"}},
    {"matchLabels": {"app.kubernetes.io/component": "worker"}},
    {"matchExpressions": [{"key": "prefect.io/flow-run-id", "operator": "Exists"}]},
    {"matchLabels": {OPT_LABEL: "true"}},
]


class WebhookEndpoint:
    """The operator's webhook on 127.0.0.1: serving certificate, operator settings, and the MWC."""

    def __init__(
        self,
        directory: Path,
        name: str = "prefect-gpu-operator-demo",
        pod_selectors: Sequence[Mapping[str, Any]] = POD_SELECTORS,
    ) -> None:
        """``pod_selectors``: one webhook each (ORed); ``[{}]`` sends every pod to the handler."""
        self.name = name
        self.pod_selectors = pod_selectors
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ca = CertificateAuthority("prefect-gpu-operator-webhook-ca")
        self.ca_pem = ca.cert_pem
        self.cert_file = directory / "webhook.crt"
        self.key_file = directory / "webhook.key"
        ca.issue_server("127.0.0.1", ["127.0.0.1"]).write(self.cert_file, self.key_file)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def operator_env(self) -> dict[str, str]:
        return {
            "PREFECT_GPU_OPERATOR_WEBHOOK_ENABLED": "true",
            "PREFECT_GPU_OPERATOR_WEBHOOK_ADDRESS": "127.0.0.1",
            "PREFECT_GPU_OPERATOR_WEBHOOK_HOST": "127.0.0.1",
            "PREFECT_GPU_OPERATOR_WEBHOOK_PORT": str(self.port),
            "PREFECT_GPU_OPERATOR_WEBHOOK_CERT_FILE": str(self.cert_file),
            "PREFECT_GPU_OPERATOR_WEBHOOK_KEY_FILE": str(self.key_file),
        }

    def serving(self) -> bool:
        """True once the operator answers TLS handshakes with the certificate the CA signed."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return True
        except OSError:
            return False

    def configuration(self, excluded_namespaces: Sequence[str]) -> dict[str, Any]:
        """The chart's MutatingWebhookConfiguration with ``clientConfig.url`` for its Service."""
        webhooks = []
        for index, selector in enumerate(self.pod_selectors):
            object_selector: dict[str, Any] = {
                "matchExpressions": [
                    {"key": OPT_LABEL, "operator": "NotIn", "values": ["false"]},
                    *selector.get("matchExpressions", []),
                ]
            }
            if "matchLabels" in selector:
                object_selector["matchLabels"] = selector["matchLabels"]
            webhooks.append(
                {
                    "name": f"inject-worker-id-{index}.prefectgpu.io",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Ignore",  # never blocks a pod
                    "timeoutSeconds": 5,
                    "matchPolicy": "Equivalent",
                    "reinvocationPolicy": "IfNeeded",
                    "clientConfig": {
                        "url": self.url,
                        "caBundle": base64.b64encode(self.ca_pem).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                            "scope": "Namespaced",
                        }
                    ],
                    "namespaceSelector": {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/metadata.name",
                                "operator": "NotIn",
                                "values": list(excluded_namespaces),
                            }
                        ]
                    },
                    "objectSelector": object_selector,
                }
            )
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": self.name},
            "webhooks": webhooks,
        }

    def register(self, api: client.ApiClient, excluded_namespaces: Sequence[str]) -> None:
        admission = client.AdmissionregistrationV1Api(api)
        # The client sends a plain dict as it is.
        admission.create_mutating_webhook_configuration(
            self.configuration(excluded_namespaces)  # type: ignore[arg-type]
        )

    def unregister(self, api: client.ApiClient) -> None:
        admission = client.AdmissionregistrationV1Api(api)
        try:
            admission.delete_mutating_webhook_configuration(self.name)
        except ApiException as error:
            if error.status != 404:
                raise


@dataclass(frozen=True)
class WorkerPod:
    """A Prefect worker pod as the API server stored it (after the webhook)."""

    name: str
    namespace: str
    node: str
    worker_id: Mapping[str, Any] | None
    """The container's WORKER_ID variable, or None when the webhook did not add one."""

    @property
    def worker_id_source(self) -> str:
        if self.worker_id is None:
            return "(not injected)"
        value_from = self.worker_id.get("valueFrom") or {}
        field_ref = value_from.get("fieldRef") or {}
        if "fieldPath" in field_ref:
            return f"valueFrom.fieldRef.fieldPath: {field_ref['fieldPath']}"
        return f"value: {self.worker_id.get('value')!r}"

    def resolved_worker_id(self) -> str:
        """WORKER_ID as the kubelet would set it when the pod starts on its node."""
        if self.worker_id is None:
            raise RuntimeError(f"pod {self.name}: the webhook did not inject {WORKER_ID}")
        field_ref = (self.worker_id.get("valueFrom") or {}).get("fieldRef") or {}
        if field_ref.get("fieldPath") == "spec.nodeName":
            return self.node
        return str(self.worker_id.get("value", ""))


def _worker_pod_body(name: str, node: str, pool: str, queue: str, api_url: str) -> dict[str, Any]:
    """A process worker's pod, as PrefectHQ's prefect-worker chart makes it, bound to ``node``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(WORKER_POD_LABELS)},
        "spec": {
            "nodeName": node,  # "scheduled" by hand: no scheduler or kubelet runs here
            "tolerations": [{"key": "prefectgpu.io/simulated", "operator": "Exists"}],
            "containers": [
                {
                    "name": "prefect-worker",
                    "image": "prefecthq/prefect:3-python3.11",
                    "args": f"prefect worker start --type process --pool {pool} "
                    f"--work-queue {queue}".split(),
                    "env": [{"name": "PREFECT_API_URL", "value": api_url}],
                }
            ],
        },
    }


def _worker_id_of(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    container = pod["spec"]["containers"][0]
    return next((v for v in container.get("env") or [] if v["name"] == WORKER_ID), None)


def create_worker_pod(
    api: client.ApiClient, namespace: str, node: str, *, pool: str, api_url: str
) -> WorkerPod:
    """Create the worker pod for ``node``; first wait until the webhook is in effect.

    The API server picks up a new webhook configuration asynchronously, so a server-side dry run
    (which runs the webhooks but stores nothing) is repeated until it shows the injection.
    """
    core = client.CoreV1Api(api)
    name = f"prefect-worker-{node}"
    body = _worker_pod_body(name, node, pool, node, api_url)

    def create(dry_run: bool) -> dict[str, Any]:
        # A plain dict body is sent as it is.
        if dry_run:
            pod = core.create_namespaced_pod(namespace, body, dry_run="All")  # type: ignore[arg-type]
        else:
            pod = core.create_namespaced_pod(namespace, body)  # type: ignore[arg-type]
        plain: dict[str, Any] = api.sanitize_for_serialization(pod)  # type: ignore[no-untyped-call]
        return plain

    wait_until(
        lambda: _worker_id_of(create(dry_run=True)) is not None,
        timeout=30,
        what="the WORKER_ID webhook",
        interval=0.2,
    )
    return WorkerPod(name, namespace, node, _worker_id_of(create(dry_run=False)))
