"""The webhook's self-signed certificate, made by the operator itself and kept in a Secret.

For installs that render the chart offline (``manifests/``, ``helm template``, GitOps tools),
nothing secret may be rendered: a key in a committed YAML file is a key everybody has. With
``webhook_tls_secret`` set, the first replica to start mints a CA and a serving certificate,
stores them in that Secret (``kubernetes.io/tls`` plus ``ca.crt``, the layout cert-manager and
the chart use), injects the CA into the MutatingWebhookConfiguration, and every replica serves the
Secret's certificate. Replicas racing to create it settle on whichever write the API server took.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.adapters.pki import CertificateAuthority

__all__ = [
    "VALIDITY",
    "WebhookTLS",
    "ca_bundle_patch",
    "ensure_webhook_tls",
    "inject_ca",
    "mint_webhook_tls",
]

log = logging.getLogger(__name__)

# Like the chart's genCA path: long enough that nobody meets an expiry; rotate by deleting the
# Secret and restarting the operator.
VALIDITY = datetime.timedelta(days=3650)
# A certificate closer than this to its end is replaced at start-up.
RENEW_BEFORE = datetime.timedelta(days=30)
_WRITE_ATTEMPTS = 5
_SECRET_KEYS = ("ca.crt", "tls.crt", "tls.key")


@dataclass(frozen=True)
class WebhookTLS:
    """PEM CA certificate, serving certificate and its private key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> WebhookTLS | None:
        """The bundle in a Secret's (base64) data; None when a part is missing or unreadable."""
        try:
            parts = [
                base64.b64decode((data or {})[key]) for key in ("ca.crt", "tls.crt", "tls.key")
            ]
        except (KeyError, ValueError):
            return None
        return cls(*parts) if all(parts) else None

    def secret_data(self) -> dict[str, str]:
        parts = (self.ca_pem, self.cert_pem, self.key_pem)
        return {
            key: base64.b64encode(part).decode()
            for key, part in zip(_SECRET_KEYS, parts, strict=True)
        }

    def serves(self, hosts: Sequence[str], now: datetime.datetime) -> bool:
        """True if the serving certificate names every host and is valid well past ``now``."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_pem)
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return False
        covered = {str(name) for name in names.get_values_for_type(x509.DNSName)} | {
            str(address) for address in names.get_values_for_type(x509.IPAddress)
        }
        wanted = {_canonical(host) for host in hosts}
        # The start is not checked: replicas with skewed clocks must not re-mint in turn.
        fresh = now < cert.not_valid_after_utc - RENEW_BEFORE
        return wanted <= covered and fresh

    def write(self, cert_file: Path, key_file: Path) -> None:
        """The files the HTTPS server loads (a writable emptyDir in the pod)."""
        cert_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.parent.mkdir(parents=True, exist_ok=True)
        cert_file.write_bytes(self.cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(self.key_pem)


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def mint_webhook_tls(hosts: Sequence[str], common_name: str) -> WebhookTLS:
    """A fresh CA and a serving certificate for ``hosts`` (DNS names or IP addresses)."""
    authority = CertificateAuthority(f"{common_name}-ca", validity=VALIDITY)
    pair = authority.issue_server(common_name, list(hosts))
    return WebhookTLS(authority.cert_pem, pair.cert_pem, pair.key_pem)


def ca_bundle_patch(configuration: Mapping[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    """JSONPatch setting every webhook's ``caBundle`` to ``ca_pem``; empty when all have it.

    The ``test`` on resourceVersion makes a patch computed from a stale read fail (409) instead of
    writing into a list that changed meanwhile.
    """
    bundle = base64.b64encode(ca_pem).decode()
    ops: list[dict[str, Any]] = [
        {
            "op": "add",  # "add" replaces an existing member too
            "path": f"/webhooks/{index}/clientConfig/caBundle",
            "value": bundle,
        }
        for index, webhook in enumerate(configuration.get("webhooks") or [])
        if (webhook.get("clientConfig") or {}).get("caBundle") != bundle
    ]
    if not ops:
        return []
    version = (configuration.get("metadata") or {}).get("resourceVersion")
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *ops]


def ensure_webhook_tls(
    api: client.ApiClient,
    *,
    namespace: str,
    secret_name: str,
    hosts: Sequence[str],
    configuration: str | None,
) -> WebhookTLS:
    """The certificate in ``secret_name`` (created or replaced if missing, stale or for other
    hosts), with its CA injected into the MutatingWebhookConfiguration ``configuration``."""
    tls = _stored_or_minted(client.CoreV1Api(api), namespace, secret_name, hosts)
    if configuration:
        inject_ca(api, configuration, tls.ca_pem)
    return tls


def _stored_or_minted(
    core: client.CoreV1Api, namespace: str, name: str, hosts: Sequence[str]
) -> WebhookTLS:
    for _ in range(_WRITE_ATTEMPTS):
        secret = _read_json(lambda: core.read_namespaced_secret(name, namespace, **_RAW))
        stored = WebhookTLS.from_secret_data(secret.get("data") if secret else None)
        if stored is not None and stored.serves(hosts, datetime.datetime.now(datetime.UTC)):
            return stored
        fresh = mint_webhook_tls(hosts, common_name=name)
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "prefect-gpu-operator"},
            },
            "data": fresh.secret_data(),
        }
        try:
            if secret is None:
                core.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]
            else:
                body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
                core.replace_namespaced_secret(name, namespace, body)  # type: ignore[arg-type]
        except ApiException as error:
            if error.status == 409:  # another replica wrote first: read and use its certificate
                continue
            raise
        log.info("Stored a new webhook certificate for %s in Secret %s/%s", hosts, namespace, name)
        return fresh
    raise RuntimeError(f"Secret {namespace}/{name} kept changing under {_WRITE_ATTEMPTS} writes")


def inject_ca(api: client.ApiClient, name: str, ca_pem: bytes) -> None:
    """Set ``ca_pem`` as the caBundle of every webhook of configuration ``name`` lacking it."""
    admission = client.AdmissionregistrationV1Api(api)
    for _ in range(_WRITE_ATTEMPTS):
        configuration = _read_json(
            lambda: admission.read_mutating_webhook_configuration(name, **_RAW)
        )
        if configuration is None:
            log.warning("MutatingWebhookConfiguration %s not found: no CA to inject", name)
            return
        ops = ca_bundle_patch(configuration, ca_pem)
        if not ops:
            return
        try:
            admission.patch_mutating_webhook_configuration(name, ops)
        except ApiException as error:
            if error.status in (409, 422):  # changed since the read (the test op failed): again
                continue
            raise
        log.info("Injected the webhook CA into MutatingWebhookConfiguration %s", name)
        return
    raise RuntimeError(f"MutatingWebhookConfiguration {name} kept changing")


_RAW: dict[str, Any] = {"_preload_content": False}


def _read_json(read: Any) -> dict[str, Any] | None:
    """The object as a plain dict, or None if it does not exist."""
    try:
        response = read()
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    document: dict[str, Any] = json.loads(response.data)
    return document
