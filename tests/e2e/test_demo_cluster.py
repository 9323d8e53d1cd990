"""``demo --cluster``, the README's in-cluster walkthrough, end to end on a node of its own: the
chart's GPU worker pod runs several flow runs of the bundled deployment at once, and what each
run's GPU step saw, as the step wrote it inside the pod, shows that it saw only the device its
slot held, that two steps at once never saw the same device, and that no more ran at once than
the node's limit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from prefect_gpu_sandbox.demo.cluster import FAKE_GPUS, RUNS
from prefect_gpu_sandbox.demo.workers import max_concurrency
from tests.support.node_traces import lasting_traces

pytestmark = pytest.mark.e2e

DEMO = [sys.executable, "-m", "prefect_gpu_sandbox", "demo", "--cluster", "--dir"]


def _held(row: dict[str, Any]) -> tuple[datetime, datetime]:
    first, last = row["slot_held"]
    return datetime.fromisoformat(first), datetime.fromisoformat(last)


def test_cluster_demo_runs_gpu_flow_runs_in_the_charts_worker_pod(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a real node needs root (network namespaces, mounts, cgroups)")
    result = subprocess.run(
        [*DEMO, str(tmp_path)], capture_output=True, text=True, timeout=1200, check=False
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-4000:]
    assert "the operator's 2 replicas are Ready" in out
    assert "runs with WORKER_ID=sandbox-node, read from inside its container" in out
    assert f"all {RUNS} flow runs Completed" in out
    assert "the limit followed" in out
    # The worker pod's slots-metrics container served the node's slots while the runs ran.
    scraped = re.search(
        r"scraped (\d+) times meanwhile: up to (\d+) slot\(s\) held and (\d+) run\(s\) "
        r"waiting, limit (\d+)",
        out,
    )
    assert scraped, out
    scrapes, held, _, limit = map(int, scraped.groups())
    assert scrapes >= 3, scraped.group(0)
    assert limit == FAKE_GPUS, scraped.group(0)
    assert 1 <= held <= FAKE_GPUS, scraped.group(0)

    # The container was given FAKE_GPUS devices by the device plugin (UUIDs); each run's GPU
    # step saw, inside its slot, exactly one of them: the one its slot held.
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert len(timeline) == RUNS
    given = timeline[0]["nvidia_visible_devices"].split(",")
    assert len(given) == len(set(given)) == FAKE_GPUS
    assert all(re.fullmatch(r"GPU-[0-9a-f-]+", device) for device in given), given
    for row in timeline:
        assert row["state"] == "Completed", row
        assert row["nvidia_visible_devices"].split(",") == given  # one worker pod, one container
        assert row["slot_devices"] == [row["cuda_visible_devices"]], row
        assert row["cuda_visible_devices"] in given, row

    # Steps whose slots overlapped in time saw different devices; never more at once than the
    # limit, and the runs did contend (both devices in use at some moment).
    for one, other in combinations(timeline, 2):
        (start, end), (other_start, other_end) = _held(one), _held(other)
        if start < other_end and other_start < end:
            assert one["cuda_visible_devices"] != other["cuda_visible_devices"], (one, other)
    assert max_concurrency([_held(row) for row in timeline]) == FAKE_GPUS
    assert "OVER the limit" not in out

    # The demo stopped its node: nothing of it is left on this machine.
    assert "stopping the node" in out
    node_directory = tmp_path / "node"
    assert not lasting_traces(node_directory, _netns(node_directory), [])


def _netns(directory: Path) -> str:
    from prefect_gpu_sandbox.node import NodeCluster

    return NodeCluster(directory).netns.name
