"""Peering priorities by age: the replica started first is the active one."""

from __future__ import annotations

import pytest

from prefect_gpu_operator.runtime.fence import seniority_priority

_NOW = 1_796_300_000.0  # December 2026, in epoch seconds


def test_an_older_replica_outranks_a_newer_one_whatever_their_tiebreaks() -> None:
    older = seniority_priority(_NOW, tiebreak=0)
    newer = seniority_priority(_NOW + 0.001, tiebreak=999)
    assert older > newer


def test_replicas_started_in_the_same_millisecond_differ_by_their_tiebreak() -> None:
    priorities = {seniority_priority(_NOW + 0.0004, tiebreak) for tiebreak in range(1000)}
    assert len(priorities) == 1000
    assert seniority_priority(_NOW, tiebreak=7) > seniority_priority(_NOW, tiebreak=6)


def test_priorities_stay_exact_in_json_numbers() -> None:
    """The peering object stores them as JSON: inside 2**53 they survive any client."""
    assert abs(seniority_priority(4_102_444_800.0, tiebreak=0)) < 2**53  # the year 2100


@pytest.mark.parametrize("tiebreak", [-1, 1000])
def test_a_tiebreak_outside_its_range_is_refused(tiebreak: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.999"):
        seniority_priority(_NOW, tiebreak)
