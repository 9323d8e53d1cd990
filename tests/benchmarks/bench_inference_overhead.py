"""What the GPU gate costs the bundled deployment's embedding step, over calling the model directly.

Run: ``python tests/benchmarks/bench_inference_overhead.py [--runs 15] [--batch 64]``
(not collected by pytest).

It starts its own Prefect server (SQLite, 127.0.0.1), creates the limit ``gpu:<node>`` with one
slot, loads the encoder once, and then times, round-robin so background load hits all alike:

- ``model``: ``encoder.embed(texts)``, the bare model call;
- ``gpu_slot``: the same inside ``gpu_slot()`` (the node's Prefect limit and a device lock) with
  the slot's encoder (``slot_encoder``: on the CPU, the process's cached session);
- ``slot+load``: inside ``gpu_slot()``, a session loaded for the slot and dropped at its end,
  as the deployment does on CUDA so that no model outlives its slot on the device: what giving
  the model's memory back costs per slot (its load), measured on the CPU;
- ``task``: the deployment's ``embed`` task called from a flow (a task run, its state changes,
  ``gpu_slot()`` and the model), timed around the call as the flow sees it.

Each row: median and min over ``--runs`` timed calls after one untimed warm-up call, then the
median overhead over ``model`` in ms and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

NODE = "bench-node"


def timed(call: Callable[[], object]) -> float:
    """Milliseconds one call takes."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64, help="documents per call")
    args = parser.parse_args()

    from prefect_gpu_sandbox.prefect_server import PrefectServer

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    server = PrefectServer(work / "prefect")
    server.start()
    os.environ.update(
        PREFECT_API_URL=server.api_url,
        WORKER_ID=NODE,
        PREFECT_GPU_LOCK_DIR=str(work / "locks"),
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    try:
        # Imported only now, so Prefect reads the server's URL from the environment.
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        from prefect_gpu_flows import gpu_slot, inference
        from prefect_gpu_flows.inference import (
            Document,
            embed,
            load_encoder,
            slot_encoder,
        )

        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=f"gpu:{NODE}", limit=1)
            )

        texts = _texts(args.batch)
        documents = [Document(id=str(i), text=text) for i, text in enumerate(texts)]
        encoder = load_encoder()

        def model() -> None:
            encoder.embed(texts)

        def slot() -> None:
            with gpu_slot() as lease, slot_encoder(lease) as slot_model:
                slot_model.embed(texts)

        def slot_and_load() -> None:
            with gpu_slot():
                loaded = inference._load(None)  # what a CUDA slot loads (on the CPU here)
                loaded.embed(texts)
                loaded.close()

        @flow(name="bench-embed")
        def task_path(runs: int) -> list[float]:
            return [timed(lambda: embed(documents)) for _ in range(runs + 1)][1:]

        paths: dict[str, Callable[[], None]] = {
            "model": model,
            "gpu_slot": slot,
            "slot+load": slot_and_load,
        }
        for call in paths.values():
            call()  # warm-up: clients, connections, caches
        times: dict[str, list[float]] = {name: [] for name in [*paths, "task"]}
        for _ in range(args.runs):
            for name, call in paths.items():
                times[name].append(timed(call))
            times["task"] += task_path(1)  # one flow run per round: a warm-up call and a timed one
        _report(times, args.batch, encoder.device)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _texts(count: int) -> list[str]:
    """``count`` texts: the bundled samples, repeated."""
    lines = (files("prefect_gpu_flows") / "data" / "sample_documents.jsonl").read_text()
    samples = [json.loads(line)["text"] for line in lines.splitlines() if line.strip()]
    return [samples[i % len(samples)] for i in range(count)]


def _report(times: dict[str, list[float]], batch: int, device: str) -> None:
    base = statistics.median(times["model"])
    print(f"\nembed {batch} documents on {device}, {len(times['model'])} timed runs per path")
    print(f"{'path':10} {'median':>9} {'min':>9} {'overhead':>10} {'ratio':>6}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:10} {median:7.1f}ms {min(values):7.1f}ms {median - base:8.1f}ms "
            f"{median / base:6.2f}"
        )


if __name__ == "__main__":
    main()
