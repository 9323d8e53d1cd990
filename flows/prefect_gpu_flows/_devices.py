"""Which devices a gpu_slot() block may hold: read from the container's environment, pure and
stdlib-only (the GPU check uses it where Prefect is not installed).

The container's devices come from, in order:

1. ``NVIDIA_VISIBLE_DEVICES``, as NVIDIA's container runtime and device plugin set it: GPU or MIG
   UUIDs (the plugin's default), host indices (the container numbers its devices 0..n-1, so
   index ``k`` of the list is CUDA's ``k`` there), ``all`` (go on to the next source), or
   ``none``/``void``/empty (no GPU in this container);
2. ``CUDA_VISIBLE_DEVICES``: indices or UUIDs; like CUDA, the list stops at the first entry that
   is neither, and empty means no device;
3. NVML (``nvidia-ml-py``, when installed and a driver answers): every GPU's UUID, or the UUIDs
   of its MIG devices when MIG is on;
4. none of these: the devices are unknown and slot ``i`` is device ``i`` (a CPU-only machine).

Slot ``i`` of the node's limit is device ``i mod n``, so with ``slots_per_device`` > 1
(time-sliced or MPS GPUs) consecutive slots go to different devices first. A device's *name* is
what ``CUDA_VISIBLE_DEVICES`` takes to show a process exactly that device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "DeviceError",
    "Devices",
    "is_mig",
    "same_device",
]

NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z/-]+")
_INDEX = re.compile(r"\d+")
_MIG_BY_INDEX = re.compile(r"\d+:\d+")  # the container runtime's <gpu>:<mig> form


class DeviceError(ValueError):
    """The container's devices cannot serve the request or the node's limit as configured."""


def is_mig(name: str) -> bool:
    return name.startswith("MIG-")


def same_device(a: str, b: str) -> bool:
    """Whether two UUID spellings name one device (CUDA reports UUIDs without their prefix)."""
    return _bare(a) == _bare(b)


def _bare(name: str) -> str:
    return name.lower().removeprefix("gpu-").removeprefix("mig-")


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    # A device listed twice (time-slicing replicas of one GPU) is still one device.
    return tuple(dict.fromkeys(names))


def _nvidia(value: str) -> tuple[str, ...] | None:
    """NVIDIA_VISIBLE_DEVICES as CUDA names the devices inside the container; None for ``all``."""
    value = value.strip()
    if value.lower() == "all":
        return None
    if value.lower() in ("", "none", "void"):
        return ()
    tokens = [token.strip() for token in value.split(",")]
    for token in tokens:
        if _MIG_BY_INDEX.fullmatch(token):
            raise DeviceError(
                f"{NVIDIA_VISIBLE_DEVICES}={value!r} names MIG device {token!r} by index; CUDA "
                "can be pinned to a MIG device only by its UUID (MIG-...): run NVIDIA's device "
                "plugin with its default deviceIDStrategy=uuid"
            )
        if not (_UUID.fullmatch(token) or _INDEX.fullmatch(token)):
            raise DeviceError(f"{NVIDIA_VISIBLE_DEVICES}={value!r}: {token!r} is not a device")
    if all(_INDEX.fullmatch(token) for token in tokens):
        # Host indices: the container shows those GPUs as 0..n-1.
        return tuple(str(ordinal) for ordinal in range(len(_unique(tokens))))
    if any(_INDEX.fullmatch(token) for token in tokens):
        raise DeviceError(f"{NVIDIA_VISIBLE_DEVICES}={value!r} mixes indices and UUIDs")
    return _unique(tokens)


def _cuda(value: str) -> tuple[str, ...]:
    names = []
    for token in (token.strip() for token in value.split(",")):
        if not (_UUID.fullmatch(token) or _INDEX.fullmatch(token)):
            break  # CUDA ignores an invalid entry and every entry after it
        names.append(token)
    return _unique(names)


def visible(
    environ: Mapping[str, str], nvml: Callable[[], Sequence[str] | None]
) -> tuple[tuple[str, ...] | None, str]:
    """The devices this container can use (None: unknown) and where that came from."""
    nvidia = environ.get(NVIDIA_VISIBLE_DEVICES)
    if nvidia is not None:
        names = _nvidia(nvidia)
        if names is not None:
            return names, f"{NVIDIA_VISIBLE_DEVICES}={nvidia}"
    cuda = environ.get(CUDA_VISIBLE_DEVICES)
    if cuda is not None:
        return _cuda(cuda), f"{CUDA_VISIBLE_DEVICES}={cuda}"
    found = nvml()
    if found is not None:
        return _unique(found), "NVML"
    return None, "no device list (no NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES or NVML)"


@dataclass(frozen=True)
class Devices:
    """The devices gpu_slot() hands out on this container, and how many slots each takes."""

    names: tuple[str, ...] | None
    """In slot order; None when unknown: slot ``i`` is then device ``str(i)``."""
    source: str
    slots_per_device: int | None = 1
    """None: as many as the limit gives (the older ``PREFECT_GPU_DEVICE_COUNT`` setting)."""

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str],
        nvml: Callable[[], Sequence[str] | None],
        slots_per_device: int | None = 1,
        device_count: int | None = None,
    ) -> Devices:
        """``device_count``: use only the first that many devices (the older setting)."""
        if slots_per_device is not None and slots_per_device < 1:
            raise DeviceError(f"slots per device must be at least 1, not {slots_per_device}")
        names, source = visible(environ, nvml)
        if device_count is not None:
            if device_count < 1:
                raise DeviceError(f"the device count must be at least 1, not {device_count}")
            if names is None:
                names = tuple(str(ordinal) for ordinal in range(device_count))
            elif device_count > len(names):
                raise DeviceError(
                    f"PREFECT_GPU_DEVICE_COUNT={device_count}, but this container sees "
                    f"{len(names)} device(s) ({source})"
                )
            names = names[:device_count]
        return cls(names, source, slots_per_device)

    @property
    def mig(self) -> bool:
        return self.names is not None and any(is_mig(name) for name in self.names)

    @property
    def capacity(self) -> int | None:
        """The most slots these devices can serve; None when there is no bound."""
        if self.names is None or self.slots_per_device is None:
            return None
        return len(self.names) * self.slots_per_device

    def of_slot(self, slot: int) -> str:
        if self.names is None:
            return str(slot)
        if not self.names:
            raise DeviceError(f"this container has no device ({self.source})")
        return self.names[slot % len(self.names)]

    def check_request(self, gpus: int) -> None:
        """Refuse a request no limit can serve here."""
        if gpus < 1:
            raise DeviceError(f"gpus must be at least 1, not {gpus}")
        if gpus > 1 and self.mig:
            raise DeviceError(
                f"gpus={gpus} on MIG devices ({self.source}): CUDA shows a process one MIG "
                "device only, so each MIG device serves one gpu_slot(gpus=1) block at a time"
            )
        if self.names is not None and gpus > len(self.names):
            raise DeviceError(
                f"gpus={gpus}, but this container sees {len(self.names)} device(s) ({self.source})"
            )

    def check_limit(self, limit_name: str, limit: int) -> None:
        """Refuse a limit larger than these devices can serve: its extra slots have no device."""
        if self.names is None or self.slots_per_device is None:
            return
        capacity = len(self.names) * self.slots_per_device
        if limit <= capacity:
            return
        raise DeviceError(
            f"limit {limit_name!r} is {limit}, but this container can serve only {capacity} "
            f"slot(s): {len(self.names)} device(s) ({self.source}) x {self.slots_per_device} "
            f"slot(s) per device (PREFECT_GPU_SLOTS_PER_DEVICE). Give the node's Prefect worker "
            f"all of the node's GPUs (one worker per GPU node), or set "
            f"PREFECT_GPU_SLOTS_PER_DEVICE to the GPUs' time-slicing or MPS replicas"
        )
