"""Run the real operator as a subprocess against the test control plane, and read what it did."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from prefect_gpu_sandbox.processes import ServerProcess, free_port
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.policies import Policies

__all__ = ["OperatorProcess", "PrefectLimitsReader", "Scene", "expect_limits"]


class OperatorProcess:
    """``prefect-gpu-operator run`` with its own health and metrics ports."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        *,
        namespace: str = "prefect-gpu-operator",
        resync_seconds: float = 2.0,
        extra_env: Mapping[str, str] | None = None,
        verbose: bool = True,
    ) -> None:
        self.health_port = free_port()
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PREFECT_GPU_OPERATOR_NAMESPACE": namespace,
            "PREFECT_GPU_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
            "PREFECT_GPU_OPERATOR_RETRY_MAX_SECONDS": "2",
            "PREFECT_GPU_OPERATOR_HEALTH_ADDRESS": "127.0.0.1",
            "PREFECT_GPU_OPERATOR_HEALTH_PORT": str(self.health_port),
            "PREFECT_GPU_OPERATOR_METRICS_PORT": str(self.metrics_port),
            **(extra_env or {}),
        }
        self.process = ServerProcess(
            "operator",
            [
                sys.executable,
                "-m",
                "prefect_gpu_operator",
                "run",
                *(["--verbose"] if verbose else []),
            ],
            log_path=log_path,
            env=env,
        )

    def start(self) -> OperatorProcess:
        self.process.start()
        self.process.wait_ready(self.healthy, timeout=60)
        return self

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a node failure or OOM would."""
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def prefect_calls(self) -> float:
        return self.metric("prefect_gpu_operator_prefect_api_calls_total")


class PrefectLimitsReader:
    """Reads and edits global concurrency limits through Prefect's REST API, as a user would."""

    def __init__(self, api_url: str, *, headers: Mapping[str, str] | None = None) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=10, headers=dict(headers or {}))

    def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        # A SQLite server answers 503 "database is locked" when writes collide: retry those.
        for attempt in range(6):
            response = self.http.request(method, path, json=body)
            if response.status_code != 503:
                return response
            time.sleep(0.1 * 2**attempt)
        return response

    def all(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            page = self._request(
                "POST", "/v2/concurrency_limits/filter", {"limit": 200, "offset": offset}
            )
            page.raise_for_status()
            for item in page.json():
                found[item["name"]] = item
            if len(page.json()) < 200:
                return found
            offset += 200

    def limits(self, prefix: str = "") -> dict[str, int]:
        return {name: item["limit"] for name, item in self.all().items() if name.startswith(prefix)}

    def create(self, name: str, limit: int) -> None:
        body = {"name": name, "limit": limit}
        self._request("POST", "/v2/concurrency_limits/", body).raise_for_status()

    def set_limit(self, name: str, limit: int) -> None:
        self._request(
            "PATCH", f"/v2/concurrency_limits/{name}", {"limit": limit}
        ).raise_for_status()

    def delete(self, name: str) -> None:
        response = self._request("DELETE", f"/v2/concurrency_limits/{name}")
        if response.status_code != 404:
            response.raise_for_status()

    def close(self) -> None:
        self.http.close()


@dataclass(frozen=True)
class Scene:
    """What an operator test works with while the module's operator runs: its policies, the GPU
    nodes it made and the Prefect server's limits."""

    policies: Policies
    nodes: NodeFactory
    limits: PrefectLimitsReader
    api_url: str


def expect_limits(
    reader: PrefectLimitsReader, prefix: str, expected: dict[str, int], timeout: float = 10.0
) -> None:
    def check() -> None:
        assert reader.limits(prefix) == expected

    eventually(check, timeout=timeout)
