"""The highly available server's settings: each one a setting Prefect or prefect-redis reads (a
misspelt variable would be ignored without a word), and the README and docs/prefect-server.md
list exactly the ones the HA test topology runs with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prefect.settings import Settings
from prefect_redis.client import RedisMessagingSettings

from prefect_gpu_sandbox.prefect_ha import REDIS_LEASE_STORAGE, ha_settings

REPO = Path(__file__).resolve().parents[2]
DATABASE_URL = "postgresql+asyncpg://prefect:secret@postgres.example:5432/prefect"
SETTINGS = ha_settings(DATABASE_URL, "redis.example", 6380, 2)
DOCUMENTED = ha_settings(
    "postgresql+asyncpg://USER:PASSWORD@POSTGRES:5432/prefect", "REDIS", 6379, 0
)
"""What the documents list: the capitalised parts are placeholders, the rest is verbatim."""


def test_every_setting_reaches_the_server_and_prefect_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profile of this machine's
    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    server = Settings().server
    assert server.database.connection_url is not None
    assert server.database.connection_url.get_secret_value() == DATABASE_URL
    assert server.database.driver == "postgresql+asyncpg"
    assert server.concurrency.lease_storage == REDIS_LEASE_STORAGE
    assert server.events.messaging_broker == "prefect_redis.messaging"
    assert server.events.messaging_cache == "prefect_redis.messaging"
    assert server.events.causal_ordering == "prefect_redis.ordering"
    assert server.docket.url == "redis://redis.example:6380/2"
    redis = RedisMessagingSettings()
    assert (redis.host, redis.port, redis.db) == ("redis.example", 6380, 2)


def _listed(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of the document's first code block that sets the lease storage."""
    text = path.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    block = next(b for b in blocks if "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=" in b)
    pairs = (line.split("=", 1) for line in block.splitlines() if "=" in line)
    return {name: value for name, value in pairs}


@pytest.mark.parametrize("document", ["README.md", "docs/prefect-server.md"])
def test_the_documents_list_the_settings_the_ha_test_runs_with(document: str) -> None:
    assert _listed(REPO / document) == DOCUMENTED
