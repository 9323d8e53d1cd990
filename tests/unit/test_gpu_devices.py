"""Which devices gpu_slot() hands out, and how a block pins them: the stdlib-only parts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from prefect_gpu_flows import _cuda
from prefect_gpu_flows._cuda import pinned, unpinned_environ, walk_nvml
from prefect_gpu_flows._devices import DeviceError, Devices, same_device, visible

UUID_A = "GPU-8a1b2c3d-0000-1111-2222-333344445555"
UUID_B = "GPU-9f8e7d6c-0000-1111-2222-333344445555"
MIG_A = "MIG-1d2e3f40-aaaa-bbbb-cccc-ddddeeeeffff"
MIG_B = "MIG-5a6b7c80-aaaa-bbbb-cccc-ddddeeeeffff"


def no_nvml() -> Sequence[str] | None:
    return None


def never_nvml() -> Sequence[str] | None:
    pytest.fail("NVML asked although the environment names the devices")


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"NVIDIA_VISIBLE_DEVICES": f"{UUID_A},{UUID_B}"}, (UUID_A, UUID_B)),
        # Time-slicing: the device plugin repeats a GPU once per replica.
        ({"NVIDIA_VISIBLE_DEVICES": f"{UUID_A},{UUID_A},{UUID_B}"}, (UUID_A, UUID_B)),
        # Host indices: the container shows those GPUs as 0..n-1.
        ({"NVIDIA_VISIBLE_DEVICES": "2,3"}, ("0", "1")),
        ({"NVIDIA_VISIBLE_DEVICES": f" {MIG_A} ,{MIG_B}"}, (MIG_A, MIG_B)),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, ()),
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, ()),
        ({"NVIDIA_VISIBLE_DEVICES": ""}, ()),
        # The container's list wins over CUDA's, as the NVIDIA runtime made the container so.
        ({"NVIDIA_VISIBLE_DEVICES": UUID_A, "CUDA_VISIBLE_DEVICES": "0,1"}, (UUID_A,)),
        ({"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "1,0"}, ("1", "0")),
        ({"CUDA_VISIBLE_DEVICES": f"{UUID_B}"}, (UUID_B,)),
        ({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, ("1",)),  # CUDA stops at an invalid entry
        ({"CUDA_VISIBLE_DEVICES": ""}, ()),
    ],
)
def test_the_environment_names_the_devices(environ: dict[str, str], names: tuple[str]) -> None:
    found, source = visible(environ, never_nvml)
    assert found == names
    assert source.startswith(("NVIDIA_VISIBLE_DEVICES=", "CUDA_VISIBLE_DEVICES="))


def test_nvml_then_nothing_when_the_environment_does_not_say() -> None:
    assert visible({"NVIDIA_VISIBLE_DEVICES": "all"}, lambda: [UUID_B, UUID_A]) == (
        (UUID_B, UUID_A),
        "NVML",
    )
    found, source = visible({}, no_nvml)
    assert found is None
    assert "no device list" in source


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0:1", "by its UUID"),
        (f"0,{UUID_A}", "mixes indices and UUIDs"),
        ("gpu0", "'gpu0' is not a device"),
    ],
)
def test_device_lists_gpu_slot_cannot_pin_are_errors(value: str, problem: str) -> None:
    with pytest.raises(DeviceError, match=problem):
        visible({"NVIDIA_VISIBLE_DEVICES": value}, never_nvml)


def test_slots_go_round_the_devices_and_a_larger_limit_is_an_error() -> None:
    devices = Devices.from_environment(
        {"NVIDIA_VISIBLE_DEVICES": f"{UUID_A},{UUID_B}"}, never_nvml, slots_per_device=2
    )
    assert [devices.of_slot(slot) for slot in range(4)] == [UUID_A, UUID_B, UUID_A, UUID_B]
    assert devices.capacity == 4
    devices.check_limit("gpu:n", 4)
    with pytest.raises(DeviceError) as error:
        devices.check_limit("gpu:n", 5)
    message = str(error.value)
    assert "limit 'gpu:n' is 5" in message
    assert "only 4 slot(s): 2 device(s)" in message
    assert "x 2 slot(s) per device" in message


def test_a_container_without_gpus_serves_no_slot() -> None:
    devices = Devices.from_environment({"NVIDIA_VISIBLE_DEVICES": "void"}, never_nvml)
    devices.check_limit("gpu:n", 0)
    with pytest.raises(DeviceError, match=r"is 1, but .* only 0 slot\(s\): 0 device\(s\)"):
        devices.check_limit("gpu:n", 1)
    with pytest.raises(DeviceError, match="no device"):
        devices.of_slot(0)


def test_unknown_devices_are_numbered_by_slot_without_a_bound() -> None:
    devices = Devices.from_environment({}, no_nvml)
    assert [devices.of_slot(slot) for slot in range(3)] == ["0", "1", "2"]
    assert devices.capacity is None
    devices.check_limit("gpu:n", 64)
    devices.check_request(8)


def test_the_older_device_count_takes_the_first_devices() -> None:
    unknown = Devices.from_environment({}, no_nvml, slots_per_device=None, device_count=2)
    assert [unknown.of_slot(slot) for slot in range(3)] == ["0", "1", "0"]
    assert unknown.capacity is None
    environ = {"CUDA_VISIBLE_DEVICES": "3,1,2"}
    listed = Devices.from_environment(environ, never_nvml, slots_per_device=None, device_count=2)
    assert listed.names == ("3", "1")
    with pytest.raises(DeviceError, match=r"PREFECT_GPU_DEVICE_COUNT=4, but .* sees 3 device"):
        Devices.from_environment(environ, never_nvml, device_count=4)


def test_mig_devices_serve_one_gpu_per_block() -> None:
    devices = Devices.from_environment({"NVIDIA_VISIBLE_DEVICES": f"{MIG_A},{MIG_B}"}, never_nvml)
    assert devices.mig
    devices.check_request(1)
    with pytest.raises(DeviceError, match=r"gpus=2 on MIG devices \(.*\): CUDA shows a process"):
        devices.check_request(2)


def test_a_request_for_more_devices_than_the_container_has_is_an_error() -> None:
    devices = Devices.from_environment({"NVIDIA_VISIBLE_DEVICES": UUID_A}, never_nvml)
    with pytest.raises(DeviceError, match=r"gpus=2, but this container sees 1 device"):
        devices.check_request(2)
    with pytest.raises(DeviceError, match="at least 1"):
        devices.check_request(0)


def test_uuid_spellings_of_one_device_match() -> None:
    assert same_device(UUID_A, UUID_A.lower().removeprefix("GPU-"))
    assert same_device("mig-" + MIG_A.removeprefix("MIG-").upper(), MIG_A)
    assert not same_device(UUID_A, UUID_B)


class _Nvml(SimpleNamespace):
    """The few pynvml calls walk_nvml makes, over a made-up machine."""

    class NVMLError(Exception):
        pass

    NVML_DEVICE_MIG_ENABLE = 1


def test_nvml_lists_gpus_and_the_mig_devices_of_mig_gpus() -> None:
    gpus: dict[int, dict[str, Any]] = {
        0: {"uuid": UUID_A.encode(), "mig": None},  # older bindings return bytes
        1: {"uuid": "GPU-parent", "mig": {0: MIG_A, 2: MIG_B}},  # slot 1 is empty
        2: {"uuid": UUID_B, "mig": {}},  # MIG-capable, MIG off
    }

    def mig_mode(gpu: int) -> tuple[int, int]:
        if gpus[gpu]["mig"] is None:
            raise _Nvml.NVMLError("not supported")
        return (1 if gpus[gpu]["mig"] else 0), 0

    def mig_device(gpu: int, slot: int) -> str:
        if slot not in gpus[gpu]["mig"]:
            raise _Nvml.NVMLError("not found")
        return str(gpus[gpu]["mig"][slot])

    nvml = _Nvml(
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda gpu: 3,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_device,
        nvmlDeviceGetUUID=lambda handle: (
            handle if isinstance(handle, str) else gpus[handle]["uuid"]
        ),
    )
    assert walk_nvml(nvml) == (UUID_A, MIG_A, MIG_B, UUID_B)


def test_without_nvidia_ml_py_nvml_says_nothing() -> None:
    assert _cuda.nvml_devices() is None  # not installed here


# ## Pinning


@pytest.fixture
def clean_cuda_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    assert _cuda._owner is None, "a pin outlived its block"


@pytest.mark.usefixtures("clean_cuda_env")
@pytest.mark.parametrize("before", [None, "0,1"])
def test_a_block_names_exactly_its_devices_and_restores_the_variable(
    monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    if before is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
    with pinned((UUID_B,)) as pin:
        assert pin.pinned
        assert pin.reason is None
        assert pin.index == 0
        assert os.environ["CUDA_VISIBLE_DEVICES"] == UUID_B
        assert unpinned_environ().get("CUDA_VISIBLE_DEVICES") == before  # for the next block
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == UUID_B  # an inheriting child sees the pin too
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


@pytest.mark.usefixtures("clean_cuda_env")
def test_only_one_block_at_a_time_pins_the_process() -> None:
    first_in, second_done = threading.Event(), threading.Event()
    seen: list[_cuda.Pin] = []

    def second() -> None:
        first_in.wait(5)
        with pinned((UUID_B,)) as pin:
            seen.append(pin)
            assert os.environ["CUDA_VISIBLE_DEVICES"] == UUID_A  # untouched: the first's
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    with pinned((UUID_A,)) as pin:
        assert pin.pinned
        first_in.set()
        assert second_done.wait(5)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == UUID_A  # the second left it alone
    thread.join()
    (other,) = seen
    assert not other.pinned
    assert other.index is None
    assert other.reason is not None
    assert "another gpu_slot() block in this process has pinned CUDA" in other.reason
    assert UUID_A in other.reason
    assert UUID_B in other.reason
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with pinned((UUID_B,)) as pin:  # free again
        assert pin.pinned


def test_cuda_is_not_initialised_in_this_process() -> None:
    """The probe answers without loading or initialising libcuda (none on this machine)."""
    assert _cuda.initialised_devices() is None


@pytest.mark.usefixtures("clean_cuda_env")
@pytest.mark.parametrize(
    ("seen", "held", "is_pinned", "index"),
    [
        ((UUID_A.lower(),), (UUID_A,), True, 0),  # already on exactly the held device
        ((UUID_A, UUID_B), (UUID_B,), False, 1),  # sees it, and another one too
        ((UUID_A,), (UUID_B,), False, None),  # cannot reach it at all
        ((), (UUID_B,), False, None),  # initialised with no device
    ],
)
def test_cuda_initialised_before_the_block_is_reported(
    monkeypatch: pytest.MonkeyPatch,
    seen: tuple[str, ...],
    held: tuple[str, ...],
    is_pinned: bool,
    index: int | None,
) -> None:
    monkeypatch.setattr(_cuda, "initialised_devices", lambda: seen)
    with pinned(held) as pin:
        assert pin.pinned is is_pinned
        assert pin.index == index
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(held)  # for child processes
    if not is_pinned:
        assert pin.reason is not None
        assert "CUDA was initialised in this process before the block" in pin.reason
        assert (", ".join(seen) or "no device") in pin.reason


def test_the_device_modules_need_only_the_standard_library() -> None:
    """The GPU check imports them where Prefect is not installed."""
    probe = (
        "import sys\n"
        "sys.modules['prefect'] = None  # any import of it fails\n"
        "import prefect_gpu_flows._devices, prefect_gpu_flows._cuda, prefect_gpu_flows._locks\n"
        "ours = ('prefect_gpu_flows', '__main__', '_distutils_hack')\n"
        "print([m for m, module in sys.modules.items() if module is not None\n"
        "       and m.split('.')[0] not in sys.stdlib_module_names\n"
        "       and not m.startswith(ours) and not m.startswith('__editable__')])\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]", found.stdout
