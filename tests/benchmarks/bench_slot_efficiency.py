"""Slot efficiency of gpu_slot() against a local semaphore (and, on request, bare Prefect
concurrency()), on the two workloads the README quotes.

Run: ``python tests/benchmarks/bench_slot_efficiency.py [--reps 3] [--runners ...]`` (not collected
by pytest).

It starts its own Prefect server (SQLite, 127.0.0.1) and, per runner and workload, P worker
processes that loop: take a unit, enter the slot, hold it ``d`` seconds, leave, until N units are
done. Reported per run: makespan, efficiency (ideal N*d/K over makespan), the same relative to the
semaphore of the same repetition (``vs sem``), p95 of the idle gap between a release and the next
entry, the first-acquire cost (median and max over the first K entries of the time from calling
the slot to being inside: they find a free slot, so this is what taking one costs), the most
holders inside at once (from the recorded intervals), the most ``active_slots`` the server reported
(sampled every 20 ms), units per process (max/min), whether two holders ever shared a device, and
when the K-th slot was first entered; then min/median/max per runner. By default each process
makes one untimed use first (imports, client, connection) so the figures measure taking and
handing over slots; ``--cold`` includes that start-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

RUNNERS = ("gpu_slot", "prefect", "semaphore")
DEFAULT_RUNNERS = ("gpu_slot", "semaphore")
WORKLOADS = ((4, 64, 0.5, 8), (2, 40, 0.2, 6))  # K slots, N units, d seconds, P processes

Interval = tuple[int, float, float, tuple[int, ...], float]  # pid, enter, exit, devices, asked


@dataclass
class Job:
    runner: str
    limit_name: str
    slots: int
    hold: float


def _slot(job: Job, semaphore: Any) -> Callable[[], AbstractContextManager[tuple[int, ...]]]:
    """A zero-argument context manager factory yielding the devices held (empty if unknown)."""
    if job.runner == "gpu_slot":
        from prefect_gpu_flows import gpu_slot

        @contextmanager
        def gpu() -> Iterator[tuple[int, ...]]:
            with gpu_slot() as lease:
                yield lease.devices

        return gpu
    if job.runner == "prefect":
        from prefect.concurrency.sync import concurrency

        @contextmanager
        def bare() -> Iterator[tuple[int, ...]]:
            with concurrency(job.limit_name, occupy=1, strict=True):
                yield ()

        return bare

    @contextmanager
    def local() -> Iterator[tuple[int, ...]]:
        with semaphore:
            yield ()

    return local


def worker(
    job: Job,
    units: Synchronized[int],
    total: int,
    start: multiprocessing.synchronize.Event,
    ready: Queue[int],
    results: Queue[list[Interval]],
    semaphore: Any,
    warm: bool,
) -> None:
    slot = _slot(job, semaphore)  # imports happen before the clock starts
    if warm:
        with slot():  # first use (client, connection, imports) before the clock starts
            pass
    ready.put(os.getpid())
    start.wait()
    done: list[Interval] = []
    while True:
        with units.get_lock():
            if units.value >= total:
                break
            units.value += 1
        asked = time.time()
        with slot() as devices:
            entered = time.time()
            time.sleep(job.hold)
            left = time.time()
        done.append((os.getpid(), entered, left, devices, asked))
    results.put(done)


@dataclass
class Run:
    runner: str
    makespan: float
    efficiency: float
    gap_p95_ms: float
    first_acquire_ms: tuple[float, float]  # median, max over the first K entries
    max_inside: int
    max_active_slots: int
    units_max: int
    units_min: int
    shared_devices: bool
    startup_ms: float


def _analyse(
    runner: str,
    intervals: list[Interval],
    t0: float,
    slots: int,
    ideal: float,
    max_active: int,
) -> Run:
    makespan = max(left for _, _, left, _, _ in intervals) - t0
    steps = sorted(
        [(entry, 1) for _, entry, _, _, _ in intervals]
        + [(left, -1) for _, _, left, _, _ in intervals]
    )
    inside = max_inside = 0
    for _, step in steps:  # exits sort before entries at equal times
        inside += step
        max_inside = max(max_inside, inside)
    enters = sorted(entry for _, entry, _, _, _ in intervals)
    gaps = []
    for _, _, left, _, _ in intervals:
        later = [entry for entry in enters if entry >= left]
        if later:
            gaps.append(later[0] - left)
    gaps.sort()
    p95 = gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))] if gaps else 0.0
    first = sorted(intervals, key=lambda interval: interval[1])[:slots]
    waits = [(entry - asked) * 1000 for _, entry, _, _, asked in first]
    per_process: dict[int, int] = {}
    for pid, *_ in intervals:
        per_process[pid] = per_process.get(pid, 0) + 1
    shared = any(
        a[3] and set(a[3]) & set(b[3]) and a[1] < b[2] and b[1] < a[2]
        for i, a in enumerate(intervals)
        for b in intervals[i + 1 :]
    )
    return Run(
        runner,
        makespan,
        ideal / makespan,
        p95 * 1000,
        (statistics.median(waits), max(waits)),
        max_inside,
        max_active,
        max(per_process.values()),
        min(per_process.values()),
        shared,
        (enters[min(slots, len(enters)) - 1] - t0) * 1000,
    )


def _sample_active(name: str, stop: threading.Event, seen: list[int]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(0.02):
            seen.append(client.read_global_concurrency_limit_by_name(name).active_slots)


def run_once(
    runner: str,
    slots: int,
    total: int,
    hold: float,
    processes: int,
    tag: str,
    lock_root: Path,
    warm: bool,
) -> Run:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    worker_id = f"bench-{tag}"
    name = f"gpu:{worker_id}"
    if runner != "semaphore":
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots)
            )
    os.environ["WORKER_ID"] = worker_id  # spawned workers inherit it
    os.environ["PREFECT_GPU_LOCK_DIR"] = str(lock_root)
    context = multiprocessing.get_context("spawn")
    units = context.Value("i", 0)
    start = context.Event()
    ready: Queue[int] = context.Queue()
    results: Queue[list[Interval]] = context.Queue()
    semaphore = context.BoundedSemaphore(slots)
    job = Job(runner, name, slots, hold)
    workers = [
        context.Process(
            target=worker, args=(job, units, total, start, ready, results, semaphore, warm)
        )
        for _ in range(processes)
    ]
    seen: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_active, args=(name, stop, seen))
    try:
        for process in workers:
            process.start()
        for _ in workers:
            ready.get(timeout=120)
        if runner != "semaphore":
            sampler.start()
        t0 = time.time()
        start.set()
        intervals = [item for _ in workers for item in results.get(timeout=600)]
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        for process in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    ideal = total * hold / slots
    return _analyse(runner, intervals, t0, slots, ideal, max(seen, default=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runners", nargs="+", default=list(DEFAULT_RUNNERS), choices=RUNNERS)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no untimed first use per process: include client start-up in the makespan",
    )
    args = parser.parse_args()
    runners = sorted(set(args.runners), key=RUNNERS.index)

    from prefect_gpu_sandbox.prefect_server import PrefectServer

    work = Path(tempfile.mkdtemp(prefix="bench-slots-"))
    server = PrefectServer(work / "prefect")
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    summary: dict[tuple[str, str, str], list[float]] = {}
    try:
        for slots, total, hold, processes in WORKLOADS:
            workload = f"K={slots} N={total} d={hold} P={processes}"
            start = "cold" if args.cold else "warm (one untimed use per process)"
            print(f"\n{workload}  (ideal {total * hold / slots:.2f} s, {start})")
            print(
                f"{'runner':10} {'makespan':>8} {'eff':>6} {'vs sem':>6} {'gap p95':>9} "
                f"{'first acquire':>15} {'inside':>6} {'active':>6} {'units':>7} {'shared':>6} "
                f"{'start':>7}"
            )
            for rep in range(args.reps):
                # The semaphore first: the reference for this repetition's other runners.
                ordered = sorted(runners, key=lambda runner: runner != "semaphore")
                reference: float | None = None
                for runner in ordered:
                    tag = f"{runner}-{slots}-{rep}"
                    run = run_once(
                        runner,
                        slots,
                        total,
                        hold,
                        processes,
                        tag,
                        work / "locks" / tag,
                        warm=not args.cold,
                    )
                    if runner == "semaphore":
                        reference = run.efficiency
                    relative = run.efficiency / reference if reference else float("nan")
                    summary.setdefault((workload, runner, "eff"), []).append(run.efficiency)
                    summary.setdefault((workload, runner, "vs sem"), []).append(relative)
                    summary.setdefault((workload, runner, "first ms"), []).append(
                        run.first_acquire_ms[0]
                    )
                    median_ms, max_ms = run.first_acquire_ms
                    print(
                        f"{runner:10} {run.makespan:8.2f} {run.efficiency:6.3f} {relative:6.3f} "
                        f"{run.gap_p95_ms:7.1f}ms {median_ms:6.1f}/{max_ms:6.1f}ms "
                        f"{run.max_inside:6} "
                        f"{run.max_active_slots if runner != 'semaphore' else '-':>6} "
                        f"{run.units_max:>3}/{run.units_min:<3} {run.shared_devices!s:>6} "
                        f"{run.startup_ms:5.0f}ms",
                        flush=True,
                    )
        print("\nmin / median / max per runner")
        for (workload, runner, figure), values in summary.items():
            if runner == "semaphore" and figure == "vs sem":
                continue
            print(
                f"{workload:24} {runner:10} {figure:9} {min(values):7.3f} / "
                f"{statistics.median(values):7.3f} / {max(values):7.3f}"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
