"""A resync lists Prefect without the policy's lock; names written meanwhile take newer values."""

from __future__ import annotations

from prefect_gpu_operator.domain.plan import ObservedLimit, newest_observation


def limit(name: str, value: int) -> ObservedLimit:
    return ObservedLimit(name, value, True, 0.0)


LISTED = {
    "gpu:a": limit("gpu:a", 4),
    "gpu:b": limit("gpu:b", 2),
    "gpu:manual": limit("gpu:manual", 9),
}


def test_nothing_written_meanwhile_trusts_the_listing() -> None:
    cached = {"gpu:a": limit("gpu:a", 1)}  # older than the listing: an outside edit since
    assert newest_observation(LISTED, cached, frozenset()) == LISTED


def test_updated_meanwhile_takes_the_cached_value() -> None:
    cached = {"gpu:a": limit("gpu:a", 8), "gpu:b": limit("gpu:b", 0)}
    newest = newest_observation(LISTED, cached, frozenset({"gpu:a"}))
    assert newest["gpu:a"].limit == 8
    assert newest["gpu:b"].limit == 2  # not written meanwhile: the listing is newer
    assert newest["gpu:manual"].limit == 9


def test_created_meanwhile_is_added_and_deleted_meanwhile_is_dropped() -> None:
    cached = {"gpu:c": limit("gpu:c", 3)}  # gpu:b deleted (gone from the cache), gpu:c created
    newest = newest_observation(LISTED, cached, frozenset({"gpu:b", "gpu:c"}))
    assert sorted(newest) == ["gpu:a", "gpu:c", "gpu:manual"]
    assert newest["gpu:c"].limit == 3


def test_listing_is_not_mutated() -> None:
    before = dict(LISTED)
    newest_observation(LISTED, {}, frozenset({"gpu:a"}))
    assert before == LISTED
