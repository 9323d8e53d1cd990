"""The demo's inference part: the bundled ``embed-documents`` deployment run by real process
workers (local processes, one per simulated GPU node, or the chart's worker pods on a real node)
and a timeline of when each run held a GPU slot.

Each worker is ``prefect worker start --pool gpu-process-pool --work-queue <node> --limit N`` with
``WORKER_ID=<node>``; its flow runs are subprocesses that share the node's GPU slots through
``gpu_slot()`` (the node's limit ``gpu:<node>``, then a device lock). The summary each run writes
records when it held its slot, which is what the timeline draws.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from prefect_gpu_sandbox.processes import (
    ServerProcess,
    descendants,
    interrupt_safe,
    process_alive,
    stop_process_group,
)
from prefect_gpu_sandbox.waiting import WaitTimeout, eventually

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

__all__ = [
    "DocumentBatch",
    "FinishedRun",
    "NodeWorker",
    "RunSite",
    "check_inference_installed",
    "create_deployment",
    "max_concurrency",
    "print_timeline",
    "run_flows",
    "running_workers",
    "write_documents",
    "write_timeline",
]

POOL = "gpu-process-pool"  # as in flows/prefect.yaml
DEPLOYMENT = "embed-documents"
ENTRYPOINT = "prefect_gpu_flows.inference.embed_documents"


def check_inference_installed() -> None:
    """Fail before anything starts if the model runtime of the bundled flow is missing."""
    import prefect_gpu_flows.inference  # noqa: F401  (raises an ImportError that says what to do)


# --- the deployment --------------------------------------------------------------------------


def create_deployment(prefect: SyncPrefectClient, queues: Sequence[str]) -> UUID:
    """What ``cd flows && prefect deploy --all`` makes from flows/prefect.yaml, through the API.

    The pool gets one work queue per node, so each node's worker takes exactly that node's runs.
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    from prefect_gpu_flows.inference import embed_documents

    pool = WorkPoolCreate(
        name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
    )
    with contextlib.suppress(ObjectAlreadyExists):
        prefect.create_work_pool(pool)
    for queue in queues:
        with contextlib.suppress(ObjectAlreadyExists):
            prefect.create_work_queue(queue, work_pool_name=POOL)
    return prefect.create_deployment(
        flow_id=prefect.create_flow_from_name(embed_documents.name),
        name=DEPLOYMENT,
        entrypoint=ENTRYPOINT,  # imported from the installed package: nothing to pull
        work_pool_name=POOL,
        work_queue_name="default",
        tags=["gpu", "inference"],
        pull_steps=[],
        parameter_openapi_schema=parameter_schema(embed_documents).model_dump_for_openapi(),
    )


@dataclass(frozen=True)
class DocumentBatch:
    path: Path
    count: int


def write_documents(path: Path, copies: int) -> DocumentBatch:
    """The flows package's sample documents, ``copies`` times over, as one JSON-lines file."""
    source = files("prefect_gpu_flows") / "data" / "sample_documents.jsonl"
    samples = [json.loads(line) for line in source.read_text("utf-8").splitlines() if line.strip()]
    lines = [
        json.dumps({"id": f"{sample['id']}-{copy}", "text": sample["text"]})
        for copy in range(copies)
        for sample in samples
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DocumentBatch(path, len(lines))


# --- the workers -----------------------------------------------------------------------------


class RunSite(Protocol):
    """Where a node's flow runs happen, as ``run_flows`` watches them."""

    node: str
    queue: str | None
    """The work queue of this node's runs; None: the deployment's own."""

    def check(self) -> None:
        """Raise if the worker is gone (its runs would never finish)."""

    def log_tail(self, lines: int = 40) -> str: ...

    def summary(self, run_id: UUID) -> dict[str, Any]:
        """The summary.json the run wrote."""
        ...


class NodeWorker:
    """``WORKER_ID=<node> prefect worker start --pool gpu-process-pool --work-queue <node>``."""

    def __init__(
        self,
        node: str,
        worker_id: str,
        *,
        limit: int,
        api_url: str,
        directory: Path,
        output_dir: Path,
    ) -> None:
        self.node = node
        self.queue: str | None = node
        self.output_dir = output_dir
        home = directory / node
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            {
                "PREFECT_API_URL": api_url,
                "PREFECT_HOME": str(home / "prefect-home"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick up new runs at once (default 10)
                "PREFECT_GPU_LOCK_DIR": str(directory / "gpu-locks"),  # <dir>/<WORKER_ID>/
                "WORKER_ID": worker_id,
            }
        )
        self.argv = [
            str(Path(sys.executable).with_name("prefect")),
            "worker", "start", "--type", "process", "--pool", POOL, "--work-queue", node,
            "--limit", str(limit), "--name", f"worker-{node}",
        ]  # fmt: skip
        self.process = ServerProcess(
            f"worker-{node}", self.argv, log_path=home / "worker.log", env=env, cwd=home
        )

    @property
    def command(self) -> str:
        env = f"WORKER_ID={self.process.env['WORKER_ID'] if self.process.env else '?'}"
        return " ".join([env, "prefect", *self.argv[1:]])

    def start(self) -> None:
        self.process.start()

    def check(self) -> None:
        if not self.process.running():
            raise RuntimeError(f"{self.process.name} exited:\n{self.process.log_tail(40)}")

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def summary(self, run_id: UUID) -> dict[str, Any]:
        path = self.output_dir / str(run_id) / "summary.json"
        summary: dict[str, Any] = json.loads(path.read_text())
        return summary

    def stop(self, grace: float = 10.0) -> None:
        """Let finished flow runs exit, then stop the worker and any flow run still running."""
        if not self.process.running():
            return
        with contextlib.suppress(WaitTimeout):
            eventually(lambda: not descendants(self.process.pid), timeout=grace, what="flow runs")
        groups = {os.getpgid(pid) for pid, _ in descendants(self.process.pid) if process_alive(pid)}
        self.process.stop()
        for group in groups - {os.getpgrp()}:
            stop_process_group(group, timeout=5)


@contextlib.contextmanager
def running_workers(workers: Sequence[NodeWorker]) -> Iterator[None]:
    """Start the workers; on the way out stop them and their flow runs (at once on an error)."""
    grace = 0.0
    try:
        for worker in workers:
            worker.start()
        yield
        grace = 10.0  # finished normally: let the flow-run processes exit by themselves
    finally:
        for worker in workers:
            interrupt_safe(functools.partial(worker.stop, grace=grace))


# --- flow runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    id: UUID
    name: str
    node: str
    state: str
    started: datetime
    ended: datetime
    summary: dict[str, Any]

    @property
    def held(self) -> tuple[datetime, datetime]:
        first, last = self.summary["slot_held"]
        return datetime.fromisoformat(first), datetime.fromisoformat(last)


def run_flows(
    prefect: SyncPrefectClient,
    deployment: UUID,
    workers: Sequence[RunSite],
    *,
    runs_per_node: int,
    parameters: dict[str, Any],
    timeout: float,
    report: Callable[[str], None],
) -> list[FinishedRun]:
    """Create ``runs_per_node`` runs for each node and wait until every one is Completed."""
    pending: dict[UUID, tuple[str, RunSite]] = {}
    for worker in workers:
        for number in range(1, runs_per_node + 1):
            name = f"{worker.node}/run-{number}"
            run = prefect.create_flow_run_from_deployment(
                deployment, parameters=parameters, name=name, work_queue_name=worker.queue
            )
            pending[run.id] = (name, worker)
    report(f"created {len(pending)} flow runs of {DEPLOYMENT}: {runs_per_node} for each node")

    finished: list[FinishedRun] = []
    deadline = time.monotonic() + timeout
    while pending:
        for worker in workers:
            worker.check()
        for run_id, (name, worker) in list(pending.items()):
            run = prefect.read_flow_run(run_id)
            if run.state is None or not run.state.is_final():
                continue
            if not run.state.is_completed():
                log = worker.log_tail(40)
                raise RuntimeError(f"{name} ended {run.state.name}: {run.state.message}\n{log}")
            del pending[run_id]
            summary = worker.summary(run_id)
            started, ended = run.start_time, run.end_time
            if started is None or ended is None:
                raise RuntimeError(f"{name} is Completed but has no start or end time")
            state = run.state.name or run.state.type.value
            done = FinishedRun(run_id, name, worker.node, state, started, ended, summary)
            finished.append(done)
            first, last = done.held
            report(
                f"{name} {done.state}: {summary['documents']} documents embedded on "
                f"{summary['device']} (device {summary['slot_devices'][0]} of gpu:{worker.node}), "
                f"slot held {(last - first).total_seconds():.2f} s"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow runs not finished after {timeout:.0f} s: {pending}")
        time.sleep(0.5)
    return finished


# --- the timeline ----------------------------------------------------------------------------


def max_concurrency(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """Most intervals open at one instant (one that ends where another starts does not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    # At equal instants -1 sorts before +1: a release and an acquire at the same time never count
    # as two holders.
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def write_timeline(runs: Sequence[FinishedRun], path: Path) -> None:
    """The timeline as JSON: per run its node, start and end, and when it held its GPU slot."""
    rows = [
        {
            "flow_run": run.name,
            "flow_run_id": str(run.id),
            "node": run.node,
            "state": run.state,
            "started": run.started.isoformat(),
            "ended": run.ended.isoformat(),
            "slot_held": run.summary["slot_held"],
            "slot_devices": run.summary["slot_devices"],
            # What the run's GPU step saw, and what its container was given, from its summary.
            "cuda_visible_devices": run.summary.get("cuda_visible_devices"),
            "nvidia_visible_devices": run.summary.get("nvidia_visible_devices"),
        }
        for run in sorted(runs, key=lambda run: run.name)
    ]
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def print_timeline(runs: Sequence[FinishedRun], limits: dict[str, int], width: int = 50) -> None:
    """One row per flow run: '-' running, '#' holding the node's GPU slot (embedding)."""
    origin = min(run.started for run in runs)
    span = max((max(run.ended, run.held[1]) - origin).total_seconds() for run in runs)

    def column(moment: datetime) -> int:
        return min(width - 1, int((moment - origin).total_seconds() / span * width))

    print("    timeline ('-' flow run running, '#' its embed step holding a GPU slot):")
    end = f"{span:.1f} s"
    device_width = max(4, *(len(run.summary["slot_devices"][0]) for run in runs))
    print(f"    {'FLOW RUN':<18} {'GPU':<{device_width}} 0 s{end:>{width - 1}}")
    for run in sorted(runs, key=lambda run: run.name):
        row = [" "] * width
        for index in range(column(run.started), column(run.ended) + 1):
            row[index] = "-"
        first, last = run.held
        for index in range(column(first), column(last) + 1):
            row[index] = "#"
        device = run.summary["slot_devices"][0]
        print(f"    {run.name:<18} {device:<{device_width}} |{''.join(row)}|")
    for node in sorted({run.node for run in runs}):
        peak = max_concurrency([run.held for run in runs if run.node == node])
        limit = limits.get(f"gpu:{node}", 0)
        verdict = "within" if peak <= limit else "OVER"
        print(
            f"    {node}: at most {peak} embed step(s) at a time; limit gpu:{node} = {limit} "
            f"({verdict} the limit)"
        )
