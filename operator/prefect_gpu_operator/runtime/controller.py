"""The reconcile of one policy, and the live picture of nodes, policies and Prefect pods it uses.

Nodes, policies and pods arrive through kopf's watches (``observe_*``); each policy's daemon calls
``reconcile`` whenever something relevant changed and every ``resync_seconds``. A reconcile is
level-triggered: desired state from every policy and node (pure), Prefect's limits (the
``PrefectView``), then the plan (pure) applied in crash-safe order: new names are written to the
ledger before they are created in Prefect, so a crash at any point leaves nothing unowned.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from prefect_gpu_operator.adapters.kube import SecretNotFound
from prefect_gpu_operator.adapters.prefect_limits import PrefectLimits, PrefectUnreachable
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
)
from prefect_gpu_operator.domain.events import Event
from prefect_gpu_operator.domain.plan import Change, changes, plan_policy
from prefect_gpu_operator.domain.status import Outcome
from prefect_gpu_operator.domain.worker_pods import WorkerPods
from prefect_gpu_operator.metrics import RECONCILE_SECONDS, RECONCILES
from prefect_gpu_operator.runtime.nodes import NodeChange, NodeView
from prefect_gpu_operator.runtime.ports import ConnectPrefect, KubeApi, LimitsApi
from prefect_gpu_operator.runtime.prefect_view import Listing, PrefectView
from prefect_gpu_operator.runtime.records import PolicyRecord
from prefect_gpu_operator.runtime.status_writer import StatusWriter, export_metrics, remove_metrics
from prefect_gpu_operator.settings import OperatorSettings

__all__ = ["Controller"]


def _parse_time(value: str | None) -> datetime.datetime:
    if not value:
        return datetime.datetime.max.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stored_status(body: Mapping[str, Any]) -> GPULimitPolicyStatus:
    try:
        return GPULimitPolicyStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return GPULimitPolicyStatus()  # edited by hand beyond repair: rebuilt by the reconcile


class Controller:
    """Nodes, policies and Prefect pods as last seen, and the reconcile of one policy."""

    def __init__(
        self, settings: OperatorSettings, kube: KubeApi, connect: ConnectPrefect = PrefectLimits
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.node_view = NodeView(kube)
        self.policies: dict[str, PolicyRecord] = {}
        self.workers = WorkerPods()
        self.prefect = PrefectView(
            kube, settings.namespace, connect, timeout=settings.prefect_timeout_seconds
        )
        self.status = StatusWriter(kube, settings.status_interval_seconds, self.workers.nodes)
        self._verdicts = VerdictCache()

    # --- what the watches tell us ------------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, GPUNode]:
        return self.node_view.nodes

    def seed_nodes(self, nodes: Iterable[GPUNode]) -> None:
        """The node view at start-up, before any policy reconciles: a restart must never see
        "no nodes" and delete limits that are still needed."""
        self.node_view.seed(nodes)

    def observe_node(self, body: Mapping[str, Any], deleted: bool = False) -> list[str]:
        """Record a node; the policies woken because what they want of it changed."""
        change = self.node_view.observe(body, deleted)
        return self._wake_for(change) if change is not None else []

    def _wake_for(self, change: NodeChange) -> list[str]:
        """Wake the policies whose verdict on the node changed: label churn that changes no
        selector verdict and no GPU count (a feature-discovery timestamp) wakes nobody."""
        before, after = change
        woken = []
        for name, record in self.policies.items():
            if record.policy is None:
                continue
            try:
                changed = node_verdict(record.policy, before) != node_verdict(record.policy, after)
            except LimitNameError:
                changed = True  # its reconcile reports the template
            if changed:
                record.wake.set()
                woken.append(name)
        return woken

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
            spec_error = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
            )
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
        """Record a Prefect pod; a warning for it when it first lands on a node without a
        limit. Policies' ``workers`` status follows the set of nodes running Prefect pods."""
        if self.workers.observe(body, deleted):
            self.wake_all()
        node = None if deleted else self.workers.first_sighting(body)
        if node is None or self.node_has_limit(node):
            return None
        return events.no_gpu_limit(node)

    def node_has_limit(self, node: str) -> bool:
        try:
            desired = desired_limits(self._policies(), self.nodes.values(), self._verdicts)
        except LimitNameError:
            return False  # such a policy creates no limit at all
        return any(limit.node == node for d in desired.values() for limit in d.limits.values())

    def forget_policy(self, name: str) -> None:
        if (record := self.policies.pop(name, None)) is not None:
            remove_metrics(name, record)
            self.wake_all()  # a younger policy may now own what this one held

    def wake_all(self) -> None:
        for record in self.policies.values():
            record.wake.set()

    def retry_delay(self, failures: int) -> float:
        """Seconds before the next attempt: the resync interval, or an exponential backoff while
        Prefect fails, jittered so several policies do not retry in lockstep."""
        if not failures:
            return self.settings.resync_seconds
        delay: float = min(self.settings.retry_max_seconds, 0.5 * 2**failures)
        return delay * random.uniform(0.8, 1.2)

    async def close(self) -> None:
        await self.status.flush_all(self.policies)
        await self.prefect.close()
        self.kube.close()

    # --- reconcile -----------------------------------------------------------------------------

    def _policies(self) -> list[Policy]:
        return [r.policy for r in self.policies.values() if r.policy is not None]

    def _desired(self, name: str) -> PolicyDesired:
        desired = desired_limits(self._policies(), self.nodes.values(), self._verdicts)
        return desired.get(name, PolicyDesired())

    def _other_ledgers(self, name: str) -> dict[str, str]:
        return {
            entry.name: other
            for other, record in self.policies.items()
            if other != name
            for entry in record.ledger
        }

    async def reconcile(self, name: str, *, full: bool, deleting: bool = False) -> list[Event]:
        """Bring one policy's limits to the desired state; return the events to post.

        ``full`` re-reads Prefect's limits (drift repair); otherwise the cache of the last read and
        of the operator's own writes is trusted, so a node change costs only the write it needs.
        Raises nothing for Prefect trouble: that is reported in status and events.
        """
        record = self.policies.get(name)
        if record is None:
            return []
        started = time.perf_counter()
        trigger = "full" if full else "change"
        if full:  # a resync re-lists the nodes (one listing serves every policy's resync)
            for change in await self.node_view.refresh(self.settings.resync_seconds / 2):
                self._wake_for(change)
        async with contextlib.AsyncExitStack() as stack:
            listed = None
            if full and not deleting and record.policy is not None:
                listed = await self.prefect.list_unlocked(record.policy.spec.server, stack)
            async with record.lock:
                RECONCILES.labels(name, trigger).inc()
                try:
                    return await self._reconcile(name, record, full, deleting, listed)
                finally:
                    RECONCILE_SECONDS.labels(trigger).observe(time.perf_counter() - started)

    async def _reconcile(
        self,
        name: str,
        record: PolicyRecord,
        full: bool,
        deleting: bool,
        listed: Listing | None,
    ) -> list[Event]:
        policy = record.policy
        generation = policy.generation if policy else record.status.observed_generation or 0
        if policy is None:
            self.status.write(name, record, Outcome(generation, spec_error=record.spec_error))
            return [events.invalid_spec(record.spec_error)]
        if deleting and not record.ledger:
            return []  # owns nothing: no need to reach Prefect (or its Secret) to let it go
        spec = policy.spec
        done: list[Event] = []
        plan = None
        try:
            server = await self.prefect.server(spec.server, full=full)
            observed = await self.prefect.observed(server, full=full, listed=listed)
            try:
                desired = PolicyDesired() if deleting else self._desired(name)
            except LimitNameError as error:
                self.status.write(name, record, Outcome(generation, spec_error=str(error)))
                return [events.invalid_limit_name(str(error))]
            plan = plan_policy(
                desired,
                record.ledger,
                observed,
                deletion_policy=spec.deletion_policy,
                other_ledgers=self._other_ledgers(name),
            )
            writes = changes(plan, observed)
            new_names = {e.name for e in plan.claim} - {e.name for e in record.ledger}
            record.ledger = plan.claim
            # Write-ahead: name every limit about to be created before creating it, so a crash
            # cannot leave one of ours looking like a user's. Only names matter here; a changed
            # size of a limit already listed is written after, at leisure.
            if new_names and not await self.status.write_ahead(name, record):
                return [events.status_write_failed()]
            await self._apply(server, writes, done)
            record.ledger = plan.ledger
        except (PrefectUnreachable, SecretNotFound) as error:
            self.prefect.forget(spec.server.api_url)  # re-read everything once it is back
            message = str(error)
            self.status.write(name, record, Outcome(generation, plan, prefect_error=message))
            return [*done, events.prefect_unreachable(message)]
        export_metrics(name, record, plan.ledger)
        self.status.write(name, record, Outcome(generation, plan))
        return done

    async def _apply(self, server: LimitsApi, writes: list[Change], done: list[Event]) -> None:
        """Make the plan's writes in order; each one's event joins ``done`` once it is made."""
        for change in writes:
            if change.limit is None:
                await server.delete(change.name)
            elif change.action == "create":
                await server.create(
                    change.name, change.limit.limit, change.limit.slot_decay_per_second
                )
            else:
                await server.update(
                    change.name, change.limit.limit, change.limit.slot_decay_per_second
                )
            self.prefect.record(server, change)
            done.append(change.event)
