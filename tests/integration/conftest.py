"""Fixtures for operator tests: the CRD installed, the operator running, policies cleaned up."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.api.crd import CRD_FILE
from prefect_gpu_sandbox.tools import tools_bin
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, Scene
from tests.support.policies import Policies

REPO = Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "prefect-gpu-operator"


@pytest.fixture(scope="session")
def crd(kubeconfig: Path) -> Path:
    """The chart's CRD file, applied and Established."""
    path = REPO / CRD_FILE
    kubectl = [str(tools_bin() / "kubectl"), f"--kubeconfig={kubeconfig}"]
    subprocess.run([*kubectl, "apply", "-f", str(path)], check=True, capture_output=True)
    subprocess.run(
        [
            *kubectl,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/gpulimitpolicies.prefectgpu.io",
        ],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="session")
def operator_namespace(core_v1: client.CoreV1Api) -> str:
    try:
        core_v1.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NAMESPACE))
        )
    except ApiException as error:
        if error.status != 409:
            raise
    return OPERATOR_NAMESPACE


@pytest.fixture(scope="module")
def operator(
    request: pytest.FixtureRequest,
    crd: Path,
    kubeconfig: Path,
    operator_namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The real operator, out of cluster; resync every 2 s unless the module sets
    ``OPERATOR_RESYNC_SECONDS``."""
    process = OperatorProcess(
        kubeconfig,
        tmp_path_factory.mktemp("operator") / "operator.log",
        resync_seconds=getattr(request.module, "OPERATOR_RESYNC_SECONDS", 2.0),
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
def policies(kube_api: client.ApiClient, crd: Path) -> Iterator[Policies]:
    created = Policies(kube_api)
    yield created
    created.delete_all()


@pytest.fixture
def prefect_limits(prefect_api_url: str) -> Iterator[PrefectLimitsReader]:
    reader = PrefectLimitsReader(prefect_api_url)
    yield reader
    reader.close()


@pytest.fixture
def scene(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> Scene:
    """The module's operator running, and what a test works with (cleaned up after it)."""
    return Scene(policies, gpu_nodes, prefect_limits, prefect_api_url)
