"""The node-local view of who holds and who waits (``_presence``, ``prefect-gpu-slots``), from
records written by the real writers; a record whose process is gone is not shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from prefect_gpu_flows import _presence, _slots_cli, _slots_metrics


def test_holders_and_waiters_are_shown_while_their_blocks_last(tmp_path: Path) -> None:
    node = tmp_path / "node-a"
    with _presence.holding(node, [1, 0], ["GPU-b", "GPU-a"]), _presence.waiting(node, 2):
        held = _presence.holders(node)
        assert [(h.slot, h.device, h.pid, h.gpus) for h in held] == [
            (0, "GPU-a", os.getpid(), 2),
            (1, "GPU-b", os.getpid(), 2),
        ]
        (waiter,) = _presence.waiters(node)
        assert (waiter.pid, waiter.gpus, waiter.slot) == (os.getpid(), 2, None)
        view = _slots_cli.node_slots(node)
        assert (view.node, view.limit, len(view.holders), len(view.waiters)) == (
            "node-a",
            None,
            2,
            1,
        )
    assert _presence.holders(node) == _presence.waiters(node) == []


def test_a_record_left_by_a_dead_process_is_not_shown(tmp_path: Path) -> None:
    node = tmp_path / "node-a"
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(child.stdout)
    with _presence.holding(node, [0], ["GPU-a"]):
        (mine,) = _presence.holders(node)
        # The same record under the dead process's pid, as a SIGKILLed holder leaves it.
        record = json.dumps({**mine.__dict__, "pid": dead, "slot": 1})
        (node / "slot-1.holder").write_text(record)
        # And one under a live pid whose process started at another time (a reused pid).
        reused = json.dumps({**mine.__dict__, "slot": 2, "started": "1"})
        (node / "slot-2.holder").write_text(reused)
        assert _presence.holders(node) == [mine]


def test_the_cli_prints_metrics_and_says_what_to_do_without_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node-a"
    with _presence.holding(node, [0], ["GPU-a"]), _presence.waiting(node, 1):
        assert _slots_cli.main(["--lock-dir", str(tmp_path), "--metrics"]) == 0
        metrics = capsys.readouterr().out
        assert 'prefect_gpu_slots_held{node="node-a"} 1.0' in metrics
        assert 'prefect_gpu_slots_waiting{node="node-a"} 1.0' in metrics
        assert 'prefect_gpu_slot_held_seconds{device="GPU-a",node="node-a",slot="0"}' in metrics
        assert 'prefect_gpu_slots_waiting_seconds_gcount{node="node-a"} 1.0' in metrics
        assert _slots_cli.main(["--lock-dir", str(tmp_path)]) == 0
        text = capsys.readouterr().out
        assert "node node-a: limit unknown, 1 held, 1 waiting" in text
        assert "GPU-a" in text
    assert _slots_cli.main(["node-b", "--lock-dir", str(tmp_path)]) == 1
    assert "no gpu_slot() lock directory for node-b" in capsys.readouterr().err
    assert replace(_presence.Presence(1, "x", 0.0, None, None, None, 1), slot=3).slot == 3


NOW = 1_000_000.0


def _presence_at(age: float, slot: int | None = None) -> _presence.Presence:
    device = None if slot is None else f"GPU-{slot}"
    return _presence.Presence(1, "1", NOW - age, "run", "task-run", "embed", 1, slot, device)


KNOWN = _presence.NodeSlots(
    "node-a",
    4,
    # Held 5 s, 2 min and a bit over a day; waiting half a second, 3 s, 45 s and over an hour.
    [_presence_at(5.0, 0), _presence_at(120.0, 1), _presence_at(86_401.0, 2)],
    [_presence_at(4000.0), _presence_at(45.0), _presence_at(3.0), _presence_at(0.5)],
)


def _samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    (family,) = [f for f in _slots_metrics.families([KNOWN], NOW) if f.name == name]
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


def _buckets(name: str) -> dict[str, float]:
    return {dict(k)["le"]: v for k, v in _samples(name).items() if "le" in dict(k)}


def test_the_wait_histogram_counts_each_waiter_under_each_bound() -> None:
    assert _buckets("prefect_gpu_slots_waiting_seconds") == {
        "1.0": 1,
        "5.0": 2,
        "15.0": 2,
        "30.0": 2,
        "60.0": 3,
        "120.0": 3,
        "300.0": 3,
        "600.0": 3,
        "1800.0": 3,
        "3600.0": 3,
        "+Inf": 4,
    }
    (family,) = [
        f
        for f in _slots_metrics.families([KNOWN], NOW)
        if f.name == "prefect_gpu_slots_waiting_seconds"
    ]
    assert family.type == "gaugehistogram"
    totals = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert totals == {
        "prefect_gpu_slots_waiting_seconds_gcount": 4,
        "prefect_gpu_slots_waiting_seconds_gsum": pytest.approx(4048.5),
    }


def test_the_held_histogram_counts_each_held_slot_under_each_bound() -> None:
    buckets = _buckets("prefect_gpu_slots_held_seconds")
    assert buckets == {
        "10.0": 1,
        "60.0": 1,
        "300.0": 2,
        "900.0": 2,
        "1800.0": 2,
        "3600.0": 2,
        "7200.0": 2,
        "14400.0": 2,
        "43200.0": 2,
        "86400.0": 2,
        "+Inf": 3,
    }
    assert _samples("prefect_gpu_slot_held_seconds") == {
        (("device", "GPU-0"), ("node", "node-a"), ("slot", "0")): 5.0,
        (("device", "GPU-1"), ("node", "node-a"), ("slot", "1")): 120.0,
        (("device", "GPU-2"), ("node", "node-a"), ("slot", "2")): 86_401.0,
    }


def test_the_gauges_of_a_busy_and_an_idle_node() -> None:
    idle = _presence.NodeSlots("node-b", None, [], [])
    nodes = {}
    text = _slots_metrics.exposition([KNOWN, idle], NOW)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            nodes.setdefault(sample.labels["node"], {})[sample.name] = sample.value
    assert {k: v for k, v in nodes["node-a"].items() if "_bucket" not in k} == {
        "prefect_gpu_slots_limit": 4,
        "prefect_gpu_slots_held": 3,
        "prefect_gpu_slots_waiting": 4,
        "prefect_gpu_slots_longest_wait_seconds": 4000,
        "prefect_gpu_slot_held_seconds": 86_401,  # the last slot's, of three
        "prefect_gpu_slots_waiting_seconds_gcount": 4,
        "prefect_gpu_slots_waiting_seconds_gsum": 4048.5,
        "prefect_gpu_slots_held_seconds_gcount": 3,
        "prefect_gpu_slots_held_seconds_gsum": 86_526,
    }
    # A node whose limit was never read has no limit sample, and empty histograms.
    assert "prefect_gpu_slots_limit" not in nodes["node-b"]
    assert nodes["node-b"]["prefect_gpu_slots_held_seconds_gcount"] == 0
    assert nodes["node-b"]["prefect_gpu_slots_waiting_seconds_bucket"] == 0


def test_openmetrics_names_the_histograms_gauge_histograms() -> None:
    registry = CollectorRegistry()
    registry.register(_slots_metrics.SlotsCollector(lambda: [KNOWN], lambda: NOW))
    text = openmetrics(registry).decode()
    assert "# TYPE prefect_gpu_slots_waiting_seconds gaugehistogram" in text
    assert "# TYPE prefect_gpu_slots_held_seconds gaugehistogram" in text
    assert 'prefect_gpu_slots_held_seconds_bucket{le="300.0",node="node-a"} 2' in text
    assert text.endswith("# EOF\n")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("9465", ("0.0.0.0", 9465)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:80", ("::1", 80))],
)
def test_serve_addresses(address: str, expected: tuple[str, int]) -> None:
    assert _slots_metrics.parse_address(address) == expected


@pytest.mark.parametrize("address", ["metrics", "127.0.0.1:", "70000"])
def test_a_bad_serve_address_is_refused_before_serving(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _slots_cli.main(["--lock-dir", str(tmp_path), "--serve", address])
    assert exited.value.code == 2
    assert f"--serve: {address!r} is not [HOST:]PORT" in capsys.readouterr().err
