"""Prometheus metrics of the operator, served on ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ADMISSIONS",
    "ADMISSION_SECONDS",
    "MANAGED_LIMITS",
    "NODE_HELD_SLOTS",
    "NODE_SLOTS",
    "PREFECT_CALLS",
    "PREFECT_ERRORS",
    "PREFECT_THROTTLED",
    "RECONCILES",
    "RECONCILE_SECONDS",
]

PREFECT_CALLS = Counter(
    "prefect_gpu_operator_prefect_api_calls", "Prefect API requests made", ["operation"]
)
PREFECT_ERRORS = Counter(
    "prefect_gpu_operator_prefect_api_errors", "Prefect API requests that failed", ["operation"]
)
PREFECT_THROTTLED = Counter(
    "prefect_gpu_operator_prefect_api_throttled",
    "Prefect API requests refused with 429 Too Many Requests (rate limiting)",
    ["operation"],
)
RECONCILES = Counter(
    "prefect_gpu_operator_reconciles", "Policy reconciliations", ["policy", "trigger"]
)
RECONCILE_SECONDS = Histogram(
    "prefect_gpu_operator_reconcile_seconds",
    "Duration of one policy reconciliation: full (resync, re-reads Prefect) or change",
    ["trigger"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MANAGED_LIMITS = Gauge(
    "prefect_gpu_operator_managed_limits", "Global concurrency limits a policy owns", ["policy"]
)
NODE_SLOTS = Gauge("prefect_gpu_operator_node_slots", "Slots of a node's limit", ["policy", "node"])
NODE_HELD_SLOTS = Gauge(
    "prefect_gpu_operator_node_held_slots",
    "Slots of a node's limit held when Prefect was last read (each resync, and before a lowering)",
    ["policy", "node"],
)
ADMISSIONS = Counter(
    "prefect_gpu_operator_webhook_admissions", "Pods seen by the webhook", ["result"]
)
ADMISSION_SECONDS = Histogram(
    "prefect_gpu_operator_webhook_admission_seconds",
    "Time the webhook handler spends on one pod (selection and patch building)",
    # Fine buckets below the 20 ms budget: the apiserver waits for this on every pod creation.
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
)
