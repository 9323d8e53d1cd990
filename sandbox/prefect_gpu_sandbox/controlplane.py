"""etcd + kube-apiserver on 127.0.0.1 with RBAC, generated certificates and an admin kubeconfig."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from prefect_gpu_operator.adapters.pki import CertificateAuthority, KeyPair
from prefect_gpu_sandbox.processes import ServerProcess, Service, free_port
from prefect_gpu_sandbox.tools import ensure_tools

__all__ = [
    "ControlPlane",
    "client_certificate",
    "http_ok",
    "kubeconfig",
    "write_service_account_key",
]

_READY_TIMEOUT = 120.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class ControlPlane(Service):
    """A real etcd + kube-apiserver pair. ``start()`` returns once ``/readyz`` answers ok."""

    directory: Path
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    processes: list[ServerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    def start(self) -> None:
        bin_dir = ensure_tools(("etcd", "kube-apiserver"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pki.mkdir(exist_ok=True)
        self._write_certificates()
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        etcd = ServerProcess(
            "etcd",
            [
                str(bin_dir / "etcd"),
                f"--data-dir={self.directory / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{self.etcd_peer_port}",
                "--unsafe-no-fsync=true",  # test data: durability is not worth the latency
                "--log-level=warn",
            ],
            log_path=self.directory / "etcd.log",
        )
        self.processes.append(etcd)
        etcd.start()
        etcd.wait_ready(lambda: http_ok(f"{etcd_url}/health"), timeout=_READY_TIMEOUT)

        apiserver = ServerProcess(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={self.pki / 'apiserver.crt'}",
                f"--tls-private-key-file={self.pki / 'apiserver.key'}",
                f"--client-ca-file={self.pki / 'client-ca.crt'}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                # No controller-manager runs, so no token controller fills service accounts.
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-issuer=https://127.0.0.1:{self.apiserver_port}/",
                f"--service-account-key-file={self.pki / 'sa.key'}",
                f"--service-account-signing-key-file={self.pki / 'sa.key'}",
                f"--cert-dir={self.pki}",
                "--profiling=false",
            ],
            log_path=self.directory / "kube-apiserver.log",
        )
        self.processes.append(apiserver)
        apiserver.start()
        apiserver.wait_ready(self.ready, timeout=_READY_TIMEOUT)

    def ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki / "serving-ca.crt"))
        context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return http_ok(f"{self.url}/readyz", context)

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver, etcd keeping the data: its watch cache starts afresh,
        so a client resuming an older watch gets 410 Gone and lists again, as in an upgrade."""
        apiserver = self.processes[-1]
        apiserver.stop()
        apiserver.start()
        apiserver.wait_ready(self.ready, timeout=_READY_TIMEOUT)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def _write_certificates(self) -> None:
        serving_ca = CertificateAuthority("prefect-gpu-operator-serving-ca")
        client_ca = CertificateAuthority("prefect-gpu-operator-client-ca")
        (self.pki / "serving-ca.crt").write_bytes(serving_ca.cert_pem)
        (self.pki / "client-ca.crt").write_bytes(client_ca.cert_pem)
        serving = serving_ca.issue_server("kube-apiserver", ["127.0.0.1", "localhost", "10.0.0.1"])
        serving.write(self.pki / "apiserver.crt", self.pki / "apiserver.key")
        admin = client_certificate(client_ca, "admin", ("system:masters",))
        admin.write(self.pki / "admin.crt", self.pki / "admin.key")
        write_service_account_key(self.pki / "sa.key")
        document = kubeconfig(self.url, serving_ca.cert_pem, "admin", admin)
        self.kubeconfig.write_text(yaml.safe_dump(document))
        self.kubeconfig.chmod(0o600)


def kubeconfig(server: str, ca_pem: bytes, user: str, credentials: KeyPair) -> dict[str, Any]:
    """A kubeconfig for ``user`` authenticating with a client certificate."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "sandbox",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(credentials.cert_pem),
                    "client-key-data": _b64(credentials.key_pem),
                },
            }
        ],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": user}}],
        "current-context": "sandbox",
    }


def client_certificate(ca: CertificateAuthority, user: str, groups: tuple[str, ...]) -> KeyPair:
    """A client certificate: Kubernetes reads the user from CN and the groups from O."""
    return ca.issue(user, ExtendedKeyUsageOID.CLIENT_AUTH, organizations=groups)


def write_service_account_key(path: Path) -> None:
    """The RSA key kube-apiserver signs and verifies service-account tokens with."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return False
