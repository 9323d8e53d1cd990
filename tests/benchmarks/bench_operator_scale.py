"""The operator at 1,000 GPU nodes: cold start, change latency, noise immunity, resync cost.

Run: ``python tests/benchmarks/bench_operator_scale.py [--nodes 1000] [--rate 5] [--seconds 60]
[--runs 1] [--database sqlite|postgres] [--write-concurrency 12]`` (not collected by pytest);
``--write-concurrency 1`` is the sequential baseline of the parallel Prefect writes. Each run
starts its own etcd + kube-apiserver, Prefect server (SQLite, or PostgreSQL from Debian's
``postgresql`` package) and operator on 127.0.0.1 and prints:

1. cold start: nodes exist before the operator starts; seconds until every GCL is correct, the
   Prefect API calls it made, the operator's peak RSS;
2. change latency: allocatable of random nodes changed at ``rate``/s for ``seconds``; from the
   status patch to the GCL showing the new limit (p50/p95/p99/max);
3. noise: one update per node that leaves its slots unchanged; Prefect calls and operator CPU;
4. resync: one full reconcile with nothing to change; its Prefect calls and duration.

``--realistic --nodes 5000 --pods 20000`` builds a cluster that looks real instead: ~15 KB nodes
(GFD/NFD/topology labels, 50 images, conditions; nvidia.com/gpu on ``--gpu-fraction`` of them),
``--pods`` pods bound to nodes (``--workers`` of them Prefect workers requesting GPUs, labelled
prefectgpu.io/has-worker-id), and adds:

5. churn: GFD rewrites its timestamp label on every GPU node; Prefect calls and policy wake-ups
   (reconciles triggered by a change) it caused, both targets 0;
6. the policy's status size in bytes, the final peak RSS, and a cold start again with one Prefect
   write at a time (the sequential baseline) on the same cluster, with its ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.support

import httpx
from kubernetes import client, config
from tests.support.nodes import gpu_node_body
from tests.support.operator import OperatorProcess, PrefectLimitsReader
from tests.support.realistic import GFD_TIMESTAMP, realistic_node_body, realistic_pod_body

from prefect_gpu_operator.api.crd import build_crd
from prefect_gpu_operator.api.policy import GROUP, PLURAL, VERSION
from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.processes import interrupt_safe
from prefect_gpu_sandbox.waiting import eventually

PROFILE = ""
DATABASE = "sqlite"
WRITE_CONCURRENCY = 12
REALISTIC = False
PODS = 20_000
WORKERS = 300
GPU_FRACTION = 0.4
TRACEMALLOC = ""
RESOURCES = ("nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "amd.com/gpu")


def _resources(rng: random.Random) -> dict[str, int]:
    kind = rng.choices(RESOURCES, weights=(8, 1, 1))[0]
    return {kind: rng.randint(1, 8)}


def _limits(http: httpx.Client) -> dict[str, int]:
    found: dict[str, int] = {}
    offset = 0
    while True:
        page = http.post("/v2/concurrency_limits/filter", json={"limit": 200, "offset": offset})
        page.raise_for_status()
        found.update({item["name"]: item["limit"] for item in page.json()})
        if len(page.json()) < 200:
            return found
        offset += 200


def _proc(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return peak / 1024, (int(fields[11]) + int(fields[12])) / ticks


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_once(nodes: int, rate: float, seconds: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    results: dict[str, float] = _Results()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        plane = ControlPlane(root / "cluster")
        postgres = PostgresServer() if DATABASE == "postgres" else None
        prefect = PrefectServer(
            root / "prefect", database_url=postgres.database_url if postgres else None
        )
        operator: OperatorProcess | None = None
        try:
            plane.start()
            if postgres is not None:
                postgres.start()
            prefect.start()
            api = config.new_client_from_config(config_file=str(plane.kubeconfig))
            core = client.CoreV1Api(api)
            custom = client.CustomObjectsApi(api)
            client.ApiextensionsV1Api(api).create_custom_resource_definition(build_crd())
            eventually(lambda: _established(api), timeout=30, what="CRD", interval=0.2)
            core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name="prefect-gpu-operator"))
            )
            allocatable = _create_cluster(core, nodes, rng, results)
            expected = {f"gpu:{name}": sum(gpus.values()) for name, gpus in allocatable.items()}
            custom.create_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "GPULimitPolicy",
                    "metadata": {"name": "bench"},
                    "spec": {
                        "server": {"remoteApiUrl": prefect.api_url},
                        "resources": list(RESOURCES),
                    },
                },
            )
            http = httpx.Client(base_url=prefect.api_url, timeout=30)

            # 1. cold start
            operator = OperatorProcess(
                plane.kubeconfig,
                root / "operator.log",
                resync_seconds=3600,
                verbose=False,
                extra_env={
                    "PREFECT_GPU_OPERATOR_PREFECT_WRITE_CONCURRENCY": str(WRITE_CONCURRENCY),
                    **_memtrace_env(),
                },
            )
            started = time.perf_counter()
            operator.start()
            eventually(
                lambda: _limits(http) == expected, timeout=300, what="cold start", interval=0.2
            )
            results["cold_start_s"] = time.perf_counter() - started
            results["cold_start_prefect_calls"] = operator.prefect_calls()
            results["cold_start_peak_rss_mb"] = _proc(operator.process.pid)[0]
            if REALISTIC:
                status = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "bench")["status"]
                results["policy_status_bytes"] = len(json.dumps(status, separators=(",", ":")))

            # 2. change latency
            if PROFILE:
                import subprocess

                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(operator.process.pid),
                        "-o",
                        PROFILE,
                        "-d",
                        str(int(seconds)),
                        "-f",
                        "speedscope",
                    ]
                )
            latencies: list[float] = []
            pending: dict[str, tuple[int, float]] = {}
            lock = threading.Lock()
            issuing = threading.Event()
            issuing.set()

            def watch() -> None:
                # One poller for all pending changes, one GET every few ms: the measurement must
                # not load the Prefect server it measures.
                while issuing.is_set() or pending:
                    with lock:
                        todo = list(pending.items())
                    for name, (gpus, began) in todo:
                        limit = http.get(f"/v2/concurrency_limits/gpu:{name}").json()["limit"]
                        if limit == gpus:
                            with lock:
                                latencies.append(time.perf_counter() - began)
                                del pending[name]
                        elif time.perf_counter() - began > 60:
                            raise TimeoutError(name)
                        time.sleep(0.002)
                    if not todo:
                        time.sleep(0.002)

            def change(name: str, gpus: int) -> None:
                resource = next(iter(allocatable[name]))
                began = time.perf_counter()
                core.patch_node_status(name, {"status": {"allocatable": {resource: str(gpus)}}})
                with lock:
                    pending[name] = (gpus, began)

            poller = threading.Thread(target=watch, daemon=True)
            poller.start()
            changes = int(rate * seconds)
            names = rng.sample(sorted(allocatable), changes)  # distinct: no overlapping changes
            tick = time.perf_counter()
            try:
                for name in names:
                    current = sum(allocatable[name].values())
                    gpus = rng.choice([g for g in range(0, 9) if g != current])
                    allocatable[name] = {next(iter(allocatable[name])): gpus}
                    change(name, gpus)
                    tick += 1 / rate
                    time.sleep(max(0.0, tick - time.perf_counter()))
            finally:
                issuing.clear()
            poller.join(timeout=120)
            if PROFILE:
                spy.wait()
            for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"), (1.0, "max")):
                results[f"change_{key}_ms"] = _percentile(latencies, q) * 1000

            # 3. noise
            calls, (_, cpu) = operator.prefect_calls(), _proc(operator.process.pid)
            with _pool(8) as pool:
                list(
                    pool.map(
                        lambda name: core.patch_node_status(
                            name,
                            {
                                "status": {
                                    "conditions": [
                                        {
                                            "type": "Ready",
                                            "status": "True",
                                            "reason": "KubeletReady",
                                            "lastHeartbeatTime": "2026-11-26T00:00:00Z",
                                        }
                                    ]
                                }
                            },
                        ),
                        sorted(allocatable),
                    )
                )
            _barrier(core, http, allocatable)
            results["noise_prefect_calls"] = operator.prefect_calls() - calls - 1
            results["noise_cpu_s"] = _proc(operator.process.pid)[1] - cpu

            if REALISTIC:
                # 5. GFD timestamp churn on every GPU node: no verdict changes, nothing to do.
                calls = operator.prefect_calls()
                wakes = _change_reconciles(operator)
                stamp = str(int(time.time()))
                with _pool(8) as pool:
                    list(
                        pool.map(
                            lambda name: core.patch_node(
                                name, {"metadata": {"labels": {GFD_TIMESTAMP: stamp}}}
                            ),
                            sorted(allocatable),
                        )
                    )
                _barrier(core, http, allocatable)
                results["churn_prefect_calls"] = operator.prefect_calls() - calls - 1
                results["churn_policy_wakeups"] = _change_reconciles(operator) - wakes - 1
                results["peak_rss_mb"] = _proc(operator.process.pid)[0]

                # 6. the sequential baseline: the same cold start, one Prefect write at a time.
                operator.stop()
                _delete_limits(prefect.api_url)
                expected = {f"gpu:{n}": sum(gpus.values()) for n, gpus in allocatable.items()}
                operator = OperatorProcess(
                    plane.kubeconfig,
                    root / "operator-sequential.log",
                    resync_seconds=3600,
                    verbose=False,
                    extra_env={"PREFECT_GPU_OPERATOR_PREFECT_WRITE_CONCURRENCY": "1"},
                )
                started = time.perf_counter()
                operator.start()
                eventually(
                    lambda: _limits(http) == expected,
                    timeout=600,
                    what="sequential cold start",
                    interval=0.2,
                )
                results["cold_start_sequential_s"] = time.perf_counter() - started
                results["cold_start_ratio_sequential"] = (
                    results["cold_start_sequential_s"] / results["cold_start_s"]
                )

            # 4. resync: restart the operator with a short resync and time one full pass.
            operator.stop()
            operator = OperatorProcess(
                plane.kubeconfig, root / "operator2.log", resync_seconds=5, verbose=False
            )
            operator.start()
            eventually(lambda: _full_reconciles(operator) >= 2, timeout=60, what="two resyncs")
            first_calls = operator.prefect_calls()
            eventually(lambda: _full_reconciles(operator) >= 3, timeout=60, what="a resync")
            results["resync_prefect_calls"] = operator.prefect_calls() - first_calls
            results["resync_s"] = operator.metric(
                "prefect_gpu_operator_reconcile_seconds_sum", trigger="full"
            ) / _full_reconciles(operator)
            http.close()
            api.close()
        finally:
            # Held against a second Ctrl-C: an interrupted clean-up would leave servers behind.
            if operator is not None:
                interrupt_safe(operator.stop)
            interrupt_safe(prefect.stop)
            if postgres is not None:
                interrupt_safe(postgres.stop)
            interrupt_safe(plane.stop)
    return results


@contextmanager
def _pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for API calls; on Ctrl-C the queued calls are dropped, not waited for."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _memtrace_env() -> dict[str, str]:
    """With --tracemalloc: the operator writes its top allocation sites at its traced peak."""
    if not TRACEMALLOC:
        return {}
    hook = Path(__file__).resolve().parents[1] / "support" / "memtrace"
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, "MEMTRACE_OUT": str(Path(TRACEMALLOC).resolve())}


def _create_cluster(
    core: client.CoreV1Api, nodes: int, rng: random.Random, results: dict[str, float]
) -> dict[str, dict[str, int]]:
    """Create the nodes (and, realistic, the pods); return each GPU node's allocatable."""
    allocatable: dict[str, dict[str, int]] = {}
    bodies = []
    for index in range(nodes):
        if not REALISTIC:
            name = f"gpu-{index:04d}"
            allocatable[name] = _resources(rng)
            bodies.append(gpu_node_body(name, allocatable[name]))
        elif rng.random() < GPU_FRACTION:
            name = f"gpu-{index:04d}"
            allocatable[name] = {"nvidia.com/gpu": rng.choice((1, 2, 4, 8))}
            bodies.append(realistic_node_body(name, index, allocatable[name]))
        else:
            bodies.append(realistic_node_body(f"cpu-{index:04d}", index))
    started = time.perf_counter()
    with _pool(16) as pool:
        list(pool.map(core.create_node, bodies))
        if REALISTIC:
            names = [body["metadata"]["name"] for body in bodies]  # type: ignore[index]
            gpu_names = sorted(allocatable)
            pods = [
                (
                    "prefect",
                    realistic_pod_body(
                        f"worker-{i}", gpu_names[i % len(gpu_names)], worker=True, gpus=1
                    ),
                )
                if i < WORKERS
                else (f"apps-{i % 20}", realistic_pod_body(f"app-{i}", names[i % len(names)]))
                for i in range(PODS)
            ]
            for namespace in {namespace for namespace, _ in pods}:
                core.create_namespace(
                    client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
                )
            list(pool.map(lambda pod: core.create_namespaced_pod(*pod), pods))
    results["cluster_create_s"] = time.perf_counter() - started
    return allocatable


def _barrier(
    core: client.CoreV1Api, http: httpx.Client, allocatable: dict[str, dict[str, int]]
) -> None:
    """A real change after a burst of updates: once it shows, the operator has seen them all."""
    last = sorted(allocatable)[0]
    target = (sum(allocatable[last].values()) + 1) % 9
    resource = next(iter(allocatable[last]))
    allocatable[last] = {resource: target}
    core.patch_node_status(last, {"status": {"allocatable": {resource: str(target)}}})
    eventually(
        lambda: http.get(f"/v2/concurrency_limits/gpu:{last}").json()["limit"] == target,
        timeout=60,
        what="the barrier change",
    )


def _delete_limits(api_url: str) -> None:
    reader = PrefectLimitsReader(api_url)  # one at a time: parallel deletes reset connections
    try:
        for name in reader.limits():
            reader.delete(name)
    finally:
        reader.close()


class _Results(dict[str, float]):
    """Figures of one run, each also printed when measured: a later phase that fails loses none."""

    def __setitem__(self, key: str, value: float) -> None:
        print(f"  {key:28} {value:10.2f}", file=sys.stderr, flush=True)
        super().__setitem__(key, value)


def _change_reconciles(operator: OperatorProcess) -> float:
    return operator.metric("prefect_gpu_operator_reconciles_total", trigger="change")


def _full_reconciles(operator: OperatorProcess) -> float:
    return operator.metric("prefect_gpu_operator_reconcile_seconds_count", trigger="full")


def _established(api: client.ApiClient) -> bool:
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=None, help="default 1, 3 with --realistic")
    parser.add_argument("--realistic", action="store_true", help="~15 KB nodes, pods, churn")
    parser.add_argument("--pods", type=int, default=20_000, help="with --realistic")
    parser.add_argument("--workers", type=int, default=300, help="of the pods, Prefect workers")
    parser.add_argument("--gpu-fraction", type=float, default=0.4, help="nodes with GPUs")
    parser.add_argument("--profile", default="", help="py-spy the operator during the changes")
    parser.add_argument(
        "--tracemalloc", default="", help="file for the operator's top allocation sites at peak"
    )
    parser.add_argument(
        "--database", choices=("sqlite", "postgres"), default="sqlite", help="Prefect's backend"
    )
    parser.add_argument(
        "--write-concurrency", type=int, default=12, help="Prefect writes at a time (1: baseline)"
    )
    args = parser.parse_args()
    global PROFILE, DATABASE, WRITE_CONCURRENCY, REALISTIC, PODS, WORKERS, GPU_FRACTION, TRACEMALLOC
    TRACEMALLOC = args.tracemalloc
    REALISTIC, PODS, WORKERS, GPU_FRACTION = (
        args.realistic,
        args.pods,
        args.workers,
        args.gpu_fraction,
    )
    args.runs = args.runs or (3 if REALISTIC else 1)
    WRITE_CONCURRENCY = args.write_concurrency
    PROFILE = args.profile
    DATABASE = args.database
    runs = [run_once(args.nodes, args.rate, args.seconds, seed) for seed in range(args.runs)]
    print(
        f"\n{args.nodes} {'realistic ' if REALISTIC else ''}nodes"
        + (f", {PODS} pods ({WORKERS} workers)" if REALISTIC else "")
        + f", {args.rate:g} changes/s for {args.seconds:g} s, {args.runs} run(s),"
        f" Prefect on {args.database}, {args.write_concurrency} Prefect writes at a time"
    )
    for key in runs[0]:
        values = [run[key] for run in runs]
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {key:28} median {statistics.median(values):10.2f}   runs {each}")


if __name__ == "__main__":
    main()
