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

from prefect_gpu_flows import _presence, _slots_cli


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
        assert 'prefect_gpu_slots_held{node="node-a"} 1' in metrics
        assert 'prefect_gpu_slots_waiting{node="node-a"} 1' in metrics
        assert 'prefect_gpu_slot_held_seconds{node="node-a",slot="0",device="GPU-a"}' in metrics
        assert _slots_cli.main(["--lock-dir", str(tmp_path)]) == 0
        text = capsys.readouterr().out
        assert "node node-a: limit unknown, 1 held, 1 waiting" in text
        assert "GPU-a" in text
    assert _slots_cli.main(["node-b", "--lock-dir", str(tmp_path)]) == 1
    assert "no gpu_slot() lock directory for node-b" in capsys.readouterr().err
    assert replace(_presence.Presence(1, "x", 0.0, None, None, None, 1), slot=3).slot == 3
