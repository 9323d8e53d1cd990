"""The README's main command runs end to end and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_and_stops_its_servers(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_operator.cli", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "the operator created one limit per GPU node" in out
    assert "gpu:gpu-node-1           4" in out
    assert "gpu:gpu-node-1           2" in out  # after the node lost two GPUs
    assert "gpu:cpu-node-1" not in out
    assert "its limit was removed" in out
    assert "stopping the operator" in out
    assert "stopping the servers" in out
    leftovers = [
        line
        for line in subprocess.run(
            ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if str(tmp_path) in line
    ]
    assert leftovers == []
