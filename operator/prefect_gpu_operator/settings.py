"""Operator settings, read from ``PREFECT_GPU_OPERATOR_*`` environment variables.

The Helm chart sets these on the operator Deployment; out of cluster, export them before
``prefect-gpu-operator run``. The Prefect API a policy writes to comes from the policy, not from
here, so Prefect's own ``PREFECT_API_*`` variables are not used by the operator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["OperatorSettings"]


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFECT_GPU_OPERATOR_", extra="ignore")

    namespace: str = Field(
        default="prefect-gpu-operator",
        description="The operator's own namespace: API-key Secrets are read from here only, and "
        "the webhook never touches its pods.",
    )
    resync_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Interval of the full reconcile that re-reads nodes and Prefect's limits and "
        "repairs drift (a limit edited or deleted in the UI).",
    )
    retry_max_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Upper bound of the exponential backoff while the Prefect API is unreachable.",
    )
    prefect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Timeout of one Prefect API request."
    )
    health_address: str = Field(
        default="0.0.0.0", description="Address of the liveness/readiness endpoint."
    )
    health_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of /healthz; 0 disables it."
    )
    metrics_port: int = Field(
        default=9090, ge=0, le=65535, description="Port of the Prometheus /metrics; 0 disables it."
    )
    peering: str | None = Field(
        default=None,
        description="kopf peering object name for running several replicas with one active; "
        "unset runs standalone.",
    )
    log_format: Literal["plain", "full", "json"] = Field(
        default="plain", description="Log format: plain, full or json (structured)."
    )
