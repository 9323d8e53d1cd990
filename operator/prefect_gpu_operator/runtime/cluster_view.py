"""The cluster as kopf's watches report it: nodes, policies and Prefect pods, and what the
policies want of them.

Every observation returns or causes only the wake-ups it must: a node or pod change wakes the
policies whose verdict on it changed, a policy change wakes every policy (ownership of a name
can move between them).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from prefect_gpu_operator.api.limit_names import LimitNameError
from prefect_gpu_operator.api.policy import GPULimitPolicySpec, GPULimitPolicyStatus
from prefect_gpu_operator.domain import events
from prefect_gpu_operator.domain.desired import (
    GPUNode,
    Policy,
    PolicyDesired,
    VerdictCache,
    desired_limits,
    node_verdict,
    slots_per_gpu,
    time_sliced,
)
from prefect_gpu_operator.domain.events import Event
from prefect_gpu_operator.domain.worker_pods import WorkerPod, WorkerPods
from prefect_gpu_operator.runtime.nodes import NodeChange, NodeView
from prefect_gpu_operator.runtime.ports import KubeApi
from prefect_gpu_operator.runtime.records import PolicyRecord

__all__ = ["ClusterView"]


def _parse_time(value: str | None) -> datetime.datetime:
    if not value:
        return datetime.datetime.max.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stored_status(body: Mapping[str, Any]) -> GPULimitPolicyStatus:
    try:
        return GPULimitPolicyStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return GPULimitPolicyStatus()  # edited by hand beyond repair: rebuilt by the reconcile


def _spec_error(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())


class ClusterView:
    """Nodes, policies and Prefect pods as last seen."""

    def __init__(self, kube: KubeApi) -> None:
        self.nodes = NodeView(kube)
        self.policies: dict[str, PolicyRecord] = {}
        self.workers = WorkerPods()
        self._verdicts = VerdictCache()

    # --- what the watches tell us --------------------------------------------------------------

    def observe_node(self, body: Mapping[str, Any], deleted: bool = False) -> list[str]:
        """Record a node; the policies woken because what they want of it changed."""
        change = self.nodes.observe(body, deleted)
        return self.wake_for(change) if change is not None else []

    def observe_policy(self, body: Mapping[str, Any]) -> PolicyRecord:
        """Record a policy's spec; wake every policy when a spec appears or changes."""
        metadata = body["metadata"]
        name = metadata["name"]
        generation = int(metadata.get("generation") or 1)
        policy: Policy | None = None
        spec_error: str | None = None
        try:
            spec = GPULimitPolicySpec.model_validate(body.get("spec") or {})
            policy = Policy(name, spec, _parse_time(metadata.get("creationTimestamp")), generation)
        except ValidationError as error:
            spec_error = _spec_error(error)
        record = self.policies.get(name)
        if record is None:
            status = _stored_status(body)
            record = PolicyRecord(policy, spec_error, status.limits, status)
            self.policies[name] = record
            self.wake_all()
        elif record.policy != policy or record.spec_error != spec_error:
            record.policy, record.spec_error = policy, spec_error
            self.wake_all()
        return record

    def observe_pod(self, body: Mapping[str, Any], deleted: bool = False) -> Event | None:
        """Record a Prefect pod; a warning for a GPU pod the first time it is seen scheduled on a
        node without a limit, or seeing fewer GPUs than its node's limit counts."""
        if self.workers.observe(body, deleted):
            self.wake_all()  # status.workers, worker capacity and its checks follow the pods
        uid = str((body.get("metadata") or {}).get("uid"))
        pod = None if deleted else self.workers.first_sighting(uid)
        return self._warning(pod) if pod is not None else None

    def forget_policy(self, name: str) -> PolicyRecord | None:
        record = self.policies.pop(name, None)
        if record is not None:
            self.wake_all()  # a younger policy may now own what this one held
        return record

    def wake_all(self) -> None:
        for record in self.policies.values():
            record.wake.set()

    def wake_for(self, change: NodeChange) -> list[str]:
        """Wake the policies whose verdict on the node changed: label churn that changes no
        selector verdict and no GPU count (a feature-discovery timestamp) wakes nobody."""
        before, after = change
        node = after or before
        workers = self._workers_on(node.name) if node is not None else ()
        woken = []
        for name, record in self.policies.items():
            if record.policy is None:
                continue
            try:
                old = node_verdict(record.policy, before, workers)
                changed = old != node_verdict(record.policy, after, workers)
            except LimitNameError:
                changed = True  # its reconcile reports the template
            if changed:
                record.wake.set()
                woken.append(name)
        return woken

    # --- what the policies want ----------------------------------------------------------------

    def _policies(self) -> list[Policy]:
        return [r.policy for r in self.policies.values() if r.policy is not None]

    def _workers_on(self, node: str) -> tuple[WorkerPod, ...]:
        return tuple(self.workers.on(node))

    def desired(self) -> dict[str, PolicyDesired]:
        """Every policy's desired limits. Raises LimitNameError for a template that cannot name
        one of the nodes."""
        by_node: dict[str, tuple[WorkerPod, ...]] = {}
        for pod in self.workers.pods.values():
            by_node[pod.node] = (*by_node.get(pod.node, ()), pod)
        return desired_limits(self._policies(), self.nodes.nodes.values(), self._verdicts, by_node)

    def desired_for(self, name: str) -> PolicyDesired:
        return self.desired().get(name, PolicyDesired())

    def other_ledgers(self, name: str) -> dict[str, str]:
        return {
            entry.name: other
            for other, record in self.policies.items()
            if other != name
            for entry in record.ledger
        }

    def time_sliced(self, policy: Policy, desired: PolicyDesired) -> tuple[str, ...]:
        """Nodes with a limit of ``policy`` where its slotsPerGpu is not applied."""
        if policy.spec.slots_per_gpu == 1:
            return ()
        nodes = (self.nodes.nodes.get(limit.node) for limit in desired.limits.values())
        return tuple(sorted(node.name for node in nodes if node is not None and time_sliced(node)))

    def short_workers(self, policy: Policy, desired: PolicyDesired) -> tuple[str, ...]:
        """Why worker pods on ``policy``'s nodes see fewer GPUs than their limit counts."""
        return tuple(message for _, message in self._short(policy, desired))

    def _short(self, policy: Policy, desired: PolicyDesired) -> list[tuple[WorkerPod, str]]:
        """The worker pods that request GPUs but fewer than their node's limit counts (the
        supported shape is one worker per node that owns every GPU the limit counts)."""
        found = []
        for limit in sorted(desired.limits.values(), key=lambda limit: limit.node):
            node = self.nodes.nodes.get(limit.node)
            for pod in self.workers.on(limit.node):
                sees = pod.gpus_of(policy.spec.resources)
                slots = sees * (slots_per_gpu(policy, node) if node else 1)
                if 0 < slots < limit.limit:
                    message = (
                        f"node {limit.node}: pod {pod.reference} was given {sees} GPU(s) "
                        f"({slots} slot(s)), its limit {limit.name} counts {limit.limit}"
                    )
                    found.append((pod, message))
        return found

    def _warning(self, pod: WorkerPod) -> Event | None:
        resources = {r for policy in self._policies() for r in policy.spec.resources}
        if not pod.gpus_of(resources or ("nvidia.com/gpu",)):
            return None  # not a GPU pod (a CPU flow run): nothing of ours to warn about
        try:
            desired = self.desired()
        except LimitNameError:
            desired = {}
        for name, wanted in desired.items():
            policy = self.policies[name].policy
            if policy is None or all(limit.node != pod.node for limit in wanted.limits.values()):
                continue
            short = [message for short, message in self._short(policy, wanted) if short == pod]
            return events.worker_sees_fewer_gpus(short[0]) if short else None
        return events.no_gpu_limit(pod.node)

    def seed(self, nodes: Iterable[GPUNode]) -> None:
        self.nodes.seed(nodes)
