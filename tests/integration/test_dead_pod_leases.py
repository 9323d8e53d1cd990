"""A dead pod's GPU slots come back within seconds: the operator revokes the leases gpu_slot()
published for it, on the real API server and a real Prefect server.

No kubelet runs, so the "pod" is an API object on a node and its holder is a local gpu_slot()
process that carries the pod's uid (``PREFECT_GPU_POD_UID``, what the webhook injects). The holders
use the default 10-minute lease: only the operator can free their slots in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.waiting import eventually, holds
from tests.support.operator import Scene, expect_limits
from tests.support.policies import pool_spec
from tests.support.webhook import Pods

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOLDER = "tests.integration._gpu_slot_holder"
WORKER_LABELS = {"app.kubernetes.io/name": "prefect-worker", "prefectgpu.io/has-worker-id": "true"}
FREED_WITHIN = 5.0
"""Seconds from a pod's deletion (or failure) until its slots are free on the server."""
WORKER = [
    {
        "name": "worker",
        "image": "prefect",
        "env": [{"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    }
]


@pytest.fixture
def pods(kube_api: client.ApiClient) -> Iterator[Pods]:
    created = Pods(kube_api)
    yield created
    created.delete_all()


class Holders:
    """gpu_slot() processes standing in for the flow runs of pods; killed at the end."""

    def __init__(self, api_url: str, tmp_path: Path, scene: Scene) -> None:
        self.api_url = api_url
        self.scene = scene
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, node: str, pod: dict[str, Any], name: str
    ) -> tuple[subprocess.Popen[bytes], Path]:
        events = self.tmp_path / f"{name}.jsonl"
        env = {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "WORKER_ID": node,
            "PREFECT_GPU_POD_UID": pod["metadata"]["uid"],
            # One lock directory per pod, as each container has its own /tmp.
            "PREFECT_GPU_LOCK_DIR": str(self.tmp_path / f"locks-{name}"),
        }
        env.pop("PREFECT_GPU_LEASE_SECONDS", None)  # the default lease: 10 minutes
        until = self.tmp_path / f"{name}.done"
        command = [sys.executable, "-m", HOLDER, "--events", str(events), "--until", str(until)]
        with events.with_suffix(".log").open("ab") as log:
            holder = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.started.append(holder)
        eventually(
            lambda: _entered(events),
            timeout=60,
            what=f"{name} holds a slot",
            alive=lambda: holder.poll() is None,
        )
        # Its keeper publishes the lease just after the block starts (a holder killed sooner
        # leaves its slot to the lease's expiry).
        eventually(lambda: _lease_variables(self.scene, pod) != [], timeout=10, what="published")
        return holder, events

    def stop(self) -> None:
        for holder in self.started:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)


def _entered(events: Path) -> bool:
    return events.exists() and '"event": "enter"' in events.read_text()


@pytest.fixture
def holders(scene: Scene, tmp_path: Path) -> Iterator[Holders]:
    started = Holders(scene.api_url, tmp_path, scene)
    yield started
    started.stop()


def _active_slots(scene: Scene, name: str) -> int:
    return int(scene.limits.all()[name]["active_slots"])


def _lease_variables(scene: Scene, pod: dict[str, Any]) -> list[str]:
    uid = pod["metadata"]["uid"]
    body = {"variables": {"name": {"like_": uid}}, "limit": 200}
    response = scene.limits.http.post("/variables/filter", json=body)
    response.raise_for_status()
    return [item["name"] for item in response.json()]


def _freed_within_seconds(scene: Scene, limit: str, left: int, whose: str) -> None:
    """Wait (at most FREED_WITHIN) until ``left`` slots of ``limit`` stay counted; say how long
    it took since now, the moment the pod went."""
    gone = time.monotonic()
    eventually(
        lambda: _active_slots(scene, limit) == left,
        timeout=FREED_WITHIN,
        what=f"the slot of {whose} freed",
    )
    print(f"slot of {whose} free {time.monotonic() - gone:.2f} s after it went")


def test_a_deleted_pods_slots_are_free_within_seconds_and_a_live_pods_stay_held(
    scene: Scene, pods: Pods, holders: Holders, tmp_path: Path
) -> None:
    scene.nodes.create("dp-a", 2, labels={"pool": "dp"})
    scene.policies.create("dp", pool_spec(scene.api_url, "dp"))
    expect_limits(scene.limits, "gpu:dp-", {"gpu:dp-a": 2})
    dead = pods.create("dp-dead", WORKER_LABELS, containers=WORKER, node="dp-a")
    live = pods.create("dp-live", WORKER_LABELS, containers=WORKER, node="dp-a")
    doomed, _ = holders.start("dp-a", dead, "dead")
    survivor, _ = holders.start("dp-a", live, "live")
    assert _active_slots(scene, "gpu:dp-a") == 2
    assert _lease_variables(scene, dead) == [f"prefect-gpu-lease_{dead['metadata']['uid']}_0"]

    doomed.send_signal(signal.SIGKILL)  # the kubelet would kill it with the pod
    doomed.wait(timeout=10)
    # Dead, but nothing local adopts its lease (its pod's lock directory is gone with it), and
    # the server counts the slot until the lease expires, minutes from now.
    holds(lambda: _active_slots(scene, "gpu:dp-a") == 2, duration=2.0, what="slot still counted")

    pods.delete("dp-dead")
    _freed_within_seconds(scene, "gpu:dp-a", 1, "a deleted pod")
    assert _lease_variables(scene, dead) == []
    # The live pod's holder keeps its slot and still renews its lease.
    holds(lambda: _active_slots(scene, "gpu:dp-a") == 1, duration=2.0, what="live slot held")
    assert survivor.poll() is None
    (tmp_path / "live.done").touch()
    assert survivor.wait(timeout=30) == 0
    eventually(lambda: _active_slots(scene, "gpu:dp-a") == 0, timeout=10, what="live released")


def test_a_failed_pods_slots_are_free_within_seconds_before_it_is_deleted(
    scene: Scene, pods: Pods, holders: Holders, core_v1: client.CoreV1Api
) -> None:
    scene.nodes.create("df-a", 1, labels={"pool": "df"})
    scene.policies.create("df", pool_spec(scene.api_url, "df"))
    expect_limits(scene.limits, "gpu:df-", {"gpu:df-a": 1})
    pod = pods.create("df-worker", WORKER_LABELS, containers=WORKER, node="df-a")
    holder, _ = holders.start("df-a", pod, "failed")
    assert _active_slots(scene, "gpu:df-a") == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    # What the kubelet reports when the pod's containers died for good (restartPolicy Never).
    core_v1.patch_namespaced_pod_status("df-worker", "default", {"status": {"phase": "Failed"}})
    _freed_within_seconds(scene, "gpu:df-a", 0, "a failed pod")
    assert _lease_variables(scene, pod) == []
