"""The server-free parts of gpu_slot(): configuration, leases, node-local lock files."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import cast
from uuid import uuid4

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

from prefect_gpu_flows import (
    GpuDeviceError,
    GpuLease,
    GpuSlotError,
    MissingWorkerIdError,
    SlotConfig,
    _gcl,
    _keeper,
    get_worker_id,
)
from prefect_gpu_flows._locks import (
    Cancelled,
    Doorbell,
    LeaseRecord,
    LimitReading,
    SlotFile,
    lock_wait,
    read_reading,
    ring,
    try_lock,
    unlock,
    write_reading,
)

_ENV = (
    "PREFECT_GPU_LIMIT_TEMPLATE",
    "PREFECT_GPU_LIMIT_PREFIX",
    "PREFECT_GPU_LOCK_DIR",
    "PREFECT_GPU_DEVICE_COUNT",
    "PREFECT_GPU_SLOTS_PER_DEVICE",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_ENV, "PREFECT_GPU_LEASE_SECONDS", "WORKER_ID"):
        monkeypatch.delenv(name, raising=False)


def test_worker_id_missing_or_blank_explains_how_to_set_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for value in (None, "  "):
        if value is not None:
            monkeypatch.setenv("WORKER_ID", value)
        with pytest.raises(MissingWorkerIdError, match=r"export WORKER_ID=<node-name>"):
            get_worker_id()


def test_config_defaults_follow_prefect_per_worker_example(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_ID", "gpu-1")
    config = SlotConfig.from_env()
    assert config.limit_name == "gpu:gpu-1"
    assert config.lock_dir == Path("/tmp/prefect-gpu-locks/gpu-1")
    assert config.lease_seconds == 600  # renewed half-way: 0.2 requests per minute per slot
    assert config.pod_uid is None  # no pod known: leases are not published
    # No device list on this machine (no NVIDIA runtime, no NVML): slots number the devices.
    assert [config.device_of(slot) for slot in range(3)] == ["0", "1", "2"]
    config.check_limit(100)  # nothing to check it against


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_ID", "node-a.example.com")
    monkeypatch.setenv("PREFECT_GPU_LIMIT_TEMPLATE", "{node}-gpu")
    monkeypatch.setenv("PREFECT_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-a1,GPU-b2")
    monkeypatch.setenv("PREFECT_GPU_SLOTS_PER_DEVICE", "2")  # time-sliced: 2 GPUs, 2 slots each
    monkeypatch.setenv("PREFECT_GPU_LEASE_SECONDS", "120")
    monkeypatch.setenv("PREFECT_GPU_POD_UID", " 5C1D2E3F-0000-4000-8000-00000000AB12 ")
    config = SlotConfig.from_env()
    assert config.pod_uid == "5c1d2e3f-0000-4000-8000-00000000ab12"  # a variable name's case
    assert config.limit_name == "node-a.example.com-gpu"  # a policy's limitNameTemplate
    assert config.lock_dir == tmp_path / "node-a.example.com"
    assert config.lease_seconds == 120
    assert [config.device_of(slot) for slot in range(4)] == ["GPU-a1", "GPU-b2"] * 2
    config.check_limit(4)
    with pytest.raises(GpuDeviceError, match=r"is 5, but this container can serve only 4 slot"):
        config.check_limit(5)


def test_the_older_device_count_still_shares_devices_without_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_ID", "n")
    monkeypatch.setenv("PREFECT_GPU_DEVICE_COUNT", "2")  # limit 4 on 2 GPUs, as it used to
    config = SlotConfig.from_env()
    assert [config.device_of(slot) for slot in range(4)] == ["0", "1", "0", "1"]
    config.check_limit(4)
    monkeypatch.setenv("PREFECT_GPU_SLOTS_PER_DEVICE", "1")  # both: the new bound applies
    with pytest.raises(GpuDeviceError, match=r"is 4, .* only 2 slot\(s\): 2 device\(s\)"):
        SlotConfig.from_env().check_limit(4)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("PREFECT_GPU_SLOTS_PER_DEVICE", "two", "not a whole number"),
        ("PREFECT_GPU_SLOTS_PER_DEVICE", "0", "at least 1"),
        ("PREFECT_GPU_DEVICE_COUNT", "0", "at least 1"),
        ("NVIDIA_VISIBLE_DEVICES", "0:1", "by its UUID"),
    ],
)
def test_device_settings_that_cannot_work_are_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    monkeypatch.setenv("WORKER_ID", "n")
    monkeypatch.setenv(name, value)
    with pytest.raises(GpuDeviceError, match=problem):
        SlotConfig.from_env()


def test_the_older_prefix_setting_still_names_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ID", "n")
    monkeypatch.setenv("PREFECT_GPU_LIMIT_PREFIX", "inference:")
    assert SlotConfig.from_env().limit_name == "inference:n"
    monkeypatch.setenv("PREFECT_GPU_LIMIT_TEMPLATE", "team-a:{node}")  # the template wins
    assert SlotConfig.from_env().limit_name == "team-a:n"


@pytest.mark.parametrize(
    ("template", "problem"),
    [("gpu", "must contain {node}"), ("gpu/{node}", "must not contain /")],
)
def test_an_invalid_template_says_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, template: str, problem: str
) -> None:
    monkeypatch.setenv("WORKER_ID", "n")
    monkeypatch.setenv("PREFECT_GPU_LIMIT_TEMPLATE", template)
    with pytest.raises(GpuSlotError, match=problem):
        SlotConfig.from_env()


def test_a_worker_id_prefect_cannot_name_is_an_error() -> None:
    with pytest.raises(GpuSlotError, match="WORKER_ID='a/b'"):
        _ = SlotConfig("a/b").limit_name


def test_lease_devices_without_cuda() -> None:
    lease = GpuLease("gpu:n", ("GPU-a1", "GPU-b2"), pinned=True, cuda_index=0)
    assert lease.torch_device == "cpu"  # torch is not installed in the test environment
    assert lease.env == {"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}
    assert lease.cuda_visible_devices == "GPU-a1,GPU-b2"


def test_slot_lock_is_exclusive_across_descriptors(tmp_path: Path) -> None:
    first = SlotFile(tmp_path, 0)
    assert first.try_lock()
    assert not SlotFile(tmp_path, 0).try_lock()
    assert SlotFile(tmp_path, 1).try_lock()
    first.unlock()
    assert SlotFile(tmp_path, 0).try_lock()


def test_slot_record_round_trip_and_torn_records(tmp_path: Path) -> None:
    slot = SlotFile(tmp_path, 0)
    assert slot.try_lock()
    assert slot.read() is None
    record = LeaseRecord(uuid4(), uuid4(), time.time() + 60)
    slot.write(record)
    assert slot.read() == record
    published = LeaseRecord(uuid4(), uuid4(), time.time() + 60, pod="5c1d2e3f")
    slot.write(published)
    assert slot.read() == published
    slot.write(LeaseRecord(uuid4(), uuid4(), 1.0))  # a shorter record replaces it entirely
    shorter = slot.read()
    assert shorter is not None
    assert shorter != record
    assert shorter.pod is None
    slot.write(None)
    assert slot.read() is None
    slot.path.write_text('{"lease_id": "not-a-uuid"')
    assert slot.read() is None
    slot.unlock()


def test_the_gate_keeps_the_last_reading_of_the_limit(tmp_path: Path) -> None:
    gate = try_lock(tmp_path / "gate.lock")
    assert gate is not None
    assert read_reading(gate) is None
    reading = LimitReading("gpu:n", uuid4(), 4, time.time())
    write_reading(gate, reading)
    assert read_reading(gate) == reading
    write_reading(gate, LimitReading("gpu:n", uuid4(), 0, 1.0))  # a shorter one replaces it
    assert read_reading(gate) != reading
    (tmp_path / "gate.lock").write_text('{"name": "gpu:n", "limit": "x"}')
    assert read_reading(gate) is None
    unlock(gate)


def test_lock_wait_times_out_and_cancels_without_keeping_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "gate.lock"
    held = try_lock(path)
    assert held is not None
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        lock_wait(path, time.monotonic() + 0.2, None)
    assert time.monotonic() - start < 1

    cancelled = threading.Event()
    threading.Timer(0.1, cancelled.set).start()
    with pytest.raises(Cancelled):
        lock_wait(path, None, cancelled)

    unlock(held)
    # The abandoned helper threads got the lock and dropped it again.
    deadline = time.monotonic() + 2
    while (fd := try_lock(path)) is None:
        assert time.monotonic() < deadline, "an abandoned waiter kept the lock"
        time.sleep(0.01)
    unlock(fd)


def test_lock_wait_wakes_when_released(tmp_path: Path) -> None:
    path = tmp_path / "gate.lock"
    held = try_lock(path)
    assert held is not None
    threading.Timer(0.1, unlock, args=(held,)).start()
    start = time.monotonic()
    fd = lock_wait(path, time.monotonic() + 5, None)
    assert time.monotonic() - start < 1
    unlock(fd)


def test_a_ring_wakes_the_head_at_once_and_only_a_ring_does(tmp_path: Path) -> None:
    ring(tmp_path)  # no head waits: nothing happens
    bell = Doorbell.open(tmp_path)
    assert bell is not None
    try:
        threading.Timer(0.05, ring, args=(tmp_path,)).start()
        start = time.monotonic()
        bell.wait(5)
        assert time.monotonic() - start < 2
        # The ringer has closed its end: the bell must not read as closed and wake at once.
        start = time.monotonic()
        bell.wait(0.3)
        assert time.monotonic() - start >= 0.3
        for _ in range(3):
            ring(tmp_path)
        bell.wait(5)  # one wake covers rings that came before it
        start = time.monotonic()
        bell.wait(0.2)
        assert time.monotonic() - start >= 0.2
    finally:
        bell.close()


class _RefusingClient:
    """Answers a lease release with ``status``, recording the client retries then in effect."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.retries_seen: list[int] = []

    def release_concurrency_slots_with_lease(self, lease_id: object) -> None:
        self.retries_seen.append(PREFECT_CLIENT_MAX_RETRIES.value())
        request = httpx.Request("POST", "http://prefect/api/v2/concurrency_limits/decrement")
        response = httpx.Response(self.status, request=request)
        if self.status >= 400:
            raise httpx.HTTPStatusError("refused", request=request, response=response)


@pytest.mark.parametrize(
    ("status", "released"),
    [(204, True), (404, True), (410, True), (409, False), (500, False), (503, False)],
)
def test_release_maps_refusals_and_never_retries(status: int, released: bool) -> None:
    """409 (SQLite) and 503 (PostgreSQL) are Prefect 3.9's refusal at limit 0: keep the lease,
    without the client's minute of backoff on 5xx."""
    prefect = _RefusingClient(status)
    assert _gcl.release(prefect, uuid4()) is released  # type: ignore[arg-type]
    assert _gcl.release(prefect, uuid4()) is released  # type: ignore[arg-type]
    assert prefect.retries_seen == [0, 0]  # also when the settings are reused
    assert PREFECT_CLIENT_MAX_RETRIES.value() != 0  # only for that call


class _UnreachableClient:
    def release_concurrency_slots_with_lease(self, lease_id: object) -> None:
        raise httpx.ConnectError("[Errno 111] Connection refused")


def test_an_unreachable_server_keeps_the_lease_for_later() -> None:
    """A release during an outage must not fail the task that happened to make it."""
    assert _gcl.release(_UnreachableClient(), uuid4()) is False  # type: ignore[arg-type]


def test_release_raises_other_errors() -> None:
    with pytest.raises(httpx.HTTPStatusError):
        _gcl.release(_RefusingClient(401), uuid4())  # type: ignore[arg-type]


class _Publishing:
    """``_gcl.register`` and ``_gcl.release`` without a server: each publication blocks until
    ``finish`` is set, and every call is recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.finish = threading.Event()
        self.published: list[str] = []
        monkeypatch.setattr(_gcl, "register", self.register)
        monkeypatch.setattr(_gcl, "release", lambda prefect, lease_id: True)

    def register(self, prefect: object, name: str, lease_id: object, limit_name: str) -> bool:
        self.started.set()
        assert self.finish.wait(5)
        self.published.append(name)
        return True


def _settled(keeper: _keeper._Keeper) -> None:
    """Wait until the keeper released the leases left to it (through the fakes, while they are
    still in place)."""
    deadline = time.monotonic() + 5
    while keeper._left and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not keeper._left


def _held_slot(tmp_path: Path) -> tuple[SlotFile, LeaseRecord]:
    slot = SlotFile(tmp_path, 0)
    assert slot.try_lock()
    record = LeaseRecord(uuid4(), uuid4(), time.time() + 600)
    slot.write(record)
    return slot, record


def _held_and_published(
    tmp_path: Path,
) -> tuple[_keeper._Keeper, SlotFile, LeaseRecord, _keeper.Publication]:
    """A keeper holding a slot of pod ``pod-a``, its lease to be published."""
    keeper = _keeper._Keeper()
    slot, record = _held_slot(tmp_path)
    publication = _keeper.Publication("pod-a", "gpu:n", None)
    keeper.hold(slot, record, 600, cast(SyncPrefectClient, object()), publication)
    return keeper, slot, record, publication


def test_a_leaving_holder_waits_for_its_leases_publication_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise a publication landing after the slot's next lease was published would name the
    older lease, and the pod's death would not free the slot."""
    publishing = _Publishing(monkeypatch)
    keeper, slot, record, _ = _held_and_published(tmp_path)
    assert publishing.started.wait(5)
    leaving = threading.Thread(target=keeper.leave, args=(slot, record.lease_id))
    leaving.start()
    leaving.join(0.2)
    assert leaving.is_alive()  # waits while the publication is in flight
    assert slot.fd is not None
    publishing.finish.set()
    leaving.join(5)
    assert not leaving.is_alive()
    assert publishing.published == [_gcl.lease_variable("pod-a", 0)]
    _settled(keeper)


def test_a_block_shorter_than_the_publish_delay_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publishing = _Publishing(monkeypatch)
    publishing.finish.set()
    keeper, slot, record, publication = _held_and_published(tmp_path)
    keeper.leave(slot, record.lease_id)  # at once: its lease goes to the next claimant, if any
    time.sleep(_keeper.PUBLISH_DELAY * 3)
    assert publication.state == "dropped"
    assert publishing.published == []
    _settled(keeper)


def test_a_published_lease_names_its_pod_on_the_slot_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publishing = _Publishing(monkeypatch)
    publishing.finish.set()
    keeper, slot, record, publication = _held_and_published(tmp_path)
    deadline = time.monotonic() + 5
    while publication.state != "done" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slot.read() == LeaseRecord(record.lease_id, record.limit_id, record.expires, "pod-a")
    keeper.leave(slot, record.lease_id)
    _settled(keeper)
