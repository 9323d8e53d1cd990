"""The reconcile of one policy.

Nodes, policies and pods arrive through kopf's watches into the ``ClusterView``; each policy's
daemon calls ``reconcile`` whenever something relevant changed and every ``resync_seconds``. A
reconcile is level-triggered: desired state from every policy and node (pure), Prefect's limits
(the ``PrefectView``), then the plan (pure) applied in crash-safe order: new names are written to
the ledger before they are created in Prefect, so a crash at any point leaves nothing unowned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prefect_gpu_operator.adapters.kube import SecretNotFound
from prefect_gpu_operator.adapters.prefect_limits import (
    PrefectLimits,
    PrefectRateLimited,
    PrefectUnreachable,
)
from prefect_gpu_operator.api.limit_names import LimitNameError
from prefect_gpu_operator.domain import events
from prefect_gpu_operator.domain.desired import GPUNode, PolicyDesired
from prefect_gpu_operator.domain.events import Event
from prefect_gpu_operator.domain.plan import Change, ObservedLimit, changes, plan_policy
from prefect_gpu_operator.domain.status import Outcome
from prefect_gpu_operator.metrics import RECONCILE_SECONDS, RECONCILES
from prefect_gpu_operator.runtime.cluster_view import ClusterView
from prefect_gpu_operator.runtime.fence import Fence, Fenced
from prefect_gpu_operator.runtime.pod_leases import LeaseReaper
from prefect_gpu_operator.runtime.ports import ConnectPrefect, KubeApi, LimitsApi
from prefect_gpu_operator.runtime.prefect_view import Listing, PrefectView
from prefect_gpu_operator.runtime.records import PolicyRecord
from prefect_gpu_operator.runtime.status_writer import StatusWriter, export_metrics, remove_metrics
from prefect_gpu_operator.settings import OperatorSettings

__all__ = ["Controller"]

log = logging.getLogger(__name__)


def _lowered(
    desired: PolicyDesired, observed: Mapping[str, ObservedLimit], record: PolicyRecord
) -> list[str]:
    """Owned limits about to go to 0, or draining there: whether slots are held decides."""
    lowered = {
        name
        for name, limit in desired.limits.items()
        if name in observed and limit.limit == 0 and observed[name].limit > 0
    }
    lowered |= {entry.name for entry in record.ledger if entry.draining_to is not None}
    return sorted(lowered & {entry.name for entry in record.ledger})


class Controller:
    """What the watches saw (``view``), Prefect (``prefect``), status writes (``status``), and
    the reconcile of one policy that joins them."""

    def __init__(
        self,
        settings: OperatorSettings,
        kube: KubeApi,
        connect: ConnectPrefect = PrefectLimits,
        identity: str | None = None,
    ) -> None:
        """``identity``: this replica's name in the peering object (None: standalone)."""
        self.settings = settings
        self.kube = kube
        self.fence = Fence(identity, settings.peering_lifetime_seconds)
        self.view = ClusterView(kube)
        self.prefect = PrefectView(
            kube, settings.namespace, connect, timeout=settings.prefect_timeout_seconds
        )
        self.status = StatusWriter(kube, settings.status_interval_seconds, self.view.workers.nodes)
        self.reaper = LeaseReaper(self.view.policies, self.prefect, self.fence)

    @property
    def policies(self) -> dict[str, PolicyRecord]:
        return self.view.policies

    @property
    def nodes(self) -> Mapping[str, GPUNode]:
        return self.view.nodes.nodes

    def seed_nodes(self, nodes: Iterable[GPUNode]) -> None:
        """The node view at start-up, before any policy reconciles: a restart must never see
        "no nodes" and delete limits that are still needed."""
        self.view.seed(nodes)

    def observe_node(self, body: Mapping[str, Any], deleted: bool = False) -> list[str]:
        return self.view.observe_node(body, deleted)

    def observe_policy(self, body: Mapping[str, Any]) -> PolicyRecord:
        return self.view.observe_policy(body)

    def observe_pod(self, body: Mapping[str, Any], deleted: bool = False) -> Event | None:
        """Record a Prefect pod; one that died has its published leases revoked meanwhile."""
        self.reaper.observe(body, deleted)
        return self.view.observe_pod(body, deleted)

    def forget_policy(self, name: str) -> None:
        if (record := self.view.forget_policy(name)) is not None:
            remove_metrics(name, record)

    def next_wait(self, name: str, failures: int) -> float:
        """Seconds until the policy's next reconcile without a wake-up: the resync interval, a
        short poll while a limit drains, or an exponential backoff while Prefect fails, jittered
        so several policies do not retry in lockstep."""
        if failures:
            delay: float = min(self.settings.retry_max_seconds, 0.5 * 2**failures)
            return delay * random.uniform(0.8, 1.2)
        record = self.policies.get(name)
        if record is not None and any(entry.draining_to is not None for entry in record.ledger):
            return min(self.settings.resync_seconds, self.settings.drain_poll_seconds)
        return self.settings.resync_seconds

    def rate_limit_wait(self, name: str) -> float:
        """Seconds until the Prefect API of the policy takes requests again (its Retry-After)."""
        record = self.policies.get(name)
        policy = record.policy if record is not None else None
        return self.prefect.held_for(policy.spec.server.api_url) if policy is not None else 0.0

    async def keep_fence(self) -> None:
        """Read this replica's peering record once (call it several times per lifetime)."""
        if self.fence.identity is None or self.settings.peering is None:
            return
        try:
            self.fence.observe(await self.kube.read_peering(self.settings.peering))
        except Exception as error:  # unreachable: the fence closes on its own when it is due
            log.debug("peering not read: %s", error)

    async def close(self) -> None:
        await self.reaper.close()
        await self.status.flush_all(self.policies)
        await self.prefect.close()
        self.kube.close()

    # --- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, name: str, *, full: bool, deleting: bool = False) -> list[Event]:
        """Bring one policy's limits to the desired state; return the events to post.

        ``full`` re-reads the nodes and Prefect's limits (drift repair); otherwise the caches of
        the last reads and of the operator's own writes are trusted, so a node change costs only
        the write it needs. Raises nothing for Prefect trouble: that is reported in status and
        events.
        """
        record = self.policies.get(name)
        if record is None:
            return []
        started = time.perf_counter()
        trigger = "full" if full else "change"
        if full:  # a resync lists the nodes again (one listing serves every policy's resync)
            for change in await self.view.nodes.refresh(self.settings.resync_seconds / 2):
                self.view.wake_for(change)
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
        if spec.capacity_from == "WorkerPods" and not self.settings.watch_worker_pods:
            error = "capacityFrom WorkerPods needs the operator's pod watch (watch_worker_pods)"
            self.status.write(name, record, Outcome(generation, spec_error=error))
            return [events.invalid_spec(error)]
        done: list[Event] = []
        plan = None
        try:
            server = await self.prefect.server(spec.server, full=full)
            observed = await self.prefect.observed(server, full=full, listed=listed)
            leases = await self.prefect.durability(server, full=full)
            try:
                desired = PolicyDesired() if deleting else self.view.desired_for(name)
            except LimitNameError as error:
                self.status.write(name, record, Outcome(generation, spec_error=str(error)))
                return [events.invalid_limit_name(str(error))]
            if not full:
                # Setting a limit to 0 needs how many slots it holds now, not at the last
                # listing: while any is held it drains at 1 instead.
                await self.prefect.reread(server, _lowered(desired, observed, record))
            plan = plan_policy(
                desired,
                record.ledger,
                observed,
                deletion_policy=spec.deletion_policy,
                other_ledgers=self.view.other_ledgers(name),
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
        except Fenced as error:
            log.warning("%s: %s", name, error)  # its Event may not reach the API server either
            return [*done, events.fenced(str(error))]
        except (PrefectUnreachable, SecretNotFound) as error:
            message = str(error)
            if isinstance(error, PrefectRateLimited):  # it answers: what it said still holds
                self.prefect.hold(spec.server.api_url, error.retry_after)
                outcome = Outcome(generation, plan, prefect_error=message, rate_limited=True)
                self.status.write(name, record, outcome)
                return [*done, events.prefect_rate_limited(message)]
            self.prefect.forget(spec.server.api_url)  # re-read everything once it is back
            self.status.write(name, record, Outcome(generation, plan, prefect_error=message))
            return [*done, events.prefect_unreachable(message)]
        export_metrics(name, record, plan.ledger, observed)
        outcome = Outcome(
            generation,
            plan,
            leases=leases,
            time_sliced=self.view.time_sliced(policy, desired),
            short_workers=self.view.short_workers(policy, desired),
        )
        self.status.write(name, record, outcome)
        return done

    async def _apply(self, server: LimitsApi, writes: list[Change], done: list[Event]) -> None:
        """Make the plan's writes, at most ``prefect_write_concurrency`` at a time; each one's
        event joins ``done`` once it is made.

        The plan's order holds between kinds: every create is made before any update starts,
        and every update before any delete, so a limit moving to a new name exists before the
        old one goes (the write-ahead already named every create in the ledger). Within a kind
        the names are independent. The first failure (an outage, a 429, the fence closing)
        stops further writes from starting; those in flight finish and count, and the failure
        is raised once they have: the caller reports it and the next reconcile retries the
        rest from the cache, which follows every write made.
        """
        bound = self.settings.prefect_write_concurrency
        failures: list[Fenced | PrefectUnreachable] = []

        async def worker(queue: Iterator[Change]) -> None:
            for change in queue:  # one shared iterator: the workers take writes in plan order
                if failures:
                    return
                try:
                    self.fence.check()
                    await self._write(server, change)
                except (Fenced, PrefectUnreachable) as error:
                    failures.append(error)
                    return
                self.prefect.record(server, change)
                done.append(change.event)

        for action in ("create", "update", "delete"):
            batch = [change for change in writes if change.action == action]
            if not batch:
                continue
            queue = iter(batch)
            async with asyncio.TaskGroup() as group:
                for _ in range(min(bound, len(batch))):
                    group.create_task(worker(queue))
            if failures:
                raise failures[0]

    @staticmethod
    async def _write(server: LimitsApi, change: Change) -> None:
        if change.limit is None:
            await server.delete(change.name)
        elif change.action == "create":
            await server.create(change.name, change.limit.limit, change.limit.slot_decay_per_second)
        else:
            await server.update(change.name, change.limit.limit, change.limit.slot_decay_per_second)
