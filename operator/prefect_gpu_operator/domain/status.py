"""A policy's status as a pure function of what one reconciliation found and did.

The status has one shape, the ``GPULimitPolicyStatus`` model of ``api/policy.py``: built here,
written by the runtime as the model's camelCase dump, read back through the same model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from prefect_gpu_operator.api.policy import (
    Condition,
    GPULimitPolicyStatus,
    LimitEntry,
)
from prefect_gpu_operator.domain.leases import LeaseDurability
from prefect_gpu_operator.domain.plan import Plan
from prefect_gpu_operator.domain.worker_pods import worker_entries

__all__ = ["Outcome", "build_status", "condition", "with_ledger"]


@dataclass(frozen=True)
class Outcome:
    """What a reconciliation learned: the plan it applied (if it got that far) and any error."""

    generation: int
    plan: Plan | None = None
    prefect_error: str | None = None
    spec_error: str | None = None
    workers: frozenset[str] = frozenset()  # nodes running Prefect pods (WORKER_ID)
    time_sliced: tuple[str, ...] = ()  # selected nodes where slotsPerGpu is not applied
    short_workers: tuple[str, ...] = ()  # worker pods that see fewer GPUs than their limit
    rate_limited: bool = False  # the prefect_error is a 429: Prefect answers, slowly
    leases: LeaseDurability | None = None  # what the server reports of its leases, if read


def condition(
    kind: str,
    status: bool | Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    generation: int,
    now: str,
    previous: Sequence[Condition] = (),
) -> Condition:
    """A metav1.Condition; lastTransitionTime moves only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    before = next((c for c in previous if c.type == kind), None)
    since = before.last_transition_time if before and before.status == value else now
    return Condition(
        type=kind,
        status=value,
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=since,
    )


_MATCHED = "every Prefect worker pod that requests GPUs sees as many as its node's limit counts"


def _conflict_message(plan: Plan) -> str:
    parts = []
    if plan.conflicts:
        owners = ", ".join(f"{name} (owned by {owner})" for name, owner in plan.conflicts.items())
        parts.append(f"limits owned by an older policy: {owners}")
    if plan.refused:
        parts.append(
            "limits that already exist in Prefect and are not managed by this policy, left "
            f"untouched: {', '.join(plan.refused)}; delete them in Prefect to let the policy "
            "manage them"
        )
    return "; ".join(parts)


def _sync_message(plan: Plan, time_sliced: Sequence[str]) -> str:
    slots = sum(entry.limit for entry in plan.ledger)
    parts = [f"{len(plan.ledger)} limits with {slots} slots in sync"]
    if draining := plan.draining:
        targets = ", ".join(f"{e.name} {e.limit} -> {e.draining_to}" for e in draining[:5])
        more = f" and {len(draining) - 5} more" if len(draining) > 5 else ""
        parts.append(f"{len(draining)} draining until held slots are released ({targets}{more})")
    if time_sliced:
        names = ", ".join(time_sliced[:5]) + (" ..." if len(time_sliced) > 5 else "")
        parts.append(
            f"slotsPerGpu not applied on time-sliced nodes ({names}): the device plugin "
            "already counts every replica"
        )
    return "; ".join(parts)


def _kept(kind: str, previous: Sequence[Condition], fallback: Condition) -> Condition:
    return next((c for c in previous if c.type == kind), fallback)


def with_ledger(
    previous: GPULimitPolicyStatus, ledger: Iterable[LimitEntry]
) -> GPULimitPolicyStatus:
    """``previous`` with the ledger replaced: the write-ahead before Prefect calls."""
    return previous.model_copy(update={"limits": tuple(ledger)})


def build_status(
    outcome: Outcome, previous: GPULimitPolicyStatus, now: str
) -> GPULimitPolicyStatus:
    """The status to write: ledger, counts, workers and the Ready, PrefectReachable, Conflict,
    WorkersMatchLimits and (once the server was asked) PrefectLeasesDurable conditions. What this
    reconciliation did not learn (no plan yet) keeps its previous value."""
    old = previous.conditions
    generation = outcome.generation

    def make(
        kind: str, ok: bool | Literal["True", "False", "Unknown"], reason: str, message: str
    ) -> Condition:
        return condition(kind, ok, reason, message, generation, now, old)

    if outcome.spec_error is not None:
        ready = make("Ready", False, "InvalidSpec", outcome.spec_error)
        reachable = _kept(
            "PrefectReachable",
            old,
            make("PrefectReachable", False, "NotChecked", "the spec is invalid"),
        )
        conflict = make("Conflict", False, "NoConflict", "")
    elif outcome.prefect_error is not None and outcome.rate_limited:
        ready = make("Ready", False, "RateLimited", outcome.prefect_error)
        reachable = make("PrefectReachable", True, "RateLimited", outcome.prefect_error)
        conflict = _kept("Conflict", old, make("Conflict", False, "NoConflict", ""))
    elif outcome.prefect_error is not None:
        ready = make("Ready", False, "PrefectUnreachable", outcome.prefect_error)
        reachable = make("PrefectReachable", False, "RequestFailed", outcome.prefect_error)
        conflict = _kept("Conflict", old, make("Conflict", False, "NoConflict", ""))
    else:
        plan = outcome.plan or Plan()
        reachable = make("PrefectReachable", True, "Connected", "the Prefect API answers")
        message = _conflict_message(plan)
        conflict = make(
            "Conflict", bool(message), "LimitNameTaken" if message else "NoConflict", message
        )
        ready = make("Ready", True, "LimitsInSync", _sync_message(plan, outcome.time_sliced))
    matched = make("WorkersMatchLimits", True, "WorkersSeeTheirGPUs", _MATCHED)
    if outcome.plan is None:
        matched = _kept("WorkersMatchLimits", old, matched)
    elif outcome.short_workers:
        shown = "; ".join(outcome.short_workers[:5])
        more = (
            f"; and {len(outcome.short_workers) - 5} more" if len(outcome.short_workers) > 5 else ""
        )
        matched = make("WorkersMatchLimits", False, "WorkerSeesFewerGPUs", shown + more)
    leases = outcome.leases
    durable = (
        make("PrefectLeasesDurable", leases.status, leases.reason, leases.message)
        if leases is not None
        else next((c for c in old if c.type == "PrefectLeasesDurable"), None)
    )
    ledger = previous.limits
    if outcome.plan is not None:
        ledger = outcome.plan.ledger if outcome.prefect_error is None else outcome.plan.claim
    counts = (
        {"nodes": len(ledger), "total_slots": sum(entry.limit for entry in ledger)}
        if outcome.plan is not None
        else {}
    )
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": (ready, reachable, conflict, matched, *([durable] if durable else [])),
            "limits": ledger,
            "workers": worker_entries(outcome.workers, ledger),
            **counts,
        }
    )
