"""The processes and threads the chaos test runs: the limits poller, the gpu_slot() workers, the
operator it SIGKILLs and restarts, and disruptions in the background."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.integration.chaos.invariants import POLL_SECONDS, Disruption, Snapshot
from tests.support.operator import OperatorProcess

__all__ = [
    "ATTEMPT_TIMEOUT",
    "RESYNC_SECONDS",
    "Background",
    "OperatorControl",
    "Poller",
    "Workers",
]

REPO = Path(__file__).resolve().parents[3]
WORKER = "tests.integration.chaos.worker"
ATTEMPT_TIMEOUT = 2.0
"""Seconds a worker waits for a slot before GpuSlotTimeout."""
RESYNC_SECONDS = 2.0
WORKERS_PER_NODE = 2


class Poller:
    """Reads the limits named ``prefix``... from Prefect every POLL_SECONDS in a thread (skips
    while down); the chaos nodes' by default."""

    def __init__(self, api_url: str, prefix: str = "gpu:chaos-") -> None:
        self.http = httpx.Client(base_url=api_url, timeout=2.0)
        self.prefix = prefix
        self.snapshots: list[Snapshot] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)
        self.http.close()

    def _run(self) -> None:
        while not self._done.is_set():
            a = time.monotonic()
            try:
                response = self.http.post("/v2/concurrency_limits/filter", json={"limit": 200})
                response.raise_for_status()
            except httpx.HTTPError:
                pass  # Prefect is down: the gap widens the uncertainty windows
            else:
                b = time.monotonic()
                limits = {
                    item["name"].removeprefix("gpu:"): int(item["limit"])
                    for item in response.json()
                    if item["name"].startswith(self.prefix)
                }
                self.snapshots.append(Snapshot(a, b, limits))
            self._done.wait(POLL_SECONDS)


class Workers:
    """The chaos workers: ``worker.py`` processes, WORKERS_PER_NODE per node, each on
    ``api_url`` unless it is started with a server of its own (an API replica)."""

    def __init__(self, directory: Path, api_url: str) -> None:
        self.directory = directory
        self.api_url = api_url
        self.stop_file = directory / "stop"
        self.lock_dir = directory / "locks"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, node: str, index: int, *args: str, api_url: str | None = None) -> None:
        env = {
            **os.environ,
            "WORKER_ID": node,
            "PREFECT_GPU_LOCK_DIR": str(self.lock_dir),
            "PREFECT_API_URL": api_url or self.api_url,
        }
        name = f"{node}-{index}"
        with (self.directory / f"{name}.log").open("ab") as log:
            worker = subprocess.Popen(
                [
                    sys.executable, "-m", WORKER,
                    "--records", str(self.directory / f"{name}.jsonl"),
                    "--stop", str(self.stop_file),
                    "--timeout", str(ATTEMPT_TIMEOUT),
                    *args,
                ],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        self.processes.append(worker)

    def records(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.directory.glob("*.jsonl")):
            found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return found

    def all_ready(self) -> bool:
        ready = {r["pid"] for r in self.records() if r["event"] == "ready"}
        return len(ready) == len(self.processes)

    def stop(self, timeout: float, *, touch: bool = True) -> list[int | None]:
        """Let every worker finish its attempt and exit; kill what is left at the deadline."""
        if touch:
            self.stop_file.touch()
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for worker in self.processes:
            try:
                codes.append(worker.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                _dump_stacks(worker.pid, self.directory / f"stuck-{worker.pid}.txt")
                worker.kill()
                worker.wait(timeout=10)
                codes.append(None)
        return codes


def _dump_stacks(pid: int, path: Path) -> None:
    """Where a worker that would not exit was stuck, if py-spy is installed (it is optional)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(spy).exists():
        dump = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
        path.write_text(dump.stdout + dump.stderr)


class OperatorControl:
    """The operator subprocess; ``restart()`` SIGKILLs it and starts a new one."""

    def __init__(self, kubeconfig: Path, directory: Path) -> None:
        self.kubeconfig = kubeconfig
        self.directory = directory
        self.incarnation = 0
        self.current = self._new()

    def _new(self) -> OperatorProcess:
        self.incarnation += 1
        return OperatorProcess(
            self.kubeconfig,
            self.directory / f"operator-{self.incarnation}.log",
            resync_seconds=RESYNC_SECONDS,
            verbose=False,
        )

    def start(self) -> None:
        self.current.start()

    def restart(self) -> None:
        self.current.kill()
        self.current = self._new()
        self.current.start()

    def stop(self) -> None:
        self.current.stop()


class Background:
    """At most one restart of each kind in flight, run in a thread; records its disruption."""

    def __init__(self, kind: str, disruptions: list[Disruption]) -> None:
        self.kind = kind
        self.disruptions = disruptions
        self.thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def run(self, action: Callable[[], None]) -> None:
        def target() -> None:
            start = time.monotonic()
            try:
                action()
            except BaseException as error:
                self.errors.append(error)
            self.disruptions.append(Disruption(self.kind, start, time.monotonic()))

        self.thread = threading.Thread(target=target, name=f"chaos-{self.kind}", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), f"{self.kind} restart still running"
        assert not self.errors, f"{self.kind} restart failed: {self.errors!r}"
