"""How the operator reaches a Prefect API: headers built from a server reference's values,
Retry-After, and credentials kept out of every repr and message."""

from __future__ import annotations

import asyncio
import base64
import datetime

import pytest

from prefect_gpu_operator.adapters.pki import CertificateAuthority
from prefect_gpu_operator.adapters.prefect_limits import (
    PrefectConnection,
    PrefectLimits,
    PrefectUnreachable,
    request_headers,
    retry_after_seconds,
)
from prefect_gpu_operator.api.policy import PrefectServerReference
from prefect_gpu_operator.runtime.prefect_view import connection_for

URL = "https://prefect.example/api"


def test_an_auth_string_is_sent_as_basic_like_prefects_client() -> None:
    headers = request_headers(PrefectConnection(URL, auth_string="admin:pa:ss"))
    assert headers == {"Authorization": "Basic " + base64.b64encode(b"admin:pa:ss").decode()}


def test_an_api_key_is_sent_as_bearer() -> None:
    assert request_headers(PrefectConnection(URL, api_key="pnu_k")) == {
        "Authorization": "Bearer pnu_k"
    }


def test_extra_headers_are_sent_as_given() -> None:
    connection = PrefectConnection(
        URL, api_key="pnu_k", headers=(("CF-Access-Client-Id", "id.access"), ("X-Team", "gpu"))
    )
    assert request_headers(connection) == {
        "CF-Access-Client-Id": "id.access",
        "X-Team": "gpu",
        "Authorization": "Bearer pnu_k",
    }


def test_a_value_that_cannot_be_sent_is_refused_without_showing_it() -> None:
    connection = PrefectConnection(URL, headers=(("X-Token", "line\nbreak-s3cret"),))
    with pytest.raises(ValueError, match="X-Token") as refused:
        request_headers(connection)
    assert "s3cret" not in str(refused.value)
    with pytest.raises(PrefectUnreachable) as unreachable:
        PrefectLimits(connection)
    assert "X-Token" in str(unreachable.value)
    assert "s3cret" not in str(unreachable.value)


def test_credentials_stay_out_of_repr() -> None:
    connection = PrefectConnection(
        URL, api_key="pnu_k3y", auth_string="admin:pw", headers=(("X-A", "h3ader"),)
    )
    for secret in ("pnu_k3y", "admin:pw", "h3ader"):
        assert secret not in repr(connection)


def test_every_form_a_credential_is_sent_in_is_known_for_redaction() -> None:
    connection = PrefectConnection(
        URL,
        auth_string="admin:pw",
        headers=(("X-A", "h3ader"), ("X-Team", "gpu")),
        secret_headers=frozenset({"X-A"}),
    )
    encoded = base64.b64encode(b"admin:pw").decode()
    # A value from a ConfigMap is no secret: masking "gpu" would mangle every limit name.
    assert set(connection.secrets()) == {"admin:pw", encoded, "h3ader"}


def test_a_ca_bundle_without_a_certificate_is_reported_without_its_content() -> None:
    with pytest.raises(PrefectUnreachable, match=r"caBundle for .* holds no PEM") as refused:
        PrefectLimits(PrefectConnection(URL, ca_bundle="not a certificate"))
    assert "not a certificate" not in str(refused.value)


def test_a_ca_bundle_is_trusted() -> None:
    ca = CertificateAuthority("test-ca").cert_pem.decode()
    limits = PrefectLimits(PrefectConnection(URL, ca_bundle=ca))
    asyncio.run(limits.close())


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("12", 12.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("86400", 300.0),  # capped: asked again after five minutes
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2026 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),
    ],
)
def test_retry_after(value: str | None, seconds: float | None) -> None:
    now = datetime.datetime(2026, 10, 21, 7, 28, 0, tzinfo=datetime.UTC)
    assert retry_after_seconds(value, now) == seconds


def test_a_reference_and_its_values_make_the_connection() -> None:
    secret = {"valueFrom": {"secretKeyRef": {"name": "auth", "key": "auth-string"}}}
    config_map = {"valueFrom": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}}}
    reference = PrefectServerReference.model_validate(
        {
            "remoteApiUrl": "https://prefect.example",
            "basicAuth": secret,
            "caBundle": config_map,
            "headers": [{"name": "X-Id", **config_map}, {"name": "X-Secret", **secret}],
        }
    )
    values = dict(zip(reference.value_refs(), ["admin:pw", "PEM", "PEM", "admin:pw"], strict=True))
    assert connection_for(reference, values) == PrefectConnection(
        URL,
        auth_string="admin:pw",
        ca_bundle="PEM",
        headers=(("X-Id", "PEM"), ("X-Secret", "admin:pw")),
        secret_headers=frozenset({"X-Secret"}),
    )
