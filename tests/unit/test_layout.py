"""What each distribution drags in at run time: the operator never loads Prefect, the flows, the
sandbox or a model runtime; the flows never load the operator or a Kubernetes client. The
import-linter contracts in pyproject.toml check the same statically, module by module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(statement: str) -> set[str]:
    probe = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return {name.split(".")[0] for name in json.loads(result.stdout)}


def test_the_running_operator_loads_no_prefect_flows_sandbox_or_model_runtime() -> None:
    loaded = _loaded_after("import prefect_gpu_operator.run, prefect_gpu_operator.handlers")
    assert "kopf" in loaded  # the probe did import the operator
    forbidden = {"prefect", "prefect_gpu_flows", "prefect_gpu_sandbox", "onnxruntime", "numpy"}
    assert loaded & forbidden == set()


# The package loads Prefect when its API is first used (device discovery runs without it).
@pytest.mark.parametrize(
    "statement", ["from prefect_gpu_flows import gpu_slot", "import prefect_gpu_flows.slots"]
)
def test_the_flows_load_no_operator_or_kubernetes_client(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert "prefect" in loaded
    forbidden = {
        "prefect_gpu_operator",
        "prefect_gpu_sandbox",
        "kopf",
        "kubernetes",
        "cryptography",
    }
    assert loaded & forbidden == set()
