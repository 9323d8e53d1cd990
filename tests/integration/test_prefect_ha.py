"""gpu_slot() on a highly available Prefect server: two API replicas sharing PostgreSQL and Redis
(``HAPrefect``: leases, messaging, event ordering and the docket on Redis, the background
services in one process of their own), with the flow runs of one node spread across both.

- Holders on both replicas never oversubscribe the node and leak no slot.
- Restarting the replica that granted the held slots loses none of them: the holders renew their
  leases through it once it is back, and every slot is released after them.
- The contrast, on the same two replicas with Prefect's default in-memory lease storage: a lease
  is known only to the replica that granted it, so a slot handed over to a holder on the other
  replica is never released, and a restart forgets every lease (renewal: 410 Gone). That is what
  ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage`` is for.

The first two tests fail on in-memory lease storage too (parametrize them with "in-memory" to
see it): the workload starves on leaked slots (GpuSlotTimeout: 8 of 17 attempts in one run,
against 0 of 200-odd on Redis), and after the restart the holders' renewals are refused, so their
slot files lose their leases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from prefect_gpu_flows._locks import try_lock, unlock
from prefect_gpu_sandbox.prefect_ha import MEMORY_LEASE_STORAGE, REDIS_LEASE_STORAGE, HAPrefect
from prefect_gpu_sandbox.waiting import eventually, holds
from tests.integration.chaos.harness import Poller, Workers
from tests.integration.chaos.invariants import Change, check

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOLDER = "tests.integration._gpu_slot_holder"
SLOTS = 2
"""K: the node's limit, what every test here holds at most."""
WORKLOAD_SECONDS = 20.0
WORKERS_PER_REPLICA = 2
ATTEMPT_TIMEOUT = 10.0
"""Seconds a worker waits for a slot: far above a fair share of K slots among the workers, so a
timeout means a slot the server still counts while nobody holds it."""
LEASE_SECONDS = 60.0
"""gpu_slot()'s lease (the server's minimum): it renews a held lease half-way through."""
DEVICE_ENV = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "PREFECT_GPU_SLOTS_PER_DEVICE")
LEASE_STORAGE = {"redis": REDIS_LEASE_STORAGE, "in-memory": MEMORY_LEASE_STORAGE}
ON_BOTH_LEASE_STORAGES = pytest.mark.parametrize("ha", ["redis", "in-memory"], indirect=True)
ON_REDIS = pytest.mark.parametrize("ha", ["redis"], indirect=True)
_nodes = count()


@pytest.fixture(scope="module")
def ha(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HAPrefect]:
    """Two API replicas on one PostgreSQL and Redis, one services process; the lease storage is
    Redis or Prefect's in-memory default (the parameter). pytest runs every test of one
    parameter before it starts the other topology."""
    storage = LEASE_STORAGE[request.param]
    with HAPrefect(
        tmp_path_factory.mktemp(f"ha-{request.param}"), lease_storage=storage
    ) as topology:
        yield topology
        assert topology.services.running(), "the services process died"


class Replicas:
    """One HTTP client per API replica, and the node's limit created through the first."""

    def __init__(self, ha: HAPrefect, node: str) -> None:
        self.clients = [httpx.Client(base_url=url, timeout=30.0) for url in ha.api_urls]
        self.node = node
        self.limit_name = f"gpu:{node}"

    def create_limit(self, limit: int) -> None:
        response = self.clients[0].post(
            "/v2/concurrency_limits/", json={"name": self.limit_name, "limit": limit}
        )
        assert response.status_code == 201, response.text

    def active_slots(self, replica: int) -> int:
        response = self.clients[replica].get(f"/v2/concurrency_limits/{self.limit_name}")
        response.raise_for_status()
        return int(response.json()["active_slots"])

    def acquire(self, replica: int) -> UUID:
        response = self.clients[replica].post(
            "/v2/concurrency_limits/increment-with-lease",
            json={"names": [self.limit_name], "slots": 1, "lease_duration": LEASE_SECONDS},
        )
        assert response.status_code == 200, response.text
        return UUID(response.json()["lease_id"])

    def renew(self, replica: int, lease_id: UUID) -> int:
        return (
            self.clients[replica]
            .post(
                f"/v2/concurrency_limits/leases/{lease_id}/renew",
                json={"lease_duration": LEASE_SECONDS},
            )
            .status_code
        )

    def release(self, replica: int, lease_id: UUID) -> int:
        return (
            self.clients[replica]
            .post("/v2/concurrency_limits/decrement-with-lease", json={"lease_id": str(lease_id)})
            .status_code
        )

    def none_held(self) -> None:
        held = [self.active_slots(i) for i in range(len(self.clients))]
        assert held == [0] * len(held), f"active_slots on each replica: {held}"

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def replicas(ha: HAPrefect) -> Iterator[Replicas]:
    """Clients of both replicas and a node of this test's own (its limit is made by the test)."""
    found = Replicas(ha, f"ha-{next(_nodes)}")
    yield found
    found.close()


@pytest.fixture
def node_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No device list: slot i is device "i" for every process the test starts."""
    for name in DEVICE_ENV:
        monkeypatch.delenv(name, raising=False)


class Holders:
    """``_gpu_slot_holder`` processes of one node, each through the replica it is given."""

    def __init__(self, directory: Path, node: str) -> None:
        self.directory = directory
        self.node = node
        self.lock_dir = directory / "locks"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, api_url: str, *args: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "WORKER_ID": self.node,
            "PREFECT_GPU_LOCK_DIR": str(self.lock_dir),
            "PREFECT_API_URL": api_url,
            "PREFECT_GPU_LEASE_SECONDS": str(LEASE_SECONDS),  # renewed within this test's time
        }
        with (self.directory / f"{name}.log").open("ab") as log:
            holder = subprocess.Popen(
                [sys.executable, "-m", HOLDER, "--events", str(self.events(name)), *args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        self.processes.append(holder)
        return holder

    def events(self, name: str) -> Path:
        return self.directory / f"{name}.jsonl"

    def entered(self, name: str) -> bool:
        path = self.events(name)
        return path.exists() and '"event": "enter"' in path.read_text()

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text()

    def lease_on_slot(self, index: int) -> dict[str, Any]:
        """The lease record on slot file ``index`` (written by the holder and its keeper)."""
        text = (self.lock_dir / self.node / f"slot-{index}.lock").read_text()
        # Empty: no lease (its keeper clears the file when the server says the lease is gone).
        assert text, (
            f"slot {index} has no lease on file (the server lost it, or it is being written)"
        )
        try:
            record: dict[str, Any] = json.loads(text)
        except ValueError:
            raise AssertionError(f"slot {index} is being written: {text!r}") from None
        return record

    def gate_held(self) -> bool:
        """Someone queues on the node: the head of the queue holds its gate."""
        fd = try_lock(self.lock_dir / self.node / "gate.lock")
        if fd is None:
            return True
        unlock(fd)
        return False

    def stop(self) -> None:
        for holder in self.processes:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)


@pytest.fixture
def holders(replicas: Replicas, node_env: None, tmp_path: Path) -> Iterator[Holders]:
    started = Holders(tmp_path, replicas.node)
    yield started
    started.stop()


# --- on Redis -------------------------------------------------------------------------------------


@ON_REDIS
def test_holders_on_both_replicas_never_oversubscribe_and_leak_no_slot(
    ha: HAPrefect, replicas: Replicas, node_env: None, tmp_path: Path
) -> None:
    """One node's flow runs, half through each replica, loop gpu_slot() on K slots: slots are
    handed over between them (a lease granted by one replica is adopted, renewed and released
    through the other)."""
    replicas.create_limit(SLOTS)
    created = time.monotonic()
    workers = Workers(tmp_path / "workers", ha.api_urls[0])
    workers.directory.mkdir()
    poller = Poller(ha.api_urls[1], prefix=replicas.limit_name)
    try:
        poller.start()
        for index in range(WORKERS_PER_REPLICA * len(ha.api_urls)):
            api_url = ha.api_urls[index % len(ha.api_urls)]
            workers.start(replicas.node, index, "--timeout", str(ATTEMPT_TIMEOUT), api_url=api_url)
        eventually(workers.all_ready, timeout=120, what="workers ready")
        started = time.monotonic()
        # Pacing: the workload runs this long; nothing is waited for here.
        time.sleep(WORKLOAD_SECONDS)
        codes = workers.stop(timeout=60)
        ran = time.monotonic() - started
        assert codes == [0] * len(codes), f"worker exit codes {codes}"
    finally:
        workers.stop(timeout=30)
        poller.stop()

    records = workers.records()
    node = replicas.node
    report = check(records, poller.snapshots, [Change(created, node, SLOTS)], [])
    print(f"\nHA workload: {ran:.1f} s, {json.dumps(report)}")
    assert report["timeouts"] == 0, "a slot stayed counted while nobody held it"
    # Every worker, through either replica, got slots, and the node was contended.
    entered_by = {r["pid"] for r in records if r["event"] == "enter"}
    assert len(entered_by) == len(workers.processes)
    assert report["contended_entries"] > 0
    logs = "".join(path.read_text() for path in workers.directory.glob("*.log"))
    assert "lost lease" not in logs
    eventually(replicas.none_held, timeout=10, what="every slot released on both replicas")


@ON_REDIS
def test_restarting_the_replica_that_granted_held_slots_leaks_none(
    ha: HAPrefect, replicas: Replicas, holders: Holders, tmp_path: Path
) -> None:
    """K holders take their slots through replica A; A stops while they hold them (B still
    counts them) and starts again; the holders renew their leases through A, then leave."""
    replicas.create_limit(SLOTS)
    release = tmp_path / "release"
    names = [f"holder-{i}" for i in range(SLOTS)]
    processes = [holders.start(name, ha.api_urls[0], "--until", str(release)) for name in names]
    eventually(lambda: all(map(holders.entered, names)), timeout=60, what="holders entered")
    leases = [holders.lease_on_slot(i) for i in range(SLOTS)]

    restarted = time.monotonic()
    ha.stop_replica(0)
    assert replicas.active_slots(1) == SLOTS  # the other replica still counts them
    ha.replicas[0].start()
    print(f"\nreplica A restarted in {time.monotonic() - restarted:.1f} s")

    # Each holder's keeper renews half-way through its lease, through A, which knows the lease.
    def renewed() -> None:
        now = [holders.lease_on_slot(i) for i in range(SLOTS)]
        for before, after in zip(leases, now, strict=True):
            assert after["lease_id"] == before["lease_id"]
            assert after["expires"] > before["expires"], "not renewed yet"

    eventually(renewed, timeout=LEASE_SECONDS, interval=0.5, what="leases renewed through A")
    assert replicas.active_slots(0) == replicas.active_slots(1) == SLOTS

    release.touch()
    for process in processes:
        assert process.wait(timeout=30) == 0
    for name in names:
        assert "lost lease" not in holders.log(name)
    eventually(replicas.none_held, timeout=10, what="every slot released on both replicas")


# --- the same on both lease storages: what Redis is for -------------------------------------------


@ON_BOTH_LEASE_STORAGES
def test_a_lease_granted_by_one_replica_is_renewed_and_released_by_the_other(
    ha: HAPrefect, replicas: Replicas
) -> None:
    replicas.create_limit(SLOTS)
    lease = replicas.acquire(0)
    assert replicas.active_slots(1) == 1  # the count is in the shared database
    renewal = replicas.renew(1, lease)
    assert replicas.release(1, lease) == 204  # "done", either way
    if ha.lease_storage == REDIS_LEASE_STORAGE:
        assert renewal == 204
        replicas.none_held()
    else:
        assert renewal == 410  # Gone: replica B never knew the lease
        # The release freed nothing, and the lease can be released only on A.
        holds(lambda: replicas.active_slots(1) == 1, duration=1.0, what="the slot leaked")
        assert replicas.release(0, lease) == 204
        replicas.none_held()


@ON_BOTH_LEASE_STORAGES
def test_a_slot_handed_over_to_a_holder_on_the_other_replica_is_released(
    ha: HAPrefect, replicas: Replicas, holders: Holders, tmp_path: Path
) -> None:
    """gpu_slot() hands a leaving holder's lease to the next claimant on the node with no server
    request: the lease A granted is released through B by the holder that adopted it."""
    replicas.create_limit(1)
    first = holders.start("first", ha.api_urls[0], "--until", str(tmp_path / "release-first"))
    eventually(lambda: holders.entered("first"), timeout=60, what="first holder entered")
    second = holders.start("second", ha.api_urls[1], "--until", str(tmp_path / "release-second"))
    eventually(holders.gate_held, timeout=60, what="second holder queued")

    (tmp_path / "release-first").touch()
    eventually(lambda: holders.entered("second"), timeout=30, what="second holder entered")
    assert first.wait(timeout=30) == 0  # its exit left the lease with the second holder
    assert replicas.active_slots(1) == 1
    (tmp_path / "release-second").touch()
    assert second.wait(timeout=30) == 0

    if ha.lease_storage == REDIS_LEASE_STORAGE:
        eventually(replicas.none_held, timeout=10, what="the slot released through B")
    else:
        # B answered 204 and freed nothing; only A knew the lease, and nobody holds it now. The
        # slot stays counted for good: the services process's repossessor has no such lease.
        holds(
            lambda: replicas.active_slots(0) == replicas.active_slots(1) == 1,
            duration=2.0,
            what="the slot leaked",
        )


@pytest.mark.parametrize("ha", ["in-memory"], indirect=True)
def test_a_restarted_replica_forgets_the_leases_it_kept_in_memory(
    ha: HAPrefect, replicas: Replicas
) -> None:
    """The in-memory counterpart of the restart above, at the API: after a restart the replica
    answers a renewal 410 Gone and a release 204, and the slot stays counted."""
    replicas.create_limit(SLOTS)
    lease = replicas.acquire(0)
    ha.restart_replica(0)
    assert replicas.renew(0, lease) == 410
    assert replicas.release(0, lease) == 204
    holds(
        lambda: replicas.active_slots(0) == replicas.active_slots(1) == 1,
        duration=1.0,
        what="the slot leaked",
    )
