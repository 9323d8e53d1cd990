"""What to change in Prefect for one policy: a pure diff of desired, ledger and observed limits.

The ledger (``status.limits``) is the set of limits the policy owns. The operator creates, updates
and deletes only limits in it; a limit that exists in Prefect under a desired name but is in no
policy's ledger belongs to a user and is never touched (reported as refused). ``active`` is never
changed: Prefect miscounts slots when a limit is toggled, so capacity is expressed through ``limit``
alone. A limit is never set to 0 while slots are held in it (Prefect cannot release a slot into
a limit of 0): it drains at 1 until the holders are gone (``drained``).

Crash safety comes from the order the caller applies a plan in:
1. write ``claim`` to status.limits (the ledger plus every name about to be created or adopted),
2. make the Prefect calls (create, update, delete), tolerating 409/404 races,
3. write ``ledger`` to status.limits.
A crash between any two steps leaves a ledger that names every limit the operator may have created,
so the next reconcile finishes the job instead of mistaking its own limit for a user's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Literal

from prefect_gpu_operator.api.policy import LimitEntry
from prefect_gpu_operator.domain.desired import DesiredLimit, PolicyDesired
from prefect_gpu_operator.domain.events import Event, limit_created, limit_deleted, limit_updated

__all__ = [
    "Change",
    "ObservedLimit",
    "Plan",
    "changes",
    "drained",
    "newest_observation",
    "plan_policy",
]


@dataclass(frozen=True)
class ObservedLimit:
    """A global concurrency limit as read from Prefect."""

    name: str
    limit: int
    active: bool = True
    slot_decay_per_second: float = 0.0
    active_slots: int = 0  # the slots held now


@dataclass(frozen=True)
class Plan:
    """The changes that bring one policy's limits to the desired state.

    ``create``/``update``: limits to write (an update sends only ``limit`` and
    ``slot_decay_per_second``). ``delete``: names to delete from Prefect. ``adopt``: names taken
    over from a younger policy's ledger. ``release``: names handed to another policy (dropped from
    the ledger, not deleted). ``refused``: desired names held by a limit no policy owns (a user's).
    ``conflicts``: desired names an older policy owns. ``inactive``: owned limits someone disabled;
    they gate nothing, and the operator does not re-enable them.
    """

    create: tuple[DesiredLimit, ...] = ()
    update: tuple[DesiredLimit, ...] = ()
    delete: tuple[str, ...] = ()
    adopt: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    conflicts: Mapping[str, str] = field(default_factory=dict)
    inactive: tuple[str, ...] = ()
    claim: tuple[LimitEntry, ...] = ()
    ledger: tuple[LimitEntry, ...] = ()

    @property
    def calls_prefect(self) -> bool:
        """Whether applying the plan writes to Prefect at all."""
        return bool(self.create or self.update or self.delete)

    @property
    def draining(self) -> tuple[LimitEntry, ...]:
        """Owned limits kept above their target by the slots held in them."""
        return tuple(entry for entry in self.ledger if entry.draining_to is not None)


def _drifted(observed: ObservedLimit, desired: DesiredLimit) -> bool:
    return observed.limit != desired.limit or not math.isclose(
        observed.slot_decay_per_second, desired.slot_decay_per_second, abs_tol=1e-9
    )


def _entry(limit: DesiredLimit, target: int) -> LimitEntry:
    draining_to = target if limit.limit != target else None
    return LimitEntry(name=limit.name, node=limit.node, limit=limit.limit, draining_to=draining_to)


def drained(desired: DesiredLimit, observed: ObservedLimit) -> DesiredLimit:
    """The limit to write now. Prefect cannot release a slot into a limit of 0 (its decrement
    divides by the limit: 409 on SQLite, 503 on PostgreSQL), so while slots are held a target of
    0 is written as 1: the least limit holders can release into, and one no new holder can enter
    while one holds; 0 follows once nobody does. A positive target is written at once: Prefect
    keeps holders above a lowered limit and takes their releases.

    Why not stay at the holders and follow them down: a holder that leaves hands its slot to the
    next claimant on its node without a release, so under steady demand the held count, and with
    it the limit, would never come down."""
    if desired.limit == 0 and observed.active_slots > 0:
        return replace(desired, limit=1)
    return desired


def _sorted(entries: Iterable[LimitEntry]) -> tuple[LimitEntry, ...]:
    return tuple(sorted(entries, key=lambda entry: entry.name))


def plan_policy(
    desired: PolicyDesired,
    ledger: Iterable[LimitEntry],
    observed: Mapping[str, ObservedLimit],
    *,
    deletion_policy: Literal["Delete", "Retain"],
    other_ledgers: Mapping[str, str] | None = None,
) -> Plan:
    """Diff one policy's desired limits against its ledger and Prefect.

    ``observed``: Prefect's limits by name (all of them, or at least every name in ``desired`` and
    ``ledger``). ``other_ledgers``: limit name → the other policy whose ledger lists it; ownership
    moves between policies only through these ledgers, never by guessing from a name. For a policy
    being deleted pass an empty ``PolicyDesired()``.
    """
    others = other_ledgers or {}
    owned = {entry.name: entry for entry in ledger}
    create: list[DesiredLimit] = []
    update: list[DesiredLimit] = []
    adopt: list[str] = []
    refused: list[str] = []
    kept: dict[str, LimitEntry] = {}

    for name, limit in sorted(desired.limits.items()):
        current = observed.get(name)
        if current is None:
            # Missing, whether never created or deleted behind our back: (re)create it. Even if
            # another policy still lists it, it no longer exists to be handed over.
            create.append(limit)
            kept[name] = _entry(limit, limit.limit)
        elif name in owned or name in others:
            if name not in owned:
                adopt.append(name)  # a younger policy held it; it releases once it sees ours
            write = drained(limit, current)
            if _drifted(current, write):
                update.append(write)
            kept[name] = _entry(write, limit.limit)
        else:
            refused.append(name)  # a user's limit: never adopt, change or delete it

    delete: list[str] = []
    release: list[str] = []
    for name, entry in sorted(owned.items()):
        if name in desired.limits:
            continue
        if name in desired.unknown:
            kept[name] = entry  # the node's GPU count is unreadable: leave its limit as it is
        elif name in others:
            # Another policy has taken it over: hand it on, never delete it (deleting would drop
            # the slots running tasks hold, and that policy would recreate it empty).
            release.append(name)
        elif name in desired.conflicts:
            kept[name] = entry  # an older policy wants it; keep it until that one lists it
        elif deletion_policy == "Delete" and name in observed:
            delete.append(name)
        # Retain, or already gone from Prefect: just forget it.

    inactive = tuple(
        name for name in sorted(kept) if name in observed and not observed[name].active
    )
    return Plan(
        create=tuple(create),
        update=tuple(update),
        delete=tuple(delete),
        adopt=tuple(adopt),
        release=tuple(release),
        refused=tuple(refused),
        conflicts=dict(desired.conflicts),
        inactive=inactive,
        claim=_sorted({**owned, **kept}.values()),
        ledger=_sorted(kept.values()),
    )


@dataclass(frozen=True)
class Change:
    """One Prefect write of a plan, with the Event that reports it once made."""

    action: Literal["create", "update", "delete"]
    name: str
    limit: DesiredLimit | None  # None for a delete
    event: Event


def changes(plan: Plan, observed: Mapping[str, ObservedLimit]) -> list[Change]:
    """The plan's writes in the order they are made: creates, updates, then deletes."""
    made = [
        Change("create", limit.name, limit, limit_created(limit.name, limit.limit, limit.node))
        for limit in plan.create
    ]
    draining = {entry.name: entry.draining_to for entry in plan.ledger}
    for limit in plan.update:
        before = observed.get(limit.name)
        was = before.limit if before else None
        event = limit_updated(limit.name, was, limit.limit, draining.get(limit.name))
        made.append(Change("update", limit.name, limit, event))
    made += [Change("delete", name, None, limit_deleted(name)) for name in plan.delete]
    return made


def newest_observation(
    listed: Mapping[str, ObservedLimit],
    cached: Mapping[str, ObservedLimit],
    written_meanwhile: AbstractSet[str],
) -> dict[str, ObservedLimit]:
    """A listing, except for names the operator wrote while it was in flight: for those the
    cache (which follows every write) is newer; absent from the cache means deleted."""
    newest = dict(listed)
    for name in written_meanwhile:
        if name in cached:
            newest[name] = cached[name]
        else:
            newest.pop(name, None)
    return newest
