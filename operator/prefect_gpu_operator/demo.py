"""``prefect-gpu-operator demo``: the main job on embedded defaults, end to end, on loopback."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubernetes import client, config
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_operator.sandbox.controlplane import ControlPlane
from prefect_gpu_operator.sandbox.prefect_server import PrefectServer

__all__ = ["add_demo_command", "run_demo"]

SIMULATED_NODES = {"gpu-node-1": 4, "gpu-node-2": 2}


def _step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def _servers(directory: Path) -> Iterator[tuple[ControlPlane, PrefectServer]]:
    plane = ControlPlane(directory / "cluster")
    prefect = PrefectServer(directory / "prefect")
    try:
        _step("starting etcd + kube-apiserver on 127.0.0.1")
        plane.start()
        _step(f"kube-apiserver ready at {plane.url}")
        _step("starting a Prefect server (SQLite) on 127.0.0.1")
        prefect.start()
        _step(f"Prefect API ready at {prefect.api_url}")
        yield plane, prefect
    finally:
        _step("stopping the servers")
        prefect.stop()
        plane.stop()


def _simulated_node(name: str, gpus: int) -> client.V1Node:
    """A Node as a kubelet would register it; no kubelet runs, so nothing is scheduled on it."""
    quantities = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/hostname": name}),
        spec=client.V1NodeSpec(
            taints=[client.V1Taint(key="prefectgpu.io/simulated", effect="NoSchedule")]
        ),
        status=client.V1NodeStatus(capacity=quantities, allocatable=quantities),
    )


def _gpus(node: client.V1Node) -> str:
    allocatable = (node.status.allocatable if node.status else None) or {}
    return allocatable.get("nvidia.com/gpu", "0")


async def _prefect_summary() -> str:
    async with get_client() as prefect:
        health = await prefect.api_healthcheck()
        version = await prefect.api_version()
        limits = await prefect.read_global_concurrency_limits(limit=200)
    state = "healthy" if health is None else f"unhealthy: {health}"
    return f"Prefect API {version} {state}; {len(limits)} global concurrency limits"


def run_demo(directory: Path) -> None:
    with _servers(directory) as (plane, prefect):
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
        core = client.CoreV1Api(api)
        for name, gpus in SIMULATED_NODES.items():
            core.create_node(_simulated_node(name, gpus))
            _step(f"created simulated node {name} with nvidia.com/gpu={gpus}")
        for node in core.list_node().items:
            name = (node.metadata.name if node.metadata else None) or "?"
            _step(f"kubectl get node {name}: allocatable nvidia.com/gpu={_gpus(node)}")
        with temporary_settings(updates={PREFECT_API_URL: prefect.api_url}):
            _step(asyncio.run(_prefect_summary()))
        api.close()


def _demo(args: argparse.Namespace) -> int:
    if args.dir is not None:
        run_demo(args.dir)
        return 0
    with tempfile.TemporaryDirectory(prefix="prefect-gpu-demo-") as directory:
        run_demo(Path(directory))
    return 0


def add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo", help="start a local cluster and Prefect server and show the operator at work"
    )
    demo.add_argument("--dir", type=Path, default=None, help="keep state here (default: temp)")
    demo.set_defaults(handler=_demo)
