"""The bundled deployment end to end: prefect.yaml deployed, a real process worker, real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectAlreadyExists
from prefect.logging.handlers import APILogWorker
from prefect.workers.process import ProcessWorker

from prefect_gpu_flows.inference import embed_documents
from prefect_gpu_sandbox.processes import ServerProcess, descendants
from prefect_gpu_sandbox.waiting import eventually

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "gpu-process-pool"  # as in flows/prefect.yaml
DEPLOYMENT = "embed-documents/embed-documents"
NODE = "inference-node-1"
SLOTS = 2

# Three topics, two wordings each: paraphrases sit at rows 2i and 2i + 1.
PARAPHRASES = [
    ("The server room is too hot and the fans are loud.", "It is very warm near the noisy racks."),
    ("She booked a flight to Lisbon for next Friday.", "Next Friday she flies to Lisbon."),
    ("Add two spoons of salt to the boiling water.", "Put some spoonfuls of salt in the pot."),
]


@pytest.fixture(scope="module")
def prefect(prefect_api_url: str) -> Iterator[SyncPrefectClient]:
    with get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def gpu_limit(prefect: SyncPrefectClient) -> Iterator[str]:
    """The node's limit ``gpu:<node>`` with two slots, as the operator would create it."""
    name = f"gpu:{NODE}"
    prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=SLOTS))
    yield name
    prefect.delete_global_concurrency_limit_by_name(name)


@pytest.fixture(scope="module")
def deployed(prefect: SyncPrefectClient, gpu_limit: str) -> UUID:
    """The process pool, and flows/prefect.yaml deployed to it by ``prefect deploy``."""
    pool = WorkPoolCreate(
        name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
    )
    with suppress(ObjectAlreadyExists):
        prefect.create_work_pool(pool)
    deploy = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"],
        cwd=REPO / "flows",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    deployment = prefect.read_deployment_by_name(DEPLOYMENT)
    assert deployment.pull_steps == []  # the code comes from the installed package
    return deployment.id


@contextmanager
def process_worker(tmp_path: Path, limit: int) -> Iterator[ServerProcess]:
    """``WORKER_ID=<node> prefect worker start --pool gpu-process-pool --limit <limit>``."""
    env = {
        **os.environ,
        "WORKER_ID": NODE,
        "PREFECT_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "HF_HUB_OFFLINE": "1",
    }
    worker = ServerProcess(
        "prefect-worker",
        [PREFECT, "worker", "start", "--pool", POOL, "--limit", str(limit)],
        log_path=tmp_path / "worker.log",
        env=env,
        cwd=tmp_path,
    )
    worker.start()
    try:
        yield worker
    finally:
        # Flow runs start in sessions of their own, out of the worker's process group: let them
        # finish (they report their final state just before exiting), end any that do not, then
        # stop the worker.
        def no_flow_runs() -> None:
            assert not descendants(worker.pid), descendants(worker.pid)

        try:
            eventually(no_flow_runs, timeout=30)
        except AssertionError:
            for pid, _ in descendants(worker.pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        worker.stop()


def wait_completed(
    prefect: SyncPrefectClient, run_id: UUID, worker: ServerProcess, timeout: float
) -> FlowRun:
    """Wait for the flow run to complete; fail at once if it ends otherwise or the worker dies."""

    def completed() -> FlowRun:
        run = prefect.read_flow_run(run_id)
        state = run.state
        if state is not None and state.is_final() and not state.is_completed():
            pytest.fail(f"flow run ended {state.name}: {state.message}\n{worker.log_tail(60)}")
        if not worker.running():
            pytest.fail(f"the worker exited:\n{worker.log_tail(60)}")
        assert state is not None, "no state yet"
        assert state.is_completed(), state
        return run

    try:
        return eventually(completed, timeout=timeout, interval=0.5)
    except AssertionError:
        pytest.fail(f"flow run not completed within {timeout} s:\n{worker.log_tail(60)}")


def read_output(output_dir: Path, run_id: UUID) -> tuple[dict[str, Any], np.ndarray[Any, Any]]:
    run_dir = output_dir / str(run_id)
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary, np.load(run_dir / summary["embeddings"])


def test_deployment_runs_on_a_process_worker_and_embeds_meaningfully(
    prefect: SyncPrefectClient, deployed: UUID, gpu_limit: str, tmp_path: Path
) -> None:
    documents = tmp_path / "documents.jsonl"
    lines = [
        json.dumps({"id": f"topic{i}-{j}", "text": text})
        for i, pair in enumerate(PARAPHRASES)
        for j, text in enumerate(pair)
    ]
    documents.write_text("\n".join(lines) + "\n")
    output = tmp_path / "output"

    with process_worker(tmp_path, limit=SLOTS) as worker:
        # Two runs at once on the node's two slots: the test's documents and the bundled samples.
        runs = [
            prefect.create_flow_run_from_deployment(
                deployed,
                parameters={"documents_path": str(documents), "output_dir": str(output)},
            ),
            prefect.create_flow_run_from_deployment(
                deployed, parameters={"output_dir": str(output)}
            ),
        ]
        for run in runs:
            wait_completed(prefect, run.id, worker, timeout=300)

    summary, vectors = read_output(output, runs[0].id)
    assert summary["flow_run_id"] == str(runs[0].id)
    assert summary["ids"] == [f"topic{i}-{j}" for i in range(len(PARAPHRASES)) for j in (0, 1)]
    assert summary["device"] == "cpu"  # no CUDA on this machine
    assert len(summary["slot_devices"]) == 1
    assert summary["slot_devices"][0] in {str(slot) for slot in range(SLOTS)}  # no GPU list here
    # The step itself saw CUDA pinned to its slot's device.
    assert summary["cuda_visible_devices"] == summary["slot_devices"][0]
    assert vectors.shape == (len(lines), summary["dimensions"]) == (len(lines), 384)

    cosine = vectors @ vectors.T
    n = len(vectors)
    paired = [cosine[i, i + 1] for i in range(0, n, 2)]
    unrelated = [cosine[i, j] for i in range(n) for j in range(i + 1, n) if i // 2 != j // 2]
    assert min(paired) > max(unrelated) + 0.2, (paired, unrelated)

    samples, sample_vectors = read_output(output, runs[1].id)
    assert samples["documents"] == len(sample_vectors) == 12
    # Every bundled sample's nearest neighbour is its paraphrase.
    similarity = sample_vectors @ sample_vectors.T - 2 * np.eye(len(sample_vectors))
    assert [int(j) for j in similarity.argmax(axis=1)] == [i ^ 1 for i in range(12)]

    def slots_released() -> None:
        slots = prefect.read_global_concurrency_limit_by_name(gpu_limit).active_slots
        assert slots == 0, slots

    eventually(slots_released, timeout=10)


def test_flow_in_process_holds_the_node_limit_only_to_embed(
    prefect: SyncPrefectClient,
    gpu_limit: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same flow called directly (no worker): a quicker check of the task wiring."""
    monkeypatch.setenv("WORKER_ID", NODE)
    monkeypatch.setenv("PREFECT_GPU_LOCK_DIR", str(tmp_path / "locks"))
    summary_path = Path(embed_documents(output_dir=str(tmp_path / "output")))
    APILogWorker.drain_all(timeout=10)  # send the run's logs while the server still runs
    summary = json.loads(summary_path.read_text())
    assert summary["documents"] == 12
    assert summary["ids"][:2] == ["gpu-limit-1", "gpu-limit-2"]
    assert np.load(summary_path.with_name("embeddings.npy")).shape == (12, 384)
