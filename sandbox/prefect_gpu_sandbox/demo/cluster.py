"""``prefect-gpu-sandbox demo --cluster``: the demo's story on a real node, through the chart.

1. A single-node cluster in a network namespace of its own (etcd, kube-apiserver, controller
   manager, scheduler, containerd with runc, the kubelet, kube-proxy) and a Prefect server, with
   a fake GPU device plugin advertising two ``nvidia.com/gpu`` (UUIDs, as NVIDIA's plugin sets
   ``NVIDIA_VISIBLE_DEVICES``). It needs root.
2. The operator and worker images built offline from the Dockerfile (cached after the first
   time) and loaded into the node's containerd.
3. ``helm install`` into a namespace that enforces restricted Pod Security: the operator (two
   replicas, peering, the webhook behind its Service) and the chart's GPU worker DaemonSet.
4. A GPULimitPolicy makes ``gpu:<node>`` = 2; a Deployment's pod gets ``WORKER_ID`` from the
   webhook, read back from inside its container.
5. The bundled deployment runs four times at once on the worker pod; each run's summary, read
   from inside the pod, says which device UUID its GPU step saw; a timeline shows the steps
   gated by the node's limit, and the worker pod's slots-metrics container (``prefect-gpu-slots
   --serve``), scraped meanwhile, shows the slots held and the runs waiting.
6. The plugin advertises a third GPU and the limit follows. Everything stops on exit, Ctrl-C
   included.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from prefect_gpu_operator.api.policy import GROUP, PLURAL, VERSION
from prefect_gpu_sandbox.demo import workers as demo_workers
from prefect_gpu_sandbox.demo.report import limits, print_limits, step, wait_for_limits
from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.on_node import (
    GPU_NODE_LABELS,
    PodWorker,
    Release,
    image_values,
    kubectl_exec,
    load_images,
    opted_in_deployment,
    restricted_namespace,
    running_pod,
    worker_values,
)
from prefect_gpu_sandbox.processes import interrupt_safe

__all__ = ["FAKE_GPUS", "RUNS", "SLOTS_METRICS_PORT", "run_cluster_demo"]

FAKE_GPUS = 2
RUNS = 4
"""Flow runs at once on the node's worker: twice its GPUs, so they queue for the slots."""
DOCUMENT_COPIES = 40
OPERATOR_NAMESPACE = "prefect-gpu-operator"
SLOTS_METRICS_PORT = 9465
"""The chart's default port of the GPU worker's slots-metrics container."""
APPS_NAMESPACE = "prefect"


def _install(node: NodeCluster, images: dict[str, str]) -> Release:
    core = client.CoreV1Api(node.api)
    restricted_namespace(core, OPERATOR_NAMESPACE)
    release = Release(node, OPERATOR_NAMESPACE)
    worker = worker_values(
        images["worker"],
        prefect_api_url=node.pod_prefect_api_url,
        work_pool=demo_workers.POOL,
        gpus=FAKE_GPUS,
    )
    values: dict[str, Any] = {
        "operator": {"image": image_values(images["operator"])},
        "inferenceWorker": {**worker, "slotsMetrics": {"enabled": True}},
    }
    release.install(values)
    step(
        f"helm install {release.name} charts/prefect-gpu-operator -n {OPERATOR_NAMESPACE} "
        "(namespace enforcing restricted Pod Security; inferenceWorker.enabled=true, "
        "inferenceWorker.slotsMetrics.enabled=true)"
    )
    release.wait_operator_ready()
    step("the operator's 2 replicas are Ready through their probes (kopf peering: one active)")
    return release


def _policy(node: NodeCluster, http: httpx.Client) -> None:
    policy = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPULimitPolicy",
        "metadata": {"name": "default"},
        "spec": {"server": {"remoteApiUrl": node.pod_prefect_api_url}},
    }
    client.CustomObjectsApi(node.api).create_cluster_custom_object(GROUP, VERSION, PLURAL, policy)
    step("applied GPULimitPolicy 'default' (every node, nvidia.com/gpu, 1 slot per GPU)")
    took = wait_for_limits(http, {f"gpu:{node.node_name}": FAKE_GPUS}, 120)
    step(f"the operator created the node's limit in {took:.2f} s:")
    print_limits(http)


def _webhook(node: NodeCluster, busybox: str) -> None:
    core = client.CoreV1Api(node.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=APPS_NAMESPACE)))
    apps = client.AppsV1Api(node.api)
    body = opted_in_deployment(busybox)  # a plain dict, which the client sends as it is
    apps.create_namespaced_deployment(APPS_NAMESPACE, body)  # type: ignore[arg-type]
    pod = running_pod(core, APPS_NAMESPACE, "app=opted-in")
    seen = kubectl_exec(node, pod, 'echo "$WORKER_ID"').strip()
    step(
        f"a pod of Deployment {APPS_NAMESPACE}/opted-in (label prefectgpu.io/inject-worker-id, no "
        f"WORKER_ID of its own) runs with WORKER_ID={seen}, read from inside its container"
    )
    apps.delete_namespaced_deployment("opted-in", APPS_NAMESPACE)


def _inference(node: NodeCluster, release: Release, http: httpx.Client, work: Path) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    client.CoreV1Api(node.api).patch_node(node.node_name, {"metadata": {"labels": GPU_NODE_LABELS}})
    step(f"labelled {node.node_name} {GPU_NODE_LABELS} (as GPU feature discovery does)")
    worker = release.worker(node.node_name)
    step(
        f"the chart's GPU worker pod {worker.name} is Running: "
        f"WORKER_ID={worker.env('WORKER_ID')}, "
        f"NVIDIA_VISIBLE_DEVICES={worker.env('NVIDIA_VISIBLE_DEVICES')} (set by the device plugin)"
    )
    documents = f"/tmp/documents-{uuid.uuid4().hex[:6]}.jsonl"
    _write_documents(node, worker, documents)
    with SyncPrefectClient(node.prefect_api_url) as prefect:
        deployment = demo_workers.create_deployment(prefect, ())
        step(f"deployed {demo_workers.DEPLOYMENT} to pool {demo_workers.POOL}")
        started = time.perf_counter()
        with _scraping_slots(node, worker) as scraped:
            runs = demo_workers.run_flows(
                prefect,
                deployment,
                [worker],
                runs_per_node=RUNS,
                parameters={"documents_path": documents},
                timeout=600,
                report=step,
            )
    step(f"all {len(runs)} flow runs Completed in {time.perf_counter() - started:.1f} s")
    step(
        f"the worker pod's slots-metrics container, scraped {len(scraped.samples)} times "
        f"meanwhile: up to {scraped.most('prefect_gpu_slots_held')} slot(s) held and "
        f"{scraped.most('prefect_gpu_slots_waiting')} run(s) waiting, limit "
        f"{scraped.most('prefect_gpu_slots_limit')}"
    )
    demo_workers.print_timeline(runs, {name: item["limit"] for name, item in limits(http).items()})
    for run in sorted(runs, key=lambda run: run.name):
        print(
            f"    {run.name}: CUDA_VISIBLE_DEVICES={run.summary['cuda_visible_devices']} inside "
            f"its slot (container: {run.summary['nvidia_visible_devices']})"
        )
    demo_workers.write_timeline(runs, work / "timeline.json")
    print(f"    (as JSON: {work / 'timeline.json'}; summaries read from inside {worker.name})")


_SCRAPE = (
    "import urllib.request; "
    f"print(urllib.request.urlopen('http://127.0.0.1:{SLOTS_METRICS_PORT}/metrics').read().decode())"
)


@dataclass
class _Scraped:
    """Per scrape of the slots-metrics container: the node's gauges (name -> value)."""

    samples: list[dict[str, float]] = field(default_factory=list)
    failed: Exception | None = None

    def most(self, gauge: str) -> int:
        return int(max((sample.get(gauge, 0.0) for sample in self.samples), default=0.0))


@contextlib.contextmanager
def _scraping_slots(node: NodeCluster, worker: PodWorker) -> Iterator[_Scraped]:
    """Scrape the worker pod's slots-metrics container every second while the block runs, from
    inside the pod (the containers share its network), as Prometheus would from outside."""
    scraped = _Scraped()
    done = threading.Event()

    def scrape() -> None:
        try:
            while not done.wait(1.0):
                text = kubectl_exec(node, worker.pod, f'python -c "{_SCRAPE}"')
                scraped.samples.append(
                    {
                        sample.name: sample.value
                        for family in text_string_to_metric_families(text)
                        for sample in family.samples
                        if sample.labels == {"node": node.node_name}
                    }
                )
        except Exception as error:
            scraped.failed = error

    scraper = threading.Thread(target=scrape, name="slots-metrics", daemon=True)
    scraper.start()
    try:
        yield scraped
    finally:
        done.set()
        scraper.join(timeout=30)
    if scraped.failed is not None:
        raise RuntimeError("scraping the slots-metrics container failed") from scraped.failed


def _write_documents(node: NodeCluster, worker: PodWorker, path: str) -> None:
    """The bundled samples many times over, written inside the worker pod, so that each run's
    GPU step takes a moment and the runs queue for the node's slots."""
    script = (
        "import json, importlib.resources as r; "
        "lines = [l for l in (r.files('prefect_gpu_flows') / 'data' / 'sample_documents.jsonl')"
        ".read_text().splitlines() if l.strip()]; "
        f"open({path!r}, 'w').write(''.join(l + chr(10) for l in lines * {DOCUMENT_COPIES}))"
    )
    kubectl_exec(node, worker.pod, f'python -c "{script}"')


def _follow_the_plugin(node: NodeCluster, http: httpx.Client) -> None:
    node.set_fake_gpus(FAKE_GPUS + 1)
    step(f"the device plugin now advertises {FAKE_GPUS + 1} GPUs")
    took = wait_for_limits(http, {f"gpu:{node.node_name}": FAKE_GPUS + 1}, 120)
    step(f"the limit followed in {took:.2f} s:")
    print_limits(http)


def run_cluster_demo(directory: Path) -> None:
    demo_workers.check_inference_installed()
    node = NodeCluster(directory / "node", fake_gpus=FAKE_GPUS)
    try:
        step("starting a real node (kubelet, containerd, kube-proxy, its control plane, Prefect)")
        node.start()
        step(f"node {node.node_name} Ready; {FAKE_GPUS} fake nvidia.com/gpu allocatable")
        started = time.perf_counter()
        images = load_images(node, ("operator", "worker"))
        busybox = node.import_busybox_image()
        step(
            f"built (or took from the cache) and imported {', '.join(images.values())} in "
            f"{time.perf_counter() - started:.0f} s"
        )
        with httpx.Client(base_url=node.prefect_api_url, timeout=10) as http:
            release = _install(node, images)
            _policy(node, http)
            _webhook(node, busybox)
            _inference(node, release, http, directory)
            _follow_the_plugin(node, http)
    finally:
        step("stopping the node (no process, mount or namespace stays)")
        interrupt_safe(node.stop)
