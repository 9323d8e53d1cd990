"""A policy's status from what one reconciliation found: ledger, counts, conditions, workers."""

from __future__ import annotations

from prefect_gpu_operator.api.policy import GPULimitPolicyStatus, LimitEntry, WorkerNode
from prefect_gpu_operator.domain.plan import Plan
from prefect_gpu_operator.domain.status import Outcome, build_status, with_ledger
from prefect_gpu_operator.domain.worker_pods import worker_entries
from prefect_gpu_operator.runtime.status_writer import status_body

A = LimitEntry(name="gpu:a", node="a", limit=4)
B = LimitEntry(name="gpu:b", node="b", limit=2)
EMPTY = GPULimitPolicyStatus()


def conditions(status: GPULimitPolicyStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.last_transition_time) for c in status.conditions}


def test_a_synced_plan_makes_a_ready_status_with_its_ledger() -> None:
    status = build_status(Outcome(3, Plan(ledger=(A, B))), EMPTY, "t1")
    assert status.limits == (A, B)
    assert (status.nodes, status.total_slots, status.observed_generation) == (2, 6, 3)
    assert conditions(status) == {
        "Ready": ("True", "LimitsInSync", "t1"),
        "PrefectReachable": ("True", "Connected", "t1"),
        "Conflict": ("False", "NoConflict", "t1"),
        "WorkersMatchLimits": ("True", "WorkersSeeTheirGPUs", "t1"),
    }
    assert status.conditions[0].message == "2 limits with 6 slots in sync"
    assert {c.observed_generation for c in status.conditions} == {3}


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    synced = build_status(Outcome(1, Plan(ledger=(A,))), EMPTY, "t1")
    again = build_status(Outcome(2, Plan(ledger=(A, B))), synced, "t2")
    assert {kind: since for kind, (_, _, since) in conditions(again).items()} == {
        "Ready": "t1",
        "PrefectReachable": "t1",
        "Conflict": "t1",
        "WorkersMatchLimits": "t1",
    }
    down = build_status(Outcome(2, Plan(claim=(A, B)), prefect_error="refused"), again, "t3")
    assert conditions(down)["Ready"] == ("False", "PrefectUnreachable", "t3")
    assert conditions(down)["PrefectReachable"] == ("False", "RequestFailed", "t3")
    assert conditions(down)["Conflict"] == ("False", "NoConflict", "t1")  # not re-judged
    assert down.limits == (A, B)  # the claim: every name it may have created


def test_an_invalid_spec_keeps_what_it_cannot_judge() -> None:
    synced = build_status(Outcome(1, Plan(ledger=(A,))), EMPTY, "t1")
    invalid = build_status(Outcome(2, spec_error="server: required"), synced, "t2")
    assert conditions(invalid)["Ready"] == ("False", "InvalidSpec", "t2")
    assert conditions(invalid)["PrefectReachable"] == ("True", "Connected", "t1")
    assert (invalid.limits, invalid.nodes, invalid.total_slots) == ((A,), 1, 4)
    fresh = build_status(Outcome(1, spec_error="server: required"), EMPTY, "t1")
    assert conditions(fresh)["PrefectReachable"] == ("False", "NotChecked", "t1")


def test_conflicts_and_refusals_are_named() -> None:
    plan = Plan(ledger=(A,), conflicts={"gpu:c": "older"}, refused=("gpu:d",))
    status = build_status(Outcome(1, plan), EMPTY, "t1")
    conflict = next(c for c in status.conditions if c.type == "Conflict")
    assert (conflict.status, conflict.reason) == ("True", "LimitNameTaken")
    assert "gpu:c (owned by older)" in conflict.message
    assert "gpu:d" in conflict.message


def test_worker_entries_name_the_limit_of_each_worker_node() -> None:
    assert worker_entries({"b", "cpu"}, (A, B)) == (
        WorkerNode(node="b", limit="gpu:b"),
        WorkerNode(node="cpu"),
    )
    status = build_status(
        Outcome(1, prefect_error="down", workers=frozenset({"a"})), with_ledger(EMPTY, (A,)), "t"
    )
    assert status.workers == (WorkerNode(node="a", limit="gpu:a"),)


def test_the_body_written_is_the_models_camel_case_dump() -> None:
    status = build_status(Outcome(1, Plan(ledger=(A,)), workers=frozenset({"x"})), EMPTY, "t1")
    body = status_body(status)
    assert body["limits"] == [{"node": "a", "limit": 4}]  # named by the template
    assert body["limitNameTemplate"] == "gpu:{node}"
    assert body["totalSlots"] == 4
    assert body["workers"] == [{"node": "x"}]  # no limit: the key is left out
    assert body["conditions"][0]["lastTransitionTime"] == "t1"
    assert GPULimitPolicyStatus.model_validate(body) == status  # what is read back is the same


def test_draining_limits_time_sliced_nodes_and_short_workers_are_reported() -> None:
    draining = LimitEntry(name="gpu:a", node="a", limit=1, draining_to=0)
    short = ("node a: pod ml/worker was given 1 GPU(s) (1 slot(s)), its limit gpu:a counts 4",)
    outcome = Outcome(1, Plan(ledger=(draining, B)), time_sliced=("b",), short_workers=short)
    status = build_status(outcome, EMPTY, "t1")
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.status == "True"
    assert "1 draining until held slots are released (gpu:a 1 -> 0)" in ready.message
    assert "slotsPerGpu not applied on time-sliced nodes (b)" in ready.message
    matched = next(c for c in status.conditions if c.type == "WorkersMatchLimits")
    assert (matched.status, matched.reason, matched.message) == (
        "False",
        "WorkerSeesFewerGPUs",
        short[0],
    )
    assert status_body(status)["limits"][0] == {"node": "a", "limit": 1, "drainingTo": 0}


def test_the_ledger_leaves_out_the_names_its_template_gives() -> None:
    renamed = LimitEntry(name="old-gpu-a", node="a", limit=4)  # a limit being renamed
    status = build_status(Outcome(1, Plan(ledger=(A, renamed, B))), EMPTY, "t1")
    body = status_body(status)
    assert body["limitNameTemplate"] == "gpu:{node}"  # the template most names follow
    assert body["limits"] == [
        {"node": "a", "limit": 4},
        {"name": "old-gpu-a", "node": "a", "limit": 4},
        {"node": "b", "limit": B.limit},
    ]
    assert GPULimitPolicyStatus.model_validate(body) == status


def test_a_ledger_written_with_every_name_reads_the_same() -> None:
    # As operators before the compact ledger wrote it: no template, every entry named.
    body = {"limits": [{"name": "gpu:a", "node": "a", "limit": 4}, {"name": "x", "node": "b",
                                                                    "limit": 2}]}  # fmt: skip
    status = GPULimitPolicyStatus.model_validate(body)
    assert [entry.name for entry in status.limits] == ["gpu:a", "x"]
    assert status_body(status)["limits"] == [
        {"node": "a", "limit": 4},
        {"name": "x", "node": "b", "limit": 2},
    ]
