"""How gpu_slot() works on this node, from the environment, and the errors it raises.

``WORKER_ID`` names the node (the operator's webhook injects it). The node's limit is
``PREFECT_GPU_LIMIT_TEMPLATE`` with ``{node}`` replaced by it (default ``gpu:{node}``, the same
grammar as a GPULimitPolicy's ``limitNameTemplate``; ``PREFECT_GPU_LIMIT_PREFIX=gpu:`` is the
older spelling of ``gpu:{node}``). ``PREFECT_GPU_LOCK_DIR`` (default ``/tmp/prefect-gpu-locks``)
must be one directory for every process of the node. The devices are the container's (see
``_devices``); ``PREFECT_GPU_SLOTS_PER_DEVICE`` (default 1) is how many slots one device serves
(time-sliced or MPS GPUs), and a limit above devices x that is an error. The older
``PREFECT_GPU_DEVICE_COUNT=n`` still works: it uses the first n devices and lets each serve as
many slots as the limit gives, unless ``PREFECT_GPU_SLOTS_PER_DEVICE`` is set too.
``PREFECT_GPU_LEASE_SECONDS`` (default 600) is how long a slot's Prefect lease lasts; the keeper
renews it half-way, so a held slot costs 0.2 requests per minute. ``PREFECT_GPU_POD_UID`` (the
webhook injects it as ``metadata.uid``) names the pod: each slot's lease is published under it so
that the operator revokes the leases of a pod that is deleted or fails, and its slots come back
in seconds instead of a lease later. Without it, they come back when their leases expire.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prefect_gpu_flows._cuda import nvml_devices, unpinned_environ
from prefect_gpu_flows._devices import DeviceError, Devices
from prefect_gpu_flows._limit_names import (
    DEFAULT_LIMIT_NAME_TEMPLATE,
    NODE_PLACEHOLDER,
    LimitNameError,
    limit_name,
    template_problems,
)

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "GpuDeviceError",
    "GpuLimitNotFoundError",
    "GpuSlotError",
    "GpuSlotTimeout",
    "MissingWorkerIdError",
    "SlotConfig",
    "get_worker_id",
    "logger",
]


DEFAULT_LEASE_SECONDS = 600.0
"""Renewed half-way (every 300 s: 0.2 Prefect requests per minute per held slot, under Prefect
Cloud's rate limits), with 300 s to ride out an outage. A dead pod's leases are revoked by the
operator; a holder killed in a live pod hands its lease to the next claimant at once."""


class GpuSlotError(RuntimeError):
    """gpu_slot() cannot work on this node as configured."""


class MissingWorkerIdError(GpuSlotError):
    """WORKER_ID is not set, so the node's limit is unknown."""


class GpuLimitNotFoundError(GpuSlotError):
    """The node's limit does not exist on the Prefect server."""


class GpuDeviceError(GpuSlotError):
    """The container's devices cannot serve the request or the node's limit."""


class GpuSlotTimeout(TimeoutError):
    """No GPU slot was free within ``timeout_seconds``."""


def logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()  # shows in the flow/task run's logs when there is one
    except Exception:
        return logging.getLogger("prefect_gpu_flows")


def get_worker_id() -> str:
    """The node this process runs on, from ``WORKER_ID`` (as in Prefect's per-worker example)."""
    worker_id = os.environ.get("WORKER_ID", "").strip()
    if not worker_id:
        raise MissingWorkerIdError(
            "WORKER_ID is not set, so gpu_slot() cannot tell which node's GPU limit to use. "
            "On Kubernetes the prefect-gpu-operator's webhook injects it into Prefect worker and "
            "flow-run pods (label the pod prefectgpu.io/inject-worker-id=true if it was excluded); "
            "elsewhere run `export WORKER_ID=<node-name>` before starting the worker."
        )
    return worker_id


@dataclass(frozen=True)
class SlotConfig:
    """Where and how gpu_slot() works on this node; ``from_env()`` reads the environment."""

    worker_id: str
    limit_template: str = DEFAULT_LIMIT_NAME_TEMPLATE
    lock_root: Path = Path("/tmp/prefect-gpu-locks")
    devices: Devices = field(default_factory=lambda: Devices(None, "unknown"))
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    pod_uid: str | None = None

    @classmethod
    def from_env(cls) -> SlotConfig:
        environ = unpinned_environ()  # inside another block, its pin is not this container's
        return cls(
            worker_id=get_worker_id(),
            limit_template=_limit_template(),
            lock_root=Path(environ.get("PREFECT_GPU_LOCK_DIR", "/tmp/prefect-gpu-locks")),
            devices=_devices(environ),
            lease_seconds=float(
                environ.get("PREFECT_GPU_LEASE_SECONDS", str(DEFAULT_LEASE_SECONDS))
            ),
            pod_uid=environ.get("PREFECT_GPU_POD_UID", "").strip().lower() or None,
        )

    @property
    def limit_name(self) -> str:
        try:
            return limit_name(self.limit_template, self.worker_id)
        except LimitNameError as error:
            raise GpuSlotError(f"{error} (WORKER_ID={self.worker_id!r})") from None

    @property
    def lock_dir(self) -> Path:
        return self.lock_root / self.worker_id

    def device_of(self, slot: int) -> str:
        """The name of slot ``slot``'s device (see ``_devices``)."""
        return self.devices.of_slot(slot)

    def check_limit(self, limit: int) -> None:
        """GpuDeviceError if the limit has slots that no device of this container can serve."""
        try:
            self.devices.check_limit(self.limit_name, limit)
        except DeviceError as error:
            raise GpuDeviceError(str(error)) from None


def _devices(environ: Mapping[str, str]) -> Devices:
    per_device = environ.get("PREFECT_GPU_SLOTS_PER_DEVICE")
    count = environ.get("PREFECT_GPU_DEVICE_COUNT")
    try:
        return Devices.from_environment(
            environ,
            nvml_devices,
            # The older PREFECT_GPU_DEVICE_COUNT alone set no bound per device: keep it so.
            slots_per_device=_number("PREFECT_GPU_SLOTS_PER_DEVICE", per_device)
            if per_device
            else (None if count else 1),
            device_count=_number("PREFECT_GPU_DEVICE_COUNT", count) if count else None,
        )
    except DeviceError as error:
        raise GpuDeviceError(str(error)) from None


def _number(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise GpuDeviceError(f"{name}={value!r} is not a whole number") from None


def _limit_template() -> str:
    """The node's limit-name template from the environment, checked like a policy's."""
    template = os.environ.get("PREFECT_GPU_LIMIT_TEMPLATE")
    if template is None:
        prefix = os.environ.get("PREFECT_GPU_LIMIT_PREFIX")
        template = DEFAULT_LIMIT_NAME_TEMPLATE if prefix is None else prefix + NODE_PLACEHOLDER
    if problems := template_problems(template):
        raise GpuSlotError(
            f"PREFECT_GPU_LIMIT_TEMPLATE={template!r} is invalid: {'; '.join(problems)}. Use the "
            f"GPULimitPolicy's limitNameTemplate (default {DEFAULT_LIMIT_NAME_TEMPLATE!r})."
        )
    return template
