"""How gpu_slot() works on this node, from the environment, and the errors it raises.

``WORKER_ID`` names the node (the operator's webhook injects it). The node's limit is
``PREFECT_GPU_LIMIT_TEMPLATE`` with ``{node}`` replaced by it (default ``gpu:{node}``, the same
grammar as a GPULimitPolicy's ``limitNameTemplate``; ``PREFECT_GPU_LIMIT_PREFIX=gpu:`` is the
older spelling of ``gpu:{node}``). ``PREFECT_GPU_LOCK_DIR`` (default ``/tmp/prefect-gpu-locks``)
must be one directory for every process of the node; ``PREFECT_GPU_DEVICE_COUNT`` (physical
GPUs, for nodes whose limit counts several slots per GPU; default: the limit) and
``PREFECT_GPU_LEASE_SECONDS`` (default 60, the server's minimum).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from prefect_gpu_flows._limit_names import (
    DEFAULT_LIMIT_NAME_TEMPLATE,
    NODE_PLACEHOLDER,
    LimitNameError,
    limit_name,
    template_problems,
)

__all__ = [
    "GpuLimitNotFoundError",
    "GpuSlotError",
    "GpuSlotTimeout",
    "MissingWorkerIdError",
    "SlotConfig",
    "get_worker_id",
    "logger",
]


class GpuSlotError(RuntimeError):
    """gpu_slot() cannot work on this node as configured."""


class MissingWorkerIdError(GpuSlotError):
    """WORKER_ID is not set, so the node's limit is unknown."""


class GpuLimitNotFoundError(GpuSlotError):
    """The node's limit does not exist on the Prefect server."""


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
    device_count: int | None = None
    lease_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> SlotConfig:
        count = os.environ.get("PREFECT_GPU_DEVICE_COUNT")
        return cls(
            worker_id=get_worker_id(),
            limit_template=_limit_template(),
            lock_root=Path(os.environ.get("PREFECT_GPU_LOCK_DIR", "/tmp/prefect-gpu-locks")),
            device_count=int(count) if count else None,
            lease_seconds=float(os.environ.get("PREFECT_GPU_LEASE_SECONDS", "60")),
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

    def device_of(self, slot: int) -> int:
        """Slot i is device i, or i mod the device count when several slots share a GPU."""
        return slot % self.device_count if self.device_count else slot


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
