"""Session fixtures that start REAL servers on 127.0.0.1: etcd + kube-apiserver, Prefect."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Before Prefect is imported: a client without PREFECT_API_URL must fail, not quietly start an
# ephemeral server of its own.
os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"

import pytest
from kubernetes import client, config
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer
from tests.support.nodes import NodeFactory
from tests.support.procs import surviving_children


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver (RBAC on) with an admin kubeconfig."""
    with ControlPlane(tmp_path_factory.mktemp("cluster")) as plane:
        yield plane


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def kube_api(kubeconfig: Path) -> Iterator[client.ApiClient]:
    """An admin client of the session's kube-apiserver."""
    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def core_v1(kube_api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube_api)


@pytest.fixture
def gpu_nodes(core_v1: client.CoreV1Api) -> Iterator[NodeFactory]:
    """Create simulated GPU nodes; every node a test made is deleted after it."""
    factory = NodeFactory(core_v1)
    yield factory
    factory.delete_all()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server on SQLite with its own PREFECT_HOME."""
    with PrefectServer(tmp_path_factory.mktemp("prefect")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server on PostgreSQL (Debian's, installed when missing), started only by
    the tests that run on both databases."""
    with (
        PostgresServer() as postgres,
        PrefectServer(
            tmp_path_factory.mktemp("prefect-postgres"), database_url=postgres.database_url
        ) as server,
    ):
        yield server


@pytest.fixture(scope="session")
def prefect_api_url(prefect_server: PrefectServer) -> Iterator[str]:
    """The server's API URL, also the in-process Prefect client's (and subprocesses') default."""
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = prefect_server.api_url
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server.api_url
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process started by a test outlived it."""
    survivors = surviving_children()
    if survivors:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nprocesses outlived the test session: {survivors}")
