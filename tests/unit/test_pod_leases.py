"""A dead pod's leases: which pods count as dead, which published leases are theirs, and their
revocation through the controller with the in-memory fakes (tests/support/fakes.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from prefect_gpu_operator.domain.pod_leases import DeadPod, dead_pod, pod_leases, prefix_of
from prefect_gpu_operator.runtime.pod_leases import LeaseReaper
from tests.unit.test_controller import World

POD = "0b7c1e2a-1111-4222-8333-444455556666"
OTHER = "0b7c1e2a-1111-4222-8333-444455556667"


def pod(uid: str = POD, node: str | None = "a", phase: str = "Running") -> dict[str, Any]:
    container = {
        "name": "worker",
        "env": [{"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    }
    spec: dict[str, Any] = {"containers": [container]}
    if node is not None:
        spec["nodeName"] = node
    return {
        "metadata": {"uid": uid, "name": f"worker-{uid[-4:]}", "namespace": "ml"},
        "spec": spec,
        "status": {"phase": phase},
    }


def test_a_pod_is_dead_once_deleted_or_finished_and_only_if_it_ran() -> None:
    assert dead_pod(pod(), deleted=False) is None  # running: its holders may be alive
    assert dead_pod(pod(), deleted=True) == DeadPod(POD, "a", f"ml/worker-{POD[-4:]}")
    assert dead_pod(pod(phase="Failed"), deleted=False) is not None
    assert dead_pod(pod(phase="Succeeded"), deleted=False) is not None
    assert dead_pod(pod(node=None), deleted=True) is None  # never scheduled: ran nothing
    assert dead_pod(pod(uid=POD.upper()), deleted=True) == dead_pod(pod(), deleted=True)


def test_only_the_pods_own_well_formed_leases_are_read() -> None:
    lease = str(uuid.uuid4())
    variables: list[dict[str, Any]] = [
        {"name": f"{prefix_of(POD)}1", "value": {"lease_id": lease, "limit": "gpu:a"}},
        {"name": f"{prefix_of(POD)}0", "value": {"lease_id": lease.upper()}},
        {"name": f"{prefix_of(OTHER)}0", "value": {"lease_id": lease}},  # another pod
        {"name": f"{prefix_of(POD)}x", "value": {"lease_id": lease}},  # not a slot
        {"name": f"{prefix_of(POD)}2", "value": {"lease_id": "not-a-uuid"}},
        {"name": f"{prefix_of(POD)}3", "value": "a string"},
        {"name": "prefect-gpu-lease-0b7c1e2a", "value": {"lease_id": lease}},  # `like` matched it
    ]
    found = pod_leases(POD, variables)
    assert [(each.variable, each.lease_id, each.limit) for each in found] == [
        (f"{prefix_of(POD)}0", lease, None),
        (f"{prefix_of(POD)}1", lease, "gpu:a"),
    ]


def _seen(reaper: LeaseReaper, *bodies: dict[str, Any]) -> None:
    """The watch reported these pods running."""
    for body in bodies:
        assert reaper.observe(body, deleted=False) is None


async def _reap(world: World, body: dict[str, Any], deleted: bool) -> int | None:
    task = world.controller.reaper.observe(body, deleted)
    return None if task is None else await asyncio.wait_for(task, timeout=5)


def test_a_deleted_pods_leases_are_revoked_and_others_kept() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        prefect = world.prefect
        mine = [prefect.lease("gpu:a", POD, 0), prefect.lease("gpu:a", POD, 1)]
        theirs = prefect.lease("gpu:a", OTHER, 0)
        world.controller.observe_pod(pod())
        world.controller.observe_pod(pod(OTHER))
        assert prefect.limits["gpu:a"].active_slots == 3
        world.journal.clear()

        assert await _reap(world, pod(), deleted=True) == 2
        assert prefect.limits["gpu:a"].active_slots == 1
        assert set(prefect.leases) == {theirs}
        assert not set(mine) & set(prefect.leases)
        assert list(prefect.variables) == [f"{prefix_of(OTHER)}0"]
        # Each lease is revoked before its record goes: a crash in between leaves it findable.
        revokes = [entry for entry in world.journal if "lease" in entry]
        assert revokes == [
            f"prefect pod-leases {POD}",
            f"prefect revoke-lease {mine[0]}",
            f"prefect forget-lease {prefix_of(POD)}0",
            f"prefect revoke-lease {mine[1]}",
            f"prefect forget-lease {prefix_of(POD)}1",
        ]
        assert world.controller.policies["p"].wake.is_set()  # held slots changed

    asyncio.run(scenario(World()))


def test_a_failed_pod_is_reaped_once_and_not_again_at_its_deletion() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        world.prefect.lease("gpu:a", POD, 0)
        assert await _reap(world, pod(), deleted=False) is None  # running: nothing
        assert await _reap(world, pod(phase="Failed"), deleted=False) == 1
        assert await _reap(world, pod(phase="Failed"), deleted=False) is None  # a later event
        assert await _reap(world, pod(phase="Failed"), deleted=True) is None
        assert world.prefect.calls["pod-leases"] == 1
        assert world.prefect.limits["gpu:a"].active_slots == 0

    asyncio.run(scenario(World()))


def test_a_pod_first_seen_dead_costs_no_request() -> None:
    """The listing at start-up reports finished flow-run pods by the hundred: they died while
    the operator was away, and their leases expire on their own."""

    async def scenario(world: World) -> None:
        await world.synced(4)
        world.prefect.lease("gpu:a", POD, 0)
        before = world.prefect.calls.total()
        assert await _reap(world, pod(phase="Succeeded"), deleted=False) is None
        assert await _reap(world, pod(phase="Succeeded"), deleted=True) is None
        assert world.prefect.calls.total() == before

    asyncio.run(scenario(World()))


def test_a_pod_on_a_node_without_an_owned_limit_costs_no_request() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        _seen(world.controller.reaper, pod(node="cpu-node"))
        before = world.prefect.calls.total()
        assert await _reap(world, pod(node="cpu-node"), deleted=True) == 0
        assert world.prefect.calls.total() == before

    asyncio.run(scenario(World()))


def test_revocation_is_retried_while_prefect_is_down() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        world.prefect.lease("gpu:a", POD, 0)
        controller = world.controller
        reaper = LeaseReaper(controller.policies, controller.prefect, controller.fence, (0.05,) * 3)
        _seen(reaper, pod())
        world.prefect.down = True
        task = reaper.observe(pod(), deleted=True)
        assert task is not None
        await asyncio.sleep(0.08)  # past the first attempt and into the second wait
        assert world.prefect.calls["pod-leases"] >= 1
        assert world.prefect.limits["gpu:a"].active_slots == 1
        world.prefect.down = False
        assert await asyncio.wait_for(task, timeout=5) == 1
        assert world.prefect.limits["gpu:a"].active_slots == 0

    asyncio.run(scenario(World()))


def test_after_the_last_retry_the_leases_are_left_and_a_deletion_tries_again() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        world.prefect.lease("gpu:a", POD, 0)
        controller = world.controller
        reaper = LeaseReaper(controller.policies, controller.prefect, controller.fence, (0.01,))
        _seen(reaper, pod())
        world.prefect.down = True
        failed = reaper.observe(pod(phase="Failed"), deleted=False)
        assert failed is not None
        assert await asyncio.wait_for(failed, timeout=5) == 0
        assert world.prefect.calls["pod-leases"] == 2  # one try, one retry
        world.prefect.down = False
        deleted = reaper.observe(pod(phase="Failed"), deleted=True)
        assert deleted is not None
        assert await asyncio.wait_for(deleted, timeout=5) == 1
        assert world.prefect.limits["gpu:a"].active_slots == 0

    asyncio.run(scenario(World()))


def test_a_fenced_replica_revokes_nothing() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        world.prefect.lease("gpu:a", POD, 0)
        world.controller.fence.identity = "replica-1"  # its peering record never renewed
        _seen(world.controller.reaper, pod())
        assert await _reap(world, pod(), deleted=True) == 0
        assert world.prefect.limits["gpu:a"].active_slots == 1
        assert world.prefect.calls["revoke-lease"] == 0

    asyncio.run(scenario(World()))
