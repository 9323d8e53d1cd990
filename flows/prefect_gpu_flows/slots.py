"""``gpu_slot()``: gate GPU work on the node's Prefect limit and pin concrete devices.

This automates Prefect's ``examples/per_worker_task_concurrency.py``: the node's limit is
``gpu:<WORKER_ID>`` (created by the operator, never here), and a block holds ``gpus`` of its slots
and as many devices no other holder on the node has. Slots are handed from holder to holder on the
node without a server round trip (``_claim``); a holder killed with SIGKILL drops its device at
once and its lease is adopted by the next claimant, or expires on the server. Configuration comes
from the environment (``_config``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import importlib
import importlib.util
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from prefect_gpu_flows._claim import Holding, acquire
from prefect_gpu_flows._config import (
    GpuLimitNotFoundError,
    GpuSlotError,
    GpuSlotTimeout,
    MissingWorkerIdError,
    SlotConfig,
    get_worker_id,
)

__all__ = [
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
    """What a gpu_slot() block holds: its limit and the device indices no other holder has."""

    limit_name: str
    devices: tuple[int, ...]

    @property
    def torch_device(self) -> str:
        """``cuda:<first device>`` when torch sees CUDA, else ``cpu``."""
        return f"cuda:{self.devices[0]}" if _cuda_available() else "cpu"

    @property
    def cuda_visible_devices(self) -> str:
        """For a GPU subprocess's environment: ``CUDA_VISIBLE_DEVICES=<this>``."""
        return ",".join(str(device) for device in self.devices)


@contextmanager
def gpu_slot(gpus: int = 1, timeout_seconds: float | None = None) -> Iterator[GpuLease]:
    """Hold ``gpus`` slots of this node's GPU limit and as many exclusive devices for the block.

    Waits (indefinitely, or up to ``timeout_seconds`` then raises GpuSlotTimeout) while the slots
    are busy or the node's limit is below ``gpus``. Raises MissingWorkerIdError without WORKER_ID
    and GpuLimitNotFoundError when the node has no limit. Sets no environment or CUDA state: use
    ``lease.torch_device`` or ``lease.cuda_visible_devices``.
    """
    holding = acquire(SlotConfig.from_env(), gpus, timeout_seconds, None)
    try:
        yield GpuLease(holding.config.limit_name, holding.devices)
    finally:
        holding.release()


@asynccontextmanager
async def async_gpu_slot(
    gpus: int = 1, timeout_seconds: float | None = None
) -> AsyncIterator[GpuLease]:
    """The async twin of gpu_slot(); cancelling the waiting task gives up its place at once."""
    config = SlotConfig.from_env()
    cancelled = threading.Event()
    granted: concurrent.futures.Future[Holding] = concurrent.futures.Future()
    granted.set_running_or_notify_cancel()  # so asyncio's cancel cannot cancel it under the thread
    context = contextvars.copy_context()  # the run logger follows into the thread

    def wait() -> None:
        try:
            granted.set_result(context.run(acquire, config, gpus, timeout_seconds, cancelled))
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
        yield GpuLease(holding.config.limit_name, holding.devices)
    finally:
        holding.release()  # local unlocks only: safe and instant even when cancelled


def _release_if_granted(granted: concurrent.futures.Future[Holding]) -> None:
    if granted.exception() is None:
        granted.result().release()
