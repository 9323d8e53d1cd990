"""Any Prefect server a platform team runs: a self-hosted one with basic auth and CSRF protection,
behind a TLS gateway with a private CA and access headers, and one that rate-limits (429).

One real Prefect server (auth string and CSRF on) serves the module, directly and through the
gateway (tests/support/gateway.py); the module's operator reads every credential from Secrets
and ConfigMaps in its namespace, and none of them may show in its log, Events or status.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_operator.adapters.pki import CertificateAuthority
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.waiting import eventually
from tests.support.gateway import Gateway
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies

pytestmark = pytest.mark.integration

AUTH_STRING = f"admin:{secrets.token_urlsafe(12)}"
ACCESS_ID = "gpu-operator.access"  # not secret: from a ConfigMap
ACCESS_SECRET = f"cf-{secrets.token_urlsafe(16)}"
# How long a request sent just before a 429 came back may take to reach the gateway.
IN_FLIGHT_SECONDS = 0.5
SECRET_VALUES = (AUTH_STRING, base64.b64encode(AUTH_STRING.encode()).decode(), ACCESS_SECRET)


def from_secret(name: str, key: str) -> dict[str, Any]:
    return {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}


def from_config_map(name: str, key: str) -> dict[str, Any]:
    return {"valueFrom": {"configMapKeyRef": {"name": name, "key": key}}}


BASIC_AUTH = from_secret("prefect-basic-auth", "auth-string")  # prefect-helm's key name
CA_BUNDLE = from_config_map("gateway-ca", "ca.crt")
ACCESS_HEADERS = [
    {"name": "CF-Access-Client-Id", **from_config_map("gateway-access", "client-id")},
    {"name": "CF-Access-Client-Secret", **from_secret("gateway-access", "client-secret")},
]


@pytest.fixture(scope="module")
def guarded_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A self-hosted server as prefect-helm runs it with basicAuth and CSRF protection."""
    settings = {
        "PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING,
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
    }
    with PrefectServer(tmp_path_factory.mktemp("prefect-guarded"), settings=settings) as server:
        yield server


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("gateway-test-ca")


@pytest.fixture(scope="module")
def gateway(
    guarded_prefect: PrefectServer,
    ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    upstream = f"http://127.0.0.1:{guarded_prefect.port}"
    required = {"CF-Access-Client-Id": ACCESS_ID, "CF-Access-Client-Secret": ACCESS_SECRET}
    directory = tmp_path_factory.mktemp("gateway")
    with Gateway(upstream, ca, directory, required_headers=required) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def references(
    core_v1: client.CoreV1Api, operator_namespace: str, ca: CertificateAuthority
) -> Iterator[None]:
    """The Secrets and ConfigMaps the policies name, in the operator's namespace."""
    secrets_made = {
        "prefect-basic-auth": {"auth-string": AUTH_STRING},
        "gateway-access": {"client-secret": ACCESS_SECRET},
        "wrong-access": {"client-secret": "cf-not-the-right-one"},
    }
    config_maps = {
        "gateway-ca": {"ca.crt": ca.cert_pem.decode()},
        "gateway-access": {"client-id": ACCESS_ID},
    }
    for name, data in secrets_made.items():
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
        core_v1.create_namespaced_secret(operator_namespace, body)
    for name, data in config_maps.items():
        config_map = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data)
        core_v1.create_namespaced_config_map(operator_namespace, config_map)
    yield
    for name in secrets_made:
        core_v1.delete_namespaced_secret(name, operator_namespace)
    for name in config_maps:
        core_v1.delete_namespaced_config_map(name, operator_namespace)


@pytest.fixture
def reader(guarded_prefect: PrefectServer) -> Iterator[PrefectLimitsReader]:
    """Reads limits as a user would: basic auth, and a CSRF token (listing is a POST)."""
    basic = base64.b64encode(AUTH_STRING.encode()).decode()
    limits = PrefectLimitsReader(
        guarded_prefect.api_url, headers={"Authorization": f"Basic {basic}"}
    )
    client_id = secrets.token_hex(8)
    token = limits.http.get("/csrf-token", params={"client": client_id})
    token.raise_for_status()
    limits.http.headers.update(
        {"Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": client_id}
    )
    yield limits
    limits.close()


def policy(server: dict[str, Any], pool: str) -> dict[str, Any]:
    return {"server": server, "nodeSelector": {"matchLabels": {"pool": pool}}}


def condition(policies: Policies, name: str, kind: str, status: str) -> dict[str, Any]:
    found = policies.condition(name, kind)
    assert found["status"] == status, found
    return found


def assert_nothing_secret(operator: OperatorProcess, policies: Policies, *names: str) -> None:
    """No credential in the operator's log, nor in the policies' Events and status."""
    shown = [operator.log()]
    for name in names:
        shown.append(json.dumps(policies.status(name)))
        shown.append(json.dumps(policies.event_messages(name)))
    for text in shown:
        for value in SECRET_VALUES:
            assert value not in text


@pytest.mark.usefixtures("references")
def test_basic_auth_and_csrf_on_a_self_hosted_server(
    operator: OperatorProcess,
    guarded_prefect: PrefectServer,
    policies: Policies,
    gpu_nodes: NodeFactory,
    reader: PrefectLimitsReader,
) -> None:
    gpu_nodes.create("ap1-a", 2, labels={"pool": "ap1"})
    gpu_nodes.create("ap1-b", 1, labels={"pool": "ap1"})
    server = {"remoteApiUrl": guarded_prefect.api_url, "basicAuth": BASIC_AUTH}
    policies.create("ap1", policy(server, "ap1"))
    # Every write is a change request the server checks for a CSRF token: create, update, delete.
    expect_limits(reader, "gpu:ap1-", {"gpu:ap1-a": 2, "gpu:ap1-b": 1}, timeout=30)
    gpu_nodes.set_gpus("ap1-a", 4)
    gpu_nodes.delete("ap1-b")
    expect_limits(reader, "gpu:ap1-", {"gpu:ap1-a": 4})
    eventually(lambda: condition(policies, "ap1", "Ready", "True"), timeout=10)
    assert operator.metric("prefect_gpu_operator_prefect_api_calls_total", operation="csrf-token")

    # Without the auth string the same server refuses the operator, and says so.
    gpu_nodes.create("ap1x-a", 1, labels={"pool": "ap1x"})
    policies.create("ap1x", policy({"remoteApiUrl": guarded_prefect.api_url}, "ap1x"))
    refused = eventually(
        lambda: condition(policies, "ap1x", "PrefectReachable", "False"), timeout=20
    )
    assert "HTTP 401" in refused["message"]
    assert reader.limits("gpu:ap1x-") == {}
    assert_nothing_secret(operator, policies, "ap1", "ap1x")


@pytest.mark.usefixtures("references")
def test_through_a_tls_gateway_with_a_private_ca_and_access_headers(
    operator: OperatorProcess,
    gateway: Gateway,
    policies: Policies,
    gpu_nodes: NodeFactory,
    reader: PrefectLimitsReader,
) -> None:
    through = {
        "remoteApiUrl": f"{gateway.url}/api",
        "basicAuth": BASIC_AUTH,
        "caBundle": CA_BUNDLE,
        "headers": ACCESS_HEADERS,
    }
    gpu_nodes.create("ap2-a", 2, labels={"pool": "ap2"})
    policies.create("ap2", policy(through, "ap2"))
    expect_limits(reader, "gpu:ap2-", {"gpu:ap2-a": 2}, timeout=30)
    assert any(seen.path.startswith("/api/csrf-token") for seen in gateway.seen)

    # Without the CA, the gateway's certificate is not trusted.
    untrusted = {key: value for key, value in through.items() if key != "caBundle"}
    gpu_nodes.create("ap2u-a", 1, labels={"pool": "ap2u"})
    policies.create("ap2u", policy(untrusted, "ap2u"))
    refused = eventually(
        lambda: condition(policies, "ap2u", "PrefectReachable", "False"), timeout=20
    )
    assert "CERTIFICATE_VERIFY_FAILED" in refused["message"]

    # With a wrong access secret, the gateway refuses, echoing every header it got: the
    # operator reports the refusal with its credentials masked.
    wrong = [
        ACCESS_HEADERS[0],
        {"name": "CF-Access-Client-Secret", **from_secret("wrong-access", "client-secret")},
    ]
    gpu_nodes.create("ap2w-a", 1, labels={"pool": "ap2w"})
    policies.create("ap2w", policy({**through, "headers": wrong}, "ap2w"))
    denied = eventually(
        lambda: condition(policies, "ap2w", "PrefectReachable", "False"), timeout=20
    )
    assert "HTTP 403: access denied" in denied["message"]
    assert "Authorization: Basic ***" in denied["message"]
    assert "cf-not-the-right-one" not in denied["message"]
    assert reader.limits("gpu:ap2u-") == reader.limits("gpu:ap2w-") == {}
    assert_nothing_secret(operator, policies, "ap2", "ap2u", "ap2w")


@pytest.mark.usefixtures("references")
def test_a_rate_limited_cold_start_honours_retry_after_and_finishes(
    operator: OperatorProcess,
    gateway: Gateway,
    policies: Policies,
    gpu_nodes: NodeFactory,
    reader: PrefectLimitsReader,
) -> None:
    expected = {}
    for index in range(12):
        gpu_nodes.create(f"ap3-{index:02d}", 1 + index % 3, labels={"pool": "ap3"})
        expected[f"gpu:ap3-{index:02d}"] = 1 + index % 3
    server = {
        "remoteApiUrl": f"{gateway.url}/api",
        "basicAuth": BASIC_AUTH,
        "caBundle": CA_BUNDLE,
        "headers": ACCESS_HEADERS,
    }
    start = len(gateway.seen)
    gateway.rate_limit(4, seconds=2.0)
    try:
        policies.create("ap3", policy(server, "ap3"))
        expect_limits(reader, "gpu:ap3-", expected, timeout=60)
    finally:
        gateway.rate_limit(None)
    eventually(lambda: condition(policies, "ap3", "Ready", "True"), timeout=10)

    seen = gateway.seen[start:]
    throttled = [index for index, request in enumerate(seen) if request.status == 429]
    assert len(throttled) >= 2, "the limit never bit: the test proves nothing"
    checked = 0
    for index in throttled:
        refused = seen[index]
        assert refused.retry_after is not None
        # Writes run in parallel: those already sent when the 429 came back may arrive just after
        # it (and be refused too). Once the operator has seen it, nothing is sent before
        # Retry-After has passed (a little slack for clocks) ...
        sent_later = [r for r in seen[index + 1 :] if r.at > refused.at + IN_FLIGHT_SECONDS]
        if sent_later:
            after = sent_later[0]
            assert after.at >= refused.at + refused.retry_after - 0.05, (refused, after)
            # ... and the refused write is retried from the cache: no listing again.
            assert not after.path.endswith("/filter"), (refused, after)
            checked += 1
    assert checked, "no request came after a 429 was seen: the test proves nothing"
    messages = policies.event_messages("ap3")
    assert "PrefectRateLimited" in messages
    assert "PrefectUnreachable" not in messages
    assert all("HTTP 429" in message for message in messages["PrefectRateLimited"])
    assert_nothing_secret(operator, policies, "ap3")
