"""Chaos: a node's GPUs are never oversubscribed while nodes, the operator and Prefect misbehave.

Setup: 8 simulated GPU nodes (1-8 GPUs), a GPULimitPolicy pointing to a Prefect server this test
owns, the real operator (resync 2 s) and, on every node, ``WORKERS_PER_NODE`` processes
(``_chaos_worker``) that loop ``with gpu_slot(timeout_seconds=ATTEMPT_TIMEOUT)`` and log each
attempt with ``time.monotonic()`` (one clock for all processes). For ``CHAOS_SECONDS`` (90 by
default; set the environment variable for a longer run, ``CHAOS_SEED`` to replay one,
``CHAOS_DATABASE=postgres`` to run Prefect on PostgreSQL instead of SQLite) a chaos
loop changes allocatable GPUs up and down (including 0), deletes nodes and re-adds them, SIGKILLs
and restarts the operator, and stops the Prefect server for a few seconds and restarts it. A
poller reads every ``gpu:chaos-*`` limit from Prefect every ``POLL_SECONDS``.

What the checker asserts, and why in this shape:

1. **Never oversubscribed.** A node's capacity reaches gpu_slot() only through its Prefect limit,
   so "the allocatable in effect" is the limit the operator has applied, as the poller saw it. A
   value read between two polls may have been set any time after the earlier poll began and held
   until the later poll ended (a Prefect outage widens that gap the same way), so at time t every
   value whose window contains t was possibly in effect, and the largest one counts. gpu_slot()
   reads the limit once per second while it waits (``_LIMIT_REFRESH``), and reads it again when
   its server calls outlast that, so an entry at t may use any limit in effect during
   ``[t - CLIENT_STALENESS, t]``.
   Holders that entered before a lowering may stay until they finish; the invariant is about new
   entries: **an entry on node n at t happens only while fewer than allowed(t) others hold a slot
   of n**, allowed(t) being the largest limit in effect on n during [t - CLIENT_STALENESS, t]
   (0 while the limit does not exist). The same window bounds device indices: an entry's device
   is below allowed(t). Logged holding intervals lie inside the real ones (enter is logged after
   gpu_slot() returned, exit before the block is left), so an overlap in the log is a real one.
   For every entry the checker also measures the staleness it needed (0 when the newest limit
   admitted it), and reports the largest.
2. **No device shared**: on a node, two logged holdings that overlap in time hold disjoint devices.
3. **The limits follow the truth.** For every node, the distinct values the poller saw form a
   subsequence of the values the test set (the operator never writes a value that was never true,
   nor an older one after a newer one). Every change that was not superseded first shows up in
   Prefect within ``OPERATOR_PROPAGATION`` s when the operator and Prefect were up throughout,
   and within ``RECOVERY`` s of the end of the outage or restart it overlapped otherwise. The
   request -> applied latency is measured and reported: together with CLIENT_STALENESS it is the
   end-to-end allowance between a change to a Node and the last entry that may use the old value.
4. **No task lost**: every attempt of every worker ends in exactly one of enter+exit, timeout
   (GpuSlotTimeout), or missing (GpuLimitNotFoundError) -- and missing only while the node's limit
   was absent -- never in another error; every worker exits 0 once told to stop.
5. **Convergence after the chaos**: once the operator and Prefect are both up, within
   ``RESYNC_SECONDS + CONVERGENCE_MARGIN`` s the limits equal the final allocatable of every
   existing node and no limit is left for a deleted node; once the workers have stopped, every
   limit above 0 has ``active_slots`` 0 within ``CONVERGENCE_MARGIN`` s (no slot leaked by the
   restarts: the sandbox server keeps leases in its filesystem lease storage). Prefect 3.9 cannot
   decrement a limit of 0, so slots given back at 0 stay counted, their leases kept on the slot
   files (``prefect_gpu_flows._gcl.release``); the test then gives those nodes a GPU and one
   claim per node, and every limit must reach 0 within ``REPOSSESSOR_LOOP + CONVERGENCE_MARGIN``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, Policies, PrefectLimitsReader

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKER = "tests.integration._chaos_worker"

CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", "90"))
# "postgres" runs Prefect on PostgreSQL (Debian's postgresql package must be installed).
CHAOS_DATABASE = os.environ.get("CHAOS_DATABASE", "sqlite")
NODE_GPUS = {f"chaos-{i}": gpus for i, gpus in enumerate([1, 2, 2, 3, 4, 4, 6, 8])}
WORKERS_PER_NODE = 2
POOL_LABEL = {"pool": "chaos"}
ATTEMPT_TIMEOUT = 2.0
"""Seconds a worker waits for a slot before GpuSlotTimeout."""
RESYNC_SECONDS = 2.0
POLL_SECONDS = 0.1
NODE_CHANGE_EVERY = (0.3, 0.8)
"""Seconds between two allocatable changes (a node is changed at most once a second)."""
OPERATOR_KILL_EVERY = (15.0, 25.0)
PREFECT_OUTAGE_EVERY = (20.0, 30.0)
PREFECT_OUTAGE_SECONDS = 3.0
QUIET_TAIL = 10.0
"""No operator kill or Prefect outage starts in the last seconds of the chaos."""

CLIENT_STALENESS = 1.5
"""Seconds an entry may use an older limit: gpu_slot() re-reads it every 1.0 s while waiting
(``prefect_gpu_flows.slots._LIMIT_REFRESH``), plus 0.5 s for a read and a look at the slot files
on a loaded 2-core machine."""
OPERATOR_PROPAGATION = 5.0
"""Seconds from a Node change to its limit in Prefect with the operator and Prefect up (the design
asks for about a second; this is a noisy shared machine)."""
RECOVERY = 15.0
"""Seconds from the end of an outage or operator restart to a change made during it being applied
(the operator's retry backoff is capped at 2 s in the tests, its resync is 2 s)."""
CONVERGENCE_MARGIN = 8.0
REPOSSESSOR_LOOP = 15.0
"""PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS: how often Prefect frees expired leases."""


# --- the truth the test sets, and what Prefect shows --------------------------------------------


@dataclass(frozen=True)
class Change:
    """The test set node's allocatable to ``gpus`` (None: deleted) at monotonic ``t``."""

    t: float
    node: str
    gpus: int | None


@dataclass(frozen=True)
class Disruption:
    kind: str  # "operator" | "prefect"
    start: float
    end: float


@dataclass(frozen=True)
class Snapshot:
    """Limit values read from Prefect by a request sent at ``a`` and answered at ``b``."""

    a: float
    b: float
    limits: dict[str, int]  # node -> limit; a node without a limit is absent


@dataclass(frozen=True)
class Run:
    """Consecutive polls that saw ``value`` on a node: it was possibly in effect in [lo, hi]."""

    value: int | None
    lo: float
    hi: float


class Poller:
    """Reads the chaos limits from Prefect every POLL_SECONDS in a thread (skips while down)."""

    def __init__(self, api_url: str) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=2.0)
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
                    if item["name"].startswith("gpu:chaos-")
                }
                self.snapshots.append(Snapshot(a, b, limits))
            self._done.wait(POLL_SECONDS)

    def runs(self, node: str) -> list[Run]:
        snaps = list(self.snapshots)
        values = [s.limits.get(node) for s in snaps]
        runs: list[Run] = []
        start = 0
        for i in range(1, len(snaps) + 1):
            if i == len(snaps) or values[i] != values[start]:
                lo = snaps[start - 1].a if start > 0 else -math.inf
                hi = snaps[i].b if i < len(snaps) else math.inf
                runs.append(Run(values[start], lo, hi))
                start = i
        return runs


def staleness_needed(runs: list[Run], t: float, capacity: int) -> float:
    """Seconds before ``t`` to the last moment a limit >= ``capacity`` was possibly in effect
    (0 if one possibly is at ``t``; inf if never before ``t``)."""
    ends = [r.hi for r in runs if (r.value or 0) >= capacity and r.lo <= t]
    return max(0.0, t - max(ends)) if ends else math.inf


# --- processes the test starts -------------------------------------------------------------------


class Workers:
    """The chaos workers: WORKERS_PER_NODE ``_chaos_worker`` processes per node."""

    def __init__(self, directory: Path, api_url: str) -> None:
        self.directory = directory
        self.api_url = api_url
        self.stop_file = directory / "stop"
        self.lock_dir = directory / "locks"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, node: str, index: int, *args: str) -> None:
        env = {
            **os.environ,
            "WORKER_ID": node,
            "PREFECT_GPU_LOCK_DIR": str(self.lock_dir),
            "PREFECT_API_URL": self.api_url,
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


@pytest.fixture
def chaos_prefect(tmp_path: Path) -> Iterator[PrefectServer]:
    """A Prefect server only this test uses, so it can stop and restart it (same port and DB)."""
    with contextlib.ExitStack() as stack:
        database_url = None
        if CHAOS_DATABASE == "postgres":
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
    chaos_prefect: PrefectServer,
    chaos_operator: OperatorControl,
    policies: Policies,
    gpu_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    print(f"\nchaos: seed {seed}, {CHAOS_SECONDS:.0f} s, Prefect on {CHAOS_DATABASE}")
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
        chaos_end = chaos_started + CHAOS_SECONDS
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
        eventually(lambda: _limits_are(reader, final), timeout=RESYNC_SECONDS + CONVERGENCE_MARGIN)
        converged = time.monotonic() - settled
        eventually(
            lambda: _condition_is(policies, "chaos", "Ready", "True"),
            timeout=RESYNC_SECONDS + CONVERGENCE_MARGIN,
        )
        codes = workers.stop(timeout=60)
        assert codes == [0] * len(codes), f"worker exit codes {codes}"
        poller.stop()
        _save(tmp_path / "chaos-data.json", poller, changes, disruptions)  # to replay a failure
        report = check(workers.records(), poller, changes, disruptions)

        # --- no slot leaked ---
        stopped = time.monotonic()
        positive = {name for name, count in final.items() if count > 0}
        eventually(
            lambda: _no_active_slots(reader, positive), timeout=CONVERGENCE_MARGIN, interval=0.05
        )
        drained = time.monotonic() - stopped
        # Prefect cannot decrement a limit of 0 (see prefect_gpu_flows._gcl.release), so slots
        # released at 0 stay counted, their leases kept on the slot files: give such nodes a GPU
        # again and one claim per node must hand every one of them back.
        at_zero = sorted(n for n, count in gpus.items() if count == 0)
        retained = {f"gpu:{n}": reader.all()[f"gpu:{n}"]["active_slots"] for n in at_zero}
        for node in at_zero:
            gpu_nodes.set_gpus(node, 1)
            gpus[node] = 1
        final = {f"gpu:{n}": count for n, count in gpus.items() if count is not None}
        eventually(lambda: _limits_are(reader, final), timeout=OPERATOR_PROPAGATION)
        recovered_from = time.monotonic()
        claims = Workers(tmp_path / "recovery", chaos_prefect.api_url)
        claims.directory.mkdir()
        claims.lock_dir = workers.lock_dir
        for node in at_zero:
            claims.start(node, 0, "--attempts", "1")
        assert claims.stop(timeout=60, touch=False) == [0] * len(at_zero)
        eventually(
            lambda: _no_active_slots(reader, set(final)),
            timeout=REPOSSESSOR_LOOP + CONVERGENCE_MARGIN,
            interval=0.05,
        )
        recovered = time.monotonic() - recovered_from
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
        retained_at_limit_zero=retained,
        retained_recovered_s=round(recovered, 2),
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


def _condition_is(policies: Policies, name: str, kind: str, expected: str) -> None:
    assert policies.condition(name, kind)["status"] == expected


def _no_active_slots(reader: PrefectLimitsReader, names: set[str]) -> None:
    active = {
        name: item["active_slots"]
        for name, item in reader.all().items()
        if name in names and item["active_slots"]
    }
    assert not active, f"slots still held after the workers stopped: {active}"


# --- the checker ---------------------------------------------------------------------------------


@dataclass
class Holding:
    node: str
    pid: int
    attempt: int
    enter: float
    exit: float
    devices: tuple[int, ...]


@dataclass
class Outcomes:
    attempts: int = 0
    entries: int = 0
    timeouts: int = 0
    missing: int = 0
    errors: list[str] = field(default_factory=list)


def check(
    records: list[dict[str, Any]],
    poller: Poller,
    changes: list[Change],
    disruptions: list[Disruption],
) -> dict[str, Any]:
    """Assert the invariants of the module docstring; return what was measured."""
    outcomes, holdings, missing_at = _outcomes(records)
    assert not outcomes.errors, f"lost tasks: {outcomes.errors[:5]}"
    runs = {node: poller.runs(node) for node in NODE_GPUS}

    # 4b. A limit was missing only while the node's limit was really absent.
    for node, attempt_t, missing_t in missing_at:
        window_lo = attempt_t - CLIENT_STALENESS
        assert any(
            r.value is None and r.lo <= missing_t and r.hi >= window_lo for r in runs[node]
        ), f"{node}: GpuLimitNotFoundError at {missing_t:.2f} while its limit existed"

    # 1. Entries only while fewer than allowed(t) others hold; devices below allowed(t).
    by_node: dict[str, list[Holding]] = defaultdict(list)
    for holding in holdings:
        by_node[holding.node].append(holding)
    needed: list[float] = []
    contended = 0
    violations: list[str] = []
    for node, mine in by_node.items():
        mine.sort(key=lambda h: h.enter)
        for i, holding in enumerate(mine):
            others = sum(1 for h in mine[:i] if h.exit > holding.enter)
            contended += others > 0
            need = staleness_needed(runs[node], holding.enter, others + len(holding.devices))
            need = max(
                need,
                *(staleness_needed(runs[node], holding.enter, d + 1) for d in holding.devices),
            )
            needed.append(need)
            if need > CLIENT_STALENESS:
                violations.append(
                    f"{node}: pid {holding.pid} entered at {holding.enter:.3f} on devices "
                    f"{holding.devices} with {others} other holder(s); a limit that allowed it "
                    f"was last in effect {need:.3f} s earlier"
                )
        # 2. No device held twice at once.
        for i, holding in enumerate(mine):
            for other in mine[i + 1 :]:
                if other.enter >= holding.exit:
                    break
                shared = set(holding.devices) & set(other.devices)
                assert not shared, f"{node}: devices {shared} shared by {holding} and {other}"
    assert not violations, "oversubscribed:\n" + "\n".join(violations[:10])

    # 3. The limits follow the truth: in order, promptly when healthy, soon after an outage.
    latencies, delayed = _propagation(runs, poller.snapshots, changes, disruptions)
    healthy = [latency for latency, _ in latencies]
    return {
        "workers": len({r["pid"] for r in records}),
        "attempts": outcomes.attempts,
        "entries": outcomes.entries,
        "timeouts": outcomes.timeouts,
        "missing_limit": outcomes.missing,
        "contended_entries": contended,
        "staleness_needed_max_s": round(max(needed, default=0.0), 3),
        "entries_needing_staleness": sum(1 for n in needed if n > 0),
        "propagation_healthy_n": len(healthy),
        "propagation_healthy_median_s": round(statistics.median(healthy), 3) if healthy else None,
        "propagation_healthy_max_s": round(max(healthy), 3) if healthy else None,
        "propagation_after_outage_n": len(delayed),
        "propagation_after_outage_max_s": round(max(delayed), 3) if delayed else None,
        "disruptions": [(d.kind, round(d.end - d.start, 1)) for d in disruptions],
        "polls": len(poller.snapshots),
    }


def _outcomes(
    records: list[dict[str, Any]],
) -> tuple[Outcomes, list[Holding], list[tuple[str, float, float]]]:
    """Every attempt's one outcome, per worker in order; the holdings and the missing limits."""
    outcomes = Outcomes()
    holdings: list[Holding] = []
    missing: list[tuple[str, float, float]] = []
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_pid[record["pid"]].append(record)
    for pid, mine in by_pid.items():
        events = [r for r in mine if r["event"] != "ready"]
        i = 0
        while i < len(events):
            start = events[i]
            assert start["event"] == "attempt", f"pid {pid}: {start} does not start an attempt"
            outcomes.attempts += 1
            end = events[i + 1] if i + 1 < len(events) else None
            assert end is not None, f"pid {pid}: attempt {start['attempt']} never ended (lost)"
            assert end["attempt"] == start["attempt"], f"pid {pid}: {start} then {end}"
            if end["event"] == "enter":
                leave = events[i + 2] if i + 2 < len(events) else None
                assert leave is not None, f"pid {pid}: attempt {start['attempt']} never left"
                assert leave["event"] == "exit", f"pid {pid}: {end} then {leave}"
                devices = tuple(end["devices"])
                holdings.append(
                    Holding(end["node"], pid, end["attempt"], end["t"], leave["t"], devices)
                )
                outcomes.entries += 1
                i += 3
                continue
            if end["event"] == "timeout":
                outcomes.timeouts += 1
            elif end["event"] == "missing":
                outcomes.missing += 1
                missing.append((end["node"], start["t"], end["t"]))
            else:
                outcomes.errors.append(f"pid {pid} attempt {start['attempt']}: {end}")
            i += 2
    return outcomes, holdings, missing


def _propagation(
    runs: dict[str, list[Run]],
    snapshots: list[Snapshot],
    changes: list[Change],
    disruptions: list[Disruption],
) -> tuple[list[tuple[float, Change]], list[float]]:
    """Check that each node's limits follow its changes; latencies when healthy / after outages."""
    by_node: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        by_node[change.node].append(change)
    healthy: list[tuple[float, Change]] = []
    delayed: list[float] = []
    for node, mine in by_node.items():
        # Subsequence: the operator never writes a value that was not true, or an older one.
        truth = iter(c.gpus for c in mine)
        seen = [r.value for r in runs[node]]
        assert all(value in truth for value in seen), (
            f"{node}: Prefect showed {seen}, not in the order of {[c.gpus for c in mine]}"
        )
        for change, following in zip(mine, [*mine[1:], None], strict=True):
            if change.t <= snapshots[0].a:
                continue  # set before the poller started (checked before the workers started)
            until = following.t if following is not None else math.inf
            applied = next(
                (
                    s.b
                    for s in snapshots
                    if change.t <= s.a < until and s.limits.get(node) == change.gpus
                ),
                None,
            )
            end = applied if applied is not None else until
            overlapping = [d for d in disruptions if d.start <= end and d.end >= change.t]
            if applied is None:
                # Superseded before it showed: fine if the next change came within the allowance
                # or an outage hid it; the last value of all is checked by the convergence.
                assert following is not None
                assert overlapping or until - change.t <= OPERATOR_PROPAGATION + POLL_SECONDS, (
                    f"{node}: {change.gpus} never reached Prefect in {until - change.t:.2f} s"
                )
                continue
            latency = applied - change.t
            if not overlapping:
                assert latency <= OPERATOR_PROPAGATION, (
                    f"{node}: {change.gpus} took {latency:.2f} s to reach Prefect"
                )
                healthy.append((latency, change))
            else:
                recovered = max(d.end for d in overlapping)
                assert applied - recovered <= RECOVERY, (
                    f"{node}: {change.gpus} reached Prefect {applied - recovered:.2f} s after "
                    f"the {[d.kind for d in overlapping]} came back"
                )
                delayed.append(latency)
    return healthy, delayed
