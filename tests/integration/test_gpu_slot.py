"""gpu_slot() on a real Prefect server: errors, exclusivity, crashes, limit changes, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, count
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_flows import (
    GpuDeviceError,
    GpuLease,
    GpuLimitNotFoundError,
    GpuSlotTimeout,
    MissingWorkerIdError,
    _gcl,
    async_gpu_slot,
    gpu_slot,
)
from prefect_gpu_flows._locks import try_lock, unlock
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.waiting import eventually, holds

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOLDER = "tests.integration._gpu_slot_holder"
SLOTS_CLI = str(Path(sys.executable).with_name("prefect-gpu-slots"))
_names = count()
# The contention tests run on Prefect's two database backends: PostgreSQL locks rows where
# SQLite locks the file, so races differ.
ON_BOTH_DATABASES = pytest.mark.parametrize("node", ["sqlite", "postgres"], indirect=True)
# Device UUIDs as NVIDIA's device plugin writes them into NVIDIA_VISIBLE_DEVICES.
UUID_A = "GPU-8a1b2c3d-0000-1111-2222-333344445555"
UUID_B = "GPU-9f8e7d6c-0000-1111-2222-333344445555"
MIG_A = "MIG-1d2e3f40-aaaa-bbbb-cccc-ddddeeeeffff"
MIG_B = "MIG-5a6b7c80-aaaa-bbbb-cccc-ddddeeeeffff"
DEVICE_ENV = (
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "PREFECT_GPU_SLOTS_PER_DEVICE",
    "PREFECT_GPU_DEVICE_COUNT",
)


@pytest.fixture
def _temporary_api_url() -> Iterator[Callable[[str], None]]:
    """Point this process's Prefect client at another server for one test."""
    with contextlib.ExitStack() as stack:

        def use(api_url: str) -> None:
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))

        yield use


def in_thread(target: Callable[[], None]) -> threading.Thread:
    """Start ``target`` in a thread that sees this test's Prefect settings (a context variable)."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,))
    thread.start()
    return thread


@dataclass
class Node:
    """One simulated GPU node: its WORKER_ID, lock directory and Prefect limit."""

    worker_id: str
    lock_dir: Path
    prefect: SyncPrefectClient
    holders: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def limit_name(self) -> str:
        return f"gpu:{self.worker_id}"

    def create_limit(self, limit: int) -> None:
        self.prefect.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=self.limit_name, limit=limit)
        )

    def set_limit(self, limit: int) -> None:
        self.prefect.update_global_concurrency_limit(
            self.limit_name, GlobalConcurrencyLimitUpdate(limit=limit)
        )

    def active_slots(self) -> int:
        return self.prefect.read_global_concurrency_limit_by_name(self.limit_name).active_slots

    def _free(self, name: str) -> bool:
        fd = try_lock(self.lock_dir / self.worker_id / name)
        if fd is None:
            return False
        unlock(fd)
        return True

    def slot_free(self, index: int) -> bool:
        return self._free(f"slot-{index}.lock")

    def gate_held(self) -> bool:
        """Someone queues on the node: the head of the queue holds its gate."""
        return not self._free("gate.lock")

    def start_holder(self, events: Path, *args: str) -> subprocess.Popen[bytes]:
        # Not what a block of this process may have pinned: a holder finds its own devices.
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        with events.with_suffix(".log").open("ab") as log:
            holder = subprocess.Popen(
                [sys.executable, "-m", HOLDER, "--events", str(events), *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.holders.append(holder)
        return holder

    def stop_holders(self) -> None:
        for holder in self.holders:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def entered(path: Path) -> list[dict[str, Any]]:
    return [event for event in read_events(path) if event["event"] == "enter"]


@pytest.fixture
def node(
    request: pytest.FixtureRequest,
    prefect_api_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Node]:
    """A node on the session's SQLite server, or on PostgreSQL for tests parametrized with
    ``ON_BOTH_DATABASES``."""
    if getattr(request, "param", "sqlite") == "postgres":
        server: PrefectServer = request.getfixturevalue("postgres_prefect_server")
        monkeypatch.setenv("PREFECT_API_URL", server.api_url)  # the holders inherit it
        settings = request.getfixturevalue("_temporary_api_url")
        settings(server.api_url)
    worker_id = f"node-{os.getpid()}-{next(_names)}"
    for name in DEVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKER_ID", worker_id)
    monkeypatch.setenv("PREFECT_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("PREFECT_GPU_LEASE_SECONDS", "60")  # the server's minimum
    with get_client(sync_client=True) as prefect:
        result = Node(worker_id, tmp_path / "locks", prefect)
        try:
            yield result
        finally:
            result.stop_holders()
            with contextlib.suppress(ObjectNotFound):
                prefect.delete_global_concurrency_limit_by_name(result.limit_name)


def test_missing_worker_id_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKER_ID", raising=False)
    with pytest.raises(MissingWorkerIdError, match="export WORKER_ID=") as error, gpu_slot():
        pytest.fail("entered without WORKER_ID")
    assert "webhook" in str(error.value)


def test_missing_limit_names_the_operator_and_is_not_created(node: Node) -> None:
    with pytest.raises(GpuLimitNotFoundError, match="GPULimitPolicy") as error, gpu_slot():
        pytest.fail("entered without a limit")
    assert node.limit_name in str(error.value)
    with pytest.raises(ObjectNotFound):
        node.prefect.read_global_concurrency_limit_by_name(node.limit_name)


@pytest.mark.parametrize(
    ("nvidia_visible_devices", "names"),
    [
        (None, {"0", "1"}),  # no device list here: slots number the devices
        (f"{UUID_A},{UUID_B}", {UUID_A, UUID_B}),  # what NVIDIA's device plugin sets
    ],
)
@ON_BOTH_DATABASES
def test_six_processes_share_two_slots_exclusively_each_pinned_to_its_device(
    node: Node,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nvidia_visible_devices: str | None,
    names: set[str],
) -> None:
    if nvidia_visible_devices is not None:
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", nvidia_visible_devices)  # holders inherit it
    node.create_limit(2)
    events = tmp_path / "events.jsonl"
    seen_active: list[int] = []
    done = threading.Event()

    def sample() -> None:
        with get_client(sync_client=True) as prefect:
            while not done.wait(0.05):
                limit = prefect.read_global_concurrency_limit_by_name(node.limit_name)
                seen_active.append(limit.active_slots)

    sampler = in_thread(sample)
    try:
        holders = [node.start_holder(events, "--units", "3", "--hold", "0.3") for _ in range(6)]
        for holder in holders:
            assert holder.wait(timeout=120) == 0
    finally:
        done.set()
        sampler.join()

    intervals = []
    for pid in {event["pid"] for event in read_events(events)}:
        mine = [e for e in read_events(events) if e["pid"] == pid and e["event"] != "start"]
        assert [e["event"] for e in mine] == ["enter", "exit"] * 3
        pairs = zip(mine[::2], mine[1::2], strict=True)
        intervals += [(enter["t"], leave["t"], tuple(enter["devices"])) for enter, leave in pairs]
        for enter in mine[::2]:
            assert enter["pinned"]
            assert enter["visible"] == ",".join(enter["devices"]), "the block saw other devices"
    assert len(intervals) == 18
    steps = sorted([(s, 1) for s, _, _ in intervals] + [(e, -1) for _, e, _ in intervals])
    inside = list(accumulate(step for _, step in steps))  # exits sort first at equal times
    assert max(inside) == 2, "more than 2 holders inside at once (or never 2)"
    for i, (start, end, devices) in enumerate(intervals):
        assert len(devices) == 1
        assert set(devices) <= names
        for other_start, other_end, other_devices in intervals[i + 1 :]:
            if other_start < end and start < other_end:
                assert set(devices).isdisjoint(other_devices), "two holders shared a GPU"
    assert seen_active
    assert max(seen_active) <= 2
    eventually(
        lambda: node.active_slots() == 0, timeout=10, what="slots released after the holders exit"
    )


@ON_BOTH_DATABASES
def test_killed_holder_frees_device_at_once_and_its_lease_is_adopted(
    node: Node, tmp_path: Path
) -> None:
    node.create_limit(1)
    events = tmp_path / "events.jsonl"
    holder = node.start_holder(events, "--until", str(tmp_path / "never"))
    eventually(lambda: len(entered(events)) == 1, timeout=60, what="holder entered")
    assert not node.slot_free(0)

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    eventually(lambda: node.slot_free(0), timeout=5, what="device lock dropped by the kernel")
    assert node.active_slots() == 1  # the server still counts the dead holder's lease

    start = time.monotonic()
    with gpu_slot(timeout_seconds=5) as lease:  # adopts that lease: no wait for its expiry
        took = time.monotonic() - start
        assert lease.devices == ("0",)
        assert node.active_slots() == 1
    assert took < 10  # far below the 60 s lease it would otherwise wait out
    eventually(
        lambda: node.active_slots() == 0, timeout=10, what="adopted lease released after the block"
    )


def test_killed_holder_lease_expires_on_the_server(node: Node, tmp_path: Path) -> None:
    """Nobody else claims the device: the server frees the slot after lease + repossessor loop."""
    node.create_limit(1)
    events = tmp_path / "events.jsonl"
    holder = node.start_holder(events, "--until", str(tmp_path / "never"))
    eventually(lambda: len(entered(events)) == 1, timeout=60, what="holder entered")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    killed = time.monotonic()
    assert node.active_slots() == 1
    # 60 s lease (the server's minimum) + up to 15 s for the repossessor loop; measured ~60-75 s.
    eventually(lambda: node.active_slots() == 0, timeout=85, what="lease expired on the server")
    elapsed = time.monotonic() - killed
    print(f"GCL slot of a SIGKILLed holder freed by lease expiry after {elapsed:.1f} s")
    assert elapsed >= 55


@ON_BOTH_DATABASES
def test_lowered_limit_admits_nobody_until_holders_drop_below_it(
    node: Node, tmp_path: Path
) -> None:
    node.create_limit(2)
    first, second, third = (tmp_path / f"h{i}.jsonl" for i in range(3))
    node.start_holder(first, "--until", str(tmp_path / "release-1"))
    node.start_holder(second, "--until", str(tmp_path / "release-2"))
    eventually(
        lambda: len(entered(first)) == len(entered(second)) == 1, timeout=60, what="holders entered"
    )

    node.set_limit(1)
    node.start_holder(third, "--hold", "0")
    eventually(lambda: len(read_events(third)) >= 1, timeout=60, what="third holder started")
    # Longer than a waiter's limit refresh: it must stay outside all along.
    holds(lambda: not entered(third), duration=1.5, what="third holder kept out")

    (tmp_path / "release-1").touch()
    eventually(lambda: len(read_events(first)) == 3, timeout=10, what="first holder left")
    # Its exit is logged before it gives its slot back to the server.
    eventually(lambda: node.active_slots() <= 1, timeout=5, what="first holder's slot released")
    # One holder left = the new limit: still no room.
    holds(lambda: not entered(third), duration=1.5, what="third holder kept out at the new limit")
    holds(lambda: node.active_slots() <= 1, duration=0.5, what="at most the limit counted")

    (tmp_path / "release-2").touch()
    eventually(
        lambda: len(entered(third)) == 1,
        timeout=10,
        what="third holder entered after the second left",
    )
    exit_second = next(e["t"] for e in read_events(second) if e["event"] == "exit")
    assert entered(third)[0]["t"] >= exit_second
    assert entered(third)[0]["devices"] == ["0"]  # slot 1 is above the lowered limit


def test_limit_zero_waits_and_proceeds_when_raised(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.create_limit(0)
    inside = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with gpu_slot(timeout_seconds=30):
                inside.set()
        except BaseException as error:
            failure.append(error)

    caplog.set_level(logging.INFO, logger="prefect_gpu_flows")
    worker = in_thread(run)
    try:
        assert not inside.wait(1.5)
        assert not failure, failure
        assert "is 0, below the 1 GPU(s) requested" in caplog.text
        node.set_limit(1)
        assert inside.wait(5), failure
    finally:
        worker.join(timeout=35)
    assert not failure


def test_slot_left_at_limit_zero_stays_adoptable_and_is_released_once_raised(
    node: Node,
) -> None:
    """Prefect 3.9 cannot decrement a limit of 0 (409, a division by zero in its occupancy
    average): the lease must stay on the slot file, not be forgotten while still counted."""
    node.create_limit(1)
    with gpu_slot(timeout_seconds=5):
        node.set_limit(0)
    slot = node.lock_dir / node.worker_id / "slot-0.lock"
    # Past the keeper's first release attempts, the lease the server still counts stays on file.
    holds(
        lambda: node.active_slots() == 1 and bool(slot.read_text()),
        duration=1.5,
        what="lease kept on the slot",
    )
    node.set_limit(1)
    # The keeper releases on the server first, then clears the file: wait for both.
    eventually(
        lambda: node.active_slots() == 0, timeout=5, what="lease released once the limit was raised"
    )
    eventually(lambda: not slot.read_text(), timeout=5, what="slot file cleared after the release")


def test_exiting_holder_releases_its_lease_while_the_gate_stays_busy(
    node: Node, tmp_path: Path
) -> None:
    """A head of the queue stuck in a slow server call must not strand an exiting holder's
    lease (it would stay counted until it expires, 60-75 s)."""
    node.create_limit(1)
    events, release = tmp_path / "events.jsonl", tmp_path / "release"
    holder = node.start_holder(events, "--until", str(release))
    eventually(lambda: len(entered(events)) == 1, timeout=60, what="holder entered")
    gate = try_lock(node.lock_dir / node.worker_id / "gate.lock")
    assert gate is not None
    try:
        release.touch()
        assert holder.wait(timeout=30) == 0
        eventually(lambda: node.active_slots() == 0, timeout=5, what="lease released at exit")
    finally:
        unlock(gate)


def test_timeout_raises_gpu_slot_timeout(node: Node) -> None:
    node.create_limit(1)
    with gpu_slot():
        start = time.monotonic()
        with pytest.raises(GpuSlotTimeout, match="busy") as error, gpu_slot(timeout_seconds=0.5):
            pytest.fail("entered a full node")
        assert 0.5 <= time.monotonic() - start < 5
        assert isinstance(error.value, TimeoutError)

    node.set_limit(0)
    with pytest.raises(GpuSlotTimeout, match="below the 1 GPU"), gpu_slot(timeout_seconds=0.3):
        pytest.fail("entered a limit of 0")


def test_exception_inside_the_block_releases_both(node: Node) -> None:
    node.create_limit(1)

    def crash() -> None:
        with gpu_slot():
            assert node.active_slots() == 1
            raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        crash()
    assert node.slot_free(0)
    eventually(
        lambda: node.active_slots() == 0, timeout=5, what="GCL slot released after the error"
    )


def test_async_twin_holds_and_releases_on_cancellation(node: Node) -> None:
    node.create_limit(2)

    async def scenario() -> None:
        async with async_gpu_slot(gpus=2) as lease:
            assert sorted(lease.devices) == ["0", "1"]
            assert node.active_slots() == 2

            async def wait_for_slot() -> None:
                async with async_gpu_slot():
                    pytest.fail("entered a full node")

            waiter = asyncio.create_task(wait_for_slot())
            # The waiter is queued once it holds the node's gate.
            await asyncio.to_thread(eventually, node.gate_held, timeout=10, what="waiter queued")
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter

        inside = asyncio.Event()

        async def hold_forever() -> None:
            async with async_gpu_slot() as lease:
                assert lease.devices == ("0",)
                inside.set()
                await asyncio.sleep(3600)

        holder = asyncio.create_task(hold_forever())
        await asyncio.wait_for(inside.wait(), 10)
        assert not node.slot_free(0)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert node.slot_free(0)
        assert node.slot_free(1)

        with pytest.raises(GpuSlotTimeout):
            async with async_gpu_slot(gpus=3, timeout_seconds=0.3):
                pytest.fail("entered with more GPUs than the limit")

    asyncio.run(scenario())
    eventually(
        lambda: node.active_slots() == 0, timeout=5, what="GCL slots released after cancellation"
    )


# ## The container's devices


def test_a_limit_larger_than_the_container_s_devices_is_an_error_naming_both(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's 4-GPU node whose worker sees 1 GPU: slots 1-3 have no device."""
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", UUID_A)
    node.create_limit(4)
    with pytest.raises(GpuDeviceError) as error, gpu_slot(timeout_seconds=5):
        pytest.fail("entered a slot without a device")
    message = str(error.value)
    assert f"limit {node.limit_name!r} is 4" in message
    assert "only 1 slot(s): 1 device(s)" in message
    assert node.active_slots() == 0

    monkeypatch.setenv("PREFECT_GPU_SLOTS_PER_DEVICE", "4")  # a GPU time-sliced 4 ways
    with gpu_slot(timeout_seconds=5) as lease:
        assert lease.devices == (UUID_A,)


def test_time_sliced_device_serves_several_holders_at_once(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", f"{UUID_A},{UUID_A}")  # 2 replicas of one GPU
    monkeypatch.setenv("PREFECT_GPU_SLOTS_PER_DEVICE", "2")
    node.create_limit(2)
    release = tmp_path / "release"
    events = [tmp_path / f"h{i}.jsonl" for i in range(2)]
    for path in events:
        node.start_holder(path, "--until", str(release))
    eventually(
        lambda: all(len(entered(path)) == 1 for path in events), timeout=60, what="both inside"
    )
    assert [entered(path)[0]["devices"] for path in events] == [[UUID_A], [UUID_A]]
    release.touch()
    one_device = "gpus=2, but this container sees 1 device"
    with pytest.raises(GpuDeviceError, match=one_device), gpu_slot(gpus=2, timeout_seconds=5):
        pytest.fail("two GPUs from one")


def test_a_mig_device_is_pinned_by_its_uuid_one_per_block(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", f"{MIG_A},{MIG_B}")
    node.create_limit(2)
    with pytest.raises(GpuDeviceError, match="gpus=2 on MIG devices"), gpu_slot(gpus=2):
        pytest.fail("entered with two MIG devices")
    assert node.active_slots() == 0
    with gpu_slot(timeout_seconds=5) as lease:
        assert lease.devices == (MIG_A,)
        assert lease.pinned
        assert os.environ["CUDA_VISIBLE_DEVICES"] == MIG_A
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_lease_env_shows_a_child_process_exactly_the_held_device(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", f"{UUID_A},{UUID_B}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the worker's own: replaced in the block
    node.create_limit(2)
    show = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    outside = {**os.environ}
    with gpu_slot(timeout_seconds=5) as first, gpu_slot(timeout_seconds=5) as second:
        assert {first.devices, second.devices} == {(UUID_A,), (UUID_B,)}
        assert first.pinned
        assert not second.pinned  # one environment per process: see the next test
        child = subprocess.run(
            show, env=outside | second.env, capture_output=True, text=True, check=True
        )
        assert child.stdout.strip() == second.devices[0]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # restored


def test_concurrent_blocks_in_one_process_pin_only_the_first_and_say_so(
    node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", f"{UUID_A},{UUID_B}")
    node.create_limit(2)
    caplog.set_level(logging.WARNING, logger="prefect_gpu_flows")
    first_inside, second_done = threading.Event(), threading.Event()
    leases: list[GpuLease] = []
    failures: list[BaseException] = []

    def second() -> None:
        try:
            assert first_inside.wait(30)
            with gpu_slot(timeout_seconds=10) as lease:
                leases.append(lease)
                visible.append(os.environ["CUDA_VISIBLE_DEVICES"])
        except BaseException as error:
            failures.append(error)
        finally:
            second_done.set()

    visible: list[str] = []
    thread = in_thread(second)
    try:
        with gpu_slot(timeout_seconds=10) as first:
            first_inside.set()
            assert second_done.wait(30)
            assert first.pinned
            assert first.unpinned_reason is None
            assert os.environ["CUDA_VISIBLE_DEVICES"] == first.devices[0]
    finally:
        first_inside.set()
        thread.join(timeout=30)
    assert not failures, failures
    (other,) = leases
    assert other.devices != first.devices
    assert not other.pinned
    assert other.cuda_index is None
    assert other.unpinned_reason is not None
    assert "another gpu_slot() block in this process" in other.unpinned_reason
    assert visible == [first.devices[0]]  # the env stays the first block's
    assert f"holds {other.devices[0]} but cannot pin this process's CUDA" in caplog.text
    assert "lease.env" in caplog.text
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_lone_first_acquire_is_one_lease_request(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody queued, no lease to adopt: the lease grant reports the limit, no read before it."""
    node.create_limit(2)
    calls: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(_gcl, name)

        def call(*args: Any) -> Any:
            calls.append(name)
            return real(*args)

        return call

    for name in ("read_limit", "acquire"):
        monkeypatch.setattr(_gcl, name, counted(name))
    with gpu_slot(timeout_seconds=5) as lease:
        assert lease.devices == ("0",)
        assert node.active_slots() == 1
    assert calls == ["acquire"]


class _WarpedClock:
    """``time`` for the keeper and the lease calls, with a settable jump ahead: hours of a held
    slot's upkeep pass in seconds, against a real server whose leases last in real time."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return time.time() + self.ahead

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def test_a_held_slot_costs_at_most_half_a_request_per_minute(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default lease, an hour of holding a slot makes 0.2 requests per minute (Prefect
    Cloud's rate limits count them), all renewals, and the lease stays valid throughout."""
    from prefect_gpu_flows import _keeper
    from prefect_gpu_flows._config import DEFAULT_LEASE_SECONDS

    monkeypatch.delenv("PREFECT_GPU_LEASE_SECONDS")  # the default: 600 s
    node.create_limit(1)
    clock = _WarpedClock()
    monkeypatch.setattr(_keeper, "time", clock)
    monkeypatch.setattr(_gcl, "time", clock)
    sent: list[str] = []
    http = _gcl.client()._client

    def hook(request: httpx.Request) -> None:
        sent.append(request.url.path)

    monkeypatch.setitem(http.event_hooks, "request", [*http.event_hooks["request"], hook])
    hour = 3600.0
    with gpu_slot(timeout_seconds=10):
        sent.clear()
        while clock.ahead < hour:
            clock.ahead += 5.0
            _keeper.keeper._wake.set()  # it sleeps in real time: have it look at the new time
            time.sleep(0.01)
        eventually(lambda: len(sent) >= hour / (DEFAULT_LEASE_SECONDS / 2), timeout=10)
        per_minute = len(sent) / (hour / 60)
        print(
            f"one held slot for {hour / 60:.0f} simulated minutes: {len(sent)} requests, "
            f"{per_minute:.2f} per minute"
        )
        assert all(path.endswith("/renew") for path in sent)
        assert per_minute <= 0.5
        assert node.active_slots() == 1  # renewed in time: the server never lost it
    eventually(lambda: node.active_slots() == 0, timeout=10, what="released after the block")


def _published(prefect: SyncPrefectClient, pod_uid: str, slot: int) -> str | None:
    """The lease id published for the pod's slot, if any."""
    variable = prefect.read_variable_by_name(_gcl.lease_variable(pod_uid, slot))
    if variable is None:
        return None
    value = variable.value
    assert isinstance(value, dict)
    return str(value["lease_id"])


def test_each_slots_lease_is_published_under_its_pod_and_moves_with_an_adoption(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pods sharing one lock directory: a lease adopted from the other pod's dead holder is
    published under the adopter alone, so the dead pod's cleanup cannot revoke it."""
    first, second = "0a0a0a0a-0000-4000-8000-000000000001", "0a0a0a0a-0000-4000-8000-000000000002"
    node.create_limit(1)
    monkeypatch.setenv("PREFECT_GPU_POD_UID", first)  # the holder process inherits it
    events = tmp_path / "events.jsonl"
    holder = node.start_holder(events, "--until", str(tmp_path / "never"))
    eventually(lambda: len(entered(events)) == 1, timeout=60, what="holder entered")
    # Published by the holder's keeper thread, off the block's way in.
    eventually(lambda: _published(node.prefect, first, 0) is not None, timeout=5)
    lease = _published(node.prefect, first, 0)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)

    monkeypatch.setenv("PREFECT_GPU_POD_UID", second)
    with gpu_slot(timeout_seconds=5):
        assert node.active_slots() == 1  # the same lease, adopted
        eventually(lambda: _published(node.prefect, second, 0) == lease, timeout=5)
        # Then unpublished under the dead pod: the new record first, so it is never unpublished.
        eventually(lambda: _published(node.prefect, first, 0) is None, timeout=5)
    eventually(lambda: node.active_slots() == 0, timeout=10, what="released after the block")
    with gpu_slot(timeout_seconds=5):  # a new lease on the same slot replaces the record
        eventually(lambda: _published(node.prefect, second, 0) not in (None, lease), timeout=5)
    node.prefect.delete_variable_by_name(_gcl.lease_variable(second, 0))


def test_a_block_in_a_flow_or_task_run_names_the_run_as_its_leases_holder(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's lease holder can name a run only (type and id); the server accepts ours."""
    from prefect import flow, runtime, task
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    node.create_limit(1)
    sent: list[ConcurrencyLeaseHolder | None] = []
    real = _gcl._holder

    def spied() -> ConcurrencyLeaseHolder | None:
        sent.append(real())
        return sent[-1]

    monkeypatch.setattr(_gcl, "_holder", spied)
    runs: list[str] = []

    @task
    def step() -> None:
        runs.append(str(runtime.task_run.id))
        with gpu_slot(timeout_seconds=10):
            pass

    @flow
    def pipeline() -> None:
        runs.append(str(runtime.flow_run.id))
        with gpu_slot(timeout_seconds=10):
            pass
        eventually(lambda: node.active_slots() == 0, timeout=10)  # a fresh lease for the task
        step()

    pipeline()
    assert [(holder.type, str(holder.id)) for holder in sent if holder is not None] == [
        ("flow_run", runs[0]),
        ("task_run", runs[1]),
    ]
    eventually(lambda: node.active_slots() == 0, timeout=10)  # nothing left to adopt
    with gpu_slot(timeout_seconds=10):
        pass
    assert len(sent) == 3
    assert sent[-1] is None  # outside any run: no holder


def test_the_slots_view_names_each_holder_and_waiter(node: Node, tmp_path: Path) -> None:
    """``prefect-gpu-slots``, run on the node as a user would: the two holders of a 2-slot node
    (one a task of a flow run, one a plain process) on their devices, and the third, waiting."""
    from prefect import flow, runtime, task
    from prefect.logging.handlers import APILogWorker

    node.create_limit(2)
    release = tmp_path / "release"
    plain = node.start_holder(tmp_path / "plain.jsonl", "--until", str(release))
    eventually(lambda: entered(tmp_path / "plain.jsonl"), timeout=60, what="the plain holder in")
    runs: dict[str, str] = {}
    inside = threading.Event()

    @task(name="embed-step")
    def step() -> None:
        runs["task_run"] = str(runtime.task_run.id)
        with gpu_slot(timeout_seconds=30):
            inside.set()
            while not release.exists():
                time.sleep(0.01)

    @flow
    def pipeline() -> None:
        runs["flow_run"] = str(runtime.flow_run.id)
        step()

    # In a thread with this test's Prefect settings (a context the thread would not inherit).
    in_flow = threading.Thread(target=contextvars.copy_context().run, args=(pipeline,))
    in_flow.start()
    assert inside.wait(60), "the task's block never entered"
    waiter = node.start_holder(tmp_path / "waiter.jsonl", "--until", str(release))
    try:

        def view() -> list[dict[str, Any]]:
            shown = subprocess.run(
                [SLOTS_CLI, node.worker_id, "--json"], capture_output=True, text=True
            )
            assert shown.returncode == 0, shown.stderr
            (one,) = json.loads(shown.stdout)
            assert len(one["holders"]) == 2, one
            assert len(one["waiters"]) == 1, one
            return [one]

        (seen,) = eventually(view, timeout=60, what="two holders and a waiter in the view")
        assert seen["node"] == node.worker_id
        assert seen["limit"] == 2
        by_pid = {holder["pid"]: holder for holder in seen["holders"]}
        assert plain.pid in by_pid, seen
        assert sorted(h["slot"] for h in seen["holders"]) == [0, 1]
        assert by_pid[plain.pid]["device"] == entered(tmp_path / "plain.jsonl")[0]["devices"][0]
        (ours,) = [h for h in seen["holders"] if h["pid"] == os.getpid()]
        assert (ours["flow_run"], ours["task_run"]) == (runs["flow_run"], runs["task_run"])
        assert ours["task"] == "embed-step"
        assert {by_pid[plain.pid]["device"], ours["device"]} == {"0", "1"}  # one device each
        assert [w["pid"] for w in seen["waiters"]] == [waiter.pid]
        metrics = subprocess.run(
            [SLOTS_CLI, node.worker_id, "--metrics"], capture_output=True, text=True, check=True
        ).stdout
        assert f'prefect_gpu_slots_held{{node="{node.worker_id}"}} 2.0' in metrics
        assert f'prefect_gpu_slots_waiting{{node="{node.worker_id}"}} 1.0' in metrics
    finally:
        release.touch()
        in_flow.join(timeout=60)
        APILogWorker.drain_all(timeout=10)  # the flow run's logs, while the server still runs
    assert waiter.wait(timeout=60) == 0
    assert plain.wait(timeout=30) == 0
    # Every record went with its block.
    shown = subprocess.run([SLOTS_CLI, node.worker_id, "--json"], capture_output=True, text=True)
    (after,) = json.loads(shown.stdout)
    assert after["holders"] == after["waiters"] == []


Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One scrape: each family's type, and each sample's value by name, then by labels (the
    node's label left out: one node is served)."""

    types: dict[str, str]
    samples: dict[str, dict[Labels, float]]

    def __getitem__(self, name: str) -> dict[Labels, float]:
        return self.samples[name]


def _scrape(url: str) -> Scrape:
    """The metrics at ``url``, asked for as Prometheus asks (OpenMetrics)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    response = httpx.get(url, headers={"Accept": "application/openmetrics-text"}, timeout=5)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    scrape = Scrape({}, {})
    for family in text_string_to_metric_families(response.text):
        scrape.types[family.name] = family.type
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node"))
            scrape.samples.setdefault(sample.name, {})[labels] = sample.value
    return scrape


def test_the_slots_metrics_are_served_as_they_are_at_each_scrape(
    node: Node, tmp_path: Path
) -> None:
    """``prefect-gpu-slots --serve``, as the chart's sidecar runs it, beside two real holders of
    a 2-slot node and a third process waiting: each scrape reads the lock directory afresh."""
    node.create_limit(2)
    release = tmp_path / "release"
    first = tmp_path / "first.jsonl"
    second = tmp_path / "second.jsonl"
    node.start_holder(first, "--until", str(release))
    node.start_holder(second, "--until", str(release))
    eventually(lambda: bool(entered(first) and entered(second)), timeout=60, what="both holders in")
    waiter = node.start_holder(tmp_path / "waiter.jsonl", "--until", str(release))
    started_waiting = time.time()
    served = tmp_path / "served.log"
    with served.open("wb") as log:
        server = subprocess.Popen(
            [SLOTS_CLI, node.worker_id, "--serve", "127.0.0.1:0"], stdout=log, stderr=log
        )
    try:

        def address() -> str:
            text = served.read_text()
            assert "/metrics" in text, text
            return text.split()[1]

        url = eventually(
            address, timeout=30, what="the server's address", alive=lambda: server.poll() is None
        )
        assert url.startswith("http://127.0.0.1:")

        def busy() -> Scrape:
            metrics = _scrape(url)
            assert metrics["prefect_gpu_slots_waiting"] == {(): 1}, metrics
            return metrics

        seen = eventually(busy, timeout=60, what="two holders and a waiter in the metrics")
        scraped = time.time()
        assert seen["prefect_gpu_slots_limit"] == {(): 2}
        assert seen["prefect_gpu_slots_held"] == {(): 2}
        assert seen.types["prefect_gpu_slots_waiting_seconds"] == "gaugehistogram"
        assert seen.types["prefect_gpu_slots_held_seconds"] == "gaugehistogram"
        # Each slot held for as long as its holder has been in, by its own record.
        ages = seen["prefect_gpu_slot_held_seconds"]
        assert {dict(labels)["device"] for labels in ages} == {"0", "1"}
        entries = [entered(first)[0]["t"], entered(second)[0]["t"]]
        for age, since in zip(sorted(ages.values()), sorted(entries, reverse=True), strict=True):
            assert scraped - since - 5 <= age <= scraped - since + 0.5
        assert seen["prefect_gpu_slots_held_seconds_gcount"] == {(): 2}
        assert seen["prefect_gpu_slots_held_seconds_gsum"][()] == pytest.approx(sum(ages.values()))
        assert seen["prefect_gpu_slots_held_seconds_bucket"][(("le", "+Inf"),)] == 2
        assert seen["prefect_gpu_slots_waiting_seconds_gcount"] == {(): 1}
        (waited,) = seen["prefect_gpu_slots_longest_wait_seconds"].values()
        assert 0 <= waited <= scraped - started_waiting + 0.5
        assert seen["prefect_gpu_slots_waiting_seconds_gsum"] == {(): waited}
        buckets = seen["prefect_gpu_slots_waiting_seconds_bucket"]
        # The one waiter is in every bucket from the first bound at or above its wait.
        assert all(count == (waited <= float(dict(le)["le"])) for le, count in buckets.items())
        # Read afresh: the same holders, older at the next scrape.
        later = eventually(
            lambda: (
                (m := _scrape(url))["prefect_gpu_slots_held_seconds_gsum"][()]
                > seen["prefect_gpu_slots_held_seconds_gsum"][()]
                and m
            ),
            timeout=10,
            what="held time growing between scrapes",
        )
        assert later["prefect_gpu_slots_held"] == {(): 2}
        release.touch()
        assert waiter.wait(timeout=60) == 0

        def idle() -> None:
            metrics = _scrape(url)
            assert metrics["prefect_gpu_slots_held"] == {(): 0}, metrics
            assert metrics["prefect_gpu_slots_waiting"] == {(): 0}, metrics
            assert metrics["prefect_gpu_slots_held_seconds_gcount"] == {(): 0}, metrics
            assert "prefect_gpu_slot_held_seconds" not in metrics.samples, metrics

        eventually(idle, timeout=30, what="no holder and no waiter once released")
    finally:
        release.touch()
        server.send_signal(signal.SIGTERM)
        returncode = server.wait(timeout=10)
    assert returncode == 0, served.read_text()
