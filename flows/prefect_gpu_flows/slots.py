"""``gpu_slot()``: gate GPU work on the node's Prefect limit and pin concrete devices.

This automates Prefect's ``examples/per_worker_task_concurrency.py``: the node's limit is
``gpu:<WORKER_ID>`` (created by the operator, never here), and a block holds ``gpus`` of its slots
and as many devices no other holder on the node has, among those its container sees (``_devices``).
Inside the block ``CUDA_VISIBLE_DEVICES`` names exactly those devices (``_cuda``), so a step that
first touches CUDA there uses its own device as ``cuda:0``. Slots are handed from holder to holder
on the node without a server round trip (``_claim``); a holder killed with SIGKILL drops its
device at once and its lease is adopted by the next claimant, or expires on the server.
Configuration comes from the environment (``_config``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from prefect_gpu_flows import _presence
from prefect_gpu_flows._claim import Holding, acquire
from prefect_gpu_flows._config import (
    GpuDeviceError,
    GpuLimitNotFoundError,
    GpuSlotError,
    GpuSlotTimeout,
    MissingWorkerIdError,
    SlotConfig,
    get_worker_id,
    logger,
)
from prefect_gpu_flows._cuda import Pin, pinned
from prefect_gpu_flows._devices import CUDA_VISIBLE_DEVICES, DeviceError

__all__ = [
    "GpuDeviceError",
    "GpuLease",
    "GpuLimitNotFoundError",
    "GpuSlotError",
    "GpuSlotTimeout",
    "MissingWorkerIdError",
    "SlotConfig",
    "async_gpu_slot",
    "get_worker_id",
    "gpu_slot",
]


@functools.cache
def _cuda_available() -> bool:
    # torch is optional and untyped here: imported by name, and only when a device is asked for.
    if importlib.util.find_spec("torch") is None:
        return False
    torch = importlib.import_module("torch")
    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class GpuLease:
    """What a gpu_slot() block holds: its limit and the devices no other holder on the node has."""

    limit_name: str
    devices: tuple[str, ...]
    """As ``CUDA_VISIBLE_DEVICES`` names them: ``GPU-<uuid>`` or ``MIG-<uuid>`` where the
    container says, else indices among the devices this process sees."""
    pinned: bool = False
    """This process's CUDA shows exactly these devices, the first as ``cuda:0``."""
    unpinned_reason: str | None = None
    """Why not, when not pinned (also logged as a warning): run the step in a child process with
    ``env=os.environ | lease.env``."""
    cuda_index: int | None = None
    """Where this process's CUDA shows the first device: 0 when pinned, None when it cannot."""

    @property
    def env(self) -> Mapping[str, str]:
        """The variables that show a child process exactly these devices."""
        return {CUDA_VISIBLE_DEVICES: ",".join(self.devices)}

    @property
    def cuda_visible_devices(self) -> str:
        """``lease.env["CUDA_VISIBLE_DEVICES"]``."""
        return self.env[CUDA_VISIBLE_DEVICES]

    @property
    def torch_device(self) -> str:
        """``cuda:<index>`` of the first device when torch sees CUDA, else ``cpu``.

        Raises GpuDeviceError when torch sees CUDA but not this lease's device (not pinned)."""
        if not _cuda_available():
            return "cpu"
        if self.cuda_index is None:
            raise GpuDeviceError(
                f"this process's CUDA cannot reach {self.devices[0]}: {self.unpinned_reason}"
            )
        return f"cuda:{self.cuda_index}"


def _lease(holding: Holding, pin: Pin) -> GpuLease:
    if not pin.pinned:
        logger().warning(
            "gpu_slot() holds %s but cannot pin this process's CUDA to it: %s. Run the GPU step "
            "in a child process with env=os.environ | lease.env.",
            ", ".join(holding.devices),
            pin.reason,
        )
    return GpuLease(holding.config.limit_name, holding.devices, pin.pinned, pin.reason, pin.index)


def _config(gpus: int) -> SlotConfig:
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, not {gpus}")
    config = SlotConfig.from_env()
    try:
        config.devices.check_request(gpus)
    except DeviceError as error:
        raise GpuDeviceError(str(error)) from None
    return config


@contextmanager
def gpu_slot(gpus: int = 1, timeout_seconds: float | None = None) -> Iterator[GpuLease]:
    """Hold ``gpus`` slots of this node's GPU limit and as many exclusive devices for the block.

    Waits (indefinitely, or up to ``timeout_seconds`` then raises GpuSlotTimeout) while the slots
    are busy or the node's limit is below ``gpus``. Raises MissingWorkerIdError without WORKER_ID,
    GpuLimitNotFoundError when the node has no limit, and GpuDeviceError when the container's
    devices cannot serve the limit or the request (a limit above devices x slots per device;
    ``gpus > 1`` on MIG). Inside the block ``CUDA_VISIBLE_DEVICES`` names the held devices, and
    is restored after it; ``lease.pinned`` says whether that reaches this process's CUDA.
    """
    config = _config(gpus)
    with _presence.waiting(config.lock_dir, gpus):
        holding = acquire(config, gpus, timeout_seconds, None)
    try:
        with _held(holding), pinned(holding.devices) as pin:
            yield _lease(holding, pin)
    finally:
        holding.release()


def _held(holding: Holding) -> contextlib.AbstractContextManager[None]:
    """The block's holder records (``_presence``): who holds which slot, seen from the node."""
    slots = [slot.index for slot in holding.slots]
    return _presence.holding(holding.config.lock_dir, slots, holding.devices)


@asynccontextmanager
async def async_gpu_slot(
    gpus: int = 1, timeout_seconds: float | None = None
) -> AsyncIterator[GpuLease]:
    """The async twin of gpu_slot(); cancelling the waiting task gives up its place at once.

    Tasks of one event loop share the process's environment: only the first open block pins it.
    """
    config = _config(gpus)
    cancelled = threading.Event()
    granted: concurrent.futures.Future[Holding] = concurrent.futures.Future()
    granted.set_running_or_notify_cancel()  # so asyncio's cancel cannot cancel it under the thread
    context = contextvars.copy_context()  # the run logger follows into the thread

    def waited() -> Holding:
        with _presence.waiting(config.lock_dir, gpus):
            return acquire(config, gpus, timeout_seconds, cancelled)

    def wait() -> None:
        try:
            granted.set_result(context.run(waited))
        except BaseException as error:
            granted.set_exception(error)

    # A thread of its own rather than the loop's executor: many blocks may wait at once.
    threading.Thread(target=wait, name="gpu-slot-acquire", daemon=True).start()
    try:
        holding = await asyncio.wrap_future(granted)
    except asyncio.CancelledError:
        cancelled.set()
        granted.add_done_callback(_release_if_granted)  # it may be granted before it notices
        raise
    try:
        with _held(holding), pinned(holding.devices) as pin:
            yield _lease(holding, pin)
    finally:
        # Local unlocks only (a block shorter than one request may wait for its lease's
        # publication, at most _keeper.PUBLISH_WAIT): safe and quick even when cancelled.
        holding.release()


def _release_if_granted(granted: concurrent.futures.Future[Holding]) -> None:
    if granted.exception() is None:
        granted.result().release()
