"""`prefect-gpu-sandbox up --node` starts a real node from the command line; `down` leaves no
process, mount, cgroup or network namespace behind."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.node_traces import lasting_traces

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "prefect_gpu_sandbox"]
_NODE_CONDITION = (
    "{.items[*].metadata.name} {.items[*].status.conditions[?(@.type=='Ready')].status}"
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=400, check=False)


def _shell(env_file: Path, command: str, *, netns: str | None = None) -> str:
    """``command``'s output in a clean shell that sourced ``env_file``: here, or inside
    ``netns``."""
    shell = ["bash", "-c", f"source {env_file} && {command}"]
    if netns is not None:
        shell = ["nsenter", f"--net=/var/run/netns/{netns}", "--", *shell]
    # kubectl keeps its discovery cache under HOME.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(env_file.parent)}
    done = subprocess.run(shell, capture_output=True, text=True, timeout=60, check=True, env=env)
    return done.stdout


@pytest.mark.usefixtures("node")  # a second node beside the session's: they must not meet
def test_node_sandbox_lifecycle(tmp_path: Path) -> None:
    directory = (tmp_path / "sandbox").resolve()
    up = _cli("up", "--node", "--dir", str(directory))
    state = json.loads((directory / "sandbox.json").read_text()) if up.returncode == 0 else {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = directory / "env"
        # One kubeconfig and one PREFECT_API_URL, valid here (through the relay) and inside.
        nodes = f'kubectl get nodes -o jsonpath="{_NODE_CONDITION}"'
        assert _shell(env, nodes) == "sandbox-node True"
        assert _shell(env, nodes, netns=state["netns"]) == "sandbox-node True"
        api_url = _shell(env, 'printf %s "$PREFECT_API_URL"')
        with urllib.request.urlopen(f"{api_url}/health", timeout=10) as response:
            assert response.read() == b"true"
        status = _cli("status", "--dir", str(directory))
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("running") == len(state["pids"])
    finally:
        down = _cli("down", "--dir", str(directory))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not lasting_traces(directory, state["netns"], state["pids"].values())
    assert _cli("status", "--dir", str(directory)).returncode == 1
