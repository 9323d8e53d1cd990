"""The chaos test's checker on small, hand-made recordings: it passes a clean run and catches each
violation it exists to catch."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.integration.chaos.invariants import (
    Change,
    Disruption,
    Run,
    Snapshot,
    check,
    runs_of,
    staleness_needed,
)


def polls(*values: int | None, node: str = "n", start: float = 0.0) -> list[Snapshot]:
    """One poll per second: request at t, answer at t + 0.1; None means no limit then."""
    return [
        Snapshot(start + i, start + i + 0.1, {} if value is None else {node: value})
        for i, value in enumerate(values)
    ]


class Worker:
    """Writes the records one chaos worker would."""

    def __init__(self, pid: int, node: str = "n") -> None:
        self.pid, self.node, self.attempt = pid, node, 0
        self.records: list[dict[str, Any]] = [self._record("ready", 0.0)]

    def _record(self, event: str, t: float, **extra: Any) -> dict[str, Any]:
        return {"pid": self.pid, "node": self.node, "attempt": self.attempt, "event": event,
                "t": t, **extra}  # fmt: skip

    def hold(self, enter: float, exit: float, *devices: int) -> Worker:
        self.attempt += 1
        self.records += [
            self._record("attempt", enter - 0.01),
            self._record("enter", enter, devices=[str(d) for d in devices]),  # gpu_slot()'s names
            self._record("exit", exit),
        ]
        return self

    def ends(self, event: str, t: float) -> Worker:
        self.attempt += 1
        self.records += [self._record("attempt", t - 0.5), self._record(event, t)]
        return self


def records(*workers: Worker) -> list[dict[str, Any]]:
    return [record for worker in workers for record in worker.records]


SET_TWO = [Change(-1.0, "n", 2)]  # before the first poll: not a propagation sample


def test_runs_of_give_each_value_its_possible_window() -> None:
    runs = runs_of(polls(2, 2, 1, None), "n")
    assert runs == [Run(2, -math.inf, 2.1), Run(1, 1.0, 3.1), Run(None, 2.0, math.inf)]


def test_staleness_is_how_long_ago_a_large_enough_limit_was_possibly_in_effect() -> None:
    runs = [Run(2, 0.0, 5.0), Run(1, 4.0, 10.0)]
    assert staleness_needed(runs, 3.0, 2) == 0.0
    assert staleness_needed(runs, 7.0, 2) == pytest.approx(2.0)
    assert staleness_needed(runs, 7.0, 3) == math.inf


def test_a_clean_run_passes_and_reports_what_it_measured() -> None:
    workers = [
        Worker(1).hold(0.5, 1.5, 0).hold(2.0, 3.0, 1),
        Worker(2).hold(0.6, 1.4, 1).ends("timeout", 3.5),
    ]
    report = check(records(*workers), polls(2, 2, 2, 2), SET_TWO, [])
    assert report["entries"] == 3
    assert report["timeouts"] == 1
    assert report["contended_entries"] == 1
    assert report["staleness_needed_max_s"] == 0.0


def test_more_holders_than_the_limit_allows_is_caught() -> None:
    workers = [
        Worker(1).hold(0.5, 2.5, 0),
        Worker(2).hold(0.6, 2.4, 1),
        Worker(3).hold(0.7, 2.3, 2),
    ]
    with pytest.raises(AssertionError, match="oversubscribed"):
        check(records(*workers), polls(2, 2, 2), SET_TWO, [])


def test_an_entry_on_a_lowered_limit_is_allowed_only_within_the_client_staleness() -> None:
    lowered = polls(2, 2, 1, 1, 1, 1, 1)  # 2 until the poll at 2.0 shows 1
    changes = [*SET_TWO, Change(1.5, "n", 1)]
    late_ok = [Worker(1).hold(0.5, 5.0, 0), Worker(2).hold(2.9, 3.0, 1)]
    assert check(records(*late_ok), lowered, changes, [])["staleness_needed_max_s"] > 0
    too_late = [Worker(1).hold(0.5, 6.0, 0), Worker(2).hold(5.0, 5.5, 1)]
    with pytest.raises(AssertionError, match="oversubscribed"):
        check(records(*too_late), lowered, changes, [])


def test_a_device_held_twice_at_once_is_caught() -> None:
    workers = [Worker(1).hold(0.5, 2.0, 0), Worker(2).hold(1.0, 1.5, 0)]
    with pytest.raises(AssertionError, match="shared"):
        check(records(*workers), polls(2, 2, 2), SET_TWO, [])


def test_an_attempt_that_ends_in_an_error_is_a_lost_task() -> None:
    with pytest.raises(AssertionError, match="lost tasks"):
        check(records(Worker(1).ends("error", 1.0)), polls(2, 2), SET_TWO, [])


def test_an_attempt_that_never_ends_is_a_lost_task() -> None:
    worker = Worker(1).hold(0.5, 1.0, 0)
    worker.records.append({"pid": 1, "node": "n", "attempt": 2, "event": "attempt", "t": 1.5})
    with pytest.raises(AssertionError, match="never ended"):
        check(records(worker), polls(2, 2), SET_TWO, [])


def test_a_missing_limit_is_only_allowed_while_it_was_absent() -> None:
    deleted = [*SET_TWO, Change(0.5, "n", None)]
    assert check(records(Worker(1).ends("missing", 2.5)), polls(2, None, None), deleted, [])
    with pytest.raises(AssertionError, match="while its limit existed"):
        check(records(Worker(1).ends("missing", 2.5)), polls(2, 2, 2, 2), SET_TWO, [])


def test_limits_must_follow_the_changes_in_order_and_promptly() -> None:
    changes = [*SET_TWO, Change(0.5, "n", 1), Change(3.5, "n", 3)]
    assert check([], polls(2, 1, 1, 1, 3), changes, [])["propagation_healthy_n"] == 2
    with pytest.raises(AssertionError, match="not in the order"):
        check([], polls(2, 3, 1, 1, 1), changes, [])
    slow = [*SET_TWO, Change(0.5, "n", 1)]
    with pytest.raises(AssertionError, match="took"):
        check([], polls(2, 2, 2, 2, 2, 2, 2, 1), slow, [])
    # The same delay is fine when the operator was down meanwhile and it came soon after.
    outage = [Disruption("operator", 1.0, 6.0)]
    report = check([], polls(2, 2, 2, 2, 2, 2, 2, 1), slow, outage)
    assert report["propagation_after_outage_n"] == 1


def test_a_zero_may_drain_at_one_first() -> None:
    changes = [*SET_TWO, Change(0.5, "n", 0)]
    assert check([], polls(2, 1, 1, 0, 0), changes, [])["propagation_healthy_n"] == 1
    with pytest.raises(AssertionError, match="not in the order"):
        check([], polls(2, 3, 0), changes, [])  # 3 was never asked for


def test_a_drain_that_goes_back_to_one_is_still_one_target() -> None:
    """A holder that slipped in as 0 was written sends the limit back to 1 until it leaves."""
    changes = [*SET_TWO, Change(0.5, "n", 0)]
    assert check([], polls(2, 1, 0, 1, 0), changes, [])["propagation_healthy_n"] == 1
