"""A real single-node Kubernetes cluster and a Prefect server, in a network namespace of its own.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (runc, CNI bridge),
the kubelet, kube-proxy and a Prefect server all run inside the network namespace
``NodeCluster`` creates: the node's address (10.250.0.2 on its loopback) and the pods' bridge
exist only there, so nothing listens on the machine's own network. They also share a mount
namespace of the node's own, where its directories stand in for the machine-wide paths the
kubelet and containerd use regardless of their flags (/var/lib/kubelet holds the device
plugins' socket and checkpoint): two nodes on one machine do not meet, and their mounts vanish
with them. Pods run under a cgroup of the node's own.

How clients reach it. A relay process listens on this machine's 127.0.0.1 at the API server's
and the Prefect server's ports and forwards each connection to the same port inside the
namespace, where both servers listen on every address. So one kubeconfig and one
``PREFECT_API_URL`` (``https://127.0.0.1:PORT``, ``http://127.0.0.1:PORT/api``) work in both
places: tests, kubectl, helm and Prefect clients use them from here like the loopback control
plane's, and a shell entered with ``nsenter --net=/var/run/netns/NAME`` (``command()``) uses
them inside. The alternative, tests moving into the namespace (``setns``), only works for a
thread or a process started for it, and would cut them off from the loopback servers other tests
use. Pods reach the Prefect server at the node's address, ``pod_prefect_api_url``.

With ``fake_gpus=N`` a fake GPU device plugin (fake-device-plugin/, built by install-node.sh)
registers ``nvidia.com/gpu`` with the kubelet through its real device-plugin API, advertising N
devices with stable UUIDs and setting ``NVIDIA_VISIBLE_DEVICES`` in each container it is
allocated to; ``set_fake_gpus`` changes N while it runs.

Images come from OCI archives (``import_image``), as no registry is reachable: pods use
``imagePullPolicy: Never`` or ``IfNotPresent``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.x509.oid import ExtendedKeyUsageOID
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from prefect_gpu_operator.adapters.pki import CertificateAuthority
from prefect_gpu_sandbox import host
from prefect_gpu_sandbox.controlplane import (
    client_certificate,
    http_ok,
    kubeconfig,
    write_service_account_key,
)
from prefect_gpu_sandbox.namespaces import MountNamespace, NetworkNamespace, run
from prefect_gpu_sandbox.node_config import (
    PAUSE_IMAGE,
    NodeNetwork,
    NodePaths,
    apiserver_args,
    cni_network,
    containerd_config,
    controller_manager_args,
    etcd_args,
    kube_proxy_args,
    kubelet_args,
    kubelet_configuration,
    scheduler_args,
)
from prefect_gpu_sandbox.oci import ImageConfig, write_busybox_image
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.processes import ServerProcess, free_port, stop_process_group
from prefect_gpu_sandbox.tools import ALL_TOOLS, cni_bin, ensure_tools
from prefect_gpu_sandbox.waiting import WaitTimeout, eventually

__all__ = ["BUSYBOX_IMAGE", "GPU_RESOURCE", "NodeCluster"]

GPU_RESOURCE = "nvidia.com/gpu"

# A busybox image for tests, from the same writer as the pause image.
BUSYBOX_IMAGE = "localhost/prefect-gpu-sandbox/busybox:1"
_READY_TIMEOUT = 180.0
_STATE = "node.json"


def _netns_name(directory: Path) -> str:
    digest = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    return f"prefect-gpu-node-{digest}"


@dataclass
class NodeCluster:
    """One node and its control plane in ``directory``. ``start()`` returns once the node is
    Ready, Services are programmed, pods can be admitted (the default ServiceAccount and
    ``kube-root-ca.crt`` exist) and Prefect answers; ``stop()`` leaves no process, mount,
    cgroup or network namespace behind, also from another process (``prefect-gpu-sandbox
    down``)."""

    directory: Path
    node_name: str = "sandbox-node"
    # The ports the relay opens here, and the servers in the namespace, are the same.
    network: NodeNetwork = field(default_factory=lambda: NodeNetwork(apiserver_port=free_port()))
    prefect_port: int = field(default_factory=free_port)
    # Fake GPUs the device plugin advertises; None runs no plugin.
    fake_gpus: int | None = None
    processes: list[ServerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = self.directory.resolve()
        self.paths = NodePaths(self.directory)
        self.netns = NetworkNamespace(_netns_name(self.directory))
        self.mountns = MountNamespace(self.directory / "namespace")
        self._api: client.ApiClient | None = None
        self._bin = Path()  # the tools' directory, found by start()

    @property
    def cgroup(self) -> str:
        """The top-level cgroup (in each hierarchy) every pod of this node runs under."""
        return self.netns.name

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig, valid here and inside the namespace."""
        return self.directory / "kubeconfig"

    @property
    def env_file(self) -> Path:
        return self.directory / "env"

    @property
    def api_url(self) -> str:
        return self.network.apiserver_url

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def pod_prefect_api_url(self) -> str:
        """The Prefect API as pods reach it: at the node's address."""
        return f"http://{self.network.node_ip}:{self.prefect_port}/api"

    @property
    def api(self) -> client.ApiClient:
        """An admin client of the node's API server (closed by ``stop()``)."""
        if self._api is None:
            kubeconfig_file = str(self.kubeconfig)
            self._api = config.new_client_from_config(config_file=kubeconfig_file)  # type: ignore[no-untyped-call]
        return self._api

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("a node needs root (network namespaces, mounts, cgroups)")
        self._bin = ensure_tools(ALL_TOOLS)
        if self.netns.exists():
            raise RuntimeError(f"a node already runs in {self.directory}: stop it first")
        self._write_files()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.netns.create(self.network.node_ip)
        self.mountns.create(self._private_directories())
        host.make_cgroup(self.cgroup)
        ports = [str(self.network.apiserver_port), str(self.prefect_port)]
        relay = ["-m", "prefect_gpu_sandbox.relay", str(self.netns.path), *ports]
        self._launch("relay", relay, program=Path(sys.executable), inside=False)  # enters itself
        self._launch("etcd", etcd_args(self.paths))
        self._launch("kube-apiserver", apiserver_args(self.paths, self.network))
        prefect = PrefectServer(
            self.paths.prefect_home,
            port=self.prefect_port,
            host="0.0.0.0",  # every address of the namespace: the pods reach the node's
            launcher=self.command([]),
        )
        prefect.launch()  # the slowest to start: it gets ready while the rest comes up
        assert prefect.process is not None
        self._adopt(prefect.process)
        self._launch("containerd", [f"--config={self.paths.containerd_config}"])
        self._wait("containerd", self.paths.containerd_socket.exists)
        pause = write_busybox_image(
            self.paths.images / "pause.tar", PAUSE_IMAGE, ImageConfig(entrypoint=["sleep", "inf"])
        )
        self.import_image(pause)

        # The rest read their permissions from the API server's bootstrap RBAC, some only once.
        self._wait("kube-apiserver /readyz", self._apiserver_ready)
        self._launch("kube-controller-manager", controller_manager_args(self.paths, self.network))
        self._launch("kube-scheduler", scheduler_args(self.paths))
        self._launch("kubelet", kubelet_args(self.paths, self.network, self.node_name))
        self._launch("kube-proxy", kube_proxy_args(self.paths, self.network, self.node_name))

        self._wait(f"node {self.node_name} Ready", self._node_ready)
        self._wait("the kubernetes Service in kube-proxy's rules", self._service_programmed)
        self._wait("the default ServiceAccount and kube-root-ca.crt", self._admits_pods)
        if self.fake_gpus is not None:
            self._start_device_plugin(self.fake_gpus)
        self._wait("prefect-server /api/health", prefect.healthy)
        self._write_env()

    @property
    def _gpu_count_file(self) -> Path:
        return self.directory / "fake-gpus"

    def _start_device_plugin(self, count: int) -> None:
        """Start the fake GPU plugin once the kubelet serves its registration socket (in the
        kubelet's /var/lib/kubelet/device-plugins, which the mount namespace maps to ours)."""
        self._write_gpu_count(count)
        kubelet_socket = self.paths.kubelet_root / "device-plugins" / "kubelet.sock"
        self._wait("the kubelet's device-plugin socket", kubelet_socket.exists)
        plugin_args = [f"--count-file={self._gpu_count_file}", f"--seed={self.node_name}"]
        self._launch("fake-device-plugin", plugin_args)
        self._wait(f"{count} {GPU_RESOURCE} allocatable", lambda: self.allocatable_gpus() == count)

    def _write_gpu_count(self, count: int) -> None:
        # Replaced whole, so the plugin never reads a half-written file.
        partial = self._gpu_count_file.with_suffix(".partial")
        partial.write_text(f"{count}\n")
        partial.replace(self._gpu_count_file)

    def set_fake_gpus(self, count: int) -> None:
        """Make the running plugin advertise ``count`` devices (the kubelet follows on its own:
        wait on ``allocatable_gpus``)."""
        if self.fake_gpus is None:
            raise RuntimeError("this node runs no fake GPU device plugin (fake_gpus=None)")
        self.fake_gpus = count
        self._write_gpu_count(count)

    def allocatable_gpus(self) -> int | None:
        """The node's allocatable ``nvidia.com/gpu`` as the API server has it, None if absent."""
        node = _quietly(lambda: client.CoreV1Api(self.api).read_node(self.node_name))
        allocatable = (node.status.allocatable or {}) if node else {}
        value = allocatable.get(GPU_RESOURCE)
        return None if value is None else int(value)

    def _private_directories(self) -> dict[Path, Path]:
        """The node's own directories mounted over the machine-wide paths the kubelet and
        containerd use whatever their configuration says (the device plugins' socket and
        checkpoint, container log links, shim sockets, the CNI result cache)."""
        return {
            self.paths.kubelet_root: Path("/var/lib/kubelet"),
            self.paths.root / "container-logs": Path("/var/log/containers"),
            self.paths.containerd / "run": Path("/run/containerd"),
            self.paths.root / "cni" / "cache": Path("/var/lib/cni"),
        }

    def _write_files(self) -> None:
        for directory in (self.paths.logs, self.paths.images, self.paths.cni_conf_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        self.paths.containerd.mkdir(exist_ok=True)
        self.paths.containerd_config.write_text(
            containerd_config(self.paths, runc=self._bin / "runc", cni_bin=cni_bin())
        )
        network = cni_network(self.paths, self.network)
        (self.paths.cni_conf_dir / "10-pods.conflist").write_text(json.dumps(network, indent=2))
        configuration = kubelet_configuration(self.paths, cgroup_root=f"/{self.cgroup}")
        self.paths.kubelet_config.write_text(yaml.safe_dump(configuration))

    def _write_pki(self) -> None:
        """One CA for everything: it signs the serving certificates (the API server's, the
        kubelet's) and each component's client certificate (its user in CN, groups in O)."""
        pki = self.paths.pki
        pki.mkdir(exist_ok=True)
        ca = CertificateAuthority("prefect-gpu-sandbox-node-ca")
        (pki / "ca.crt").write_bytes(ca.cert_pem)
        service = "kubernetes.default.svc"
        apiserver_names = ["127.0.0.1", "localhost", self.network.node_ip]
        apiserver_names += [self.network.kubernetes_service_ip, "kubernetes", service]
        apiserver_names += ["kubernetes.default", f"{service}.cluster.local"]
        ca.issue_server("kube-apiserver", apiserver_names).write(
            pki / "apiserver.crt", pki / "apiserver.key"
        )
        kubelet_names = [self.network.node_ip, self.node_name]
        ca.issue_server(self.node_name, kubelet_names).write(
            pki / "kubelet.crt", pki / "kubelet.key"
        )
        # The API server's identity at the kubelet (logs, exec): allowed everything there.
        apiserver_client = ca.issue(
            "kube-apiserver-kubelet-client",
            ExtendedKeyUsageOID.CLIENT_AUTH,
            organizations=("system:masters",),
        )
        apiserver_client.write(
            pki / "apiserver-kubelet-client.crt", pki / "apiserver-kubelet-client.key"
        )
        write_service_account_key(pki / "sa.key")
        users: dict[str, tuple[str, tuple[str, ...]]] = {
            "admin": ("admin", ("system:masters",)),
            "kubelet": (f"system:node:{self.node_name}", ("system:nodes",)),
            "kube-controller-manager": ("system:kube-controller-manager", ()),
            "kube-scheduler": ("system:kube-scheduler", ()),
            "kube-proxy": ("system:kube-proxy", ()),
        }
        for component, (user, groups) in users.items():
            credentials = client_certificate(ca, user, groups)
            path = self.kubeconfig if component == "admin" else self.paths.kubeconfig(component)
            document = kubeconfig(self.api_url, ca.cert_pem, component, credentials)
            path.write_text(yaml.safe_dump(document))
            path.chmod(0o600)
            if component == "admin":  # for readiness checks before a client can be made
                credentials.write(pki / "admin.crt", pki / "admin.key")

    def _write_env(self) -> None:
        variables = {
            "KUBECONFIG": str(self.kubeconfig),
            "PREFECT_API_URL": self.prefect_api_url,
            "CONTAINERD_ADDRESS": str(self.paths.containerd_socket),  # for ctr
            "CONTAINERD_NAMESPACE": "k8s.io",  # the kubelet's images and containers
            "NODE_NETNS": str(self.netns.path),
        }
        lines = [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
        lines.append(f'export PATH={shlex.quote(str(self._bin))}:"$PATH"')
        self.env_file.write_text("\n".join(lines) + "\n")

    def _launch(
        self,
        name: str,
        args: Sequence[str],
        *,
        program: Path | None = None,
        inside: bool = True,
    ) -> None:
        """Start ``program`` (the tool called ``name``) with ``args``, inside the namespace unless
        told otherwise, as a server the node owns."""
        argv = [str(program or self._bin / name), *args]
        process = ServerProcess(
            name,
            self.command(argv) if inside else argv,
            log_path=self.paths.logs / f"{name}.log",
            # containerd finds its shim on PATH; kube-proxy runs Debian's iptables and conntrack.
            env={**os.environ, "PATH": f"{self._bin}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"},
        )
        process.start()
        self._adopt(process)

    def _adopt(self, process: ServerProcess) -> None:
        self.processes.append(process)
        state = {
            "netns": self.netns.name,
            "node_name": self.node_name,
            "kubeconfig": str(self.kubeconfig),
            "kube_apiserver": self.api_url,
            "prefect_api_url": self.prefect_api_url,
            "pids": {each.name: each.pid for each in self.processes},  # in start order
        }
        (self.directory / _STATE).write_text(json.dumps(state, indent=2))

    def _wait(self, what: str, check: Callable[[], object]) -> None:
        def alive() -> bool:
            return all(process.running() for process in self.processes)

        try:
            eventually(check, timeout=_READY_TIMEOUT, interval=0.2, what=what, alive=alive)
        except (WaitTimeout, RuntimeError) as error:
            stopped = [process for process in self.processes if not process.running()]
            shown = stopped or self.processes[-1:]
            tails = "\n".join(f"--- {p.log_path}:\n{p.log_tail()}" for p in shown)
            exited = f" (exited: {', '.join(p.name for p in stopped)})" if stopped else ""
            raise RuntimeError(f"{error}{exited}\n{tails}") from None

    # -- readiness checks (each passes or returns False) -----------------------------------

    def _apiserver_ready(self) -> bool:
        pki = self.paths.pki
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(pki / "admin.crt", pki / "admin.key")
        return http_ok(f"{self.api_url}/readyz", context)

    def _node_ready(self) -> bool:
        node = _quietly(lambda: client.CoreV1Api(self.api).read_node(self.node_name))
        conditions = (node.status.conditions or []) if node else []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    def _service_programmed(self) -> bool:
        try:
            rules = run(self.command(["iptables", "-t", "nat", "-S", "KUBE-SERVICES"]))
        except RuntimeError:  # the chain is not there yet
            return False
        return f"{self.network.kubernetes_service_ip}/32" in rules

    def _admits_pods(self) -> bool:
        core = client.CoreV1Api(self.api)
        account = _quietly(lambda: core.read_namespaced_service_account("default", "default"))
        ca = _quietly(lambda: core.read_namespaced_config_map("kube-root-ca.crt", "default"))
        return account is not None and ca is not None

    # -- use --------------------------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the node's namespaces, as its own servers run (a shell there reaches
        the API server, the kubelet's files and containerd's mounts)."""
        return ["nsenter", f"--net={self.netns.path}", f"--mount={self.mountns.path}", "--", *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 60) -> str:
        """Run ``argv`` in the node's namespaces; return its output."""
        return run(self.command(argv), timeout=timeout)

    def import_image(self, archive: Path) -> None:
        """Load an OCI image archive into the node's containerd, where the kubelet finds it."""
        ctr = ensure_tools(("ctr",)) / "ctr"
        done = subprocess.run(
            [
                *(str(ctr), f"--address={self.paths.containerd_socket}", "--namespace=k8s.io"),
                *("images", "import", str(archive)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ctr images import {archive}: {done.stderr.strip()}")

    def import_busybox_image(self, reference: str = BUSYBOX_IMAGE) -> str:
        """Give the node a busybox image (``sh`` as its command); return its reference."""
        archive = write_busybox_image(
            self.paths.images / "busybox.tar", reference, ImageConfig(cmd=["sh"])
        )
        self.import_image(archive)
        return reference

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the servers (newest first), then whatever else runs in the namespace or in the
        pods' cgroups (containerd's shims and the containers outlive containerd by design),
        unmount what the kubelet and containerd mounted, remove the pods' cgroups and the
        namespace. Safe to call again, and on a node another process started."""
        if self._api is not None:
            self._api.close()  # type: ignore[no-untyped-call]
            self._api = None
        if self.processes:
            for process in reversed(self.processes):
                process.stop()
            self.processes.clear()
        else:
            members = set(self.netns.members())
            for pid in reversed(self._recorded_pids()):
                if pid in members:
                    stop_process_group(pid)
        self._kill_leftovers()
        # The mount namespace's pin goes first: with it go all the node's mounts.
        host.unmount(host.mounts_under(self.directory))
        eventually(
            lambda: not host.mounts_under(self.directory), timeout=30, what="mounts released"
        )
        eventually(
            lambda: not host.remove_cgroup(self.cgroup),
            timeout=30,
            what=f"cgroup /{self.cgroup} removed",
        )
        self.netns.delete()
        (self.directory / _STATE).unlink(missing_ok=True)

    def _recorded_pids(self) -> list[int]:
        try:
            state = json.loads((self.directory / _STATE).read_text())
        except FileNotFoundError:
            return []
        return list(state["pids"].values())

    def _leftovers(self) -> set[int]:
        return set(self.netns.members()) | host.cgroup_processes(self.cgroup)

    def _kill_leftovers(self) -> None:
        def all_gone() -> bool:
            left = self._leftovers()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not left

        eventually(all_gone, timeout=30, interval=0.1, what="the node's processes gone")


def _quietly(read: Callable[[], Any]) -> Any:
    """``read()``, or None while the server cannot answer it yet."""
    try:
        return read()
    except (ApiException, HTTPError, OSError):
        return None
