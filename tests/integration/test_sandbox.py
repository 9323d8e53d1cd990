"""`prefect-gpu-sandbox up|status|down` starts real servers and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_gpu_sandbox.processes import group_members, process_alive
from prefect_gpu_sandbox.tools import tools_bin

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "prefect_gpu_sandbox"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, check=False)


def _sourced(env_file: Path, variable: str) -> str:
    shell = f'source {env_file} && printf %s "${variable}"'
    return subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, check=True, env={}
    ).stdout


def test_sandbox_lifecycle(tmp_path: Path) -> None:
    directory = tmp_path / "sandbox"
    up = _cli("up", "--dir", str(directory))
    pids: dict[str, int] = {}
    try:
        assert up.returncode == 0, up.stderr
        pids = json.loads((directory / "sandbox.json").read_text())["pids"]
        assert set(pids) == {"etcd", "kube-apiserver", "prefect-server"}

        kubeconfig = _sourced(directory / "env", "KUBECONFIG")
        api_url = _sourced(directory / "env", "PREFECT_API_URL")
        assert Path(kubeconfig) == directory.resolve() / "kubeconfig"
        assert api_url.startswith("http://127.0.0.1:")

        nodes = subprocess.run(
            [str(tools_bin() / "kubectl"), f"--kubeconfig={kubeconfig}", "get", "namespaces"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "kube-system" in nodes.stdout
        prefect = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "gcl", "ls"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PREFECT_API_URL": api_url},
        )
        assert prefect.returncode == 0, prefect.stdout + prefect.stderr

        status = _cli("status", "--dir", str(directory))
        assert status.returncode == 0
        assert status.stdout.count("running") == 3
    finally:
        down = _cli("down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert not [name for name, pid in pids.items() if process_alive(pid)]
    # Each server led its own process group: nothing in those groups outlives `down`.
    assert not [pid for pid in pids.values() if group_members(pid)]
    assert _cli("status", "--dir", str(directory)).returncode == 1
