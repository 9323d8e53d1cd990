"""The operator's view of the Prefect servers its policies write to.

One connection per server and set of credentials, every Secret and ConfigMap value a server
reference names read on full reconciles only (a rotated key is picked up at the next resync), and
per server the limits as last listed and since changed by the operator's own writes, so that a
node change costs only the write it needs. A resync lists a server before taking the policy's
lock (a 1,000-limit listing is several paged calls); names written while that listing is in
flight keep their newer cached value (``newest_observation``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prefect_gpu_operator.adapters.kube import SecretNotFound
from prefect_gpu_operator.adapters.prefect_limits import (
    PrefectConnection,
    PrefectRateLimited,
    PrefectUnreachable,
)
from prefect_gpu_operator.api.policy import (
    ApiKeySource,
    BasicAuthSource,
    CaBundleSource,
    PrefectServerReference,
    ValueRef,
)
from prefect_gpu_operator.domain.leases import LeaseDurability, lease_durability
from prefect_gpu_operator.domain.plan import Change, ObservedLimit, newest_observation
from prefect_gpu_operator.runtime.ports import ConnectPrefect, KubeApi, LimitsApi

__all__ = ["Listing", "PrefectView", "connection_for"]


def connection_for(
    reference: PrefectServerReference, values: Mapping[ValueRef, str]
) -> PrefectConnection:
    """The connection a reference describes, given the values of its ``value_refs()``."""

    def value(source: ApiKeySource | BasicAuthSource | CaBundleSource | None) -> str | None:
        return None if source is None else values[source.value_from.ref()]

    return PrefectConnection(
        reference.api_url,
        api_key=value(reference.api_key),
        auth_string=value(reference.basic_auth),
        headers=tuple(
            (header.name, values[header.value_from.ref()]) for header in reference.headers
        ),
        ca_bundle=value(reference.ca_bundle),
        secret_headers=frozenset(
            header.name for header in reference.headers if header.value_from.ref().kind == "Secret"
        ),
    )


@dataclass(frozen=True)
class Listing:
    """Every limit on one server as a resync read them, and the names written meanwhile."""

    api_url: str
    limits: dict[str, ObservedLimit]
    written_meanwhile: set[str]  # live: grows until the reconcile that uses it ends
    error: PrefectUnreachable | None = None


class PrefectView:
    """Connections, the Secret and ConfigMap values they use, and the listing cache, per
    Prefect server."""

    def __init__(
        self, kube: KubeApi, namespace: str, connect: ConnectPrefect, *, timeout: float
    ) -> None:
        self._kube = kube
        self._namespace = namespace
        self._connect = connect
        self._timeout = timeout
        self._servers: dict[PrefectConnection, LimitsApi] = {}
        self._values: dict[ValueRef, str] = {}  # Secret and ConfigMap values; never logged
        self._observed: dict[str, dict[str, ObservedLimit]] = {}
        # Per server, one set per resync listing in flight: the names written since it began.
        self._listing_watchers: dict[str, list[set[str]]] = {}
        self._held: dict[str, float] = {}  # per server: when its Retry-After ends (monotonic)
        self._durability: dict[str, LeaseDurability] = {}  # per server: what it says of leases

    async def server(self, reference: PrefectServerReference, *, full: bool) -> LimitsApi:
        """The connection for ``reference``; the Secrets and ConfigMaps it names are read again
        on full reconciles, not on every node change."""
        values = {ref: await self._read(ref, full=full) for ref in reference.value_refs()}
        connection = connection_for(reference, values)
        if connection not in self._servers:
            self._servers[connection] = self._connect(connection, timeout=self._timeout)
        return self._servers[connection]

    async def _read(self, ref: ValueRef, *, full: bool) -> str:
        if full or ref not in self._values:
            read = (
                self._kube.read_secret_key
                if ref.kind == "Secret"
                else self._kube.read_config_map_key
            )
            self._values[ref] = await read(self._namespace, ref.name, ref.key)
        return self._values[ref]

    async def observed(
        self, server: LimitsApi, *, full: bool, listed: Listing | None = None
    ) -> dict[str, ObservedLimit]:
        """The server's limits: from ``listed`` (a resync's listing), re-listed when ``full``,
        else the cache. The returned dict is the cache itself; ``record`` keeps it current."""
        url = server.api_url
        if listed is not None and listed.api_url == url:
            if listed.error is not None:
                raise listed.error
            self._observed[url] = newest_observation(
                listed.limits, self._observed.get(url, {}), listed.written_meanwhile
            )
        elif full or url not in self._observed:
            self._observed[url] = await server.list_all()
        return self._observed[url]

    async def durability(self, server: LimitsApi, *, full: bool) -> LeaseDurability:
        """What the server reports of its leases: read on full reconciles (and the first),
        else as last read. A server that fails to answer this one request is not an outage."""
        url = server.api_url
        if full or url not in self._durability:
            try:
                self._durability[url] = lease_durability(await server.settings())
            except PrefectRateLimited:
                raise
            except PrefectUnreachable as error:
                self._durability[url] = LeaseDurability("Unknown", "SettingsUnreadable", str(error))
        return self._durability[url]

    async def list_unlocked(
        self, reference: PrefectServerReference, stack: contextlib.AsyncExitStack
    ) -> Listing | None:
        """A resync's listing, taken before the policy's lock. Names the operator writes from
        now until ``stack`` closes are noted, so their newer values win over the listing."""
        try:
            server = await self.server(reference, full=False)
        except (SecretNotFound, PrefectUnreachable):
            return None  # the locked reconcile reads the Secret again and reports it
        url = server.api_url
        written = stack.enter_context(self._tracking_writes(url))
        try:
            limits = await server.list_all()
        except PrefectUnreachable as error:
            return Listing(url, {}, written, error)
        return Listing(url, limits, written)

    async def reread(self, server: LimitsApi, names: Iterable[str]) -> None:
        """Read these limits again (how many slots they hold now) into the cache."""
        observed = self._observed.setdefault(server.api_url, {})
        for name in names:
            if (limit := await server.read(name)) is None:
                observed.pop(name, None)
            else:
                observed[name] = limit

    def record(self, server: LimitsApi, change: Change) -> None:
        """Keep the cache in step with a write the operator just made."""
        observed = self._observed.setdefault(server.api_url, {})
        if change.limit is None:
            observed.pop(change.name, None)
        else:
            before = observed.get(change.name)
            observed[change.name] = ObservedLimit(
                change.name,
                change.limit.limit,
                before.active if before else True,
                change.limit.slot_decay_per_second,
                before.active_slots if before else 0,
            )
        for written in self._listing_watchers.get(server.api_url, ()):
            written.add(change.name)

    def hold(self, api_url: str, seconds: float) -> None:
        """The server rate-limits: no reconcile of a policy writing to it for ``seconds``."""
        self._held[api_url] = max(self._held.get(api_url, 0.0), time.monotonic() + seconds)

    def held_for(self, api_url: str) -> float:
        """Seconds left of the server's Retry-After; 0 when it takes requests."""
        return max(0.0, self._held.get(api_url, 0.0) - time.monotonic())

    def forget(self, api_url: str) -> None:
        """Drop a server's cache: after an outage everything is read again."""
        self._observed.pop(api_url, None)

    @contextlib.contextmanager
    def _tracking_writes(self, url: str) -> Iterator[set[str]]:
        written: set[str] = set()
        watchers = self._listing_watchers.setdefault(url, [])
        watchers.append(written)
        try:
            yield written
        finally:
            watchers.remove(written)
            if not watchers:
                del self._listing_watchers[url]

    async def close(self) -> None:
        for server in self._servers.values():
            await server.close()
