"""The Prefect server fixture serves real global concurrency limits."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound

from prefect_gpu_sandbox.prefect_server import PrefectServer
from tests.support.sockets import answers, listening_addresses

pytestmark = pytest.mark.integration


def test_gcl_round_trip(prefect_api_url: str) -> None:
    async def scenario() -> None:
        async with get_client() as prefect:
            await prefect.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="gpu:node-a", limit=4)
            )
            limit = await prefect.read_global_concurrency_limit_by_name("gpu:node-a")
            assert (limit.name, limit.limit, limit.active, limit.active_slots) == (
                "gpu:node-a",
                4,
                True,
                0,
            )
            await prefect.delete_global_concurrency_limit_by_name("gpu:node-a")
            with pytest.raises(ObjectNotFound):
                await prefect.read_global_concurrency_limit_by_name("gpu:node-a")

    asyncio.run(scenario())


def test_server_binds_loopback_only(prefect_server: PrefectServer) -> None:
    assert answers("127.0.0.1", prefect_server.port)
    assert listening_addresses(prefect_server.port) == {"127.0.0.1"}
