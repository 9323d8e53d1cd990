"""The README's main command runs end to end and cleans up after itself, Ctrl-C included."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from prefect_gpu_sandbox.waiting import eventually

pytestmark = pytest.mark.integration

DEMO = [sys.executable, "-m", "prefect_gpu_sandbox", "demo", "--dir"]
INJECTED = (
    '{"name": "WORKER_ID", "valueFrom": {"fieldRef": {"apiVersion": "v1", '
    '"fieldPath": "spec.nodeName"}}}'
)
LIMITS = {"gpu-node-1": 1, "gpu-node-2": 2}


def processes_of(directory: Path) -> list[str]:
    """Live processes whose command line or environment mentions ``directory``: every process
    the demo starts does (flow runs inherit their worker's PREFECT_HOME and lock directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(directory).encode() in cmdline + environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def peak_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """Most intervals that share an instant, counted at each interval's start."""
    return max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)


def test_demo_runs_end_to_end_and_stops_everything(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DEMO, str(tmp_path)], capture_output=True, text=True, timeout=600, check=False
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr

    # Limits: created per GPU node, then following a failed GPU.
    assert "the operator created one limit per GPU node" in out
    assert "gpu:gpu-node-1           2" in out
    assert "gpu:gpu-node-1           1" in out  # after a GPU of gpu-node-1 failed
    assert "gpu:cpu-node-1" not in out

    # The webhook injected WORKER_ID (a Downward API reference) into both worker pods.
    assert "registered the chart's MutatingWebhookConfiguration" in out
    assert out.count(f"env injected by the webhook: {INJECTED}") == 2
    for node in LIMITS:
        assert f"-> WORKER_ID={node} once the kubelet starts it on {node}" in out
        assert f"started WORKER_ID={node} prefect worker start" in out

    # Three runs per node's worker, all Completed, each on a device of its own node's limit.
    completed = re.findall(r"(gpu-node-\d)/run-\d Completed: .* of gpu:(gpu-node-\d)\)", out)
    assert sorted(completed) == sorted([(node, node) for node in LIMITS for _ in range(3)])
    assert "all 6 flow runs Completed" in out

    # The GPU steps were gated per node: never more embed steps at once than the node's limit.
    timeline = json.loads((tmp_path / "inference" / "timeline.json").read_text())
    held: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for row in timeline:
        assert row["state"] == "Completed", row
        summary = json.loads(
            (tmp_path / "inference" / "output" / row["flow_run_id"] / "summary.json").read_text()
        )
        assert summary["slot_held"] == row["slot_held"]
        assert summary["documents"] == 240
        assert summary["slot_devices"][0] in {str(d) for d in range(LIMITS[row["node"]])}
        first, last = (datetime.fromisoformat(moment) for moment in row["slot_held"])
        assert first < last
        held[row["node"]].append((first, last))
    assert {node: len(intervals) for node, intervals in held.items()} == {n: 3 for n in LIMITS}
    assert peak_overlap(held["gpu-node-1"]) == 1
    assert peak_overlap(held["gpu-node-2"]) <= 2
    for node, limit in LIMITS.items():
        peak = peak_overlap(held[node])
        assert f"{node}: at most {peak} embed step(s) at a time; limit gpu:{node} = {limit}" in out
    assert "OVER the limit" not in out

    # The slots were all released, then a node left and its limit went.
    assert "gpu:gpu-node-2           2             0" in out.split("every slot released")[1]
    assert "its limit was removed" in out
    assert "stopping the workers" in out
    assert "stopping the operator" in out
    assert "stopping the servers" in out
    assert processes_of(tmp_path) == []


def test_ctrl_c_while_flows_run_stops_every_process(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [*DEMO, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own foreground group, as in a terminal
    )
    try:

        def flow_runs_running() -> None:
            assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
            engines = [p for p in processes_of(tmp_path) if "prefect.engine" in p]
            assert engines, "no flow-run process yet"

        eventually(flow_runs_running, timeout=240, interval=0.5)
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 130, out
    assert "interrupted; everything the demo started has been stopped" in out
    assert "stopping the servers" in out
    assert processes_of(tmp_path) == []
