"""A policy's status from what one reconciliation found: ledger, counts, conditions, workers."""

from __future__ import annotations

from prefect_gpu_operator.domain.status import Outcome, build_status
from prefect_gpu_operator.domain.worker_pods import worker_entries


def test_worker_entries_in_status() -> None:
    limits = [{"name": "gpu:gpu-1", "node": "gpu-1", "limit": 4}]
    assert worker_entries({"gpu-1", "cpu-1"}, limits) == [
        {"node": "cpu-1"},
        {"node": "gpu-1", "limit": "gpu:gpu-1"},
    ]
    status = build_status(
        Outcome(1, prefect_error="down", workers=frozenset({"gpu-1"})), {"limits": limits}, "now"
    )
    assert status["workers"] == [{"node": "gpu-1", "limit": "gpu:gpu-1"}]
