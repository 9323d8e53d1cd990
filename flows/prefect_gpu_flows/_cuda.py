"""This process and CUDA: pinning a block's devices through ``CUDA_VISIBLE_DEVICES``, telling
whether CUDA was already initialised (it reads that variable once), and NVML's device list.
Stdlib-only, like ``_devices``: ``nvidia-ml-py`` and ``libcuda`` are used when present, never
required.

One environment per process: only one block at a time pins it. A block that opens while another
one holds the pin, or after CUDA was initialised on other devices, is not pinned and says why;
its step should run in a child process given ``lease.env``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect_gpu_flows._devices import CUDA_VISIBLE_DEVICES, same_device

__all__ = ["Pin", "initialised_devices", "nvml_devices", "pinned", "unpinned_environ"]


@dataclass(frozen=True)
class Pin:
    """What a block's CUDA in this process sees."""

    pinned: bool
    """CUDA in this process shows exactly the block's devices (its ``cuda:0`` is the first)."""
    reason: str | None
    """Why not, when not pinned."""
    index: int | None
    """Where this process's CUDA shows the block's first device: 0 when pinned; None when it
    cannot reach it (or cannot tell)."""


_lock = threading.Lock()
_owner: object | None = None  # the block whose devices CUDA_VISIBLE_DEVICES names now
_before: str | None = None  # CUDA_VISIBLE_DEVICES before that block pinned it (None: unset)


def unpinned_environ() -> Mapping[str, str]:
    """The environment as it is outside any block: the devices this process may hand out."""
    with _lock:
        if _owner is None:
            return dict(os.environ)
        environ = dict(os.environ)
        if _before is None:
            environ.pop(CUDA_VISIBLE_DEVICES, None)
        else:
            environ[CUDA_VISIBLE_DEVICES] = _before
        return environ


@contextmanager
def pinned(devices: Sequence[str]) -> Iterator[Pin]:
    """Name exactly ``devices`` in ``CUDA_VISIBLE_DEVICES`` for the block, then restore it."""
    global _owner, _before
    token = object()
    wanted = ",".join(devices)
    with _lock:
        if _owner is not None:
            pin = Pin(
                False,
                f"another gpu_slot() block in this process has pinned CUDA to "
                f"{os.environ.get(CUDA_VISIBLE_DEVICES)!r} (threads and tasks share one "
                f"environment); this block holds {wanted!r}",
                None,
            )
        else:
            pin = _check_initialised(devices)
            _owner, _before = token, os.environ.get(CUDA_VISIBLE_DEVICES)
            os.environ[CUDA_VISIBLE_DEVICES] = wanted  # also for children that inherit it
    try:
        yield pin
    finally:
        with _lock:
            if _owner is token:
                if _before is None:
                    os.environ.pop(CUDA_VISIBLE_DEVICES, None)
                else:
                    os.environ[CUDA_VISIBLE_DEVICES] = _before
                _owner, _before = None, None


def _check_initialised(devices: Sequence[str]) -> Pin:
    seen = initialised_devices()
    if seen is None:
        return Pin(True, None, 0)  # CUDA will read the pinned variable when first used
    if len(seen) == len(devices) and all(map(same_device, seen, devices)):
        return Pin(True, None, 0)  # already on exactly these devices (an earlier block's)
    index = next((i for i, name in enumerate(seen) if same_device(name, devices[0])), None)
    return Pin(
        False,
        f"CUDA was initialised in this process before the block and sees "
        f"{', '.join(seen) or 'no device'}; it read CUDA_VISIBLE_DEVICES then and will not "
        f"again, so this block's {', '.join(devices)} cannot be pinned",
        index,
    )


# ## Is CUDA initialised here?
#
# The driver API answers without initialising anything: cuDeviceGetCount returns
# CUDA_ERROR_NOT_INITIALIZED until someone (torch, onnxruntime, cupy, ...) called cuInit, and
# libcuda is looked up only if already loaded (RTLD_NOLOAD).

_CUDA_SUCCESS = 0


def initialised_devices() -> tuple[str, ...] | None:
    """The UUIDs (``GPU-...``) or ordinals CUDA shows this process; None if not initialised."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None  # not loaded, so not initialised
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS:
        return None
    return tuple(_device_name(cuda, ordinal) for ordinal in range(count.value))


def _device_name(cuda: ctypes.CDLL, ordinal: int) -> str:
    device = ctypes.c_int()
    uuid = (ctypes.c_ubyte * 16)()
    get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid  # v2: MIG
    if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != _CUDA_SUCCESS:
        return str(ordinal)
    if get_uuid(ctypes.byref(uuid), device) != _CUDA_SUCCESS:
        return str(ordinal)
    hexa = bytes(uuid).hex()
    return f"GPU-{hexa[:8]}-{hexa[8:12]}-{hexa[12:16]}-{hexa[16:20]}-{hexa[20:]}"


# ## NVML


@functools.cache
def nvml_devices() -> tuple[str, ...] | None:
    """Every GPU's UUID, or its MIG devices' when MIG is on; None without NVML or a driver."""
    try:
        nvml = importlib.import_module("pynvml")  # nvidia-ml-py: optional
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None  # no driver here
    try:
        return walk_nvml(nvml)
    except Exception:
        return None
    finally:
        nvml.nvmlShutdown()


def walk_nvml(nvml: Any) -> tuple[str, ...]:
    """The device names an initialised NVML (the ``pynvml`` module) reports."""
    names: list[str] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        gpu = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            current, _ = nvml.nvmlDeviceGetMigMode(gpu)
        except nvml.NVMLError:
            current = 0  # not MIG-capable
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            names.append(_text(nvml.nvmlDeviceGetUUID(gpu)))
            continue
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
            except nvml.NVMLError:
                continue  # no MIG device in this slot
            names.append(_text(nvml.nvmlDeviceGetUUID(mig)))
    return tuple(names)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older bindings return bytes
