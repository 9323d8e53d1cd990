"""The chart installed on a real node (``NodeCluster``) the way a user installs it: images built
from the repository's Dockerfile and loaded into the node's containerd (no registry: pull policy
``Never``), ``helm install`` into a namespace whose admission enforces restricted Pod Security,
and the chart's GPU worker pods, whose flow runs are read back from inside them. Shared by
``demo --cluster`` and the end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from kubernetes import client

from prefect_gpu_sandbox.image_builder import build_image
from prefect_gpu_sandbox.images import IMAGES
from prefect_gpu_sandbox.namespaces import run
from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.paths import CHART
from prefect_gpu_sandbox.tools import tools_bin
from prefect_gpu_sandbox.waiting import eventually

__all__ = [
    "GPU_NODE_LABELS",
    "RELEASE",
    "WORKER_OUTPUT",
    "PodWorker",
    "Release",
    "image_values",
    "kubectl_exec",
    "load_images",
    "opted_in_deployment",
    "restricted_namespace",
    "running_pod",
    "worker_values",
]

RELEASE = "gpu-operator"
# What NVIDIA's GPU feature discovery labels a GPU node with: the worker DaemonSet's nodeSelector.
GPU_NODE_LABELS = {"nvidia.com/gpu.present": "true"}
# Where the bundled flow writes each run's summary.json in a worker pod (HOME is /tmp there).
WORKER_OUTPUT = "/tmp/prefect-gpu-flows/embeddings"
_WORKER_SELECTOR = "app.kubernetes.io/component=worker"


def load_images(node: NodeCluster, targets: Iterable[str]) -> dict[str, str]:
    """Build (or take from the cache) each Dockerfile target and import it into the node's
    containerd; each target's image reference."""
    references = {}
    for target in targets:
        built = build_image(IMAGES[target])
        node.import_image(built.archive)
        references[target] = built.reference
    return references


def image_values(reference: str) -> dict[str, str]:
    """A component's ``image`` values for an imported image: the node has it or nothing."""
    repository, tag = reference.rsplit(":", 1)
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


def worker_values(image: str, *, prefect_api_url: str, work_pool: str, gpus: int) -> dict[str, Any]:
    """The chart's GPU worker (``inferenceWorker``) on the node's Prefect server, requesting
    ``gpus`` devices, and polling every second rather than Prefect's 10 s."""
    return {
        "enabled": True,
        "image": image_values(image),
        "prefectApiUrl": prefect_api_url,
        "workPool": work_pool,
        "gpus": gpus,
        "extraEnv": [{"name": "PREFECT_WORKER_QUERY_SECONDS", "value": "1"}],
    }


def opted_in_deployment(image: str, name: str = "opted-in") -> dict[str, Any]:
    """A Deployment whose pods opt in to WORKER_ID injection (the chart's default selector) and
    set no WORKER_ID themselves; they sleep until stopped."""
    labels = {"app": name, "prefectgpu.io/inject-worker-id": "true"}
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", 'trap "exit 0" TERM; sleep inf & wait'],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def running_pod(
    core: client.CoreV1Api,
    namespace: str,
    selector: str,
    *,
    on_node: str | None = None,
    timeout: float = 120,
) -> client.V1Pod:
    """The one pod ``selector`` matches in ``namespace`` (and on node ``on_node``), once
    Running."""
    fields = f"spec.nodeName={on_node}" if on_node else None

    def running() -> client.V1Pod:
        found = core.list_namespaced_pod(namespace, label_selector=selector, field_selector=fields)
        pods: list[Any] = found.items
        assert [pod.status.phase for pod in pods] == ["Running"], [p.status for p in pods]
        pod: client.V1Pod = pods[0]
        return pod

    return eventually(running, timeout=timeout, what=f"the pod {selector} Running in {namespace}")


def restricted_namespace(core: client.CoreV1Api, name: str) -> None:
    """A namespace whose real admission enforces the restricted Pod Security profile."""
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    metadata = client.V1ObjectMeta(name=name, labels=labels)
    core.create_namespace(client.V1Namespace(metadata=metadata))


def _namespace_and_name(pod: client.V1Pod) -> tuple[str, str]:
    metadata: Any = pod.metadata
    return str(metadata.namespace), str(metadata.name)


def kubectl_exec(node: NodeCluster, pod: client.V1Pod, script: str) -> str:
    """Run the shell ``script`` in the pod's (first) container as a user would, through the API
    server, the kubelet and containerd; its output."""
    namespace, name = _namespace_and_name(pod)
    kubectl = [str(tools_bin() / "kubectl"), f"--kubeconfig={node.kubeconfig}", "exec"]
    return run([*kubectl, f"--namespace={namespace}", name, "--", "sh", "-c", script])


@dataclass(frozen=True)
class Release:
    """The chart as the Helm release ``name`` in ``namespace`` of the node."""

    node: NodeCluster
    namespace: str
    name: str = RELEASE

    def helm(self, *args: str, timeout: float = 300) -> str:
        helm = [str(tools_bin() / "helm"), f"--kubeconfig={self.node.kubeconfig}", *args]
        return run(helm, timeout=timeout)

    def _values_file(self, values: Mapping[str, Any]) -> Path:
        path = self.node.directory / f"values-{self.name}.yaml"
        path.write_text(yaml.safe_dump(dict(values)), encoding="utf-8")
        return path

    def install(self, values: Mapping[str, Any]) -> None:
        self.helm("install", self.name, str(CHART), f"--namespace={self.namespace}",
                  f"--values={self._values_file(values)}")  # fmt: skip

    def upgrade(self, values: Mapping[str, Any]) -> None:
        """``helm upgrade --reuse-values`` with ``values`` on top."""
        self.helm("upgrade", self.name, str(CHART), f"--namespace={self.namespace}",
                  "--reuse-values", f"--values={self._values_file(values)}")  # fmt: skip

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, f"--namespace={self.namespace}", "--wait")

    def operator_deployment(self) -> client.V1Deployment:
        apps = client.AppsV1Api(self.node.api)
        deployments: list[Any] = apps.list_namespaced_deployment(self.namespace).items
        names = [d.metadata.name for d in deployments]
        if len(names) != 1:
            raise RuntimeError(f"not the operator's Deployment alone in {self.namespace}: {names}")
        deployment: client.V1Deployment = deployments[0]
        return deployment

    def wait_operator_ready(self, replicas: int = 2, timeout: float = 240) -> None:
        def ready() -> None:
            status: Any = self.operator_deployment().status
            assert status.ready_replicas == replicas, status

        eventually(ready, timeout=timeout, what=f"the operator's {replicas} replicas Ready")

    def worker(self, node_name: str, timeout: float = 180) -> PodWorker:
        """The chart's GPU worker pod on ``node_name``, once Running."""
        core = client.CoreV1Api(self.node.api)
        pod = running_pod(core, self.namespace, _WORKER_SELECTOR, on_node=node_name,
                          timeout=timeout)  # fmt: skip
        return PodWorker(self.node, pod)


class PodWorker:
    """A worker pod as a place flow runs happen: alive or not, its log, and each run's summary
    as the run wrote it inside the pod."""

    queue: str | None = None  # the deployment's own work queue

    def __init__(self, node: NodeCluster, pod: client.V1Pod) -> None:
        self._core = client.CoreV1Api(node.api)
        self._node = node
        self.pod = pod
        spec: Any = pod.spec
        self.node = str(spec.node_name)
        self.namespace, self.name = _namespace_and_name(pod)

    def check(self) -> None:
        """Raise if the pod stopped running or its worker restarted (runs in it would be lost)."""
        status: Any = self._core.read_namespaced_pod(self.name, self.namespace).status
        restarts = sum(int(c.restart_count) for c in status.container_statuses or [])
        if status.phase != "Running" or restarts:
            raise RuntimeError(f"worker pod {self.name}: {status.phase}, {restarts} restarts")

    def log_tail(self, lines: int = 40) -> str:
        log = self._core.read_namespaced_pod_log(
            self.name, self.namespace, container="worker", tail_lines=lines
        )
        return str(log)

    def summary(self, run_id: UUID) -> dict[str, Any]:
        """The run's summary.json, read from inside the pod."""
        text = kubectl_exec(self._node, self.pod, f"cat {WORKER_OUTPUT}/{run_id}/summary.json")
        summary: dict[str, Any] = json.loads(text)
        return summary

    def env(self, name: str) -> str:
        """An environment variable of the worker's container, read from inside it."""
        return kubectl_exec(self._node, self.pod, f'printf %s "${name}"')
