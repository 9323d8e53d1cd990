"""The operator-made webhook certificate: its checks and the caBundle patch are pure."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509

from prefect_gpu_operator.adapters.webhook_tls import (
    RENEW_BEFORE,
    WebhookTLS,
    ca_bundle_patch,
    mint_webhook_tls,
)

HOSTS = ["svc", "svc.ns", "svc.ns.svc", "127.0.0.1"]


def now() -> datetime.datetime:
    # At call time: the module is collected long before its tests run in a full session.
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def tls() -> WebhookTLS:
    return mint_webhook_tls(HOSTS, common_name="svc-webhook-tls")


def test_minted_certificate_is_signed_by_its_ca_for_the_hosts(tls: WebhookTLS) -> None:
    ca = x509.load_pem_x509_certificate(tls.ca_pem)
    cert = x509.load_pem_x509_certificate(tls.cert_pem)
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == HOSTS[:3]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.not_valid_after_utc - now() > datetime.timedelta(days=3000)
    assert b"PRIVATE KEY" in tls.key_pem


def test_two_mints_never_share_a_key(tls: WebhookTLS) -> None:
    other = mint_webhook_tls(HOSTS, common_name="svc-webhook-tls")
    assert other.key_pem != tls.key_pem
    assert other.ca_pem != tls.ca_pem


def test_secret_data_round_trips(tls: WebhookTLS) -> None:
    data = tls.secret_data()
    assert sorted(data) == ["ca.crt", "tls.crt", "tls.key"]
    assert base64.b64decode(data["ca.crt"]) == tls.ca_pem
    assert WebhookTLS.from_secret_data(data) == tls


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"tls.crt": "eA==", "tls.key": "eA=="},  # no ca.crt: a Secret made by someone else
        {"ca.crt": "", "tls.crt": "eA==", "tls.key": "eA=="},
        {"ca.crt": "not base64!", "tls.crt": "eA==", "tls.key": "eA=="},
    ],
)
def test_incomplete_or_unreadable_secret_is_no_bundle(data: dict[str, str] | None) -> None:
    assert WebhookTLS.from_secret_data(data) is None


def test_serves_the_hosts_it_was_made_for(tls: WebhookTLS) -> None:
    assert tls.serves(HOSTS, now())
    assert tls.serves(["svc.ns.svc"], now())
    assert tls.serves(["127.0.0.1"], now())


def test_does_not_serve_another_host(tls: WebhookTLS) -> None:
    assert not tls.serves([*HOSTS, "other.ns.svc"], now())
    assert not tls.serves(["10.0.0.1"], now())


def test_certificate_near_its_end_is_replaced(tls: WebhookTLS) -> None:
    end = x509.load_pem_x509_certificate(tls.cert_pem).not_valid_after_utc
    assert tls.serves(HOSTS, end - RENEW_BEFORE - datetime.timedelta(days=1))
    assert not tls.serves(HOSTS, end - RENEW_BEFORE + datetime.timedelta(days=1))
    assert not tls.serves(HOSTS, end + datetime.timedelta(days=1))


def test_garbage_certificate_serves_nothing() -> None:
    assert not WebhookTLS(b"x", b"not a certificate", b"y").serves(["svc"], now())


def _configuration(*bundles: str | None) -> dict[str, object]:
    webhooks = []
    for index, bundle in enumerate(bundles):
        client_config: dict[str, object] = {"service": {"name": "svc", "namespace": "ns"}}
        if bundle is not None:
            client_config["caBundle"] = bundle
        webhooks.append({"name": f"w{index}.prefectgpu.io", "clientConfig": client_config})
    return {"metadata": {"name": "svc", "resourceVersion": "42"}, "webhooks": webhooks}


def test_ca_bundle_patch_sets_every_webhook_that_lacks_the_ca(tls: WebhookTLS) -> None:
    bundle = base64.b64encode(tls.ca_pem).decode()
    ops = ca_bundle_patch(_configuration(None, bundle, "b2xk"), tls.ca_pem)
    assert ops == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle},
        {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": bundle},
    ]


def test_ca_bundle_patch_is_empty_when_all_have_it(tls: WebhookTLS) -> None:
    bundle = base64.b64encode(tls.ca_pem).decode()
    assert ca_bundle_patch(_configuration(bundle, bundle), tls.ca_pem) == []
    assert ca_bundle_patch(_configuration(), tls.ca_pem) == []
