"""The mutating admission webhook that gives Prefect pods their ``WORKER_ID``, served by kopf.

It runs in the operator process (``prefect-gpu-operator run``). The chart owns the
MutatingWebhookConfiguration (``service`` + ``path: /inject-worker-id``, failurePolicy Ignore, a
short timeout, kube-system and the operator's namespace excluded), so kopf never manages one:
``settings.admission.managed`` stays None. Its certificate comes from Helm or cert-manager, or from
the operator itself (``webhook_tls.py``), which then only patches that one configuration's CA.
The handler makes no API call and never raises: a pod it cannot handle is admitted unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jsonpatch
import kopf

from prefect_gpu_operator.adapters.kube import api_client
from prefect_gpu_operator.adapters.webhook_tls import ensure_webhook_tls, inject_ca
from prefect_gpu_operator.domain.injection import WEBHOOK_ID, Injection
from prefect_gpu_operator.metrics import ADMISSION_SECONDS, ADMISSIONS
from prefect_gpu_operator.settings import OperatorSettings, current_settings

__all__ = ["configure_webhook", "inject_worker_id"]

log = logging.getLogger(__name__)


async def _no_server(_: Any) -> AsyncIterator[Any]:
    """A webhook "server" that never listens: kopf refuses to start admission handlers without
    one, and with the webhook disabled the handler stays registered but unreachable."""
    await asyncio.Event().wait()
    yield {}  # pragma: no cover  (makes this an async generator; never reached)


# Retried until it succeeds: an API server that is not reachable yet is no reason to crash.
@kopf.on.startup(errors=kopf.ErrorsMode.TEMPORARY, backoff=5)
async def configure_webhook(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    config = current_settings()
    memo.injection = Injection(
        excluded_namespaces=frozenset([*config.inject_excluded_namespaces, config.namespace]),
        extra_env=tuple(config.inject_extra_env.items()),
    )
    if not config.webhook_enabled:
        settings.admission.server = _no_server
        return
    if config.webhook_tls_secret:
        ca_pem = await asyncio.to_thread(_make_certificate, config)
        if config.webhook_configuration:
            memo.ca_keeper = asyncio.create_task(
                _keep_ca(config.webhook_configuration, ca_pem, config.resync_seconds)
            )
    settings.admission.server = kopf.WebhookServer(
        addr=config.webhook_address,
        port=config.webhook_port,
        host=config.webhook_host,
        certfile=config.webhook_cert_file,
        pkeyfile=config.webhook_key_file,
        file_check_interval=30.0,  # a renewed cert-manager certificate is picked up within 30 s
    )
    settings.admission.managed = None


@kopf.on.mutate(
    "",
    "v1",
    "pods",
    id=WEBHOOK_ID,
    operations=["CREATE"],
    ignore_failures=True,
    side_effects=False,
)
async def inject_worker_id(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    """Add WORKER_ID (spec.nodeName) to every container of a Prefect pod that lacks it.

    Async on purpose: a sync handler would hop to kopf's thread pool on every pod creation.
    """
    started = time.perf_counter()
    result = "error"
    try:
        injection: Injection = memo.injection
        ops = injection.patch(body)
        if ops:
            patch.fns.append(lambda raw: _apply(raw, ops))
            result = "injected"
        else:
            result = "unchanged" if injection.allows(body) else "skipped"
    except Exception:  # an error must cost the pod its WORKER_ID, never its creation
        log.exception("WORKER_ID not injected into pod %s", body.get("metadata", {}))
    finally:
        ADMISSIONS.labels(result).inc()
        ADMISSION_SECONDS.observe(time.perf_counter() - started)


@kopf.on.cleanup()
async def stop_ca_keeper(memo: Any, **_: Any) -> None:
    if (keeper := getattr(memo, "ca_keeper", None)) is not None:
        keeper.cancel()


async def _keep_ca(configuration: str, ca_pem: bytes, interval: float) -> None:
    """Inject the CA again whenever the configuration lost it: a later ``helm upgrade`` that adds
    a webhook entry leaves that entry without a caBundle, and nothing would restart us."""
    api = api_client()
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(inject_ca, api, configuration, ca_pem)
        except Exception as error:  # the API server may be away: try again next time
            log.warning("webhook CA not checked (%s); retrying in %.0f s", error, interval)


def _make_certificate(config: OperatorSettings) -> bytes:
    assert config.webhook_tls_secret
    assert config.webhook_cert_file
    assert config.webhook_key_file
    tls = ensure_webhook_tls(
        api_client(),
        namespace=config.namespace,
        secret_name=config.webhook_tls_secret,
        hosts=config.webhook_tls_hosts,
        configuration=config.webhook_configuration,
    )
    tls.write(config.webhook_cert_file, config.webhook_key_file)
    return tls.ca_pem


def _apply(raw: kopf.RawBody, ops: list[dict[str, Any]]) -> None:
    jsonpatch.apply_patch(raw, ops, in_place=True)
