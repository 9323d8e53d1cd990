"""What the operator would change in Prefect now, without changing anything (``plan``).

The cluster is listed once (nodes, policies, and the worker pods where a policy counts them) into
a ``ClusterView``, each policy's server is listed through a ``PrefectView``, and the pure planning
(``plan_policy``, ``changes``) says what a full reconcile would write. Only listings and API-key
Secret reads are made: no Prefect write, no status patch, no Event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from prefect_gpu_operator.adapters.kube import KubeUnavailable, SecretNotFound
from prefect_gpu_operator.adapters.prefect_limits import PrefectLimits, PrefectUnreachable
from prefect_gpu_operator.api.limit_names import LimitNameError
from prefect_gpu_operator.api.policy import LimitEntry
from prefect_gpu_operator.domain.desired import PolicyDesired
from prefect_gpu_operator.domain.injection import WORKER_LABEL
from prefect_gpu_operator.domain.plan import ObservedLimit, Plan, changes, plan_policy
from prefect_gpu_operator.runtime.cluster_view import ClusterView
from prefect_gpu_operator.runtime.ports import ClusterReader, ConnectPrefect
from prefect_gpu_operator.runtime.prefect_view import PrefectView
from prefect_gpu_operator.settings import OperatorSettings, env_name

__all__ = ["LimitWrite", "PolicyNotFound", "PolicyPlan", "preview"]


class PolicyNotFound(LookupError):
    """The policy named on the command line does not exist."""


@dataclass(frozen=True)
class LimitWrite:
    """One Prefect write a reconcile would make."""

    action: Literal["create", "update", "delete"]
    name: str
    node: str | None
    current: int | None  # the limit in Prefect now; None when it does not exist
    planned: int | None  # the limit it would be set to; None for a delete
    draining_to: int | None = None  # held slots keep it above this target for now


@dataclass(frozen=True)
class PolicyPlan:
    """A policy's writes, how many of its limits need none, and why some are left alone; or
    the ``error`` that keeps it from being planned."""

    policy: str
    server: str | None = None
    writes: tuple[LimitWrite, ...] = ()
    unchanged: int = 0
    notes: tuple[str, ...] = ()
    error: str | None = None


def _writes(
    plan: Plan, observed: Mapping[str, ObservedLimit], ledger: Iterable[LimitEntry]
) -> list[LimitWrite]:
    node_of = {entry.name: entry.node for entry in ledger}  # a delete's node: the old ledger's
    draining = {entry.name: entry.draining_to for entry in plan.ledger}
    return [
        LimitWrite(
            change.action,
            change.name,
            change.limit.node if change.limit else node_of.get(change.name),
            limit.limit if (limit := observed.get(change.name)) else None,
            change.limit.limit if change.limit else None,
            draining.get(change.name),
        )
        for change in changes(plan, observed)
    ]


def _notes(plan: Plan, desired: PolicyDesired) -> list[str]:
    """Why limits the policy wants or owns are left as they are."""
    return [
        *(f"{name}: owned by the older policy {owner}" for name, owner in plan.conflicts.items()),
        *(f"{name}: exists in Prefect and no policy owns it: left alone" for name in plan.refused),
        *(f"{name}: taken over by another policy" for name in plan.release),
        *(f"{name}: inactive in Prefect, so it gates nothing" for name in plan.inactive),
        *(f"{name}: {reason}: left as it is" for name, reason in desired.unknown.items()),
    ]


async def _plan_one(
    view: ClusterView,
    prefect: PrefectView,
    settings: OperatorSettings,
    name: str,
    deleting: bool,
) -> PolicyPlan:
    """A full reconcile of ``name`` up to the point where it would write (the controller's)."""
    record = view.policies[name]
    policy = record.policy
    if policy is None:
        return PolicyPlan(name, error=f"invalid spec: {record.spec_error}")
    spec = policy.spec
    url = spec.server.api_url
    if deleting and not record.ledger:
        return PolicyPlan(name, url)
    if spec.capacity_from == "WorkerPods" and not settings.watch_worker_pods:
        error = f"capacityFrom WorkerPods needs {env_name('watch_worker_pods')}=true"
        return PolicyPlan(name, url, error=error)
    try:
        desired = PolicyDesired() if deleting else view.desired_for(name)
        server = await prefect.server(spec.server, full=False)
        observed = await prefect.observed(server, full=False)  # one listing per server
    except LimitNameError as error:
        return PolicyPlan(name, url, error=str(error))
    except (SecretNotFound, KubeUnavailable) as error:
        return PolicyPlan(name, url, error=f"API key not readable: {error}")
    except PrefectUnreachable as error:
        return PolicyPlan(name, url, error=f"Prefect unreachable: {error}")
    plan = plan_policy(
        desired,
        record.ledger,
        observed,
        deletion_policy=spec.deletion_policy,
        other_ledgers=view.other_ledgers(name),
    )
    writes = _writes(plan, observed, record.ledger)
    written = {write.name for write in writes}
    unchanged = sum(entry.name not in written for entry in plan.ledger)
    return PolicyPlan(name, url, tuple(writes), unchanged, tuple(_notes(plan, desired)))


async def preview(
    kube: ClusterReader,
    settings: OperatorSettings,
    connect: ConnectPrefect = PrefectLimits,
    *,
    only: str | None = None,
) -> list[PolicyPlan]:
    """Plan every policy (or just ``only``) against the cluster and Prefect as they are now.
    Raises ``PolicyNotFound``, and ``KubeUnavailable`` when the cluster cannot be listed."""
    bodies = await kube.list_policies()
    names = {body["metadata"]["name"] for body in bodies}
    if only is not None and only not in names:
        raise PolicyNotFound(f"GPULimitPolicy {only!r} not found")
    view = ClusterView(kube)
    view.seed(await kube.list_gpu_nodes())
    for body in bodies:
        view.observe_policy(body)
    counts_workers = any(
        record.policy is not None and record.policy.spec.capacity_from == "WorkerPods"
        for record in view.policies.values()
    )
    if counts_workers and settings.watch_worker_pods:  # no pod is read unless one counts
        for pod in await kube.list_pods(f"{WORKER_LABEL}=true"):
            view.observe_pod(pod)
    # A policy being deleted is planned as its finalizer would reconcile it: wanting nothing.
    deleting = {b["metadata"]["name"] for b in bodies if b["metadata"].get("deletionTimestamp")}
    prefect = PrefectView(
        kube, settings.namespace, connect, timeout=settings.prefect_timeout_seconds
    )
    try:
        return [
            await _plan_one(view, prefect, settings, name, name in deleting)
            for name in sorted(names)
            if only in (None, name)
        ]
    finally:
        await prefect.close()
