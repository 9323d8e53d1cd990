"""Operator settings, read from ``PREFECT_GPU_OPERATOR_*`` environment variables.

The Helm chart sets these on the operator Deployment; out of cluster, export them before
``prefect-gpu-operator run``. The Prefect API a policy writes to comes from the policy, not from
here, so Prefect's own ``PREFECT_API_*`` variables are not used by the operator.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

__all__ = [
    "ENV_PREFIX",
    "InvalidSettings",
    "OperatorSettings",
    "current_settings",
    "describe_invalid",
    "env_name",
]

ENV_PREFIX = "PREFECT_GPU_OPERATOR_"


def env_name(field: str) -> str:
    """The environment variable of a setting: ``resync_seconds`` -> ``..._RESYNC_SECONDS``."""
    return ENV_PREFIX + field.upper()


class InvalidSettings(ValueError):
    """The environment holds settings the operator cannot run with; the message, one line,
    names the variables to fix."""


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

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
    status_interval_seconds: float = Field(
        default=0.25,
        ge=0,
        description="Status writes after a change wait this long so that a burst of node changes "
        "is written as one. Writes that must precede a Prefect call are never delayed.",
    )
    drain_poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="While a limit drains (its node lost GPUs that slots are still held on), how "
        "often the held slots are read again so that the limit follows them down.",
    )
    retry_max_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Upper bound of the exponential backoff while the Prefect API is unreachable.",
    )
    prefect_write_concurrency: int = Field(
        default=12,
        ge=1,
        le=100,
        description="How many Prefect limit writes (create, update, delete) one reconcile makes "
        "at a time. A cold start at thousands of nodes is that many writes; a 429 from the "
        "server stops new writes until its Retry-After has passed.",
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
    peering_lifetime_seconds: int = Field(
        default=15,
        ge=5,
        description="With peering: seconds after which a replica that stopped announcing itself "
        "(killed, partitioned) is considered gone, so a standby takes over.",
    )
    peering_priority: int | None = Field(
        default=None,
        description="With peering: this replica's priority (the highest one is active). Unset: "
        "by age, the replica started first is active (a random tie-break, since replicas of "
        "equal priority would all pause).",
    )
    log_format: Literal["plain", "full", "json"] = Field(
        default="plain", description="Log format: plain, full or json (structured)."
    )
    webhook_enabled: bool = Field(
        default=False,
        description="Serve the mutating admission webhook that injects WORKER_ID into the pods "
        "its MutatingWebhookConfiguration sends (the chart owns that configuration and its pod "
        "selectors). Needs webhook_cert_file and webhook_key_file, from Helm, cert-manager or "
        "webhook_tls_secret.",
    )
    webhook_address: str = Field(
        default="0.0.0.0", description="Address the webhook's HTTPS server listens on."
    )
    webhook_port: int = Field(
        default=9443, ge=1, le=65535, description="Port of the webhook's HTTPS server."
    )
    webhook_host: str | None = Field(
        default=None,
        description="Host name in the webhook URL kopf reports; only used when kopf manages the "
        "webhook configuration (never in production). Defaults to the address.",
    )
    webhook_cert_file: Path | None = Field(
        default=None,
        description="PEM serving certificate of the webhook (re-read when it changes on disk).",
    )
    webhook_key_file: Path | None = Field(
        default=None, description="PEM private key of webhook_cert_file."
    )
    webhook_tls_secret: str | None = Field(
        default=None,
        description="Make the webhook's certificate here: a Secret in the operator's namespace "
        "that the first replica creates with a self-signed CA and a serving certificate for "
        "webhook_tls_hosts; every replica writes it to webhook_cert_file and webhook_key_file. "
        "Unset: those files come from elsewhere (Helm or cert-manager).",
    )
    webhook_tls_hosts: list[str] = Field(
        default=[],
        description="With webhook_tls_secret: the DNS names and IP addresses the certificate is "
        "made for (the webhook Service's names).",
    )
    webhook_configuration: str | None = Field(
        default=None,
        description="With webhook_tls_secret: the MutatingWebhookConfiguration whose webhooks get "
        "the CA as caBundle at start-up.",
    )
    watch_worker_pods: bool = Field(
        default=True,
        description="Watch the Prefect pods the webhook labelled (prefectgpu.io/has-worker-id; "
        "the API server filters the watch): report where workers run in each policy's status, "
        "warn GPU pods on nodes without a limit or with fewer GPUs than their limit counts, and "
        "count their GPUs for policies with capacityFrom WorkerPods. Off: no pod is read at "
        "all, and such policies are reported invalid.",
    )
    inject_excluded_namespaces: list[str] = Field(
        default=["kube-system"],
        description="Namespaces whose pods are never changed, besides the operator's own. The "
        "chart passes webhook.excludeNamespaces here and into the webhook configuration's "
        "namespaceSelector, which does the real filtering; this is the handler's own guard.",
    )
    inject_extra_env: dict[str, str] = Field(
        default={},
        description="More variables injected like WORKER_ID, as name -> Downward API fieldPath "
        '(e.g. {"POD_NAME": "metadata.name"}); a container that defines one keeps its own.',
    )

    @model_validator(mode="after")
    def _webhook_has_certificate(self) -> OperatorSettings:
        # kopf could self-sign, but not with Debian's OpenSSL (oscrypto fails to load it), and the
        # apiserver must trust the certificate anyway: it comes from the chart or the operator.
        # The messages name the environment variables: that is where a user fixes them.
        if self.webhook_enabled and None in (self.webhook_cert_file, self.webhook_key_file):
            raise ValueError(
                f"{env_name('webhook_enabled')}=true needs {env_name('webhook_cert_file')} "
                f"and {env_name('webhook_key_file')}"
            )
        if self.webhook_tls_secret and not self.webhook_tls_hosts:
            raise ValueError(
                f"{env_name('webhook_tls_secret')} needs {env_name('webhook_tls_hosts')} "
                "(the webhook Service's names)"
            )
        return self


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_invalid(error: ValidationError | SettingsError) -> str:
    """One line that says which variables to fix, for a user rather than a developer."""
    if isinstance(error, SettingsError):  # a list or dict variable that is not JSON
        named = re.search(r'field "(\w+)"', str(error))
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        return f"{env_name(named[1])} is not valid JSON{cause}" if named else str(error)
    problems = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule across settings: its message names them
            problems.append(message)
            continue
        field, *inner = problem["loc"]
        where = "".join(f"[{part}]" for part in inner)
        problems.append(
            f"{env_name(str(field))}{where}={_shown(problem['input'])}: "
            f"{message[0].lower()}{message[1:]}"
        )
    return "; ".join(problems)


@functools.cache
def current_settings() -> OperatorSettings:
    """This process's settings, read from the environment once. Raises ``InvalidSettings``."""
    try:
        return OperatorSettings()
    except (ValidationError, SettingsError) as error:
        raise InvalidSettings(describe_invalid(error)) from None
