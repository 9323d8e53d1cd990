"""Admission latency of the WORKER_ID webhook, and what it adds to pod creation.

Run: ``python tests/benchmarks/bench_webhook_latency.py [--rate 50] [--seconds 20]`` (not collected
by pytest). It starts its own etcd + kube-apiserver and the operator with the webhook on
127.0.0.1, then creates Prefect worker pods through the API at ``rate``/s for ``seconds``, first
without the MutatingWebhookConfiguration, then with it. Reported:

- the handler's p50/p99 (the operator's ``..._webhook_admission_seconds`` histogram; target p99
  ≤ 20 ms),
- the API server's own round trip to the webhook (``apiserver_admission_webhook_admission_duration
  _seconds``: TLS, kopf, handler, JSONPatch), coarse buckets,
- the client's end-to-end create latency p50/p99 without and with the webhook, and their ratio.

Quantiles from histograms are interpolated within buckets, as PromQL's histogram_quantile does.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.support

from kubernetes import client, config
from prometheus_client.parser import text_string_to_metric_families
from tests.support.operator import OperatorProcess
from tests.support.webhook import WORKER_ID_VAR, Pods, WebhookEndpoint, worker_ids

from prefect_gpu_operator.api.crd import build_crd
from prefect_gpu_sandbox.controlplane import ControlPlane

NAMESPACE = "prefect-gpu-operator"
LABELS = {"app.kubernetes.io/name": "prefect-worker", "app.kubernetes.io/component": "worker"}


def _buckets(text: str, metric: str, **labels: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram, summed over matching series."""
    totals: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{metric}_bucket" and labels.items() <= sample.labels.items():
                bound = float(sample.labels["le"])
                totals[bound] = totals.get(bound, 0.0) + sample.value
    return sorted(totals.items())


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _quantiles(values: Iterable[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(sorted(values), n=100, method="inclusive")
    return cuts[49], cuts[98]


def _load(pods: Pods, prefix: str, rate: float, seconds: float) -> list[float]:
    """Create pods at a fixed rate from a small thread pool; return each create's latency."""
    latencies: list[float] = []
    lock = threading.Lock()

    def create(index: int) -> None:
        started = time.perf_counter()
        pods.create(f"{prefix}-{index}", LABELS)
        with lock:
            latencies.append(time.perf_counter() - started)

    total = int(rate * seconds)
    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for index in range(total):
            delay = begin + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(create, index)
    return latencies


def _ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="pods per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        directory = Path(tmp)
        plane = ControlPlane(directory / "cluster")
        operator: OperatorProcess | None = None
        endpoint = WebhookEndpoint(directory)
        try:
            plane.start()
            api = config.new_client_from_config(config_file=str(plane.kubeconfig))
            core = client.CoreV1Api(api)
            core.create_namespace({"metadata": {"name": NAMESPACE}})
            client.ApiextensionsV1Api(api).create_custom_resource_definition(build_crd())
            operator = OperatorProcess(
                plane.kubeconfig,
                directory / "operator.log",
                namespace=NAMESPACE,
                extra_env=endpoint.operator_env(),
            ).start()
            operator.process.wait_ready(endpoint.serving, timeout=30)
            pods = Pods(api)
            _load(pods, "warmup", args.rate, 1.0)  # connections, caches, imports

            without = _load(pods, "plain", args.rate, args.seconds)
            endpoint.register(api, NAMESPACE)
            deadline = time.monotonic() + 20
            while worker_ids(pods.create(f"probe-{time.monotonic_ns()}", LABELS))["main"] != [
                WORKER_ID_VAR
            ]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the webhook never took effect")
                time.sleep(0.2)
            handler_before = _buckets(
                _metrics(operator), "prefect_gpu_operator_webhook_admission_seconds"
            )
            with_webhook = _load(pods, "mutated", args.rate, args.seconds)

            handler = [
                (bound, count - before)
                for (bound, count), (_, before) in zip(
                    _buckets(_metrics(operator), "prefect_gpu_operator_webhook_admission_seconds"),
                    handler_before,
                    strict=True,
                )
            ]
            apiserver_text = _apiserver_metrics(plane)
            round_trip = _buckets(
                apiserver_text,
                "apiserver_admission_webhook_admission_duration_seconds",
                name="inject-worker-id.prefectgpu.io",
            )
            injected = operator.metric(
                "prefect_gpu_operator_webhook_admissions_total", result="injected"
            )
            errors = operator.metric(
                "prefect_gpu_operator_webhook_admissions_total", result="error"
            )
        finally:
            if operator is not None:
                operator.stop()
            plane.stop()

    p50_without, p99_without = _quantiles(without)
    p50_with, p99_with = _quantiles(with_webhook)
    print(f"pods: {len(without)} without, {len(with_webhook)} with the webhook at {args.rate}/s")
    print(f"injected {injected:.0f}, handler errors {errors:.0f}")
    print(
        f"handler latency:      p50 {_ms(_histogram_quantile(0.5, handler))}, "
        f"p99 {_ms(_histogram_quantile(0.99, handler))} (target p99 <= 20 ms)"
    )
    print(
        f"apiserver->webhook:   p50 {_ms(_histogram_quantile(0.5, round_trip))}, "
        f"p99 {_ms(_histogram_quantile(0.99, round_trip))} (buckets 5/25/100 ms: coarse)"
    )
    print(f"create without:       p50 {_ms(p50_without)}, p99 {_ms(p99_without)}")
    print(f"create with webhook:  p50 {_ms(p50_with)}, p99 {_ms(p99_with)}")
    ratio50, ratio99 = p50_with / p50_without, p99_with / p99_without
    print(f"ratio with/without:   p50 {ratio50:.2f}x, p99 {ratio99:.2f}x")
    return 0


def _apiserver_metrics(plane: ControlPlane) -> str:
    context = ssl.create_default_context(cafile=str(plane.pki / "serving-ca.crt"))
    context.load_cert_chain(plane.pki / "admin.crt", plane.pki / "admin.key")
    with urllib.request.urlopen(f"{plane.url}/metrics", context=context) as response:
        text: str = response.read().decode()
    return text


def _metrics(operator: OperatorProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as response:
        text: str = response.read().decode()
    return text


if __name__ == "__main__":
    sys.exit(main())
