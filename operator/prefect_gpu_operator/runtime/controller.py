"""The operator's live state and its one reconcile loop, between kopf's handlers and the adapters.

Nodes and policies arrive through kopf's watches (``observe_*``); each policy's daemon calls
``reconcile`` whenever something relevant changed and every ``resync_seconds``. A reconcile is
level-triggered: desired state from every policy and node (pure), Prefect's limits (cached between
full resyncs, which re-read them), then the plan (pure) applied in crash-safe order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from prefect_gpu_operator.adapters.kube import Kube, SecretNotFound, gpu_node
from prefect_gpu_operator.adapters.prefect_limits import PrefectLimits, PrefectUnreachable
from prefect_gpu_operator.api.limit_names import LimitNameError
from prefect_gpu_operator.api.policy import GPULimitPolicySpec, LimitEntry, PrefectServerReference
from prefect_gpu_operator.domain.desired import (
    GPUNode,
    Policy,
    PolicyDesired,
    VerdictCache,
    desired_limits,
)
from prefect_gpu_operator.domain.plan import ObservedLimit, Plan, plan_policy
from prefect_gpu_operator.domain.status import Outcome, build_status
from prefect_gpu_operator.domain.worker_pods import WorkerPods, no_limit_message
from prefect_gpu_operator.metrics import (
    MANAGED_LIMITS,
    NODE_SLOTS,
    RECONCILE_SECONDS,
    RECONCILES,
)
from prefect_gpu_operator.settings import OperatorSettings

__all__ = ["Event", "Operator", "PolicyRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the policy."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class PolicyRecord:
    """What the operator knows of one policy between reconciles."""

    policy: Policy | None  # None when the spec does not parse
    spec_error: str | None
    ledger: tuple[LimitEntry, ...]
    status: dict[str, Any] = field(default_factory=dict)  # as last written
    pending: dict[str, Any] | None = None  # the status to write next, if it differs
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # writes in order
    flusher: asyncio.Task[None] | None = None
    exported_nodes: set[str] = field(default_factory=set)  # node labels of the slots metric


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime.datetime:
    if not value:
        return datetime.datetime.max.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _export_metrics(name: str, record: PolicyRecord, ledger: tuple[LimitEntry, ...]) -> None:
    MANAGED_LIMITS.labels(name).set(len(ledger))
    nodes = {entry.node for entry in ledger}
    for gone in record.exported_nodes - nodes:
        with contextlib.suppress(KeyError):
            NODE_SLOTS.remove(name, gone)
    for entry in ledger:
        NODE_SLOTS.labels(name, entry.node).set(entry.limit)
    record.exported_nodes = nodes


def _ledger(status: Mapping[str, Any]) -> tuple[LimitEntry, ...]:
    return tuple(LimitEntry.model_validate(entry) for entry in status.get("limits") or [])


@dataclass(frozen=True)
class Listing:
    """Every limit on one server as a resync read them, and the names written meanwhile."""

    api_url: str
    limits: dict[str, ObservedLimit]
    written_meanwhile: set[str]  # live: grows until the reconcile that uses it ends
    error: PrefectUnreachable | None = None


def newest_observation(
    listed: Mapping[str, ObservedLimit],
    cached: Mapping[str, ObservedLimit],
    written_meanwhile: AbstractSet[str],
) -> dict[str, ObservedLimit]:
    """The listing, except for names the operator wrote while it was in flight: for those the
    cache (which follows every write) is newer; absent from the cache means deleted."""
    newest = dict(listed)
    for name in written_meanwhile:
        if name in cached:
            newest[name] = cached[name]
        else:
            newest.pop(name, None)
    return newest


class Operator:
    """Nodes, policies, Prefect connections and the reconcile of one policy."""

    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.nodes: dict[str, GPUNode] = {}
        self.policies: dict[str, PolicyRecord] = {}
        self._servers: dict[tuple[str, str | None], PrefectLimits] = {}
        self._observed: dict[str, dict[str, ObservedLimit]] = {}
        # Per server, one set per resync listing in flight: the names written since it began.
        self._listing_watchers: dict[str, list[set[str]]] = {}
        self._verdicts = VerdictCache()
        self._api_keys: dict[tuple[str, str], str] = {}  # (Secret, key) -> value; never logged
        self.workers = WorkerPods()

    # --- what the watches tell us ------------------------------------------------------------

    def observe_node(self, body: Mapping[str, Any], deleted: bool = False) -> bool:
        """Record a node; True (and every policy woken) if its labels or GPUs changed."""
        node = gpu_node(body)
        before = self.nodes.get(node.name)
        if deleted:
            self.nodes.pop(node.name, None)
            changed = before is not None
        else:
            changed = before != node
            if changed:  # keep the same object while unchanged: verdict caches key on identity
                self.nodes[node.name] = node
        if changed:
            self.wake_all()
        return changed

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
            status = dict(body.get("status") or {})
            record = PolicyRecord(policy, spec_error, _ledger(status), status)
            self.policies[name] = record
            self.wake_all()
        elif record.policy != policy or record.spec_error != spec_error:
            record.policy, record.spec_error = policy, spec_error
            self.wake_all()
        return record

    def observe_pod(self, body: Mapping[str, Any], deleted: bool = False) -> str | None:
        """Record a Prefect pod; return a warning for it when it first lands on a node without a
        limit. Policies' ``workers`` status follows the set of nodes running Prefect pods."""
        if self.workers.observe(body, deleted):
            self.wake_all()
        node = None if deleted else self.workers.first_sighting(body)
        if node is None or self.node_has_limit(node):
            return None
        return no_limit_message(node)

    def node_has_limit(self, node: str) -> bool:
        policies = [r.policy for r in self.policies.values() if r.policy is not None]
        try:
            desired = desired_limits(policies, self.nodes.values(), self._verdicts)
        except LimitNameError:
            return False  # such a policy creates no limit at all
        return any(limit.node == node for d in desired.values() for limit in d.limits.values())

    def forget_policy(self, name: str) -> None:
        if (record := self.policies.pop(name, None)) is not None:
            _export_metrics(name, record, ())
            with contextlib.suppress(KeyError):
                MANAGED_LIMITS.remove(name)
            self.wake_all()  # a younger policy may now own what this one held

    def wake_all(self) -> None:
        for record in self.policies.values():
            record.wake.set()

    # --- Prefect -------------------------------------------------------------------------------

    async def _server(self, reference: PrefectServerReference, full: bool) -> PrefectLimits:
        api_key: str | None = None
        if reference.api_key is not None:
            selector = reference.api_key.value_from.secret_key_ref
            secret = (selector.name, selector.key)
            # Read on full reconciles only (a rotated key is picked up at the next resync), not
            # on every node change.
            if full or secret not in self._api_keys:
                self._api_keys[secret] = await self.kube.read_secret_key(
                    self.settings.namespace, selector.name, selector.key
                )
            api_key = self._api_keys[secret]
        key = (reference.api_url, api_key)
        if key not in self._servers:
            self._servers[key] = PrefectLimits(
                reference.api_url, api_key, timeout=self.settings.prefect_timeout_seconds
            )
        return self._servers[key]

    async def _observe_prefect(
        self, server: PrefectLimits, full: bool, listed: Listing | None = None
    ) -> dict[str, ObservedLimit]:
        url = server.api_url
        if listed is not None and listed.api_url == url:
            if listed.error is not None:
                raise listed.error
            self._observed[url] = newest_observation(
                listed.limits, self._observed.get(url, {}), listed.written_meanwhile
            )
        elif full or url not in self._observed:
            self._observed[url] = await server.list_all()
        return self._observed[url]

    async def _list_unlocked(
        self, record: PolicyRecord, stack: contextlib.AsyncExitStack
    ) -> Listing | None:
        """A resync's read of Prefect, taken before the policy's lock: node changes applied
        meanwhile are not held up by it (a 1,000-limit listing is several paged calls). Names
        the operator writes from now until ``stack`` closes are noted, so their newer values win.
        """
        if record.policy is None:
            return None
        try:
            server = await self._server(record.policy.spec.server, full=False)
        except SecretNotFound:
            return None  # the locked reconcile reads the Secret again and reports it
        url = server.api_url
        written = stack.enter_context(self._tracking_writes(url))
        try:
            limits = await server.list_all()
        except PrefectUnreachable as error:
            return Listing(url, {}, written, error)
        return Listing(url, limits, written)

    @contextlib.contextmanager
    def _tracking_writes(self, url: str) -> Iterator[set[str]]:
        written: set[str] = set()
        watchers = self._listing_watchers.setdefault(url, [])
        watchers.append(written)
        try:
            yield written
        finally:
            watchers.remove(written)
            if not watchers:
                del self._listing_watchers[url]

    def _note_write(self, server: PrefectLimits, name: str) -> None:
        for written in self._listing_watchers.get(server.api_url, ()):
            written.add(name)

    async def close(self) -> None:
        await self.flush_all()
        for server in self._servers.values():
            await server.close()
        self.kube.close()

    # --- reconcile -----------------------------------------------------------------------------

    def _desired(self, name: str) -> PolicyDesired:
        policies = [r.policy for r in self.policies.values() if r.policy is not None]
        desired = desired_limits(policies, self.nodes.values(), self._verdicts)
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
        async with contextlib.AsyncExitStack() as stack:
            listed = await self._list_unlocked(record, stack) if full and not deleting else None
            async with record.lock:
                trigger = "full" if full else "change"
                RECONCILES.labels(name, trigger).inc()
                try:
                    return await self._reconcile(
                        name, record, full=full, deleting=deleting, listed=listed
                    )
                finally:
                    RECONCILE_SECONDS.labels(trigger).observe(time.perf_counter() - started)

    async def _reconcile(
        self,
        name: str,
        record: PolicyRecord,
        *,
        full: bool,
        deleting: bool,
        listed: Listing | None = None,
    ) -> list[Event]:
        policy = record.policy
        generation = (
            policy.generation if policy else int(record.status.get("observedGeneration") or 0)
        )
        if policy is None:
            await self._write_status(
                name, record, Outcome(generation, spec_error=record.spec_error)
            )
            return [Event("Warning", "InvalidSpec", record.spec_error or "invalid spec")]
        spec = policy.spec
        if deleting and not record.ledger:
            return []  # owns nothing: no need to reach Prefect (or its Secret) to let it go
        events: list[Event] = []
        plan: Plan | None = None
        try:
            server = await self._server(spec.server, full)
            observed = await self._observe_prefect(server, full, listed)
            try:
                desired = PolicyDesired() if deleting else self._desired(name)
            except LimitNameError as error:
                await self._write_status(name, record, Outcome(generation, spec_error=str(error)))
                return [Event("Warning", "InvalidLimitName", str(error))]
            plan = plan_policy(
                desired,
                record.ledger,
                observed,
                deletion_policy=spec.deletion_policy,
                other_ledgers=self._other_ledgers(name),
            )
            new_names = {e.name for e in plan.claim} - {e.name for e in record.ledger}
            record.ledger = plan.claim
            if new_names:
                # Write-ahead: name every limit about to be created before creating it, so a
                # crash cannot leave one of ours looking like a user's. Only names matter here;
                # a changed size of a limit already listed is written after, at leisure.
                written = await self._write_status(
                    name, record, Outcome(generation, plan=plan), ledger_only=True
                )
                if not written:
                    return [Event("Warning", "StatusWriteFailed", "could not record new limits")]
            events = await self._apply(server, plan, observed)
            record.ledger = plan.ledger
        except (PrefectUnreachable, SecretNotFound) as error:
            self._observed.pop(spec.server.api_url, None)  # re-read everything once it is back
            message = str(error)
            await self._write_status(
                name, record, Outcome(generation, plan=plan, prefect_error=message)
            )
            return [*events, Event("Warning", "PrefectUnreachable", message)]
        _export_metrics(name, record, plan.ledger)
        await self._write_status(name, record, Outcome(generation, plan=plan))
        return events

    async def _apply(
        self, server: PrefectLimits, plan: Plan, observed: dict[str, ObservedLimit]
    ) -> list[Event]:
        events: list[Event] = []
        for limit in plan.create:
            await server.create(limit.name, limit.limit, limit.slot_decay_per_second)
            self._note_write(server, limit.name)
            observed[limit.name] = ObservedLimit(
                limit.name, limit.limit, True, limit.slot_decay_per_second
            )
            events.append(
                Event(
                    "Normal",
                    "LimitCreated",
                    f"{limit.name}: limit {limit.limit} for node {limit.node}",
                )
            )
        for limit in plan.update:
            before = observed.get(limit.name)
            await server.update(limit.name, limit.limit, limit.slot_decay_per_second)
            self._note_write(server, limit.name)
            observed[limit.name] = ObservedLimit(
                limit.name,
                limit.limit,
                before.active if before else True,
                limit.slot_decay_per_second,
            )
            was = before.limit if before else "?"
            events.append(
                Event("Normal", "LimitUpdated", f"{limit.name}: limit {was} -> {limit.limit}")
            )
        for limit_name in plan.delete:
            await server.delete(limit_name)
            self._note_write(server, limit_name)
            observed.pop(limit_name, None)
            events.append(Event("Normal", "LimitDeleted", f"{limit_name}: node gone or deselected"))
        return events

    async def _write_status(
        self, name: str, record: PolicyRecord, outcome: Outcome, *, ledger_only: bool = False
    ) -> bool:
        """Record the status to write. The ledger-only write-ahead goes out now; the rest is
        coalesced, so a burst of node changes costs one status write, not one per change.
        Returns False when a write that had to go out now failed."""
        outcome = dataclasses.replace(outcome, workers=self.workers.nodes())
        base = record.pending if record.pending is not None else record.status
        if ledger_only:
            status = {"limits": [entry.model_dump(by_alias=True) for entry in record.ledger]}
        else:
            status = build_status(outcome, base, _now())
        intended = {**base, **status}
        if intended == base:
            return True  # nothing new: no write, no watch event, no loop
        record.pending = intended
        if ledger_only:
            return await self._flush(name, record)
        if record.flusher is None or record.flusher.done():
            record.flusher = asyncio.create_task(self._flush_soon(name, record))
        return True

    async def _flush_soon(self, name: str, record: PolicyRecord) -> None:
        await asyncio.sleep(self.settings.status_interval_seconds)
        await self._flush(name, record)

    async def _flush(self, name: str, record: PolicyRecord) -> bool:
        async with record.status_lock:  # one write at a time, so they land in order
            intended, record.pending = record.pending, None
            if intended is None or intended == record.status:
                return True
            try:
                await self.kube.patch_policy_status(name, intended)
            except ApiException as error:
                log.warning("status of %s not written (%s); will retry", name, error.reason)
                if record.pending is None:
                    record.pending = intended
                return False
            record.status = intended
            return True

    async def flush_all(self) -> None:
        """Write every pending status now (on shutdown)."""
        for name, record in list(self.policies.items()):
            await self._flush(name, record)
