"""The reconcile of one policy, through in-memory Kubernetes and Prefect (tests/support/fakes.py):
crash-safe order, ownership and conflicts, drift, outages, and how few calls it makes."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.runtime.controller import Controller
from prefect_gpu_operator.settings import OperatorSettings
from tests.support.fakes import FakeKube, FakePrefect, Journal
from tests.support.policies import ledger

API_URL = "http://prefect.test/api"


def node(name: str, gpus: int | None = 4, **labels: str) -> dict[str, Any]:
    allocatable = {"cpu": "8"} if gpus is None else {"cpu": "8", "nvidia.com/gpu": str(gpus)}
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": allocatable}}


def policy(name: str = "p", created: str = "2026-11-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": 1, "creationTimestamp": created},
        "spec": {"server": {"remoteApiUrl": API_URL}, **spec},
    }


class World:
    """A controller wired to the fakes, with a shared journal of their calls."""

    def __init__(self, identity: str | None = None, **settings: Any) -> None:
        self.journal = Journal()
        self.kube = FakeKube(self.journal)
        self.prefect = FakePrefect(self.journal, API_URL)
        config = OperatorSettings(**{"status_interval_seconds": 0.01, **settings})
        self.controller = Controller(config, self.kube, self.prefect.connect, identity)

    def node(self, name: str, gpus: int | None = 4, **labels: str) -> list[str]:
        """The node exists (or changed) in the API server and the watch reports it; the
        policies that woke."""
        body = node(name, gpus, **labels)
        self.kube.nodes[name] = body
        return self.controller.observe_node(body)

    def delete_node(self, name: str) -> list[str]:
        body = self.kube.nodes.pop(name)
        return self.controller.observe_node(body, deleted=True)

    async def settled(self, name: str = "p") -> None:
        """Let the coalesced status write of ``name`` go out."""
        flusher = self.controller.policies[name].flusher
        if flusher is not None:
            await flusher

    async def synced(self, gpus: int = 4) -> None:
        """Node ``a`` with ``gpus`` GPUs under policy ``p``, reconciled once in full."""
        self.node("a", gpus)
        self.controller.observe_policy(policy())
        await self.controller.reconcile("p", full=True)

    def status(self, name: str = "p") -> dict[str, Any]:
        return self.kube.status(name)

    def condition(self, kind: str, name: str = "p") -> dict[str, Any]:
        (found,) = [c for c in self.status(name)["conditions"] if c["type"] == kind]
        return dict(found)


def run(scenario: Callable[[World], Awaitable[None]], **settings: Any) -> World:
    async def main() -> World:
        world = World(**settings)
        await scenario(world)
        return world

    return asyncio.run(main())


def test_new_limits_are_in_the_ledger_before_they_are_created() -> None:
    async def scenario(world: World) -> None:
        world.node("a", 4)
        world.controller.observe_policy(policy())
        events = await world.controller.reconcile("p", full=True)
        assert [e.reason for e in events] == ["LimitCreated"]
        await world.settled()

    world = run(scenario)
    journal = world.journal
    # A crash between the two leaves a ledger naming gpu:a: the next reconcile owns it.
    assert journal.index("status p limits=gpu:a") < journal.index("prefect create gpu:a")
    assert world.prefect.limits == {"gpu:a": ObservedLimit("gpu:a", 4, True, 0.0)}
    assert ledger(world.status()) == [{"name": "gpu:a", "node": "a", "limit": 4}]
    assert world.condition("Ready")["status"] == "True"


def test_a_refused_write_ahead_creates_nothing() -> None:
    async def scenario(world: World) -> None:
        world.kube.refuse_status = True
        world.node("a", 4)
        world.controller.observe_policy(policy())
        events = await world.controller.reconcile("p", full=True)
        assert [e.reason for e in events] == ["StatusWriteFailed"]

    world = run(scenario)
    assert world.prefect.writes() == 0


def test_a_users_limit_of_the_same_name_is_never_touched() -> None:
    async def scenario(world: World) -> None:
        world.prefect.limits["gpu:a"] = ObservedLimit("gpu:a", 1)  # made by hand
        await world.synced()
        await world.settled()

    world = run(scenario)
    assert world.prefect.writes() == 0
    assert world.prefect.limits["gpu:a"].limit == 1
    conflict = world.condition("Conflict")
    assert conflict["status"] == "True"
    assert "gpu:a" in conflict["message"]
    assert ledger(world.status()) == []


def test_two_policies_wanting_one_name_the_older_owns_it() -> None:
    async def scenario(world: World) -> None:
        world.node("a", 4)
        world.controller.observe_policy(policy("old", "2026-11-01T00:00:00Z"))
        world.controller.observe_policy(policy("young", "2026-11-02T00:00:00Z", slotsPerGpu=2))
        await world.controller.reconcile("young", full=True)
        await world.controller.reconcile("old", full=True)
        await world.settled("young")
        await world.settled("old")

    world = run(scenario)
    assert world.prefect.limits["gpu:a"].limit == 4  # the older policy's, not 8
    assert world.prefect.calls["create"] == 1
    assert world.condition("Conflict", "young")["status"] == "True"
    assert world.condition("Conflict", "old")["status"] == "False"


def test_drift_is_repaired_by_full_reconciles_only() -> None:
    async def scenario(world: World) -> None:
        await world.synced()
        world.prefect.limits["gpu:a"] = ObservedLimit("gpu:a", 9)  # edited in the UI
        writes = world.prefect.writes()
        await world.controller.reconcile("p", full=False)  # trusts its cache: no call at all
        assert world.prefect.writes() == writes
        events = await world.controller.reconcile("p", full=True)
        assert [e.message for e in events] == ["gpu:a: limit 9 -> 4"]

    world = run(scenario)
    assert world.prefect.limits["gpu:a"].limit == 4


def test_node_changes_cost_only_the_writes_they_need() -> None:
    async def scenario(world: World) -> None:
        await world.synced()
        before = dict(world.prefect.calls)
        heartbeat = node("a", 4)
        heartbeat["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        assert not world.controller.observe_node(heartbeat)
        await world.controller.reconcile("p", full=False)
        assert dict(world.prefect.calls) == before  # nothing, not even a list
        assert world.node("a", 2)
        await world.controller.reconcile("p", full=False)
        assert world.prefect.calls["update"] == before.get("update", 0) + 1
        assert world.prefect.calls["list"] == before["list"]

    world = run(scenario)
    assert world.prefect.limits["gpu:a"].limit == 2


def test_an_outage_is_reported_and_a_recovery_re_reads_everything() -> None:
    async def scenario(world: World) -> None:
        await world.synced()
        world.prefect.down = True
        world.node("a", 2)
        events = await world.controller.reconcile("p", full=False)
        assert [e.reason for e in events] == ["PrefectUnreachable"]
        await world.settled()
        assert world.condition("PrefectReachable")["status"] == "False"
        assert world.condition("Ready")["reason"] == "PrefectUnreachable"
        world.prefect.down = False
        lists = world.prefect.calls["list"]
        await world.controller.reconcile("p", full=False)
        assert world.prefect.calls["list"] == lists + 1  # the cache went with the outage
        await world.settled()

    world = run(scenario)
    assert world.prefect.limits["gpu:a"].limit == 2
    assert world.condition("PrefectReachable")["status"] == "True"
    assert world.condition("Ready")["status"] == "True"


def test_a_burst_of_changes_is_one_status_write() -> None:
    async def scenario(world: World) -> None:
        world.controller.observe_policy(policy())
        for index in range(5):
            world.node(f"n{index}", 1)
        await world.controller.reconcile("p", full=True)
        await world.settled()
        patches = len(world.kube.patches["p"])
        for gpus in (2, 3, 4, 3, 2):
            world.node("n0", gpus)
            await world.controller.reconcile("p", full=False)
        await world.settled()
        assert len(world.kube.patches["p"]) == patches + 1
        assert world.status()["totalSlots"] == 6

    # A window far longer than five in-memory reconciles take, however loaded the machine.
    run(scenario, status_interval_seconds=0.5)


def test_a_change_staged_while_a_status_write_is_in_flight_goes_out_after_it() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        await world.settled()
        world.kube.status_gate = gate = asyncio.Event()  # the API server answers slowly
        written = world.journal.count("status p limits=gpu:a")
        world.node("a", 2)
        await world.controller.reconcile("p", full=False)

        async def in_flight() -> None:  # the write of 2 has reached the API server
            while world.journal.count("status p limits=gpu:a") == written:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(in_flight(), timeout=5)
        world.node("a", 1)
        await world.controller.reconcile("p", full=False)  # staged behind it
        gate.set()
        await world.settled()
        assert world.status()["totalSlots"] == 1

    run(scenario)


def test_a_refused_status_write_is_retried_by_the_next_reconcile() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        await world.settled()
        world.kube.refuse_status = True
        world.node("a", 2)
        await world.controller.reconcile("p", full=False)
        await world.settled()
        assert world.status()["totalSlots"] == 4
        world.kube.refuse_status = False
        await world.controller.reconcile("p", full=False)  # nothing changed but the API
        await world.settled()
        assert world.status()["totalSlots"] == 2

    run(scenario)


def test_deletion_applies_the_deletion_policy() -> None:
    async def scenario(world: World) -> None:
        world.node("a", 4)
        world.node("b", 2)
        world.controller.observe_policy(policy("gone", nodeSelector={"matchLabels": {}}))
        world.controller.observe_policy(
            policy("kept", limitNameTemplate="kept:{node}", deletionPolicy="Retain")
        )
        for name in ("gone", "kept"):
            await world.controller.reconcile(name, full=True)
        for name in ("gone", "kept"):
            events = await world.controller.reconcile(name, full=True, deleting=True)
            assert not any(event.warning for event in events)
            world.controller.forget_policy(name)

    world = run(scenario)
    assert sorted(world.prefect.limits) == ["kept:a", "kept:b"]


def test_the_api_key_is_read_on_full_reconciles_and_sent() -> None:
    key = {"apiKey": {"valueFrom": {"secretKeyRef": {"name": "prefect", "key": "key"}}}}

    async def scenario(world: World) -> None:
        world.kube.secrets["ops", "prefect", "key"] = "pnu_secret"
        world.node("a", 4)
        world.controller.observe_policy(policy(server={"remoteApiUrl": API_URL, **key}))
        await world.controller.reconcile("p", full=True)
        reads = world.kube.secret_reads
        world.node("a", 2)
        await world.controller.reconcile("p", full=False)
        assert world.kube.secret_reads == reads  # a node change reads no Secret
        await world.controller.reconcile("p", full=True)
        assert world.kube.secret_reads == reads + 1

    world = run(scenario, namespace="ops")
    assert {connection.api_key for connection in world.prefect.connections} == {"pnu_secret"}


def test_every_referenced_value_is_read_on_full_reconciles_only() -> None:
    def from_secret(name: str, key: str) -> dict[str, Any]:
        return {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}

    def from_config_map(name: str, key: str) -> dict[str, Any]:
        return {"valueFrom": {"configMapKeyRef": {"name": name, "key": key}}}

    server = {
        "remoteApiUrl": API_URL,
        "basicAuth": from_secret("prefect-auth", "auth-string"),
        "caBundle": from_config_map("prefect-ca", "ca.crt"),
        "headers": [
            {"name": "CF-Access-Client-Id", **from_config_map("access", "id")},
            {"name": "CF-Access-Client-Secret", **from_secret("access", "secret")},
        ],
    }

    async def scenario(world: World) -> None:
        world.kube.secrets["ops", "prefect-auth", "auth-string"] = "admin:first"
        world.kube.secrets["ops", "access", "secret"] = "s3cret"
        world.kube.config_maps["ops", "prefect-ca", "ca.crt"] = "PEM"
        world.kube.config_maps["ops", "access", "id"] = "client.access"
        world.node("a", 4)
        world.controller.observe_policy(policy(server=server))
        await world.controller.reconcile("p", full=True)
        reads = (world.kube.secret_reads, world.kube.config_map_reads)
        world.kube.secrets["ops", "prefect-auth", "auth-string"] = "admin:rotated"
        world.node("a", 2)
        await world.controller.reconcile("p", full=False)
        assert (world.kube.secret_reads, world.kube.config_map_reads) == reads
        assert len(world.prefect.connections) == 1  # a node change keeps the connection
        await world.controller.reconcile("p", full=True)  # two of each kind, once
        assert (world.kube.secret_reads, world.kube.config_map_reads) == (
            reads[0] + 2,
            reads[1] + 2,
        )

    world = run(scenario, namespace="ops")
    first, rotated = world.prefect.connections
    assert first.auth_string == "admin:first"
    assert rotated.auth_string == "admin:rotated"
    assert rotated.api_key is None
    assert rotated.ca_bundle == "PEM"
    assert rotated.headers == (
        ("CF-Access-Client-Id", "client.access"),
        ("CF-Access-Client-Secret", "s3cret"),
    )
    assert world.prefect.limits["gpu:a"].limit == 2


def test_a_missing_config_map_is_reported_and_nothing_is_written() -> None:
    ca = {"caBundle": {"valueFrom": {"configMapKeyRef": {"name": "absent", "key": "ca.crt"}}}}

    async def scenario(world: World) -> None:
        world.node("a", 4)
        world.controller.observe_policy(policy(server={"remoteApiUrl": API_URL, **ca}))
        events = await world.controller.reconcile("p", full=True)
        assert [(e.reason, e.message) for e in events] == [
            ("PrefectUnreachable", "ConfigMap prefect-gpu-operator/absent not found")
        ]

    world = run(scenario)
    assert world.prefect.calls == {}


def test_rate_limiting_is_reported_as_such_and_keeps_what_was_done() -> None:
    async def scenario(world: World) -> None:
        for name in "abcde":
            world.node(name, 1)
        world.controller.observe_policy(policy())
        world.prefect.throttled_from = 5  # the listing, the settings and two creates pass
        events = await world.controller.reconcile("p", full=True)
        assert [e.reason for e in events] == ["LimitCreated", "LimitCreated", "PrefectRateLimited"]
        await world.settled()
        assert world.condition("PrefectReachable")["status"] == "True"
        assert world.condition("PrefectReachable")["reason"] == "RateLimited"
        assert world.condition("Ready")["reason"] == "RateLimited"
        assert "429" in world.condition("Ready")["message"]
        assert 0.5 < world.controller.rate_limit_wait("p") <= 1.0  # the fake's Retry-After
        world.prefect.throttled_from = None
        # What the daemon does next: a reconcile from the cache, which re-lists nothing.
        events = await world.controller.reconcile("p", full=False)
        assert [e.reason for e in events] == ["LimitCreated"] * 3
        await world.settled()

    world = run(scenario)
    assert world.prefect.calls["list"] == 1
    assert world.prefect.calls["create"] == 6  # five limits, one of them refused once
    assert sorted(world.prefect.limits) == ["gpu:a", "gpu:b", "gpu:c", "gpu:d", "gpu:e"]
    assert world.condition("Ready")["status"] == "True"
    assert world.condition("PrefectReachable")["reason"] == "Connected"


def test_a_missing_secret_is_reported_like_an_unreachable_server() -> None:
    key = {"apiKey": {"valueFrom": {"secretKeyRef": {"name": "absent", "key": "key"}}}}

    async def scenario(world: World) -> None:
        world.controller.observe_policy(policy(server={"remoteApiUrl": API_URL, **key}))
        events = await world.controller.reconcile("p", full=True)
        assert [(e.reason, e.message) for e in events] == [
            ("PrefectUnreachable", "Secret prefect-gpu-operator/absent not found")
        ]

    world = run(scenario)
    assert world.prefect.calls == {}


@pytest.mark.parametrize("failures", [1, 2, 10])
def test_retries_back_off_within_the_cap(failures: int) -> None:
    world = World(retry_max_seconds=3, resync_seconds=30)
    delay = world.controller.next_wait("p", failures)
    assert 0.8 * min(3, 0.5 * 2**failures) <= delay <= 1.2 * min(3, 0.5 * 2**failures)
    assert world.controller.next_wait("p", 0) == 30


def test_a_node_deleted_out_of_sight_loses_its_limit_at_the_next_resync() -> None:
    """Deleted while the operator was standby, stopped or between watches: no DELETED event."""

    async def scenario(world: World) -> None:
        await world.synced()
        world.node("b", 2)
        await world.controller.reconcile("p", full=False)
        assert sorted(world.prefect.limits) == ["gpu:a", "gpu:b"]
        del world.kube.nodes["b"]  # gone from the API server; the watch never said so
        await world.controller.reconcile("p", full=False)
        assert "gpu:b" in world.prefect.limits  # a change reconcile trusts the view
        await world.controller.reconcile("p", full=True)

    world = run(scenario, resync_seconds=1e-6)  # every full reconcile lists again
    assert sorted(world.prefect.limits) == ["gpu:a"]


def test_what_the_watch_reports_during_a_listing_wins_over_the_listing() -> None:
    async def scenario(world: World) -> None:
        await world.synced()
        world.kube.while_listing = lambda: world.node("late", 2)
        await world.controller.reconcile("p", full=True)
        await world.controller.reconcile("p", full=False)  # the wake-up the new node caused

    world = run(scenario, resync_seconds=1e-6)  # every full reconcile lists again
    assert sorted(world.prefect.limits) == ["gpu:a", "gpu:late"]


def test_only_policies_whose_verdict_changed_wake_up() -> None:
    async def scenario(world: World) -> None:
        world.controller.observe_policy(
            policy("team-a", nodeSelector={"matchLabels": {"team": "a"}})
        )
        world.controller.observe_policy(
            policy(
                "team-b", limitNameTemplate="b:{node}", nodeSelector={"matchLabels": {"team": "b"}}
            )
        )
        assert world.node("n", 4, team="a") == ["team-a"]
        # Feature discovery rewrites a timestamp label every minute: nobody wakes.
        assert world.node("n", 4, team="a", **{"nvidia.com/gfd.timestamp": "1767225600"}) == []
        assert world.node("n", 2, team="a") == ["team-a"]  # its GPUs changed
        assert sorted(world.node("n", 2, team="b")) == ["team-a", "team-b"]  # moved teams
        assert world.delete_node("n") == ["team-b"]

    run(scenario)


def test_a_node_that_loses_its_gpus_drains_instead_of_stranding_slots() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        world.prefect.hold("gpu:a", 3)
        world.node("a", 0)
        await world.controller.reconcile("p", full=False)
        assert world.prefect.calls["read"] == 1  # how many are held now, not at the listing
        assert world.prefect.limits["gpu:a"].limit == 1  # never 0 while slots are held
        assert world.controller.next_wait("p", 0) == 0.5  # polls while draining
        await world.settled()
        assert ledger(world.status()) == [
            {"name": "gpu:a", "node": "a", "limit": 1, "drainingTo": 0}
        ]
        world.prefect.hold("gpu:a", 1)
        await world.controller.reconcile("p", full=False)
        assert world.prefect.limits["gpu:a"].limit == 1
        world.prefect.hold("gpu:a", 0)
        events = await world.controller.reconcile("p", full=False)
        assert [e.message for e in events] == ["gpu:a: limit 1 -> 0"]
        assert world.controller.next_wait("p", 0) == 30
        await world.settled()

    world = run(scenario, drain_poll_seconds=0.5, resync_seconds=30)
    assert world.prefect.limits["gpu:a"].limit == 0
    assert ledger(world.status()) == [{"name": "gpu:a", "node": "a", "limit": 0}]


def _pod(uid: str, node: str, gpus: int) -> dict[str, Any]:
    container = {
        "name": "worker",
        "env": [{"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {},
    }
    return {
        "metadata": {"uid": uid, "name": f"worker-{uid}", "namespace": "ml"},
        "spec": {"nodeName": node, "containers": [container]},
        "status": {"phase": "Running"},
    }


def test_capacity_from_worker_pods_follows_them() -> None:
    async def scenario(world: World) -> None:
        world.node("a", 8)
        world.controller.observe_policy(policy(capacityFrom="WorkerPods"))
        await world.controller.reconcile("p", full=True)
        assert world.prefect.limits["gpu:a"].limit == 0  # no worker yet
        world.controller.observe_pod(_pod("w1", "a", 2))
        await world.controller.reconcile("p", full=False)
        assert world.prefect.limits["gpu:a"].limit == 2
        world.controller.observe_pod(_pod("w1", "a", 2), deleted=True)
        world.controller.observe_pod(_pod("w2", "a", 4))  # its replacement, resized
        await world.controller.reconcile("p", full=False)
        assert world.prefect.limits["gpu:a"].limit == 4

    run(scenario)


def test_gpu_pods_that_see_fewer_gpus_than_their_limit_are_reported() -> None:
    async def scenario(world: World) -> None:
        await world.synced(4)
        cpu = world.controller.observe_pod(_pod("cpu", "a", 0))
        assert cpu is None  # a CPU flow run asks nothing of the GPUs: no warning
        short = world.controller.observe_pod(_pod("short", "a", 1))
        assert short is not None
        assert short.reason == "WorkerSeesFewerGPUs"
        assert "node a: pod ml/worker-short was given 1 GPU(s)" in short.message
        assert "gpu:a counts 4" in short.message
        assert world.controller.observe_pod(_pod("short", "a", 1)) is None  # warned once
        whole = world.controller.observe_pod(_pod("whole", "a", 4))
        assert whole is None
        world.node("b", None)  # a CPU node: no limit
        lost = world.controller.observe_pod(_pod("lost", "b", 1))
        assert lost is not None
        assert lost.reason == "NoGPULimit"
        await world.controller.reconcile("p", full=False)
        await world.settled()

    world = run(scenario)
    matched = world.condition("WorkersMatchLimits")
    assert matched["status"] == "False"
    assert "pod ml/worker-short" in matched["message"]
    assert "worker-whole" not in matched["message"]


def test_a_replica_whose_peering_record_went_stale_writes_nothing() -> None:
    now = datetime.datetime.now(datetime.UTC)

    async def scenario(world: World) -> None:
        fresh = {"status": {"me": {"priority": 2, "lifetime": 10, "lastseen": now.isoformat()}}}
        world.kube.peering = fresh
        await world.controller.keep_fence()
        await world.synced(4)
        assert world.prefect.limits["gpu:a"].limit == 4
        stale = (now - datetime.timedelta(seconds=9)).isoformat()  # 90 % of the lifetime ago
        world.kube.peering = {"status": {"me": {"priority": 2, "lifetime": 10, "lastseen": stale}}}
        await world.controller.keep_fence()
        world.node("a", 2)
        events = await world.controller.reconcile("p", full=False)
        assert [e.reason for e in events] == ["Fenced"]

    world = run(scenario, peering="ha", peering_lifetime_seconds=10, identity="me")
    assert world.prefect.limits["gpu:a"].limit == 4  # the stale replica did not write 2


def test_held_slots_and_capacity_are_exported_per_node() -> None:
    """What the dashboard's held-vs-capacity panel reads, from the last read of Prefect."""

    held = "prefect_gpu_operator_node_held_slots"

    def gauge(metric: str) -> float | None:
        return REGISTRY.get_sample_value(metric, {"policy": "p", "node": "a"})

    async def scenario(world: World) -> None:
        await world.synced(4)
        assert (gauge("prefect_gpu_operator_node_slots"), gauge(held)) == (4, 0)
        world.prefect.hold("gpu:a", 3)
        await world.controller.reconcile("p", full=True)
        assert (gauge("prefect_gpu_operator_node_slots"), gauge(held)) == (4, 3)
        world.delete_node("a")
        await world.controller.reconcile("p", full=False)
        assert gauge(held) is None  # a node that left exports nothing

    run(scenario)


def test_writes_run_in_parallel_up_to_the_bound_after_the_write_ahead() -> None:
    async def scenario(world: World) -> None:
        world.prefect.latency = 0.01
        for index in range(40):
            world.node(f"n{index:02}", 1)
        world.controller.observe_policy(policy())
        events = await world.controller.reconcile("p", full=True)
        assert [e.reason for e in events] == ["LimitCreated"] * 40
        await world.settled()

    world = run(scenario, prefect_write_concurrency=8)
    assert world.prefect.max_in_flight == 8
    assert len(world.prefect.limits) == 40
    creates = [i for i, call in enumerate(world.journal) if call.startswith("prefect create")]
    ahead = next(i for i, call in enumerate(world.journal) if call.startswith("status p limits="))
    assert ahead < min(creates)  # every new name is in the ledger before any is created


def test_parallel_writes_keep_creates_before_deletes() -> None:
    async def scenario(world: World) -> None:
        for name in "abcde":
            world.node(name, 1)
        world.controller.observe_policy(policy())
        await world.controller.reconcile("p", full=True)
        world.prefect.latency = 0.01
        for name in "abcde":
            world.delete_node(name)
        for name in "vwxyz":
            world.node(name, 1)
        await world.controller.reconcile("p", full=False)
        await world.settled()

    world = run(scenario, prefect_write_concurrency=4)
    creates = [i for i, call in enumerate(world.journal) if call.startswith("prefect create")]
    deletes = [i for i, call in enumerate(world.journal) if call.startswith("prefect delete")]
    assert len(deletes) == 5
    assert max(creates) < min(deletes)
    assert sorted(world.prefect.limits) == [f"gpu:{name}" for name in "vwxyz"]


def test_a_failing_write_among_parallel_ones_is_reported_and_retried() -> None:
    async def scenario(world: World) -> None:
        world.prefect.latency = 0.01
        world.prefect.failing = {"gpu:c"}
        for name in "abcdefghij":
            world.node(name, 1)
        world.controller.observe_policy(policy())
        events = await world.controller.reconcile("p", full=True)
        reasons = [e.reason for e in events]
        assert reasons[-1] == "PrefectUnreachable"
        assert set(reasons[:-1]) == {"LimitCreated"}
        await world.settled()
        assert world.condition("PrefectReachable")["status"] == "False"
        # Everything the plan named is in the ledger: nothing created is left unowned.
        assert {e["name"] for e in ledger(world.status())} >= set(world.prefect.limits)
        world.prefect.failing = set()
        await world.controller.reconcile("p", full=False)
        await world.settled()

    world = run(scenario, prefect_write_concurrency=4)
    assert sorted(world.prefect.limits) == [f"gpu:{name}" for name in "abcdefghij"]
    assert world.condition("Ready")["status"] == "True"


def test_a_429_among_parallel_writes_stops_new_ones() -> None:
    async def scenario(world: World) -> None:
        world.prefect.latency = 0.01
        for index in range(20):
            world.node(f"n{index:02}", 1)
        world.controller.observe_policy(policy())
        world.prefect.throttled_from = 7  # the listing, the settings and four creates pass
        events = await world.controller.reconcile("p", full=True)
        assert [e.reason for e in events] == ["LimitCreated"] * 4 + ["PrefectRateLimited"]

    world = run(scenario, prefect_write_concurrency=4)
    assert world.prefect.calls["create"] == 5  # the writes in flight finished; none began after
    assert len(world.prefect.limits) == 4
