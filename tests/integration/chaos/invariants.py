"""The chaos test's invariants, checked on what it recorded: pure, and unit-tested on their own.

Inputs: the workers' records (one per attempt event, ``t`` from ``time.monotonic()``), the
poller's snapshots of the limits in Prefect, the allocatable changes the test made, and the
operator and Prefect disruptions.

What the checker asserts, and why in this shape:

1. **Never oversubscribed.** A node's capacity reaches gpu_slot() only through its Prefect limit,
   so "the allocatable in effect" is the limit the operator has applied, as the poller saw it. A
   value read between two polls may have been set any time after the earlier poll began and held
   until the later poll ended (a Prefect outage widens that gap the same way), so at time t every
   value whose window contains t was possibly in effect, and the largest one counts. gpu_slot()
   reads the limit once per second while it waits (``_LIMIT_REFRESH``), and reads it again when
   its server calls outlast that, so an entry at t may use any limit in effect during
   ``[t - CLIENT_STALENESS, t]``.
   Holders that entered before a lowering may stay until they finish; the invariant is about new
   entries: **an entry on node n at t happens only while fewer than allowed(t) others hold a slot
   of n**, allowed(t) being the largest limit in effect on n during [t - CLIENT_STALENESS, t]
   (0 while the limit does not exist). The same window bounds device indices: an entry's device
   is below allowed(t). Logged holding intervals lie inside the real ones (enter is logged after
   gpu_slot() returned, exit before the block is left), so an overlap in the log is a real one.
   For every entry the checker also measures the staleness it needed (0 when the newest limit
   admitted it), and reports the largest.
2. **No device shared**: on a node, two logged holdings that overlap in time hold disjoint devices.
3. **The limits follow the truth.** For every node, the distinct values the poller saw form a
   subsequence of the values the test set (the operator never writes a value that was never true,
   nor an older one after a newer one; a 0 may show as 1 first, while held slots drain). Every
   change that was not superseded first shows up in Prefect within ``OPERATOR_PROPAGATION`` s
   when the operator and Prefect were up throughout, and within ``RECOVERY`` s of the end of the
   outage or restart it overlapped otherwise. The request -> applied latency is measured and
   reported: together with CLIENT_STALENESS it is the end-to-end allowance between a change to a
   Node and the last entry that may use the old value.
4. **No task lost**: every attempt of every worker ends in exactly one of enter+exit, timeout
   (GpuSlotTimeout), or missing (GpuLimitNotFoundError) -- and missing only while the node's limit
   was absent -- never in another error; every worker exits 0 once told to stop.
5. **Convergence after the chaos**: once the operator and Prefect are both up, within
   ``RESYNC_SECONDS + CONVERGENCE_MARGIN`` s the limits equal the final allocatable of every
   existing node (a node left at 0 may still drain at 1 while its workers hold slots: Prefect
   cannot release into a limit of 0) and no limit is left for a deleted node; once the workers
   have stopped, every limit has ``active_slots`` 0 and every drain reached its target within
   ``CONVERGENCE_MARGIN`` s (no slot leaked by the restarts: the sandbox server keeps leases in its
   filesystem lease storage).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLIENT_STALENESS",
    "OPERATOR_PROPAGATION",
    "POLL_SECONDS",
    "RECOVERY",
    "Change",
    "Disruption",
    "Run",
    "Snapshot",
    "check",
    "runs_of",
    "staleness_needed",
]

CLIENT_STALENESS = 1.5
"""Seconds an entry may use an older limit: gpu_slot() re-reads it every 1.0 s while waiting
(``prefect_gpu_flows._claim._LIMIT_REFRESH``), plus 0.5 s for a read and a look at the slot files
on a loaded 2-core machine."""
OPERATOR_PROPAGATION = 5.0
"""Seconds from a Node change to its limit in Prefect with the operator and Prefect up (the design
asks for about a second; this is a noisy shared machine)."""
RECOVERY = 15.0
"""Seconds from the end of an outage or operator restart to a change made during it being applied
(the operator's retry backoff is capped at 2 s in the tests, its resync is 2 s)."""
POLL_SECONDS = 0.1
"""How often the poller reads the limits from Prefect."""


@dataclass(frozen=True)
class Change:
    """The test set node's allocatable to ``gpus`` (None: deleted) at monotonic ``t``."""

    t: float
    node: str
    gpus: int | None


@dataclass(frozen=True)
class Disruption:
    kind: str  # "operator" | "prefect"
    start: float
    end: float


@dataclass(frozen=True)
class Snapshot:
    """Limit values read from Prefect by a request sent at ``a`` and answered at ``b``."""

    a: float
    b: float
    limits: dict[str, int]  # node -> limit; a node without a limit is absent


@dataclass(frozen=True)
class Run:
    """Consecutive polls that saw ``value`` on a node: it was possibly in effect in [lo, hi]."""

    value: int | None
    lo: float
    hi: float


def runs_of(snapshots: list[Snapshot], node: str) -> list[Run]:
    """The node's limit over time: consecutive polls that saw one value, each possibly in effect
    from the poll before the first (its request's start) to the poll after the last."""
    snaps = list(snapshots)
    values = [s.limits.get(node) for s in snaps]
    runs: list[Run] = []
    start = 0
    for i in range(1, len(snaps) + 1):
        if i == len(snaps) or values[i] != values[start]:
            lo = snaps[start - 1].a if start > 0 else -math.inf
            hi = snaps[i].b if i < len(snaps) else math.inf
            runs.append(Run(values[start], lo, hi))
            start = i
    return runs


def staleness_needed(runs: list[Run], t: float, capacity: int) -> float:
    """Seconds before ``t`` to the last moment a limit >= ``capacity`` was possibly in effect
    (0 if one possibly is at ``t``; inf if never before ``t``)."""
    ends = [r.hi for r in runs if (r.value or 0) >= capacity and r.lo <= t]
    return max(0.0, t - max(ends)) if ends else math.inf


@dataclass
class Holding:
    node: str
    pid: int
    attempt: int
    enter: float
    exit: float
    devices: tuple[str, ...]
    """The workers see no device list, so a device is its slot's index (``"0"``, ``"1"``, ...)."""


@dataclass
class Outcomes:
    attempts: int = 0
    entries: int = 0
    timeouts: int = 0
    missing: int = 0
    errors: list[str] = field(default_factory=list)


def check(
    records: list[dict[str, Any]],
    snapshots: list[Snapshot],
    changes: list[Change],
    disruptions: list[Disruption],
) -> dict[str, Any]:
    """Assert the invariants of the module docstring; return what was measured."""
    outcomes, holdings, missing_at = _outcomes(records)
    assert not outcomes.errors, f"lost tasks: {outcomes.errors[:5]}"
    runs = {node: runs_of(snapshots, node) for node in {c.node for c in changes}}

    # 4b. A limit was missing only while the node's limit was really absent.
    for node, attempt_t, missing_t in missing_at:
        window_lo = attempt_t - CLIENT_STALENESS
        assert any(
            r.value is None and r.lo <= missing_t and r.hi >= window_lo for r in runs[node]
        ), f"{node}: GpuLimitNotFoundError at {missing_t:.2f} while its limit existed"

    # 1. Entries only while fewer than allowed(t) others hold; devices below allowed(t).
    by_node: dict[str, list[Holding]] = defaultdict(list)
    for holding in holdings:
        by_node[holding.node].append(holding)
    needed: list[float] = []
    contended = 0
    violations: list[str] = []
    for node, mine in by_node.items():
        mine.sort(key=lambda h: h.enter)
        for i, holding in enumerate(mine):
            others = sum(1 for h in mine[:i] if h.exit > holding.enter)
            contended += others > 0
            need = staleness_needed(runs[node], holding.enter, others + len(holding.devices))
            need = max(
                need,
                *(staleness_needed(runs[node], holding.enter, int(d) + 1) for d in holding.devices),
            )
            needed.append(need)
            if need > CLIENT_STALENESS:
                violations.append(
                    f"{node}: pid {holding.pid} entered at {holding.enter:.3f} on devices "
                    f"{holding.devices} with {others} other holder(s); a limit that allowed it "
                    f"was last in effect {need:.3f} s earlier"
                )
        # 2. No device held twice at once.
        for i, holding in enumerate(mine):
            for other in mine[i + 1 :]:
                if other.enter >= holding.exit:
                    break
                shared = set(holding.devices) & set(other.devices)
                assert not shared, f"{node}: devices {shared} shared by {holding} and {other}"
    assert not violations, "oversubscribed:\n" + "\n".join(violations[:10])

    # 3. The limits follow the truth: in order, promptly when healthy, soon after an outage.
    latencies, delayed = _propagation(runs, snapshots, changes, disruptions)
    healthy = [latency for latency, _ in latencies]
    return {
        "workers": len({r["pid"] for r in records}),
        "attempts": outcomes.attempts,
        "entries": outcomes.entries,
        "timeouts": outcomes.timeouts,
        "missing_limit": outcomes.missing,
        "contended_entries": contended,
        "staleness_needed_max_s": round(max(needed, default=0.0), 3),
        "entries_needing_staleness": sum(1 for n in needed if n > 0),
        "propagation_healthy_n": len(healthy),
        "propagation_healthy_median_s": round(statistics.median(healthy), 3) if healthy else None,
        "propagation_healthy_max_s": round(max(healthy), 3) if healthy else None,
        "propagation_after_outage_n": len(delayed),
        "propagation_after_outage_max_s": round(max(delayed), 3) if delayed else None,
        "disruptions": [(d.kind, round(d.end - d.start, 1)) for d in disruptions],
        "polls": len(snapshots),
    }


def _outcomes(
    records: list[dict[str, Any]],
) -> tuple[Outcomes, list[Holding], list[tuple[str, float, float]]]:
    """Every attempt's one outcome, per worker in order; the holdings and the missing limits."""
    outcomes = Outcomes()
    holdings: list[Holding] = []
    missing: list[tuple[str, float, float]] = []
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_pid[record["pid"]].append(record)
    for pid, mine in by_pid.items():
        events = [r for r in mine if r["event"] != "ready"]
        i = 0
        while i < len(events):
            start = events[i]
            assert start["event"] == "attempt", f"pid {pid}: {start} does not start an attempt"
            outcomes.attempts += 1
            end = events[i + 1] if i + 1 < len(events) else None
            assert end is not None, f"pid {pid}: attempt {start['attempt']} never ended (lost)"
            assert end["attempt"] == start["attempt"], f"pid {pid}: {start} then {end}"
            if end["event"] == "enter":
                leave = events[i + 2] if i + 2 < len(events) else None
                assert leave is not None, f"pid {pid}: attempt {start['attempt']} never left"
                assert leave["event"] == "exit", f"pid {pid}: {end} then {leave}"
                devices = tuple(end["devices"])
                holdings.append(
                    Holding(end["node"], pid, end["attempt"], end["t"], leave["t"], devices)
                )
                outcomes.entries += 1
                i += 3
                continue
            if end["event"] == "timeout":
                outcomes.timeouts += 1
            elif end["event"] == "missing":
                outcomes.missing += 1
                missing.append((end["node"], start["t"], end["t"]))
            else:
                outcomes.errors.append(f"pid {pid} attempt {start['attempt']}: {end}")
            i += 2
    return outcomes, holdings, missing


def shows(value: int | None, target: int | None) -> bool:
    """Whether Prefect showing ``value`` is the operator applying ``target``: a target of 0 shows
    as 1 while slots are held (the limit drains: Prefect cannot release into 0)."""
    return value == target or (target == 0 and value == 1)


def _follows(seen: list[int | None], truth: list[int | None]) -> bool:
    """Whether ``seen`` is a subsequence of ``truth``, one drain to 0 counting as one 0: while
    slots are held it shows 1, and a holder that slipped in as 0 was written sends it back to 1
    before 0 holds (both are the operator following that one target)."""
    position = 0
    draining = False  # the last value shown was the operator applying a target of 0
    for value in seen:
        if draining and value in (0, 1):
            continue
        while position < len(truth) and not shows(value, truth[position]):
            position += 1
        if position == len(truth):
            return False
        draining = truth[position] == 0
        position += 1
    return True


def _propagation(
    runs: dict[str, list[Run]],
    snapshots: list[Snapshot],
    changes: list[Change],
    disruptions: list[Disruption],
) -> tuple[list[tuple[float, Change]], list[float]]:
    """Check that each node's limits follow its changes; latencies when healthy / after outages."""
    by_node: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        by_node[change.node].append(change)
    healthy: list[tuple[float, Change]] = []
    delayed: list[float] = []
    for node, mine in by_node.items():
        # Subsequence: the operator never writes a value that was not true, or an older one.
        seen = [r.value for r in runs[node]]
        assert _follows(seen, [c.gpus for c in mine]), (
            f"{node}: Prefect showed {seen}, not in the order of {[c.gpus for c in mine]}"
        )
        for change, following in zip(mine, [*mine[1:], None], strict=True):
            if change.t <= snapshots[0].a:
                continue  # set before the poller started (checked before the workers started)
            until = following.t if following is not None else math.inf
            applied = next(
                (
                    s.b
                    for s in snapshots
                    if change.t <= s.a < until and shows(s.limits.get(node), change.gpus)
                ),
                None,
            )
            end = applied if applied is not None else until
            overlapping = [d for d in disruptions if d.start <= end and d.end >= change.t]
            if applied is None:
                # Superseded before it showed: fine if the next change came within the allowance
                # or an outage hid it; the last value of all is checked by the convergence.
                assert following is not None
                assert overlapping or until - change.t <= OPERATOR_PROPAGATION + POLL_SECONDS, (
                    f"{node}: {change.gpus} never reached Prefect in {until - change.t:.2f} s"
                )
                continue
            latency = applied - change.t
            if not overlapping:
                assert latency <= OPERATOR_PROPAGATION, (
                    f"{node}: {change.gpus} took {latency:.2f} s to reach Prefect"
                )
                healthy.append((latency, change))
            else:
                recovered = max(d.end for d in overlapping)
                assert applied - recovered <= RECOVERY, (
                    f"{node}: {change.gpus} reached Prefect {applied - recovered:.2f} s after "
                    f"the {[d.kind for d in overlapping]} came back"
                )
                delayed.append(latency)
    return healthy, delayed
