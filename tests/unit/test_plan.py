"""Plans for one policy: create, update, delete or retain, refuse users' limits, hand over."""

from __future__ import annotations

from typing import Literal

import pytest

from prefect_gpu_operator.api.policy import LimitEntry
from prefect_gpu_operator.domain.desired import DesiredLimit, PolicyDesired
from prefect_gpu_operator.domain.plan import ObservedLimit, Plan, plan_policy

DeletionPolicy = Literal["Delete", "Retain"]


def want(*limits: tuple[str, int], conflicts: dict[str, str] | None = None) -> PolicyDesired:
    """Desired limits given as (node, limit), named gpu:<node>."""
    return PolicyDesired(
        limits={f"gpu:{node}": DesiredLimit(f"gpu:{node}", node, limit) for node, limit in limits},
        conflicts=conflicts or {},
    )


def owned(*limits: tuple[str, int]) -> list[LimitEntry]:
    return [LimitEntry(name=f"gpu:{node}", node=node, limit=limit) for node, limit in limits]


def prefect(*limits: ObservedLimit) -> dict[str, ObservedLimit]:
    return {limit.name: limit for limit in limits}


def gcl(name: str, limit: int, *, active: bool = True, decay: float = 0.0) -> ObservedLimit:
    return ObservedLimit(name=name, limit=limit, active=active, slot_decay_per_second=decay)


def plan(
    desired: PolicyDesired,
    ledger: list[LimitEntry],
    observed: dict[str, ObservedLimit],
    deletion_policy: DeletionPolicy = "Delete",
    other_ledgers: dict[str, str] | None = None,
) -> Plan:
    return plan_policy(
        desired, ledger, observed, deletion_policy=deletion_policy, other_ledgers=other_ledgers
    )


def test_new_node_is_created_and_claimed_before_the_call() -> None:
    result = plan(want(("gpu-1", 4)), [], {})
    assert result.create == (DesiredLimit("gpu:gpu-1", "gpu-1", 4),)
    assert (result.update, result.delete, result.refused) == ((), (), ())
    assert result.claim == result.ledger == tuple(owned(("gpu-1", 4)))
    assert result.calls_prefect


def test_nothing_changed_means_no_prefect_call() -> None:
    result = plan(want(("gpu-1", 4)), owned(("gpu-1", 4)), prefect(gcl("gpu:gpu-1", 4)))
    assert result == Plan(claim=tuple(owned(("gpu-1", 4))), ledger=tuple(owned(("gpu-1", 4))))
    assert not result.calls_prefect


@pytest.mark.parametrize(
    ("observed", "desired_limit", "desired_decay"),
    [
        (gcl("gpu:gpu-1", 4), 2, 0.0),  # a GPU failed
        (gcl("gpu:gpu-1", 4), 8, 0.0),  # more GPUs or more slots per GPU
        (gcl("gpu:gpu-1", 1), 4, 0.0),  # someone edited it in the UI
        (gcl("gpu:gpu-1", 4), 0, 0.0),  # all GPUs gone: a deliberate 0
        (gcl("gpu:gpu-1", 4, decay=0.5), 4, 0.0),  # decay drifted
        (gcl("gpu:gpu-1", 4), 4, 0.25),  # decay changed in the policy
    ],
)
def test_drift_is_updated(
    observed: ObservedLimit, desired_limit: int, desired_decay: float
) -> None:
    limit = DesiredLimit("gpu:gpu-1", "gpu-1", desired_limit, desired_decay)
    desired = PolicyDesired(limits={limit.name: limit})
    result = plan(desired, owned(("gpu-1", observed.limit)), prefect(observed))
    assert result.update == (limit,)
    assert (result.create, result.delete) == ((), ())
    assert result.ledger == (LimitEntry(name="gpu:gpu-1", node="gpu-1", limit=desired_limit),)


def test_owned_limit_deleted_behind_our_back_is_recreated() -> None:
    result = plan(want(("gpu-1", 4)), owned(("gpu-1", 4)), {})
    assert result.create == (DesiredLimit("gpu:gpu-1", "gpu-1", 4),)


@pytest.mark.parametrize(
    ("deletion_policy", "deleted"), [("Delete", ("gpu:gone",)), ("Retain", ())]
)
def test_node_gone(deletion_policy: DeletionPolicy, deleted: tuple[str, ...]) -> None:
    result = plan(
        want(("gpu-1", 4)),
        owned(("gpu-1", 4), ("gone", 2)),
        prefect(gcl("gpu:gpu-1", 4), gcl("gpu:gone", 2)),
        deletion_policy,
    )
    assert result.delete == deleted
    assert result.ledger == tuple(owned(("gpu-1", 4)))  # dropped from the ledger either way
    # The entry stays claimed until the delete has happened: a crash in between loses nothing.
    assert result.claim == tuple(owned(("gone", 2), ("gpu-1", 4)))


@pytest.mark.parametrize("deletion_policy", ["Delete", "Retain"])
def test_policy_deleted(deletion_policy: DeletionPolicy) -> None:
    ledger = owned(("a", 1), ("b", 2))
    result = plan(
        PolicyDesired(), ledger, prefect(gcl("gpu:a", 1), gcl("gpu:b", 2)), deletion_policy
    )
    assert result.delete == (("gpu:a", "gpu:b") if deletion_policy == "Delete" else ())
    assert result.ledger == ()


def test_ledger_entry_already_gone_from_prefect_is_just_forgotten() -> None:
    result = plan(want(), owned(("gone", 2)), {})
    assert (result.delete, result.ledger) == ((), ())


def test_users_manual_limit_is_never_touched() -> None:
    # gpu:manual is the user's own limit and not desired; nothing about it may change.
    result = plan(
        want(("gpu-1", 4)),
        owned(("gpu-1", 4)),
        prefect(gcl("gpu:gpu-1", 4), gcl("gpu:manual", 1)),
    )
    assert "gpu:manual" not in result.delete
    assert all(limit.name != "gpu:manual" for limit in result.create + result.update)
    assert not result.calls_prefect


@pytest.mark.parametrize("observed_limit", [1, 4])
def test_pre_existing_gpu_node_limit_is_refused_not_adopted(observed_limit: int) -> None:
    # Someone ran `prefect gcl create gpu:gpu-1 --limit 1` before installing the operator.
    result = plan(want(("gpu-1", 4)), [], prefect(gcl("gpu:gpu-1", observed_limit)))
    assert result.refused == ("gpu:gpu-1",)
    assert (result.create, result.update, result.delete) == ((), (), ())
    assert result.ledger == result.claim == ()


def test_refused_limit_stays_refused_when_its_node_leaves() -> None:
    result = plan(want(), [], prefect(gcl("gpu:gpu-1", 1)))
    assert (result.delete, result.refused, result.ledger) == ((), (), ())


@pytest.mark.parametrize("deletion_policy", ["Delete", "Retain"])
def test_active_is_never_toggled(deletion_policy: DeletionPolicy) -> None:
    result = plan(
        want(("gpu-1", 2)),
        owned(("gpu-1", 4)),
        prefect(gcl("gpu:gpu-1", 4, active=False)),
        deletion_policy,
    )
    assert result.update == (DesiredLimit("gpu:gpu-1", "gpu-1", 2),)  # carries no `active`
    assert result.inactive == ("gpu:gpu-1",)  # reported, not re-enabled


def test_unknown_node_leaves_its_limit_alone() -> None:
    desired = PolicyDesired(unknown={"gpu:bad": "node bad: '1.5' is fractional"})
    result = plan(desired, owned(("bad", 2)), prefect(gcl("gpu:bad", 2)))
    assert (result.create, result.update, result.delete) == ((), (), ())
    assert result.ledger == tuple(owned(("bad", 2)))


def test_younger_policy_reports_conflict_and_never_touches_the_older_ones_limit() -> None:
    desired = want(conflicts={"gpu:gpu-1": "old"})
    result = plan(desired, [], prefect(gcl("gpu:gpu-1", 4)), other_ledgers={"gpu:gpu-1": "old"})
    assert result.conflicts == {"gpu:gpu-1": "old"}
    assert (result.create, result.update, result.delete, result.refused) == ((), (), (), ())
    assert result.ledger == ()


def test_older_policy_takes_over_from_a_younger_one_without_a_delete() -> None:
    """The older policy's selector grew to a node the younger one already serves."""
    observed = prefect(gcl("gpu:gpu-1", 2))
    # Pass 1: the older policy adopts (and fixes the limit); the younger keeps its entry for now.
    older = plan(want(("gpu-1", 4)), [], observed, other_ledgers={"gpu:gpu-1": "young"})
    assert older.adopt == ("gpu:gpu-1",)
    assert older.update == (DesiredLimit("gpu:gpu-1", "gpu-1", 4),)
    assert older.ledger == tuple(owned(("gpu-1", 4)))
    younger_before = plan(
        want(conflicts={"gpu:gpu-1": "old"}), owned(("gpu-1", 2)), observed, "Delete"
    )
    assert (younger_before.delete, younger_before.release) == ((), ())
    assert younger_before.ledger == tuple(owned(("gpu-1", 2)))
    # Pass 2: the older policy lists it, so the younger releases it, still without deleting.
    younger_after = plan(
        want(conflicts={"gpu:gpu-1": "old"}),
        owned(("gpu-1", 2)),
        observed,
        "Delete",
        other_ledgers={"gpu:gpu-1": "old"},
    )
    assert (younger_after.delete, younger_after.release) == ((), ("gpu:gpu-1",))
    assert younger_after.ledger == ()


def test_a_limit_another_policy_took_over_is_released_not_deleted() -> None:
    result = plan(
        want(), owned(("gpu-1", 4)), prefect(gcl("gpu:gpu-1", 4)), "Delete", {"gpu:gpu-1": "other"}
    )
    assert (result.delete, result.release, result.ledger) == ((), ("gpu:gpu-1",), ())


def test_many_nodes_mixed() -> None:
    desired = want(("keep", 4), ("grow", 8), ("new", 2), ("user", 1))
    ledger = owned(("keep", 4), ("grow", 4), ("old", 1))
    observed = prefect(
        gcl("gpu:keep", 4),
        gcl("gpu:grow", 4),
        gcl("gpu:old", 1),
        gcl("gpu:user", 9),
        gcl("gpu:manual", 3),
    )
    result = plan(desired, ledger, observed)
    assert [limit.name for limit in result.create] == ["gpu:new"]
    assert [limit.name for limit in result.update] == ["gpu:grow"]
    assert result.delete == ("gpu:old",)
    assert result.refused == ("gpu:user",)
    assert [entry.name for entry in result.ledger] == ["gpu:grow", "gpu:keep", "gpu:new"]
    assert [entry.name for entry in result.claim] == ["gpu:grow", "gpu:keep", "gpu:new", "gpu:old"]


def test_a_limit_of_0_waits_at_1_until_no_slot_is_held() -> None:
    """Prefect cannot release into a limit of 0; at 1 no new holder can enter while one holds."""
    ledger = [LimitEntry(name="gpu:a", node="a", limit=4)]

    def step(held: int, limit: int) -> Plan:
        observed = {"gpu:a": ObservedLimit("gpu:a", limit, active_slots=held)}
        return plan_policy(want(("a", 0)), ledger, observed, deletion_policy="Delete")

    first = step(held=3, limit=4)  # the node lost every GPU while 3 slots are held
    assert [(u.name, u.limit) for u in first.update] == [("gpu:a", 1)]
    assert first.draining == (LimitEntry(name="gpu:a", node="a", limit=1, draining_to=0),)
    assert step(held=1, limit=1).update == ()  # waiting for the last holder
    done = step(held=0, limit=1)
    assert [(u.name, u.limit) for u in done.update] == [("gpu:a", 0)]
    assert done.draining == ()
    stranded = step(held=2, limit=0)  # set to 0 by someone else: raised so they can release
    assert [(u.name, u.limit) for u in stranded.update] == [("gpu:a", 1)]


def test_a_positive_target_is_written_at_once_whatever_is_held() -> None:
    """Prefect keeps holders above a lowered limit and takes their releases: nothing to wait for
    (waiting would never end: a leaving holder hands its slot on without a release)."""
    ledger = [LimitEntry(name="gpu:a", node="a", limit=4)]
    observed = {"gpu:a": ObservedLimit("gpu:a", 4, active_slots=4)}
    plan = plan_policy(want(("a", 1)), ledger, observed, deletion_policy="Delete")
    assert [(u.name, u.limit) for u in plan.update] == [("gpu:a", 1)]
    assert plan.draining == ()
