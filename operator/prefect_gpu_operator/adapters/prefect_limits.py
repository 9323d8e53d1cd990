"""The operator's one door to Prefect: global concurrency limits over Prefect's REST API, and
the leases of dead pods (see ``domain/pod_leases``).

A few endpoints are all it needs, so it speaks them with one long-lived httpx client rather than
Prefect's full client (which costs ~40 MB of imports and extra requests per call). It
authenticates the way Prefect's client does: ``Authorization: Bearer`` for an API key (Prefect
Cloud), ``Authorization: Basic`` for a self-hosted server's auth string, extra headers, a custom
CA, and a CSRF token when the server asks for one. Every request is counted
(``prefect_api_calls_total``) so that tests and benchmarks can prove the operator makes no call
it does not need.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.domain.pod_leases import PodLease, pod_leases, prefix_of
from prefect_gpu_operator.metrics import PREFECT_CALLS, PREFECT_ERRORS, PREFECT_THROTTLED

__all__ = [
    "ObservedLimit",
    "PrefectConnection",
    "PrefectLimits",
    "PrefectRateLimited",
    "PrefectUnreachable",
    "request_headers",
    "retry_after_seconds",
]

# The server rejects pages larger than 200.
PAGE_SIZE = 200
# A SQLite-backed server answers 503 "database is locked" under concurrent writes: worth a retry.
_RETRIED_STATUS = frozenset({502, 503, 504})
_RETRIES = 3
# A 429 without Retry-After waits this long; an absurd Retry-After is capped (it is asked again).
_RATE_LIMIT_DEFAULT_SECONDS = 1.0
_RATE_LIMIT_MAX_SECONDS = 300.0
# Prefect's CSRF middleware guards these methods (prefect/server/api/middleware.py).
_CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Visible ASCII, spaces and tabs: anything else (a newline in a Secret) cannot be sent.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


class PrefectUnreachable(RuntimeError):
    """The Prefect API could not be reached or answered with an error."""


class PrefectRateLimited(PrefectUnreachable):
    """The API answered 429: it works, but asks this client to wait ``retry_after`` seconds.
    Until then every request through the same connection is refused the same way, unsent."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class PrefectConnection:
    """Where a Prefect API is and how to reach it: the values a policy's server reference
    names, read from their Secrets and ConfigMaps. Credentials stay out of ``repr``."""

    api_url: str
    api_key: str | None = field(default=None, repr=False)
    auth_string: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    ca_bundle: str | None = None  # PEM
    secret_headers: frozenset[str] = frozenset()  # the headers whose values came from Secrets

    def secrets(self) -> list[str]:
        """Every value that must never appear in a message, as sent and as configured."""
        hidden = [value for name, value in self.headers if name in self.secret_headers]
        values = [self.api_key, self.auth_string, *hidden]
        if self.auth_string:
            values.append(_basic(self.auth_string))
        return sorted((value for value in values if value), key=len, reverse=True)


def _basic(auth_string: str) -> str:
    return base64.b64encode(auth_string.encode()).decode()


def request_headers(connection: PrefectConnection) -> dict[str, str]:
    """The headers sent with every request. Raises ValueError (naming the header, never its
    value) for a value that cannot be sent, such as one with a line break."""
    headers = dict(connection.headers)
    if connection.auth_string:
        headers["Authorization"] = f"Basic {_basic(connection.auth_string)}"
    elif connection.api_key:
        headers["Authorization"] = f"Bearer {connection.api_key}"
    for name, value in headers.items():
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"the value of header {name} is not a valid HTTP header value")
    return headers


def retry_after_seconds(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """A Retry-After header (delay-seconds or HTTP-date, RFC 9110) as seconds from ``now``;
    None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            at = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=datetime.UTC)
        seconds = (at - (now or datetime.datetime.now(datetime.UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite
        return None
    return min(max(seconds, 0.0), _RATE_LIMIT_MAX_SECONDS)


def _verify(connection: PrefectConnection) -> ssl.SSLContext | bool:
    if connection.ca_bundle is None:
        return True  # certifi, or SSL_CERT_FILE / SSL_CERT_DIR (httpx reads them)
    try:
        return ssl.create_default_context(cadata=connection.ca_bundle)
    except (ssl.SSLError, ValueError):
        raise PrefectUnreachable(
            f"caBundle for {connection.api_url} holds no PEM certificate"
        ) from None


def _path(name: str) -> str:
    # Quote everything but ':' so that a name such as gpu:node-1.example.com travels intact.
    return f"/v2/concurrency_limits/{quote(name, safe=':')}"


def _observed(item: dict[str, Any]) -> ObservedLimit:
    return ObservedLimit(
        item["name"],
        int(item["limit"]),
        bool(item.get("active", True)),
        float(item.get("slot_decay_per_second") or 0.0),
        int(item.get("active_slots") or 0),
    )


@dataclass
class _CsrfToken:
    token: str
    expires: datetime.datetime


class PrefectLimits:
    """Create, read, update and delete global concurrency limits on one Prefect API (the runtime's
    ``LimitsApi``)."""

    def __init__(self, connection: PrefectConnection, *, timeout: float = 10.0) -> None:
        self.api_url = connection.api_url.rstrip("/")
        self._secrets = connection.secrets()
        try:
            headers = request_headers(connection)
        except ValueError as error:
            raise PrefectUnreachable(f"{self.api_url}: {error}") from None
        self._http = httpx.AsyncClient(
            base_url=self.api_url + "/",
            headers=headers,
            timeout=timeout,
            verify=_verify(connection),
        )
        # Learnt from the server's first refusal; Prefect Cloud and most servers never ask.
        self._csrf: _CsrfToken | None = None
        self._csrf_client = str(uuid.uuid4())
        self._csrf_lock = asyncio.Lock()
        self._not_before = 0.0  # monotonic time before which nothing is sent (Retry-After)

    async def close(self) -> None:
        await self._http.aclose()

    async def list_all(self) -> dict[str, ObservedLimit]:
        """Every limit on the server, paged."""
        found: dict[str, ObservedLimit] = {}
        offset = 0
        while True:
            body = {"limit": PAGE_SIZE, "offset": offset}
            page: list[dict[str, Any]] = (
                await self._request("list", "POST", "/v2/concurrency_limits/filter", body)
            ).json()
            found.update((item["name"], _observed(item)) for item in page)
            if len(page) < PAGE_SIZE:
                return found
            offset += PAGE_SIZE

    async def read(self, name: str) -> ObservedLimit | None:
        """One limit as it is now (its held slots included); None if it does not exist."""
        response = await self._request("read", "GET", _path(name), None, ok={404})
        return None if response.status_code == 404 else _observed(response.json())

    async def create(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        """Create the limit; if it appeared meanwhile, set it instead (the caller owns the name)."""
        body = {"name": name, "limit": limit, "slot_decay_per_second": slot_decay_per_second}
        response = await self._request("create", "POST", "/v2/concurrency_limits/", body, ok={409})
        if response.status_code == 409:
            await self.update(name, limit, slot_decay_per_second)

    async def update(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        """Change the limit's size. Never touches ``active``: toggling it corrupts slot counts."""
        body = {"limit": limit, "slot_decay_per_second": slot_decay_per_second}
        response = await self._request("update", "PATCH", _path(name), body, ok={404})
        if response.status_code == 404:
            await self.create(name, limit, slot_decay_per_second)

    async def delete(self, name: str) -> None:
        # Already gone is fine: the goal is reached.
        await self._request("delete", "DELETE", _path(name), None, ok={404})

    async def settings(self) -> dict[str, Any] | None:
        """The server's settings as it reports them (secrets masked by Prefect); None where it
        reports none (Prefect Cloud has no such endpoint; a server may refuse it). The body is
        read, never logged."""
        refused = {401, 403, 404, 405}
        response = await self._request("settings", "GET", "/admin/settings", None, ok=refused)
        if response.status_code in refused:
            return None
        found = response.json()
        return found if isinstance(found, dict) else None

    async def pod_leases(self, pod_uid: str) -> list[PodLease]:
        """The leases gpu_slot() published for the pod's slots (one request)."""
        body = {"variables": {"name": {"like_": prefix_of(pod_uid)}}, "limit": PAGE_SIZE}
        response = await self._request("pod-leases", "POST", "/variables/filter", body)
        found = response.json()
        return pod_leases(pod_uid, found if isinstance(found, list) else [])

    async def revoke_lease(self, lease_id: str) -> None:
        """Give the lease's slots back, as its holder would on leaving. A lease the server no
        longer has (released, expired) answers 204 as well: nothing to do."""
        body = {"lease_id": lease_id}
        await self._request(
            "revoke-lease", "POST", "/v2/concurrency_limits/decrement-with-lease", body, ok={404}
        )

    async def forget_lease(self, variable: str) -> None:
        """Delete a published lease once it is revoked; already gone is fine."""
        path = f"/variables/name/{quote(variable, safe='')}"
        await self._request("forget-lease", "DELETE", path, None, ok={404})

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        ok: frozenset[int] | set[int] = frozenset(),
    ) -> httpx.Response:
        csrf_refreshed = False
        attempt = 0
        while True:
            sent = self._csrf
            response, failure = await self._send(operation, method, path, body)
            if response is not None:
                if response.is_success or response.status_code in ok:
                    return response
                if _csrf_refused(response) and not csrf_refreshed:
                    await self._refresh_csrf(sent)  # missing or expired: fetch one and resend
                    csrf_refreshed = True
                    continue
                PREFECT_ERRORS.labels(operation).inc()
                # Redacted before it is cut: a cut credential would no longer match.
                failure = f"HTTP {response.status_code}: {self._redact(response.text)[:200]}"
                if response.status_code == 429:
                    raise self._rate_limited(operation, response)
                if response.status_code not in _RETRIED_STATUS:
                    break
            else:
                PREFECT_ERRORS.labels(operation).inc()
            if attempt == _RETRIES:
                break
            await asyncio.sleep(0.1 * 2**attempt)
            attempt += 1
        raise PrefectUnreachable(self._redact(f"{operation} on {self.api_url}: {failure}"))

    async def _send(
        self, operation: str, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[httpx.Response | None, str]:
        """One request: its response, or why there is none. Refused unsent while a 429's
        Retry-After lasts: the caller waits it out (holding nothing meanwhile), not this call."""
        if (wait := self._not_before - time.monotonic()) > 0:
            message = f"{operation} on {self.api_url}: rate limited (HTTP 429), {wait:.0f} s left"
            raise PrefectRateLimited(f"{message} of Retry-After", wait)
        headers: dict[str, str] = {}
        if method in _CHANGES and self._csrf is not None:
            if self._csrf.expires <= datetime.datetime.now(datetime.UTC):
                await self._refresh_csrf(self._csrf)
            if self._csrf is not None:
                headers = {
                    "Prefect-Csrf-Token": self._csrf.token,
                    "Prefect-Csrf-Client": self._csrf_client,
                }
        PREFECT_CALLS.labels(operation).inc()
        try:
            response = await self._http.request(
                method, path.lstrip("/"), json=body, headers=headers
            )
        except httpx.HTTPError as error:
            return None, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return response, ""

    async def _refresh_csrf(self, stale: _CsrfToken | None) -> None:
        """A new token for this client, as Prefect's client gets one (GET /csrf-token), unless
        a concurrent request already replaced ``stale``: the server keeps one per client."""
        async with self._csrf_lock:
            if self._csrf is not stale:
                return
            response = await self._request(
                "csrf-token", "GET", f"/csrf-token?client={self._csrf_client}", None
            )
            token = response.json()
            expires = datetime.datetime.fromisoformat(token["expiration"].replace("Z", "+00:00"))
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.UTC)
            # Renew a little early: a token that expires in flight costs a refused write.
            self._csrf = _CsrfToken(token["token"], expires - datetime.timedelta(seconds=30))

    def _rate_limited(self, operation: str, response: httpx.Response) -> PrefectRateLimited:
        PREFECT_THROTTLED.labels(operation).inc()
        delay = retry_after_seconds(response.headers.get("Retry-After"))
        delay = max(_RATE_LIMIT_DEFAULT_SECONDS if delay is None else delay, 0.1)  # never 0
        self._not_before = max(self._not_before, time.monotonic() + delay)
        message = (
            f"{operation} on {self.api_url}: HTTP 429 Too Many Requests, "
            f"retrying in {delay:.0f} s (Retry-After)"
        )
        return PrefectRateLimited(self._redact(message), delay)

    def _redact(self, message: str) -> str:
        """The message with every credential replaced: servers and proxies may echo them."""
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


def _csrf_refused(response: httpx.Response) -> bool:
    # "Missing CSRF token." or "Invalid CSRF token or client identifier." (Prefect's middleware)
    return response.status_code == 403 and "CSRF token" in response.text
