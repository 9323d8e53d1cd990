"""The node's slots as Prometheus metrics, from its lock directory (``_presence``) alone.

Per node: the limit as its claimers last read it, slots held, processes waiting, the longest
wait, each held slot's age; and two gauge histograms (OpenMetrics' type for "how long have the
items in a queue been there"): how long each current waiter has waited, and how long each held
slot has been held. ``prefect-gpu-slots --metrics`` prints them once (for a textfile collector),
``--serve`` serves them on ``/metrics``, read afresh at each scrape; neither asks the Prefect
server anything.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from prometheus_client import generate_latest, start_http_server
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from prefect_gpu_flows._presence import NodeSlots, node_slots

__all__ = [
    "HELD_BUCKETS",
    "WAIT_BUCKETS",
    "SlotsCollector",
    "exposition",
    "families",
    "node_names",
    "parse_address",
    "serve",
]

WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (s) of the waiting-time buckets, +Inf added: a waiter queues seconds to hours."""
HELD_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
"""Upper bounds (s) of the held-time buckets, +Inf added: a GPU step lasts seconds to a day."""


def _buckets(ages: Sequence[float], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative counts: how many ages are at most each bound, ending with +Inf."""
    return [
        ("+Inf" if bound == math.inf else str(bound), sum(age <= bound for age in ages))
        for bound in [*bounds, math.inf]
    ]


def families(nodes: Sequence[NodeSlots], now: float) -> list[Metric]:
    """The metric families of ``nodes`` at ``now`` (epoch seconds)."""
    limit = GaugeMetricFamily(
        "prefect_gpu_slots_limit",
        "The node's GPU limit as its claimers last read it.",
        labels=["node"],
    )
    held = GaugeMetricFamily(
        "prefect_gpu_slots_held", "Slots of the node held by gpu_slot() blocks.", labels=["node"]
    )
    waiting = GaugeMetricFamily(
        "prefect_gpu_slots_waiting", "Processes waiting for slots of the node.", labels=["node"]
    )
    longest = GaugeMetricFamily(
        "prefect_gpu_slots_longest_wait_seconds",
        "How long the longest waiter has waited.",
        labels=["node"],
    )
    slot_age = GaugeMetricFamily(
        "prefect_gpu_slot_held_seconds",
        "How long each held slot has been held.",
        labels=["node", "slot", "device"],
    )
    waits = GaugeHistogramMetricFamily(
        "prefect_gpu_slots_waiting_seconds",
        "How long the processes now waiting for slots of the node have waited.",
        labels=["node"],
    )
    holds = GaugeHistogramMetricFamily(
        "prefect_gpu_slots_held_seconds",
        "How long the slots of the node now held have been held.",
        labels=["node"],
    )
    for node in nodes:
        waited = [max(0.0, now - waiter.since) for waiter in node.waiters]
        ages = [max(0.0, now - holder.since) for holder in node.holders]
        if node.limit is not None:
            limit.add_metric([node.node], node.limit)
        held.add_metric([node.node], len(node.holders))
        waiting.add_metric([node.node], len(node.waiters))
        longest.add_metric([node.node], max(waited, default=0.0))
        for holder, age in zip(node.holders, ages, strict=True):
            slot_age.add_metric([node.node, str(holder.slot), holder.device or ""], age)
        waits.add_metric([node.node], _buckets(waited, WAIT_BUCKETS), sum(waited))
        holds.add_metric([node.node], _buckets(ages, HELD_BUCKETS), sum(ages))
    return [limit, held, waiting, longest, slot_age, waits, holds]


def node_names(root: Path, node: str | None) -> list[str]:
    """``node``, or every node with a lock directory under ``root``."""
    if node is not None:
        return [node]
    return sorted(path.name for path in root.glob("*") if path.is_dir())


class SlotsCollector(Collector):
    """The metrics of the nodes ``read`` returns, read at each collection: no state kept."""

    def __init__(
        self, read: Callable[[], Sequence[NodeSlots]], clock: Callable[[], float] = time.time
    ) -> None:
        self._read = read
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        return families(self._read(), self._clock())


def _registry(collector: Collector) -> CollectorRegistry:
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(collector)
    return metrics


def exposition(nodes: Sequence[NodeSlots], now: float) -> str:
    """The metrics of ``nodes`` at ``now`` in Prometheus' text format."""
    return generate_latest(_registry(SlotsCollector(lambda: nodes, lambda: now))).decode()


def _reader(root: Path, node: str | None) -> Callable[[], list[NodeSlots]]:
    return lambda: [node_slots(root / name) for name in node_names(root, node)]


def parse_address(address: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (HOST may be a bracketed IPv6 address) as (host, port); no HOST: all
    interfaces. ValueError if PORT is not one."""
    host, _, port = address.rpartition(":")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range")
    return host.strip("[]") or "0.0.0.0", number


def serve(root: Path, node: str | None, address: tuple[str, int]) -> None:
    """Serve the metrics on ``address`` (port 0: any free one; the URL is printed) until SIGTERM
    or SIGINT."""
    host, port = address
    stops = {signal.SIGTERM, signal.SIGINT}
    # Blocked before the server's thread starts, so that it inherits the mask and the signals
    # come to sigwait() below; blocked signals also reach a container's PID 1.
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    server, thread = start_http_server(
        port, host, registry=_registry(SlotsCollector(_reader(root, node)))
    )
    try:
        shown = f"[{host}]" if ":" in host else host
        print(f"serving http://{shown}:{server.server_port}/metrics", flush=True)
        signal.sigwait(stops)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
