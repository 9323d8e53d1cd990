"""Revoking the Prefect leases of pods that died, so that their GPU slots come back within
seconds instead of when the leases expire (gpu_slot's default lease is 10 minutes).

The pod watch reports a Prefect pod deleted or finished; its node's limit belongs to a policy,
whose Prefect server holds the leases gpu_slot() published for the pod's slots
(``domain/pod_leases``). Each is revoked as its holder would release it, then its record is
deleted. Only a pod the watch saw alive is reaped, once: one first seen dead (finished flow-run
pods in the listing at start-up) died while the operator was away, and its leases expire on their
own. A holder killed inside a live pod is not this module's business: the next claimant on the
node adopts its lease at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from prefect_gpu_operator.adapters.kube import SecretNotFound
from prefect_gpu_operator.adapters.prefect_limits import PrefectRateLimited, PrefectUnreachable
from prefect_gpu_operator.domain.pod_leases import DeadPod, dead_pod
from prefect_gpu_operator.runtime.fence import Fence, Fenced
from prefect_gpu_operator.runtime.ports import LimitsApi
from prefect_gpu_operator.runtime.prefect_view import PrefectView
from prefect_gpu_operator.runtime.records import PolicyRecord

__all__ = ["RETRY_SECONDS", "LeaseReaper"]

log = logging.getLogger(__name__)

RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
"""Waits between attempts while Prefect fails; after the last, the leases are left to expire."""


class LeaseReaper:
    """Revokes a dead pod's published leases in the background, one task per pod."""

    def __init__(
        self,
        policies: Mapping[str, PolicyRecord],
        prefect: PrefectView,
        fence: Fence,
        retry_seconds: tuple[float, ...] = RETRY_SECONDS,
    ) -> None:
        self._policies = policies
        self._prefect = prefect
        self._fence = fence
        self._retry_seconds = retry_seconds
        self._tasks: set[asyncio.Task[int]] = set()
        # Pods seen scheduled and not yet dead: only their death is worth requests. A pod first
        # seen dead (the listing at start-up, with many finished flow-run pods) died while this
        # operator was away; its leases expire on their own.
        self._alive: set[str] = set()

    def observe(self, body: Mapping[str, Any], deleted: bool) -> asyncio.Task[int] | None:
        """Start revoking the pod's leases if it was seen alive and just died; the task (its
        result: how many leases were revoked), or None when there is nothing to do."""
        pod = dead_pod(body, deleted)
        if pod is None:
            uid = (body.get("metadata") or {}).get("uid")
            if uid and (body.get("spec") or {}).get("nodeName") and not deleted:
                self._alive.add(str(uid).lower())
            return None
        if pod.uid not in self._alive:
            return None  # reaped already (finished, then deleted), or never seen alive
        self._alive.discard(pod.uid)
        task = asyncio.get_running_loop().create_task(self._reap(pod, deleted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reap(self, pod: DeadPod, deleted: bool) -> int:
        for delay in (*self._retry_seconds, None):
            try:
                return await self._revoke(pod)
            except Fenced as error:
                log.info("leases of pod %s left to the leader: %s", pod.reference, error)
            except (PrefectUnreachable, SecretNotFound) as error:
                if delay is not None:
                    if isinstance(error, PrefectRateLimited):
                        delay = max(delay, error.retry_after)
                    log.info("leases of pod %s not revoked yet: %s", pod.reference, error)
                    await asyncio.sleep(delay)
                    continue
                log.warning(
                    "leases of pod %s not revoked (%s): its GPU slots come back when they expire",
                    pod.reference,
                    error,
                )
            if not deleted:
                self._alive.add(pod.uid)  # its deletion, still to come, tries again
            return 0
        return 0  # not reached: the last delay is None

    async def _revoke(self, pod: DeadPod) -> int:
        revoked = 0
        woken: list[PolicyRecord] = []
        for server, records in (await self._servers_of(pod.node)).values():
            for lease in await server.pod_leases(pod.uid):
                self._fence.check()
                await server.revoke_lease(lease.lease_id)
                await server.forget_lease(lease.variable)
                revoked += 1
            woken += records
        if revoked:
            log.info("revoked %d lease(s) of pod %s on node %s", revoked, pod.reference, pod.node)
            for record in woken:
                record.wake.set()  # held slots changed: a draining limit may go on
        return revoked

    async def _servers_of(self, node: str) -> dict[str, tuple[LimitsApi, list[PolicyRecord]]]:
        """The Prefect servers of the policies whose ledger has the node's limit, by API URL."""
        found: dict[str, tuple[LimitsApi, list[PolicyRecord]]] = {}
        for record in list(self._policies.values()):
            policy = record.policy
            if policy is None or all(entry.node != node for entry in record.ledger):
                continue
            server = await self._prefect.server(policy.spec.server, full=False)
            found.setdefault(server.api_url, (server, []))[1].append(record)
        return found
