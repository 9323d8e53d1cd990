"""The demo's Prefect worker pods: created through the API, given ``WORKER_ID`` by the webhook.

No kubelet runs in the demo, so the worker pods stay Pending on their simulated nodes; the demo
then resolves their ``WORKER_ID`` the way a kubelet would (``fieldRef: spec.nodeName``) and starts
each worker as a local process with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from prefect_gpu_operator.domain.injection import WORKER_ID
from prefect_gpu_sandbox.waiting import eventually

__all__ = ["WORKER_POD_LABELS", "WorkerPod", "create_worker_pod"]

# The labels of the pods of PrefectHQ's prefect-worker Helm chart.
WORKER_POD_LABELS = {"app.kubernetes.io/name": "prefect-worker"}


@dataclass(frozen=True)
class WorkerPod:
    """A Prefect worker pod as the API server stored it (after the webhook)."""

    name: str
    namespace: str
    node: str
    worker_id: Mapping[str, Any] | None
    """The container's WORKER_ID variable, or None when the webhook did not add one."""

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

    eventually(
        lambda: _worker_id_of(create(dry_run=True)) is not None,
        timeout=30,
        what="the WORKER_ID webhook",
        interval=0.2,
    )
    return WorkerPod(name, namespace, node, _worker_id_of(create(dry_run=False)))
