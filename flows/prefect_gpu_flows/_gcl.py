"""The few Prefect global-concurrency-limit calls gpu_slot makes, on one client per process.

One long-lived ``SyncPrefectClient`` per process keeps its HTTP connection open: a fresh client per
acquire (what ``prefect.concurrency`` does) costs several requests and tens of milliseconds. Slots
are taken one per lease (``slots=1``) so that each GPU slot's lease can be handed from holder to
holder on the node without a server round trip.

Each lease names its holder as far as Prefect lets it (a flow or task run: Prefect 3.9's lease
holder is only a run's type and id, and it offers no way to list a limit's leases). So that the
operator can revoke the leases of a pod that died, the lease of each of a pod's slots is also
published as a Prefect variable, ``prefect-gpu-lease_<pod uid>_<slot>`` (``register``): one
request by the keeper thread, off the block's way in, when a slot takes a new lease; none while
leases are handed over within the pod or renewed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import ssl
import threading
import time
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, Settings

from prefect_gpu_flows._config import logger
from prefect_gpu_flows._locks import LeaseRecord

__all__ = [
    "LEASE_VARIABLE_PREFIX",
    "LEASE_VARIABLE_TAG",
    "LimitMissing",
    "SlotRefused",
    "acquire",
    "client",
    "forget",
    "lease_variable",
    "read_limit",
    "register",
    "release",
    "renew",
]

LEASE_VARIABLE_PREFIX = "prefect-gpu-lease_"
"""Variables ``<prefix><pod uid>_<slot>`` hold the lease of a pod's slot; the operator reads the
same names (``prefect_gpu_operator.domain.pod_leases``)."""
LEASE_VARIABLE_TAG = "prefect-gpu-lease"


class LimitMissing(Exception):
    """The named limit does not exist on the server."""


class SlotRefused(Exception):
    """The server has no slot for us now (423 full, or 422 limit below the request)."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


_lock = threading.Lock()
_client: SyncPrefectClient | None = None
_client_url: str | None = None


def _close() -> None:
    global _client
    if _client is not None:
        with contextlib.suppress(Exception):
            _client.__exit__(None, None, None)
        _client = None


def _forget_in_child() -> None:
    # A forked child must not share the parent's connection pool.
    global _client
    _client = None


atexit.register(_close)
os.register_at_fork(after_in_child=_forget_in_child)


def client() -> SyncPrefectClient:
    """The process's client for the current PREFECT_API_URL, started on first use.

    Leases are renewed and released through the client that acquired them (the keeper thread
    does not see the caller's Prefect settings context).
    """
    global _client, _client_url
    url = PREFECT_API_URL.value()
    with _lock:
        if _client is None or url != _client_url:
            _close()
            settings = {}
            if isinstance(url, str) and url.startswith("http://"):
                # Prefect loads the CA bundle for every client (~25 ms, the largest part of a
                # first acquire) even when nothing is encrypted. A context that trusts no CA
                # costs nothing and fails closed should a redirect lead to https.
                settings["verify"] = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            _client = get_client(sync_client=True, httpx_settings=settings).__enter__()
            _client_url = url
        return _client


def read_limit(prefect: SyncPrefectClient, name: str) -> tuple[UUID, int]:
    """The limit's id and current ``limit``; LimitMissing if there is no such limit."""
    try:
        found = prefect.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise LimitMissing(name) from None
    return found.id, found.limit


def acquire(prefect: SyncPrefectClient, name: str, lease_seconds: float) -> tuple[LeaseRecord, int]:
    """One slot of ``name`` under a new lease, and the limit the server counted it against;
    SlotRefused or LimitMissing otherwise."""
    expires = time.time() + lease_seconds  # taken before the call: errs on the early side
    try:
        response = prefect.increment_concurrency_slots_with_lease(
            names=[name],
            slots=1,
            mode="concurrency",
            lease_duration=lease_seconds,
            holder=_holder(),
        )
    except httpx.HTTPStatusError as error:
        status = error.response.status_code
        if status == 423:
            retry_after = float(error.response.headers.get("Retry-After", 1.0))
            raise SlotRefused("the server says the limit is full", retry_after) from None
        if status == 422:
            raise SlotRefused("the server says the limit is below the request", 1.0) from None
        raise
    granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
    if not granted.limits:  # Prefect grants "nothing to limit" for a missing limit
        release(prefect, granted.lease_id)
        raise LimitMissing(name)
    limit = granted.limits[0]
    return LeaseRecord(granted.lease_id, limit.id, expires), limit.limit


def _holder() -> ConcurrencyLeaseHolder | None:
    """The task or flow run this block runs in, if any: what Prefect lets a lease name."""
    from prefect.context import FlowRunContext, TaskRunContext

    task = TaskRunContext.get()
    if task is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task.task_run.id)
    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow.flow_run.id)
    return None


def lease_variable(pod_uid: str, slot: int) -> str:
    return f"{LEASE_VARIABLE_PREFIX}{pod_uid}_{slot}"


def register(prefect: SyncPrefectClient, name: str, lease_id: UUID, limit_name: str) -> bool:
    """Publish ``lease_id`` as the lease of the pod's slot that variable ``name`` stands for,
    replacing the slot's earlier one (released or handed over: revoking it is a no-op). False,
    with a warning, if it could not be written: the slot then comes back only when its lease
    expires, should the pod die. Without the client's retries: a 503 backoff of seconds would
    delay the block, for a record only a dead pod needs."""
    value = {"lease_id": str(lease_id), "limit": limit_name}
    named = {"name": name}
    try:
        with _without_retries():
            try:
                prefect.request(
                    "PATCH", "/variables/name/{name}", path_params=named, json={"value": value}
                )
            except httpx.HTTPStatusError as error:
                if error.response.status_code != 404:
                    raise
                created = {"name": name, "value": value, "tags": [LEASE_VARIABLE_TAG]}
                try:
                    prefect.request("POST", "/variables/", json=created)
                except httpx.HTTPStatusError as again:
                    if again.response.status_code != 409:  # 409: created meanwhile; write it
                        raise
                    prefect.request(
                        "PATCH", "/variables/name/{name}", path_params=named, json={"value": value}
                    )
    except httpx.HTTPError as error:
        logger().warning(
            "gpu_slot could not publish lease %s for the operator (%s): should this pod die, "
            "its slot comes back only when the lease expires",
            lease_id,
            error,
        )
        return False
    return True


def forget(prefect: SyncPrefectClient, name: str) -> None:
    """Delete a published lease variable (another pod's, whose lease this pod adopted)."""
    try:
        with _without_retries():
            prefect.request("DELETE", "/variables/name/{name}", path_params={"name": name})
    except httpx.HTTPError:
        pass  # gone already, or left for the operator to clean up with that pod


def renew(prefect: SyncPrefectClient, lease_id: UUID, lease_seconds: float) -> float | None:
    """Extend a lease; its new expiry (epoch s), or None if the server no longer has it."""
    expires = time.time() + lease_seconds
    try:
        prefect.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_seconds)
    except httpx.HTTPStatusError as error:
        if error.response.status_code in (404, 410):
            return None
        raise
    return expires


# Refusals that leave the lease and its slot untouched on the server (see ``release``).
REFUSED_STATUSES = frozenset({409, 500, 503})


def release(prefect: SyncPrefectClient, lease_id: UUID) -> bool:
    """Give a lease's slot back; False if the server refused or could not be reached, and the
    lease still holds it.

    An unknown or expired lease, or one on a deleted limit, counts as given back (True). The
    server refuses while the limit is 0: Prefect 3.9's decrement divides by ``limit`` for its
    occupancy average; SQLite yields NULL and the NOT NULL violation comes back as 409,
    PostgreSQL raises division by zero and it comes back as 503. Either way the lease and its slot
    stay. Forgetting such a lease would leave the slot counted until the lease expires,
    unadoptable; the caller keeps it and tries again later (once the limit is raised). The
    client's own retries are off: it would sleep ~1 min of backoff on that 503, in the thread
    that renews the other leases, or at exit.
    """
    try:
        with _without_retries():
            prefect.release_concurrency_slots_with_lease(lease_id=lease_id)
    except httpx.TransportError:
        return False  # unreachable: the lease stays on file and is released once it is back
    except httpx.HTTPStatusError as error:
        if error.response.status_code in REFUSED_STATUSES:
            return False
        if error.response.status_code not in (404, 410):
            raise
    return True


_quiet: tuple[Settings, Settings] | None = None  # the settings in force, and them without retries


def _without_retries() -> SettingsContext:
    """The current settings with the client's retries off, built once per settings: Prefect's
    ``temporary_settings`` rebuilds them on every use (~30 ms of CPU per release)."""
    global _quiet
    context = get_settings_context()
    quiet = _quiet
    if quiet is None or quiet[0] is not context.settings:
        updated = context.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
        _quiet = quiet = (context.settings, updated)
    return SettingsContext(profile=context.profile, settings=quiet[1])
