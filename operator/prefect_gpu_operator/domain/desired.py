"""Which global concurrency limits should exist: a pure function of the policies and the nodes.

For each policy, every node its ``nodeSelector`` selects that has at least one of its ``resources``
in ``status.allocatable`` gets one limit, named by ``limitNameTemplate``, of ``GPUs x slotsPerGpu``
slots. The GPUs are the node's allocatable ones, or with ``capacityFrom: WorkerPods`` the devices
its Prefect worker pods were given; ``slotsPerGpu`` is not applied where the device plugin
time-slices the GPUs (it already counts each replica). When several policies would own the same
limit name, the oldest policy (creationTimestamp, then name) owns it; the others record a
conflict and leave it alone, so no two policies ever fight over one limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prefect_gpu_operator.api.limit_names import limit_name
from prefect_gpu_operator.api.policy import GPULimitPolicySpec
from prefect_gpu_operator.domain.quantities import QuantityError, parse_quantity
from prefect_gpu_operator.domain.worker_pods import WorkerPod

__all__ = [
    "DesiredLimit",
    "GPUNode",
    "Policy",
    "PolicyDesired",
    "QuantityError",
    "VerdictCache",
    "desired_limits",
    "node_gpus",
    "node_verdict",
    "parse_quantity",
]


@dataclass(frozen=True)
class GPUNode:
    """What the operator reads from a Node: its name, labels and ``status.allocatable``."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    allocatable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """A GPULimitPolicy as the desired-state computation needs it."""

    name: str
    spec: GPULimitPolicySpec
    created: datetime
    generation: int = 1

    @property
    def seniority(self) -> tuple[datetime, str]:
        """Older first; the name breaks ties between policies created in the same second."""
        return (self.created, self.name)


@dataclass(frozen=True)
class DesiredLimit:
    name: str
    node: str
    limit: int
    slot_decay_per_second: float = 0.0


@dataclass(frozen=True)
class PolicyDesired:
    """One policy's share of the desired state.

    ``limits``: the limits it owns, by name. ``conflicts``: names it would own but an older policy
    does (name → that policy). ``unknown``: names of selected nodes whose GPU count could not be
    read, with the reason; the plan leaves those limits exactly as they are rather than guess.
    """

    limits: Mapping[str, DesiredLimit] = field(default_factory=dict)
    conflicts: Mapping[str, str] = field(default_factory=dict)
    unknown: Mapping[str, str] = field(default_factory=dict)

    @property
    def total_slots(self) -> int:
        return sum(limit.limit for limit in self.limits.values())


def node_gpus(node: GPUNode, resources: Iterable[str]) -> int | None:
    """The node's allocatable GPUs summed over ``resources``; None if it has none of them.

    None (no such resource at all) means "not a GPU node": no limit. 0 (the resource is there but
    nothing is allocatable, e.g. the device plugin reports all GPUs unhealthy) is a real count: the
    node keeps a limit of 0 on purpose. Prefect fails an acquire on a 0 limit at once instead of
    waiting, which is why the flows side waits for a slot itself rather than treating it as fatal,
    and deleting the limit instead would drop the slots running tasks still hold.
    """
    quantities = [node.allocatable[name] for name in resources if name in node.allocatable]
    if not quantities:
        return None
    try:
        return sum(parse_quantity(quantity) for quantity in quantities)
    except QuantityError as error:
        raise QuantityError(f"node {node.name}: {error}") from error


# --- the desired state ---------------------------------------------------------------------------


# A node's verdict under one policy: (limit name, its limit, or why its GPUs cannot be read).
_Verdict = tuple[str, DesiredLimit | None, str | None]
_Workers = tuple[WorkerPod, ...]
_Entry = tuple[Policy, GPUNode, _Workers, _Verdict | None]

GPU_REPLICAS_LABEL = "nvidia.com/gpu.replicas"
"""Set by NVIDIA's GPU feature discovery: how many replicas the device plugin makes of each GPU
when it time-slices them (each replica is one allocatable nvidia.com/gpu)."""


class VerdictCache:
    """Verdicts of (policy, node) pairs kept between calls of :func:`desired_limits`.

    Policies and nodes are immutable values, and the operator keeps the same object while one is
    unchanged, so an entry whose policy and node are the very objects passed again (and whose
    worker pods are equal) is still right: after a node change only that node is evaluated again.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], _Entry] = {}


def time_sliced(node: GPUNode) -> bool:
    """Whether the device plugin time-slices the node's GPUs (feature discovery says so)."""
    replicas = node.labels.get(GPU_REPLICAS_LABEL, "1")
    return replicas.isdigit() and int(replicas) > 1


def slots_per_gpu(policy: Policy, node: GPUNode) -> int:
    """The policy's slotsPerGpu, or 1 where the device plugin already counts every replica."""
    return 1 if time_sliced(node) else policy.spec.slots_per_gpu


def node_verdict(
    policy: Policy, node: GPUNode | None, workers: Sequence[WorkerPod] = ()
) -> _Verdict | None:
    """What ``policy`` wants for ``node``: (limit name, limit or None, why not readable); None
    when it gives the node no limit (absent, not selected, or none of its resources). ``workers``
    are the node's Prefect worker pods (they count with ``capacityFrom: WorkerPods``). Raises
    LimitNameError when the template cannot name the node."""
    if node is None:
        return None
    spec = policy.spec
    if not spec.node_selector.matches(node.labels):
        return None
    name = limit_name(spec.limit_name_template, node.name)
    try:
        gpus = node_gpus(node, spec.resources)
    except QuantityError as error:
        return name, None, str(error)
    if gpus is None:
        return None
    if spec.capacity_from == "WorkerPods":
        selected = (pod for pod in workers if spec.worker_selector.matches(pod.labels))
        gpus = sum(pod.gpus_of(spec.resources) for pod in selected)
    decay = spec.slot_decay_per_second or 0.0
    limit = gpus * slots_per_gpu(policy, node)
    return name, DesiredLimit(name, node.name, limit, decay), None


def _policy_candidates(
    policy: Policy,
    nodes: Iterable[GPUNode],
    workers: Mapping[str, _Workers],
    cache: VerdictCache | None,
    kept: dict[tuple[str, str], _Entry],
) -> tuple[dict[str, DesiredLimit], dict[str, str]]:
    """The limits ``policy`` wants on its own, and the names it cannot compute (name → reason)."""
    wanted: dict[str, DesiredLimit] = {}
    unknown: dict[str, str] = {}
    counts_workers = policy.spec.capacity_from == "WorkerPods"
    for node in nodes:
        key = (policy.name, node.name)
        mine = workers.get(node.name, ()) if counts_workers else ()
        cached = cache.entries.get(key) if cache is not None else None
        if cached is not None and cached[0] is policy and cached[1] is node and cached[2] == mine:
            verdict = cached[3]
        else:
            verdict = node_verdict(policy, node, mine)
        kept[key] = (policy, node, mine, verdict)
        if verdict is None:
            continue
        name, limit, reason = verdict
        if limit is not None:
            wanted[name] = limit
        else:
            unknown[name] = reason or "unreadable"
    return wanted, unknown


def desired_limits(
    policies: Iterable[Policy],
    nodes: Iterable[GPUNode],
    cache: VerdictCache | None = None,
    workers: Mapping[str, _Workers] | None = None,
) -> dict[str, PolicyDesired]:
    """Every policy's desired limits (by policy name), with name conflicts resolved by seniority.

    ``workers``: each node's Prefect worker pods. ``cache`` (optional) carries per-node verdicts
    from the previous call; the result is the same with or without it.
    """
    nodes = sorted(nodes, key=lambda node: node.name)
    owner: dict[str, str] = {}  # limit name → the oldest policy that wants it
    result: dict[str, PolicyDesired] = {}
    kept: dict[tuple[str, str], _Entry] = {}
    for policy in sorted(policies, key=lambda policy: policy.seniority):
        wanted, unknown = _policy_candidates(policy, nodes, workers or {}, cache, kept)
        mine: dict[str, DesiredLimit] = {}
        conflicts: dict[str, str] = {}
        for name in sorted(wanted.keys() | unknown.keys()):
            if name in owner:
                conflicts[name] = owner[name]
                continue
            owner[name] = policy.name
            if name in wanted:
                mine[name] = wanted[name]
        result[policy.name] = PolicyDesired(
            limits=mine,
            conflicts=conflicts,
            unknown={name: reason for name, reason in unknown.items() if name not in conflicts},
        )
    if cache is not None:
        cache.entries = kept  # only pairs still present: deleted nodes and policies drop out
    return result
