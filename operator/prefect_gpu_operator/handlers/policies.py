"""kopf wiring: short handlers that feed the controller and run one reconcile loop per policy.

Nodes and Pods are only watched (``on.event`` writes nothing to the object), so the operator
needs no write access to them and never annotates them. Policies carry the finalizer and kopf's
progress annotations under the ``prefectgpu.io`` prefix.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import kopf
from prometheus_client import start_http_server

from prefect_gpu_operator.adapters.kube import Kube
from prefect_gpu_operator.api.policy import GROUP, PLURAL, VERSION
from prefect_gpu_operator.domain.events import Event
from prefect_gpu_operator.domain.injection import WORKER_LABEL
from prefect_gpu_operator.runtime.controller import Controller
from prefect_gpu_operator.runtime.fence import POLL_SECONDS, seniority_priority
from prefect_gpu_operator.settings import current_settings

POLICIES = (GROUP, VERSION, PLURAL)
PODS = ("", "v1", "pods")
LIST_PAGE = 500
"""Objects per page when kopf lists what it watches: bounded memory on large clusters."""
log = logging.getLogger(__name__)


def _controller(memo: Any) -> Controller:
    controller: Controller = memo.controller
    return controller


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    config = current_settings()
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # our own events are posted explicitly
    settings.batching.batch_window = 0.01  # react to a node change in milliseconds, not 100 ms
    settings.watching.server_timeout = 300
    settings.watching.chunk_size = LIST_PAGE
    # The API server sends only the pods the webhook labelled, not every pod of the cluster.
    settings.watching.label_selectors[PODS] = f"{WORKER_LABEL}=true"
    settings.peering.lifetime = config.peering_lifetime_seconds
    settings.peering.priority = (
        config.peering_priority
        if config.peering_priority is not None
        else seniority_priority(time.time(), random.randrange(1000))
    )
    kube = Kube()
    controller = Controller(config, kube, identity=getattr(memo, "identity", None))
    controller.seed_nodes(await kube.list_gpu_nodes())
    memo.controller = controller
    memo.fence_keeper = asyncio.create_task(_keep_fence(controller))
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.health_address)


async def _keep_fence(controller: Controller) -> None:
    while True:
        await controller.keep_fence()
        await asyncio.sleep(POLL_SECONDS)


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    memo.fence_keeper.cancel()
    await _controller(memo).close()


@kopf.on.event("", "v1", "nodes")
async def node_changed(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    _controller(memo).observe_node(body, deleted=type == "DELETED")


@kopf.index(*POLICIES)
async def policies_seen(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Observe policies before anything else: kopf runs no handler until indexed resources are
    listed, so the first worker-pod check at start-up already knows every policy."""
    _controller(memo).observe_policy(body)


async def pod_changed(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    warning = _controller(memo).observe_pod(body, deleted=type == "DELETED")
    if warning is not None:
        _post(body, [warning])


if current_settings().watch_worker_pods:  # off: no pod is watched, and none need be readable
    kopf.on.event(*PODS)(pod_changed)


@kopf.on.event(*POLICIES)
async def policy_deleted(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    # Additions and changes reach the controller through the index above, on every event.
    if type == "DELETED":
        _controller(memo).forget_policy(body["metadata"]["name"])


def _post(body: kopf.Body, events: Iterable[Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


@kopf.daemon(*POLICIES, cancellation_timeout=5.0)
async def reconcile_policy(
    name: str, body: kopf.Body, memo: Any, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """Reconcile on every relevant change and every resync interval, backing off on errors."""
    controller = _controller(memo)
    record = controller.observe_policy(body)
    full, failures = True, 0
    while not stopped:
        record.wake.clear()
        events = await controller.reconcile(name, full=full)
        _post(body, events)
        if any(e.reason == "PrefectRateLimited" for e in events):
            # Prefect asked to wait: resume from the cache once its Retry-After has passed.
            await asyncio.sleep(controller.rate_limit_wait(name))
            full = False
            continue
        failures = failures + 1 if any(e.reason == "PrefectUnreachable" for e in events) else 0
        try:
            await asyncio.wait_for(record.wake.wait(), timeout=controller.next_wait(name, failures))
            full = failures > 0
        except TimeoutError:
            full = True


@kopf.on.delete(*POLICIES)
async def finalize_policy(name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Apply the deletionPolicy to every limit the policy owns before it goes away."""
    controller = _controller(memo)
    controller.observe_policy(body)
    events = await controller.reconcile(name, full=True, deleting=True)
    _post(body, events)
    if any(event.warning for event in events):
        raise kopf.TemporaryError("limits not released yet; retrying", delay=5)
    controller.forget_policy(name)
