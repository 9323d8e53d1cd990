"""A policy's status as a pure function of what one reconciliation found and did."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect_gpu_operator.domain.plan import Plan
from prefect_gpu_operator.domain.worker_pods import worker_entries

__all__ = ["Outcome", "build_status", "condition"]


@dataclass(frozen=True)
class Outcome:
    """What a reconciliation learned: the plan it applied (if it got that far) and any error."""

    generation: int
    plan: Plan | None = None
    prefect_error: str | None = None
    spec_error: str | None = None
    workers: frozenset[str] = frozenset()  # nodes running Prefect pods (WORKER_ID)


def condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == value else now
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


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


def build_status(outcome: Outcome, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status to write: ledger, counts and the Ready, PrefectReachable, Conflict conditions."""
    old_conditions = list(previous.get("conditions") or [])
    generation = outcome.generation

    def make(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(kind, ok, reason, message, generation, now, old_conditions)

    status: dict[str, Any] = {"observedGeneration": generation}
    if outcome.spec_error is not None:
        ready = make("Ready", False, "InvalidSpec", outcome.spec_error)
        reachable = next(
            (c for c in old_conditions if c.get("type") == "PrefectReachable"),
            make("PrefectReachable", False, "NotChecked", "the spec is invalid"),
        )
        conflict = make("Conflict", False, "NoConflict", "")
    elif outcome.prefect_error is not None:
        ready = make("Ready", False, "PrefectUnreachable", outcome.prefect_error)
        reachable = make("PrefectReachable", False, "RequestFailed", outcome.prefect_error)
        conflict = next(
            (c for c in old_conditions if c.get("type") == "Conflict"),
            make("Conflict", False, "NoConflict", ""),
        )
    else:
        plan = outcome.plan or Plan()
        reachable = make("PrefectReachable", True, "Connected", "the Prefect API answers")
        message = _conflict_message(plan)
        conflict = make(
            "Conflict",
            bool(message),
            "LimitNameTaken" if message else "NoConflict",
            message,
        )
        slots = sum(entry.limit for entry in plan.ledger)
        ready = make(
            "Ready",
            True,
            "LimitsInSync",
            f"{len(plan.ledger)} limits with {slots} slots in sync",
        )
    if outcome.plan is not None:
        ledger = outcome.plan.ledger if outcome.prefect_error is None else outcome.plan.claim
        status["limits"] = [entry.model_dump(by_alias=True) for entry in ledger]
        status["nodes"] = len(ledger)
        status["totalSlots"] = sum(entry.limit for entry in ledger)
    status["conditions"] = [ready, reachable, conflict]
    status["workers"] = worker_entries(
        outcome.workers, status.get("limits", previous.get("limits") or [])
    )
    return status
