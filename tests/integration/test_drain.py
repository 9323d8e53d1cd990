"""A node that loses its GPUs while slots are held drains: its limit is never 0 while a slot is
held (Prefect cannot release into a limit of 0: 409 on SQLite, 503 on PostgreSQL), it waits at 1
(no new holder can enter) and reaches 0 once nobody holds a slot. On both databases."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.waiting import eventually, holds
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader
from tests.support.policies import Policies, ledger, pool_spec

pytestmark = pytest.mark.integration

# What Prefect logs when a release or its repossessor meets a limit of 0.
SERVER_ERRORS = re.compile(r"Traceback|division by zero|IntegrityError|NotNullViolation|ERROR")


@pytest.fixture(params=["sqlite", "postgres"])
def database_prefect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrefectServer]:
    """A Prefect server of this test's own (its log is read), on each database."""
    with contextlib.ExitStack() as stack:
        url = None
        if request.param == "postgres":
            url = stack.enter_context(PostgresServer()).database_url
        yield stack.enter_context(PrefectServer(tmp_path / "prefect", database_url=url))


def test_holders_on_a_node_that_loses_its_gpus_all_release_cleanly(
    database_prefect: PrefectServer,
    crd: Path,
    operator_namespace: str,
    kubeconfig: Path,
    policies: Policies,
    gpu_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    api_url = database_prefect.api_url
    reader = PrefectLimitsReader(api_url)
    operator = OperatorProcess(
        kubeconfig,
        tmp_path / "operator.log",
        extra_env={"PREFECT_GPU_OPERATOR_DRAIN_POLL_SECONDS": "0.5"},
    ).start()
    stack = contextlib.ExitStack()
    prefect = stack.enter_context(SyncPrefectClient(api_url))
    try:
        gpu_nodes.create("dr-a", 4, labels={"pool": "dr"})
        policies.create("dr", pool_spec(api_url, "dr"))
        eventually(lambda: reader.limits("gpu:dr-") == {"gpu:dr-a": 4}, timeout=30)
        leases = [_hold(prefect, "gpu:dr-a") for _ in range(3)]
        assert reader.all()["gpu:dr-a"]["active_slots"] == 3

        gpu_nodes.set_gpus("dr-a", 0)  # the device plugin reports every GPU gone
        eventually(lambda: reader.limits("gpu:dr-") == {"gpu:dr-a": 1}, timeout=10)
        holds(lambda: reader.limits("gpu:dr-")["gpu:dr-a"] == 1, duration=2)  # not 0: held
        entry = eventually(lambda: _ledger(policies).get("drainingTo") == 0 and _ledger(policies))
        assert entry["limit"] == 1
        # Nobody new gets in while slots are held (a 503 is SQLite busy under load: asked again).
        refusal = eventually(lambda: (status := _status_of_a_new_hold(prefect)) != 503 and status)
        assert refusal == 423

        for lease in leases:
            prefect.release_concurrency_slots_with_lease(lease_id=lease)  # must succeed
        eventually(lambda: reader.limits("gpu:dr-") == {"gpu:dr-a": 0}, timeout=10)
        assert reader.all()["gpu:dr-a"]["active_slots"] == 0
        eventually(lambda: "drainingTo" not in _ledger(policies), timeout=10)
        errors = [
            line
            for line in (database_prefect.home / "server.log").read_text().splitlines()
            if SERVER_ERRORS.search(line)
        ]
        assert errors == []
    finally:
        policies.delete_all()
        operator.stop()
        stack.close()
        reader.close()


def _hold(prefect: SyncPrefectClient, name: str, *, retries: bool = True) -> UUID:
    """One slot of ``name`` under a lease, as gpu_slot() takes it (without the client's waiting
    on 423 when ``retries`` is off)."""
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 5 if retries else 0}):
        response = prefect.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=300
        )
    lease: UUID = UUID(response.json()["lease_id"])
    return lease


def _status_of_a_new_hold(prefect: SyncPrefectClient) -> int:
    """The HTTP status the server answers a new holder of gpu:dr-a with, asked once."""
    try:
        lease = _hold(prefect, "gpu:dr-a", retries=False)
    except httpx.HTTPStatusError as error:
        return error.response.status_code
    prefect.release_concurrency_slots_with_lease(lease_id=lease)
    return 200


def _ledger(policies: Policies) -> dict[str, object]:
    (entry,) = ledger(policies.status("dr")) or [{}]
    return dict(entry)
