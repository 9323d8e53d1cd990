"""Desired limits from policies and nodes: quantities, names, selectors, seniority on conflict."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from prefect_gpu_operator.api.policy import GPULimitPolicySpec
from prefect_gpu_operator.domain.desired import (
    DesiredLimit,
    GPUNode,
    Policy,
    QuantityError,
    VerdictCache,
    desired_limits,
    node_gpus,
    parse_quantity,
)
from prefect_gpu_operator.domain.worker_pods import WorkerPod

NV = "nvidia.com/gpu"
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def policy(name: str = "gpus", *, age: int = 0, **fields: Any) -> Policy:
    """A policy created ``age`` seconds after T0 (smaller is older)."""
    spec = GPULimitPolicySpec.model_validate(
        {"server": {"remoteApiUrl": "http://p:4200"}, **fields}
    )
    return Policy(name=name, spec=spec, created=T0 + timedelta(seconds=age))


def node(
    name: str, resources: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> GPUNode:
    return GPUNode(name=name, labels=labels or {}, allocatable={"cpu": "8", **(resources or {})})


def limits(policies: list[Policy], nodes: list[GPUNode], owner: str = "gpus") -> dict[str, int]:
    return {
        name: limit.limit for name, limit in desired_limits(policies, nodes)[owner].limits.items()
    }


@pytest.mark.parametrize(
    ("quantity", "count"),
    [
        ("0", 0),
        ("1", 1),
        ("4", 4),
        ("16", 16),
        ("1k", 1000),
        ("2000m", 2),
        ("1e3", 1000),
        ("1Ki", 1024),
        (" 8 ", 8),
    ],
)
def test_parse_quantity(quantity: str, count: int) -> None:
    assert parse_quantity(quantity) == count


@pytest.mark.parametrize(
    ("quantity", "message"),
    [
        ("1.5", "fractional"),
        ("500m", "fractional"),
        ("-1", "negative"),
        ("", "not a Kubernetes quantity"),
        ("four", "not a Kubernetes quantity"),
        ("4 GPUs", "not a Kubernetes quantity"),
    ],
)
def test_parse_quantity_rejects(quantity: str, message: str) -> None:
    with pytest.raises(QuantityError, match=message):
        parse_quantity(quantity)


@pytest.mark.parametrize(
    ("allocatable", "resources", "gpus"),
    [
        ({"nvidia.com/gpu": "4"}, ["nvidia.com/gpu"], 4),
        ({"nvidia.com/gpu": "0"}, ["nvidia.com/gpu"], 0),  # present but 0: a real count
        ({}, ["nvidia.com/gpu"], None),  # absent: not a GPU node
        ({"amd.com/gpu": "2"}, ["nvidia.com/gpu"], None),
        ({"amd.com/gpu": "2"}, ["amd.com/gpu"], 2),
        ({"nvidia.com/mig-1g.10gb": "7", "nvidia.com/gpu": "1"}, ["nvidia.com/mig-1g.10gb"], 7),
        (
            {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2"},
            ["nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"],
            9,
        ),
        ({"nvidia.com/gpu": "2"}, ["nvidia.com/gpu", "amd.com/gpu"], 2),  # only present ones count
    ],
)
def test_node_gpus(allocatable: dict[str, str], resources: list[str], gpus: int | None) -> None:
    assert node_gpus(GPUNode("n", allocatable=allocatable), resources) == gpus


def test_node_gpus_names_the_node_in_errors() -> None:
    with pytest.raises(QuantityError, match="node gpu-1: '1500m' is fractional"):
        node_gpus(GPUNode("gpu-1", allocatable={"nvidia.com/gpu": "1500m"}), ["nvidia.com/gpu"])


def test_one_limit_per_gpu_node_and_none_for_cpu_nodes() -> None:
    nodes = [
        node("gpu-1", {NV: "4"}),
        node("gpu-2.example.com", {NV: "2"}),
        node("cpu-1"),
    ]
    assert limits([policy()], nodes) == {"gpu:gpu-1": 4, "gpu:gpu-2.example.com": 2}


def test_zero_gpus_is_a_deliberate_zero_limit() -> None:
    assert limits([policy()], [node("gpu-1", {NV: "0"})]) == {"gpu:gpu-1": 0}


@pytest.mark.parametrize(("slots", "expected"), [(1, 3), (2, 6), (4, 12)])
def test_slots_per_gpu(slots: int, expected: int) -> None:
    assert limits([policy(slotsPerGpu=slots)], [node("g", {NV: "3"})]) == {"gpu:g": expected}


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (["nvidia.com/gpu"], {"gpu:nv": 2}),
        (["amd.com/gpu"], {"gpu:amd": 8}),
        (["nvidia.com/mig-1g.10gb"], {"gpu:mig": 7}),
        (
            ["nvidia.com/gpu", "amd.com/gpu", "nvidia.com/mig-1g.10gb"],
            {"gpu:nv": 2, "gpu:amd": 8, "gpu:mig": 7},
        ),
    ],
)
def test_resources(resources: list[str], expected: dict[str, int]) -> None:
    nodes = [
        node("nv", {NV: "2"}),
        node("amd", {"amd.com/gpu": "8"}),
        node("mig", {"nvidia.com/mig-1g.10gb": "7"}),
    ]
    assert limits([policy(resources=resources)], nodes) == expected


def test_slot_decay_and_template_are_applied() -> None:
    desired = desired_limits(
        [policy(limitNameTemplate="infer:{node}", slotDecayPerSecond=0.5)], [node("g", {NV: "1"})]
    )["gpus"]
    assert desired.limits == {"infer:g": DesiredLimit("infer:g", "g", 1, 0.5)}
    assert desired.total_slots == 1


def test_slot_decay_defaults_to_zero() -> None:
    desired = desired_limits([policy()], [node("g", {NV: "1"})])["gpus"]
    assert desired.limits["gpu:g"].slot_decay_per_second == 0.0


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, {"gpu:a100-1", "gpu:a100-spot", "gpu:h100-1"}),
        ({"matchLabels": {"gpu.type": "a100"}}, {"gpu:a100-1", "gpu:a100-spot"}),
        (
            {
                "matchExpressions": [
                    {"key": "gpu.type", "operator": "In", "values": ["h100", "a100"]}
                ]
            },
            {"gpu:a100-1", "gpu:a100-spot", "gpu:h100-1"},
        ),
        (
            {"matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]},
            {"gpu:a100-1", "gpu:h100-1"},
        ),
        (
            {
                "matchLabels": {"gpu.type": "a100"},
                "matchExpressions": [{"key": "spot", "operator": "NotIn", "values": ["true"]}],
            },
            {"gpu:a100-1"},
        ),
        ({"matchExpressions": [{"key": "spot", "operator": "Exists"}]}, {"gpu:a100-spot"}),
    ],
)
def test_node_selector(selector: dict[str, Any], expected: set[str]) -> None:
    nodes = [
        node("a100-1", {NV: "8"}, labels={"gpu.type": "a100"}),
        node("a100-spot", {NV: "8"}, labels={"gpu.type": "a100", "spot": "true"}),
        node("h100-1", {NV: "8"}, labels={"gpu.type": "h100"}),
        node("cpu-1", labels={"gpu.type": "a100"}),  # selected but no GPU resource: no limit
    ]
    assert set(limits([policy(nodeSelector=selector)], nodes)) == expected


def test_unreadable_quantity_marks_the_node_unknown_without_blocking_others() -> None:
    nodes = [node("good", {NV: "2"}), node("bad", {NV: "1.5"})]
    desired = desired_limits([policy()], nodes)["gpus"]
    assert set(desired.limits) == {"gpu:good"}
    assert set(desired.unknown) == {"gpu:bad"}
    assert "fractional" in desired.unknown["gpu:bad"]


@pytest.mark.parametrize("order", [("old", "young"), ("young", "old")])
def test_two_policies_same_name_the_older_wins(order: tuple[str, str]) -> None:
    policies = {
        "old": policy("old", age=0, slotsPerGpu=1),
        "young": policy("young", age=60, slotsPerGpu=2),
    }
    nodes = [node("gpu-1", {NV: "4"})]
    desired = desired_limits([policies[name] for name in order], nodes)
    assert desired["old"].limits == {"gpu:gpu-1": DesiredLimit("gpu:gpu-1", "gpu-1", 4)}
    assert desired["old"].conflicts == {}
    assert desired["young"].limits == {}
    assert desired["young"].conflicts == {"gpu:gpu-1": "old"}


def test_same_creation_time_the_name_breaks_the_tie() -> None:
    desired = desired_limits([policy("b"), policy("a")], [node("gpu-1", {NV: "1"})])
    assert set(desired["a"].limits) == {"gpu:gpu-1"}
    assert desired["b"].conflicts == {"gpu:gpu-1": "a"}


def test_policies_with_different_templates_share_nodes_without_conflict() -> None:
    nodes = [node("gpu-1", {NV: "4"})]
    desired = desired_limits(
        [policy("train", age=0, limitNameTemplate="train:{node}"), policy("infer", age=1)], nodes
    )
    assert set(desired["train"].limits) == {"train:gpu-1"}
    assert set(desired["infer"].limits) == {"gpu:gpu-1"}
    assert desired["train"].conflicts == desired["infer"].conflicts == {}


def test_partial_overlap_only_the_shared_names_conflict() -> None:
    nodes = [
        node("a", {NV: "1"}, labels={"pool": "x"}),
        node("b", {NV: "1"}, labels={"pool": "y"}),
    ]
    desired = desired_limits(
        [
            policy("all", age=0),
            policy("y-only", age=5, nodeSelector={"matchLabels": {"pool": "y"}}),
        ],
        nodes,
    )
    assert set(desired["all"].limits) == {"gpu:a", "gpu:b"}
    assert desired["y-only"].conflicts == {"gpu:b": "all"}


def test_no_nodes_or_no_policies() -> None:
    assert desired_limits([], [node("g", {NV: "1"})]) == {}
    empty = desired_limits([policy()], [])["gpus"]
    assert (dict(empty.limits), dict(empty.conflicts), empty.total_slots) == ({}, {}, 0)


def test_verdict_cache_never_changes_the_result() -> None:
    """A cached run equals a fresh one through node changes, removals and policy replacements."""
    rng = random.Random(7)
    nodes = {
        f"n{i}": node(f"n{i}", {NV: str(i % 5)}, {"pool": rng.choice("ab")}) for i in range(40)
    }
    policies = {
        "p": policy("p"),
        "q": policy("q", age=1, nodeSelector={"matchLabels": {"pool": "b"}}, slotsPerGpu=2),
    }
    cache = VerdictCache()
    for _ in range(300):
        action = rng.random()
        name = rng.choice(sorted(nodes))
        if action < 0.5:
            nodes[name] = node(name, {NV: str(rng.randint(0, 8))}, {"pool": rng.choice("ab")})
        elif action < 0.7:
            nodes.pop(name)
            added = f"x{rng.randint(0, 99)}"
            nodes[added] = node(added, {"amd.com/gpu": "2", NV: "1"})
        elif action < 0.8:
            policies["q"] = policy("q", age=1, slotsPerGpu=rng.randint(1, 3))
        cached = desired_limits(policies.values(), nodes.values(), cache)
        assert cached == desired_limits(policies.values(), nodes.values())
    assert len(cache.entries) == len(policies) * len(nodes)  # nothing stale is kept


def _worker(node: str, gpus: int, **labels: str) -> WorkerPod:
    return WorkerPod(
        uid=f"{node}-{gpus}", namespace="ml", name="w", node=node, labels=labels,
        gpus={NV: gpus},
    )  # fmt: skip


def test_capacity_from_worker_pods_counts_the_devices_they_were_given() -> None:
    nodes = [GPUNode("a", allocatable={NV: "8"}), GPUNode("b", allocatable={NV: "8"})]
    counted = policy(capacityFrom="WorkerPods", workerSelector={"matchLabels": {"role": "gpu"}})
    workers = {
        "a": (_worker("a", 2, role="gpu"), _worker("a", 4, role="cpu")),  # only role=gpu counts
    }
    limits = desired_limits([counted], nodes, workers=workers)["gpus"].limits
    assert {n: limit.limit for n, limit in limits.items()} == {"gpu:a": 2, "gpu:b": 0}
    plain = policy()
    limits = desired_limits([plain], nodes, workers=workers)["gpus"].limits
    assert {n: limit.limit for n, limit in limits.items()} == {"gpu:a": 8, "gpu:b": 8}


def test_the_cache_sees_worker_pods_change() -> None:
    node = GPUNode("a", allocatable={NV: "8"})
    counted = policy(capacityFrom="WorkerPods")
    cache = VerdictCache()
    first = desired_limits([counted], [node], cache, {"a": (_worker("a", 2),)})
    second = desired_limits([counted], [node], cache, {"a": (_worker("a", 6),)})
    assert first["gpus"].limits["gpu:a"].limit == 2
    assert second["gpus"].limits["gpu:a"].limit == 6


@pytest.mark.parametrize(("replicas", "limit"), [("4", 8), ("1", 16), ("none", 16)])
def test_slots_per_gpu_is_not_applied_where_the_device_plugin_time_slices(
    replicas: str, limit: int
) -> None:
    """Time-slicing already advertises every replica as a GPU (8 = 2 GPUs x 4 replicas)."""
    node = GPUNode("a", labels={"nvidia.com/gpu.replicas": replicas}, allocatable={NV: "8"})
    (desired,) = desired_limits([policy(slotsPerGpu=2)], [node])["gpus"].limits.values()
    assert desired.limit == limit
