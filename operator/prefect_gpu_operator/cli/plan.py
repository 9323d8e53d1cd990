"""``prefect-gpu-operator plan``: what the operator would write to Prefect now, as a table or
JSON. Nothing is written (``runtime/plan_preview.py``)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from prefect_gpu_operator.adapters.kube import Kube
from prefect_gpu_operator.cli import EXIT_ERROR, EXIT_OK, error_line
from prefect_gpu_operator.runtime.plan_preview import LimitWrite, PolicyPlan, preview
from prefect_gpu_operator.settings import current_settings

__all__ = ["plan_command", "render_json", "render_table"]

_HEADER = ("POLICY", "ACTION", "LIMIT", "NODE", "NOW", "PLANNED")


def plan_command(policy: str | None, output: str) -> int:
    settings = current_settings()
    kube = Kube()
    try:
        plans = asyncio.run(preview(kube, settings, only=policy))
    finally:
        kube.close()
    sys.stdout.write(render_json(plans) if output == "json" else render_table(plans))
    for plan in plans:
        if plan.error is not None:
            error_line(f"policy {plan.policy}: {plan.error}")
    return EXIT_ERROR if any(plan.error is not None for plan in plans) else EXIT_OK


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _planned(write: LimitWrite) -> str:
    if write.draining_to is None:
        return _number(write.planned)
    return f"{write.planned} (draining to {write.draining_to} as slots are released)"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "   ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def _summary(plans: Sequence[PolicyPlan]) -> str:
    if not plans:
        return "No GPULimitPolicy in the cluster."
    actions = [write.action for plan in plans for write in plan.writes]
    counts = ", ".join(f"{actions.count(a)} to {a}" for a in ("create", "update", "delete"))
    unchanged = sum(plan.unchanged for plan in plans)
    failed = sum(plan.error is not None for plan in plans)
    not_planned = f", {failed} {'policy' if failed == 1 else 'policies'} not planned" * bool(failed)
    return f"Plan: {counts}, {unchanged} unchanged{not_planned}. Nothing was written."


def render_table(plans: Sequence[PolicyPlan]) -> str:
    rows = [
        (plan.policy, w.action, w.name, w.node or "-", _number(w.current), _planned(w))
        for plan in plans
        for w in plan.writes
    ]
    lines = [*_columns([_HEADER, *rows]), ""] if rows else []
    notes = [f"{plan.policy}: {note}" for plan in plans for note in plan.notes]
    lines += [*notes, ""] if notes else []
    lines.append(_summary(plans))
    return "\n".join(lines) + "\n"


def _as_json(plan: PolicyPlan) -> dict[str, Any]:
    return {
        "name": plan.policy,
        "server": plan.server,
        "error": plan.error,
        "changes": [
            {
                "action": w.action,
                "limit": w.name,
                "node": w.node,
                "current": w.current,
                "planned": w.planned,
                "drainingTo": w.draining_to,
            }
            for w in plan.writes
        ],
        "unchanged": plan.unchanged,
        "notes": list(plan.notes),
    }


def render_json(plans: Sequence[PolicyPlan]) -> str:
    return json.dumps({"policies": [_as_json(plan) for plan in plans]}, indent=2) + "\n"
