"""The operator's admission webhook on 127.0.0.1, registered the way the chart registers it.

For a control plane without a kubelet or Service network: the operator serves the webhook on a
loopback port with a certificate made here, and the MutatingWebhookConfiguration is the chart's
own (``helm template``, so its pod and namespace selectors are exactly what users install), with
``clientConfig.service`` replaced by this endpoint's URL and CA.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.adapters.pki import CertificateAuthority
from prefect_gpu_operator.domain.injection import WEBHOOK_PATH
from prefect_gpu_sandbox.chart import render_chart
from prefect_gpu_sandbox.processes import free_port

__all__ = ["WebhookEndpoint"]


class WebhookEndpoint:
    """The webhook the operator serves on 127.0.0.1: certificate, operator settings, and the
    chart's MutatingWebhookConfiguration pointed here."""

    def __init__(self, directory: Path, name: str = "prefect-gpu-operator-local") -> None:
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ca = CertificateAuthority("prefect-gpu-operator-webhook-ca")
        self.ca_pem = ca.cert_pem
        self.cert_file = directory / "webhook.crt"
        self.key_file = directory / "webhook.key"
        ca.issue_server("127.0.0.1", ["127.0.0.1"]).write(self.cert_file, self.key_file)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def operator_env(self) -> dict[str, str]:
        """The operator's settings to serve this endpoint."""
        return {
            "PREFECT_GPU_OPERATOR_WEBHOOK_ENABLED": "true",
            "PREFECT_GPU_OPERATOR_WEBHOOK_ADDRESS": "127.0.0.1",
            "PREFECT_GPU_OPERATOR_WEBHOOK_HOST": "127.0.0.1",
            "PREFECT_GPU_OPERATOR_WEBHOOK_PORT": str(self.port),
            "PREFECT_GPU_OPERATOR_WEBHOOK_CERT_FILE": str(self.cert_file),
            "PREFECT_GPU_OPERATOR_WEBHOOK_KEY_FILE": str(self.key_file),
        }

    def serving(self) -> bool:
        """True once the operator answers TLS handshakes with the certificate the CA signed."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return True
        except OSError:
            return False

    def configuration(
        self, namespace: str, values: Mapping[str, Any] | None = None, *, name: str | None = None
    ) -> dict[str, Any]:
        """The chart's MutatingWebhookConfiguration for a release in ``namespace`` (chart
        ``values`` such as ``webhook.podSelectors``), named ``name`` (default: the endpoint's),
        with this endpoint as its client."""
        webhook_values = dict((values or {}).get("webhook") or {})
        webhook_values["tls"] = {"source": "operator"}  # renders no certificate of Helm's
        (configuration,) = render_chart(
            namespace,
            {**(values or {}), "webhook": webhook_values},
            show_only="templates/webhook.yaml",
        )
        configuration["metadata"] = {"name": name or self.name}
        bundle = base64.b64encode(self.ca_pem).decode()
        for webhook in configuration["webhooks"]:
            webhook["clientConfig"] = {"url": self.url, "caBundle": bundle}
        return configuration

    def register(
        self,
        api: client.ApiClient,
        namespace: str,
        values: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        admission = client.AdmissionregistrationV1Api(api)
        # The client sends a plain dict as it is.
        admission.create_mutating_webhook_configuration(
            self.configuration(namespace, values, name=name)  # type: ignore[arg-type]
        )

    def unregister(self, api: client.ApiClient, *, name: str | None = None) -> None:
        admission = client.AdmissionregistrationV1Api(api)
        try:
            admission.delete_mutating_webhook_configuration(name or self.name)
        except ApiException as error:
            if error.status != 404:
                raise
