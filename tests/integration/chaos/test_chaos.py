"""Chaos: a node's GPUs are never oversubscribed while nodes, the operator and Prefect misbehave.

Setup: 8 simulated GPU nodes (1-8 GPUs), a GPULimitPolicy pointing to a Prefect server this test
owns, the real operator (resync 2 s) and, on every node, ``WORKERS_PER_NODE`` processes
(``worker.py``) that loop ``with gpu_slot(timeout_seconds=ATTEMPT_TIMEOUT)`` and log each
attempt with ``time.monotonic()`` (one clock for all processes). It runs once with Prefect on
SQLite and once on PostgreSQL. For ``CHAOS_SECONDS`` (90 by default on SQLite, 45 on PostgreSQL;
set the environment variable for a longer run of both, ``CHAOS_SEED`` to replay one) a chaos
loop changes allocatable GPUs up and down (including 0), deletes nodes and re-adds them, SIGKILLs
and restarts the operator, and stops the Prefect server for a few seconds and restarts it. A
poller reads every ``gpu:chaos-*`` limit from Prefect every ``POLL_SECONDS``.

The invariants, and why they have the shape they have, are in ``invariants.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.waiting import eventually
from tests.integration.chaos.harness import (
    RESYNC_SECONDS,
    WORKERS_PER_NODE,
    Background,
    OperatorControl,
    Poller,
    Workers,
)
from tests.integration.chaos.invariants import (
    Change,
    Disruption,
    check,
)
from tests.support.nodes import NodeFactory
from tests.support.operator import PrefectLimitsReader
from tests.support.policies import Policies

pytestmark = pytest.mark.integration

# The PostgreSQL run is shorter: it repeats the same chaos on the other backend, and CI time counts.
DEFAULT_SECONDS = {"sqlite": 90.0, "postgres": 45.0}
NODE_GPUS = {f"chaos-{i}": gpus for i, gpus in enumerate([1, 2, 2, 3, 4, 4, 6, 8])}
POOL_LABEL = {"pool": "chaos"}
NODE_CHANGE_EVERY = (0.3, 0.8)
"""Seconds between two allocatable changes (a node is changed at most once a second)."""
OPERATOR_KILL_EVERY = (15.0, 25.0)
PREFECT_OUTAGE_EVERY = (20.0, 30.0)
PREFECT_OUTAGE_SECONDS = 3.0
QUIET_TAIL = 10.0
"""No operator kill or Prefect outage starts in the last seconds of the chaos."""
CONVERGENCE_MARGIN = 8.0


def chaos_seconds_for(database: str) -> float:
    return float(os.environ.get("CHAOS_SECONDS", DEFAULT_SECONDS[database]))


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    """Prefect's backend: PostgreSQL is Debian's, installed when missing."""
    return str(request.param)


@pytest.fixture
def chaos_prefect(tmp_path: Path, database: str) -> Iterator[PrefectServer]:
    """A Prefect server only this test uses, so it can stop and restart it (same port and DB)."""
    with contextlib.ExitStack() as stack:
        database_url = None
        if database == "postgres":
            postgres = PostgresServer()
            stack.callback(postgres.stop)
            postgres.start()
            database_url = postgres.database_url
        server = PrefectServer(tmp_path / "prefect", database_url=database_url)
        stack.callback(server.stop)
        server.start()
        yield server


@pytest.fixture
def chaos_operator(
    crd: Path, kubeconfig: Path, operator_namespace: str, tmp_path: Path
) -> Iterator[OperatorControl]:
    control = OperatorControl(kubeconfig, tmp_path)
    control.start()
    yield control
    control.stop()


# --- the test ------------------------------------------------------------------------------------


def test_never_oversubscribed_under_chaos(
    database: str,
    chaos_prefect: PrefectServer,
    chaos_operator: OperatorControl,
    policies: Policies,
    gpu_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    seconds = chaos_seconds_for(database)
    print(f"\nchaos: seed {seed}, {seconds:.0f} s, Prefect on {database}")
    reader = PrefectLimitsReader(chaos_prefect.api_url)
    changes: list[Change] = []
    disruptions: list[Disruption] = []
    gpus: dict[str, int | None] = {}
    started = time.monotonic()
    for node, count in NODE_GPUS.items():
        gpu_nodes.create(node, count, labels=POOL_LABEL)
        changes.append(Change(started, node, count))
        gpus[node] = count
    policies.create(
        "chaos",
        {
            "server": {"remoteApiUrl": chaos_prefect.api_url},
            "nodeSelector": {"matchLabels": POOL_LABEL},
        },
    )
    expected = {f"gpu:{node}": count for node, count in NODE_GPUS.items()}
    eventually(lambda: _limits_are(reader, expected), timeout=30)

    poller = Poller(chaos_prefect.api_url)
    workers = Workers(tmp_path / "workers", chaos_prefect.api_url)
    workers.directory.mkdir()
    operator_restarts = Background("operator", disruptions)
    prefect_restarts = Background("prefect", disruptions)
    try:
        poller.start()
        for node in NODE_GPUS:
            for index in range(WORKERS_PER_NODE):
                workers.start(node, index)
        eventually(workers.all_ready, timeout=120, what="chaos workers ready")
        setup_seconds = time.monotonic() - started

        # --- chaos ---
        chaos_started = time.monotonic()
        chaos_end = chaos_started + seconds
        last_change: dict[str, float] = dict.fromkeys(NODE_GPUS, 0.0)
        readd_at: dict[str, float] = {}
        next_kill = chaos_started + 8.0
        next_outage = chaos_started + 15.0
        kills = outages = 0

        def outage() -> None:
            chaos_prefect.stop()
            time.sleep(PREFECT_OUTAGE_SECONDS)  # pacing: the outage's length
            chaos_prefect.start()

        while (now := time.monotonic()) < chaos_end:
            quiet = now > chaos_end - QUIET_TAIL
            if now >= next_kill and not quiet and not operator_restarts.busy():
                operator_restarts.run(chaos_operator.restart)
                kills += 1
                next_kill = now + rng.uniform(*OPERATOR_KILL_EVERY)
            if now >= next_outage and not quiet and not prefect_restarts.busy():
                prefect_restarts.run(outage)
                outages += 1
                next_outage = now + rng.uniform(*PREFECT_OUTAGE_EVERY)
            candidates = [n for n in NODE_GPUS if now - last_change[n] >= 1.0]
            if candidates:
                node = rng.choice(candidates)
                act, value = _next_value(rng, node, gpus, readd_at, now)
                if act:
                    t = time.monotonic()
                    if value is None:
                        gpu_nodes.delete(node)
                        readd_at[node] = t + rng.uniform(2.0, 6.0)
                    elif gpus[node] is None:
                        gpu_nodes.create(node, value, labels=POOL_LABEL)
                    else:
                        gpu_nodes.set_gpus(node, value)
                    changes.append(Change(t, node, value))
                    gpus[node] = value
                    last_change[node] = t
            time.sleep(rng.uniform(*NODE_CHANGE_EVERY))  # pacing of the chaos
        operator_restarts.join(timeout=120)
        prefect_restarts.join(timeout=120)
        assert chaos_operator.current.process.running(), "the operator died on its own"
        chaos_seconds = time.monotonic() - chaos_started

        # --- convergence ---
        settled = time.monotonic()
        final = {f"gpu:{n}": count for n, count in gpus.items() if count is not None}
        # A node left at 0 GPUs drains at 1 while its workers still hold slots (never 0 then).
        draining_ok = {name: {count, 1} if count == 0 else {count} for name, count in final.items()}
        eventually(
            lambda: _limits_within(reader, draining_ok),
            timeout=RESYNC_SECONDS + CONVERGENCE_MARGIN,
        )
        converged = time.monotonic() - settled
        eventually(
            lambda: _condition_is(policies, "chaos", "Ready", "True"),
            timeout=RESYNC_SECONDS + CONVERGENCE_MARGIN,
        )
        codes = workers.stop(timeout=60)
        assert codes == [0] * len(codes), f"worker exit codes {codes}"
        poller.stop()
        _save(tmp_path / "chaos-data.json", poller, changes, disruptions)  # to replay a failure
        report = check(workers.records(), poller.snapshots, changes, disruptions)

        # --- no slot leaked, every drain finished ---
        stopped = time.monotonic()
        eventually(
            lambda: _no_active_slots(reader, set(final)), timeout=CONVERGENCE_MARGIN, interval=0.05
        )
        eventually(lambda: _limits_are(reader, final), timeout=CONVERGENCE_MARGIN)
        drained = time.monotonic() - stopped
    finally:
        workers.stop(timeout=30)
        poller.stop()
        with contextlib.suppress(AssertionError):
            operator_restarts.join(timeout=120)
        with contextlib.suppress(AssertionError):
            prefect_restarts.join(timeout=120)
        if not chaos_prefect.healthy():
            chaos_prefect.start()  # the policy's finalizer needs it to delete the limits
        if not chaos_operator.current.process.running():
            chaos_operator.current.start()
        reader.close()

    report.update(
        seed=seed,
        setup_s=round(setup_seconds, 1),
        chaos_s=round(chaos_seconds, 1),
        operator_kills=kills,
        prefect_outages=outages,
        node_changes=len(changes) - len(NODE_GPUS),
        limits_converged_s=round(converged, 2),
        slots_drained_s=round(drained, 2),
        total_s=round(time.monotonic() - started, 1),
    )
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    print("chaos report: " + json.dumps(report))


def _next_value(
    rng: random.Random,
    node: str,
    gpus: dict[str, int | None],
    readd_at: dict[str, float],
    now: float,
) -> tuple[bool, int | None]:
    """Whether to change the node now, and its next allocatable (None: delete it)."""
    current = gpus[node]
    if current is None:
        if now < readd_at[node]:
            return False, None  # deleted; re-added later
        return True, rng.randint(0, NODE_GPUS[node] + 1)
    deleted = sum(1 for count in gpus.values() if count is None)
    if deleted < 2 and rng.random() < 0.12:
        return True, None
    choices = [v for v in range(NODE_GPUS[node] + 2) if v != current]
    weights = [3 if v == 0 else 1 for v in choices]  # limit 0 is the interesting edge
    return True, rng.choices(choices, weights)[0]


def _save(path: Path, poller: Poller, changes: list[Change], disruptions: list[Disruption]) -> None:
    data = {
        "snapshots": [dataclasses.asdict(s) for s in poller.snapshots],
        "changes": [dataclasses.asdict(c) for c in changes],
        "disruptions": [dataclasses.asdict(d) for d in disruptions],
    }
    path.write_text(json.dumps(data))


def _limits_are(reader: PrefectLimitsReader, expected: dict[str, int]) -> None:
    assert reader.limits("gpu:chaos-") == expected


def _limits_within(reader: PrefectLimitsReader, allowed: dict[str, set[int]]) -> None:
    limits = reader.limits("gpu:chaos-")
    assert limits.keys() == allowed.keys()
    assert all(limits[name] in values for name, values in allowed.items()), limits


def _condition_is(policies: Policies, name: str, kind: str, expected: str) -> None:
    assert policies.condition(name, kind)["status"] == expected


def _no_active_slots(reader: PrefectLimitsReader, names: set[str]) -> None:
    active = {
        name: item["active_slots"]
        for name, item in reader.all().items()
        if name in names and item["active_slots"]
    }
    assert not active, f"slots still held after the workers stopped: {active}"
