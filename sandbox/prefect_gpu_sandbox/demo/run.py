"""``prefect-gpu-sandbox demo``: the main job on embedded defaults, end to end, on loopback.

1. A local kube-apiserver + etcd and Prefect server, the CRD, simulated GPU nodes.
2. The operator with its admission webhook (a certificate made here, the chart's
   MutatingWebhookConfiguration pointed at 127.0.0.1) and a default GPULimitPolicy: one limit per
   GPU node, which follows when a node loses a GPU.
3. Prefect worker pods on two nodes get ``WORKER_ID`` from the webhook; no kubelet runs, so the
   demo starts each worker as a local process with the value the kubelet would give it.
4. The bundled ``embed-documents`` deployment runs three times on each worker; a timeline shows the
   embedding step gated per node (one at a time on a 1-GPU node, two on a 2-GPU node).
5. A node leaves and its limit goes. Every process it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
from kubernetes import client, config

from prefect_gpu_operator.api.crd import build_crd
from prefect_gpu_operator.api.policy import GROUP, PLURAL, VERSION
from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.demo import workers as demo_workers
from prefect_gpu_sandbox.demo.pods import WorkerPod, create_worker_pod
from prefect_gpu_sandbox.demo.report import limits, print_limits, step, wait_for_limits
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.processes import ServerProcess, free_port, interrupt_safe
from prefect_gpu_sandbox.waiting import eventually
from prefect_gpu_sandbox.webhook import WebhookEndpoint

__all__ = ["add_demo_command", "run_demo"]

SIMULATED_NODES = {"gpu-node-1": 2, "gpu-node-2": 2, "cpu-node-1": None}
OPERATOR_NAMESPACE = "prefect-gpu-operator"
WORKER_NAMESPACE = "prefect"
WORKER_NODES = ("gpu-node-1", "gpu-node-2")
RUNS_PER_NODE = 3
DOCUMENT_COPIES = 20
"""Each run embeds the 12 bundled samples this many times over, so that its GPU step takes a
moment and the runs of a node queue for its slots."""


@contextmanager
def _servers(directory: Path) -> Iterator[tuple[ControlPlane, PrefectServer]]:
    plane = ControlPlane(directory / "cluster")
    prefect = PrefectServer(directory / "prefect")
    try:
        step("starting etcd + kube-apiserver on 127.0.0.1")
        plane.start()
        step(f"kube-apiserver ready at {plane.url}")
        step("starting a Prefect server (SQLite) on 127.0.0.1")
        prefect.start()
        step(f"Prefect API ready at {prefect.api_url}")
        yield plane, prefect
    finally:
        step("stopping the servers")
        interrupt_safe(prefect.stop)
        interrupt_safe(plane.stop)


@contextmanager
def _operator(kubeconfig: Path, directory: Path, webhook: WebhookEndpoint) -> Iterator[None]:
    health = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PREFECT_GPU_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
        "PREFECT_GPU_OPERATOR_HEALTH_ADDRESS": "127.0.0.1",
        "PREFECT_GPU_OPERATOR_HEALTH_PORT": str(health),
        "PREFECT_GPU_OPERATOR_METRICS_PORT": str(free_port()),
        "PREFECT_GPU_OPERATOR_RESYNC_SECONDS": "10",
        **webhook.operator_env(),
    }
    operator = ServerProcess(
        "operator",
        [sys.executable, "-m", "prefect_gpu_operator", "run"],
        log_path=directory / "operator.log",
        env=env,
    )
    step("starting the operator with its webhook (prefect-gpu-operator run)")
    operator.start()
    try:
        operator.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{health}/healthz"), timeout=60)
        operator.wait_ready(webhook.serving, timeout=30)
        step(f"operator running, webhook serving on {webhook.url}; log: {operator.log_path}")
        yield
    finally:
        step("stopping the operator")
        interrupt_safe(operator.stop)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _simulated_node(name: str, gpus: int | None) -> client.V1Node:
    """A Node as a kubelet would register it; no kubelet runs, so nothing is scheduled on it."""
    quantities = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    if gpus is not None:
        quantities["nvidia.com/gpu"] = str(gpus)
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/hostname": name}),
        spec=client.V1NodeSpec(
            taints=[client.V1Taint(key="prefectgpu.io/simulated", effect="NoSchedule")]
        ),
        status=client.V1NodeStatus(capacity=quantities, allocatable=quantities),
    )


def _install_crd(api: client.ApiClient) -> None:
    extensions = client.ApiextensionsV1Api(api)
    # The client serializes a plain dict as it is; the generated CRD is one.
    extensions.create_custom_resource_definition(build_crd())  # type: ignore[arg-type]

    def established() -> bool:
        crd = extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        conditions = (crd.status.conditions if crd.status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    eventually(established, timeout=30, what="the GPULimitPolicy CRD")
    step(f"installed CRD {PLURAL}.{GROUP} (kubectl get glp)")


def _policy_status(custom: client.CustomObjectsApi) -> dict[str, Any]:
    policy = cast(
        dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "default")
    )
    return dict(policy.get("status") or {})


def _print_policy(custom: client.CustomObjectsApi) -> None:
    status = _policy_status(custom)
    ready: dict[str, Any] = next(
        (c for c in status.get("conditions", []) if c["type"] == "Ready"), {}
    )
    print(f"    {'NAME':<10}{'NODES':>6}{'SLOTS':>6}  READY   (kubectl get glp)")
    print(
        f"    {'default':<10}{status.get('nodes', 0):>6}{status.get('totalSlots', 0):>6}  "
        f"{ready.get('status', '?')}   {ready.get('message', '')}"
    )


def _policy_and_limits(
    core: client.CoreV1Api, custom: client.CustomObjectsApi, http: httpx.Client, api_url: str
) -> None:
    policy = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPULimitPolicy",
        "metadata": {"name": "default"},
        "spec": {"server": {"remoteApiUrl": api_url}},
    }
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, policy)
    step("applied GPULimitPolicy 'default' (every node, nvidia.com/gpu, 1 slot per GPU)")
    took = wait_for_limits(http, {"gpu:gpu-node-1": 2, "gpu:gpu-node-2": 2}, 60)
    step(f"the operator created one limit per GPU node in {took:.2f} s:")
    print_limits(http)

    core.patch_node_status("gpu-node-1", {"status": {"allocatable": {"nvidia.com/gpu": "1"}}})
    step("a GPU of gpu-node-1 failed (allocatable nvidia.com/gpu 2 -> 1)")
    took = wait_for_limits(http, {"gpu:gpu-node-1": 1, "gpu:gpu-node-2": 2}, 30)
    step(f"the limit followed in {took * 1000:.0f} ms:")
    print_limits(http)


def _worker_pods(api: client.ApiClient, api_url: str) -> list[WorkerPod]:
    pods = []
    for node in WORKER_NODES:
        pod = create_worker_pod(
            api, WORKER_NAMESPACE, node, pool=demo_workers.POOL, api_url=api_url
        )
        pods.append(pod)
        step(
            f"created pod {WORKER_NAMESPACE}/{pod.name} (labels app.kubernetes.io/name="
            f"prefect-worker, spec.nodeName={node}); it stays Pending (no kubelet)"
        )
        print(f"    env injected by the webhook: {json.dumps(pod.worker_id)}")
        print(f"    -> WORKER_ID={pod.resolved_worker_id()} once the kubelet starts it on {node}")
    return pods


def _inference(directory: Path, pods: list[WorkerPod], http: httpx.Client, api_url: str) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    work = directory / "inference"
    work.mkdir(parents=True, exist_ok=True)
    documents = demo_workers.write_documents(work / "documents.jsonl", DOCUMENT_COPIES)
    output = work / "output"
    with SyncPrefectClient(api_url) as prefect:
        deployment = demo_workers.create_deployment(prefect, WORKER_NODES)
        step(
            f"deployed {demo_workers.DEPLOYMENT} as flows/prefect.yaml declares it, to pool "
            f"{demo_workers.POOL}, with a work queue per node"
        )
        workers = [
            demo_workers.NodeWorker(
                pod.node,
                pod.resolved_worker_id(),
                limit=RUNS_PER_NODE,
                api_url=api_url,
                directory=work,
                output_dir=output,
            )
            for pod in pods
        ]
        with demo_workers.running_workers(workers):
            for worker in workers:
                step(f"started {worker.command}")
            started = time.perf_counter()
            runs = demo_workers.run_flows(
                prefect,
                deployment,
                workers,
                runs_per_node=RUNS_PER_NODE,
                parameters={"documents_path": str(documents.path), "output_dir": str(output)},
                timeout=300,
                report=step,
            )
            step(
                f"all {len(runs)} flow runs Completed in {time.perf_counter() - started:.1f} s "
                f"({documents.count} documents each); stopping the workers"
            )
    demo_workers.print_timeline(runs, {name: item["limit"] for name, item in limits(http).items()})
    demo_workers.write_timeline(runs, work / "timeline.json")
    print(f"    (as JSON: {work / 'timeline.json'}; each run's summary.json under {output})")
    step("the limits after the runs (every slot released):")
    print_limits(http)


def run_demo(directory: Path) -> None:
    demo_workers.check_inference_installed()
    with _servers(directory) as (plane, prefect):
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        http = httpx.Client(base_url=prefect.api_url, timeout=10)
        _install_crd(api)
        for namespace in (OPERATOR_NAMESPACE, WORKER_NAMESPACE):
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        for name, gpus in SIMULATED_NODES.items():
            core.create_node(_simulated_node(name, gpus))
            step(f"created simulated node {name} with nvidia.com/gpu={gpus or 'none'}")
        webhook = WebhookEndpoint(directory / "webhook", name="prefect-gpu-operator-demo")
        step("made the webhook's CA and serving certificate for 127.0.0.1 (pki.py)")
        with _operator(plane.kubeconfig, directory, webhook):
            webhook.register(api, OPERATOR_NAMESPACE)
            step(
                f"registered the chart's MutatingWebhookConfiguration as {webhook.name} -> "
                f"{webhook.url} (failurePolicy Ignore, timeout 5 s)"
            )
            _policy_and_limits(core, custom, http, prefect.api_url)
            pods = _worker_pods(api, prefect.api_url)
            _inference(directory, pods, http, prefect.api_url)

            core.delete_node("gpu-node-2")
            step("gpu-node-2 left the cluster")
            took = wait_for_limits(http, {"gpu:gpu-node-1": 1}, 30)
            step(f"its limit was removed in {took * 1000:.0f} ms (deletionPolicy: Delete)")
            eventually(
                lambda: _policy_status(custom).get("nodes") == 1,
                timeout=30,
                what="the policy status",
            )
            _print_policy(custom)
        http.close()
        api.close()


def _demo(args: argparse.Namespace) -> int:
    run = run_demo
    if args.cluster:
        from prefect_gpu_sandbox.demo.cluster import run_cluster_demo

        run = run_cluster_demo
    try:
        if args.dir is not None:
            run(args.dir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="prefect-gpu-demo-") as directory:
                run(Path(directory))
    except KeyboardInterrupt:
        step("interrupted; everything the demo started has been stopped")
        return 130
    return 0


def add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo", help="start a local cluster and Prefect server and show the operator at work"
    )
    demo.add_argument("--dir", type=Path, default=None, help="keep state here (default: temp)")
    demo.add_argument(
        "--cluster",
        action="store_true",
        help="the same story on a real local node (kubelet, containerd) through the chart, with "
        "the images built from the Dockerfile and real pods; needs root",
    )
    demo.set_defaults(handler=_demo)
