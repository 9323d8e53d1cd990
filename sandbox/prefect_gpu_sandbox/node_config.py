"""What a real single-node cluster runs with: its addresses, its files, and each component's
configuration and flags, as pure functions of them (the settings that matter are explained where
they are set; research/real-node.md has the measurements behind them)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PAUSE_IMAGE",
    "NodeNetwork",
    "NodePaths",
    "apiserver_args",
    "cni_network",
    "containerd_config",
    "controller_manager_args",
    "etcd_args",
    "kube_proxy_args",
    "kubelet_args",
    "kubelet_configuration",
    "scheduler_args",
]

# Built locally from busybox (no registry is reachable) and named in containerd's configuration.
PAUSE_IMAGE = "localhost/prefect-gpu-sandbox/pause:1"
_ETCD_PORT = 2379
_ETCD_PEER_PORT = 2380


@dataclass(frozen=True)
class NodeNetwork:
    """Addresses inside the node's network namespace: the same in every node, since each has a
    namespace of its own. The API server listens on every address there, at a port that is also
    free on the machine's loopback, where a relay forwards it."""

    node_ip: str = "10.250.0.2"
    pod_subnet: str = "10.251.0.0/24"
    service_subnet: str = "10.0.0.0/24"
    apiserver_port: int = 6443

    @property
    def kubernetes_service_ip(self) -> str:
        """The ``kubernetes`` Service's ClusterIP: the first address of the Service range."""
        return str(next(ipaddress.ip_network(self.service_subnet).hosts()))

    @property
    def apiserver_url(self) -> str:
        """Where the node's own components reach the API server."""
        return f"https://127.0.0.1:{self.apiserver_port}"


@dataclass(frozen=True)
class NodePaths:
    """Every file and directory of one node, under ``root``."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def containerd(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_config(self) -> Path:
        return self.containerd / "config.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        return self.containerd / "state"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def kubeconfig(self, component: str) -> Path:
        return self.root / f"{component}.kubeconfig"


def etcd_args(paths: NodePaths) -> list[str]:
    client = f"http://127.0.0.1:{_ETCD_PORT}"
    peer = f"http://127.0.0.1:{_ETCD_PEER_PORT}"
    return [
        f"--data-dir={paths.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync=true",  # test data: durability is not worth the latency
        "--log-level=warn",
    ]


def apiserver_args(paths: NodePaths, network: NodeNetwork) -> list[str]:
    pki = paths.pki
    return [
        f"--etcd-servers=http://127.0.0.1:{_ETCD_PORT}",
        "--bind-address=0.0.0.0",  # every address of the namespace, none of the machine's
        f"--secure-port={network.apiserver_port}",
        f"--advertise-address={network.node_ip}",  # the `kubernetes` Service's endpoint
        f"--service-cluster-ip-range={network.service_subnet}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        # Node: each kubelet sees only its own pods' objects.
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",  # ServiceAccount stays on: pods get tokens
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={pki / 'sa.key'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        # Webhooks and aggregated APIs are called at their endpoints' pod IPs: the API server
        # runs outside the pods' network, where Service IPs are only kube-proxy's rules.
        "--enable-aggregator-routing=true",
        # logs, exec and port-forward go to the kubelet, verified by the cluster CA.
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        "--allow-privileged=true",
        f"--cert-dir={pki}",
        "--profiling=false",
    ]


def controller_manager_args(paths: NodePaths, network: NodeNetwork) -> list[str]:
    kubeconfig = paths.kubeconfig("kube-controller-manager")
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        # There is no cluster CIDR to carve node ranges from: the CNI config holds the pods'.
        "--controllers=*,-node-ipam-controller",
        # Publishes kube-root-ca.crt in every namespace, which projected token volumes need.
        f"--root-ca-file={paths.pki / 'ca.crt'}",
        f"--service-account-private-key-file={paths.pki / 'sa.key'}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={network.service_subnet}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def scheduler_args(paths: NodePaths) -> list[str]:
    kubeconfig = paths.kubeconfig("kube-scheduler")
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--profiling=false",
    ]


def _toml(value: str | bool | list[str]) -> str:
    """A TOML value (a JSON string is a TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def containerd_config(paths: NodePaths, *, runc: Path, cni_bin: Path) -> str:
    """containerd 2's configuration (version 3): every path under the node's directory, so two
    nodes on one machine share nothing."""
    state = paths.containerd_state
    sections: dict[str, dict[str, str | bool | list[str]]] = {
        "grpc": {"address": str(paths.containerd_socket)},
        "plugins.'io.containerd.internal.v1.opt'": {"path": str(paths.containerd / "opt")},
        "plugins.'io.containerd.nri.v1.nri'": {"disable": True},  # its socket is machine-wide
        "plugins.'io.containerd.grpc.v1.cri'": {
            "disable_tcp_service": True,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
        },
        "plugins.'io.containerd.cri.v1.images'": {"snapshotter": "overlayfs"},
        "plugins.'io.containerd.cri.v1.images'.pinned_images": {"sandbox": PAUSE_IMAGE},
        "plugins.'io.containerd.cri.v1.runtime'": {
            # Root here may not lower oom_score_adj (no CAP_SYS_RESOURCE): never ask for less
            # than containerd's own.
            "restrict_oom_score_adj": True,
            # Pod network namespaces under the state directory, not /var/run/netns.
            "netns_mounts_under_state_dir": True,
        },
        "plugins.'io.containerd.cri.v1.runtime'.containerd": {"default_runtime_name": "runc"},
        "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc": {
            "runtime_type": "io.containerd.runc.v2",
        },
        "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options": {
            "BinaryName": str(runc),
            "Root": str(state / "runc"),  # runc's state, not /run/containerd/runc
            "SystemdCgroup": False,  # the kubelet's cgroupfs driver
        },
        "plugins.'io.containerd.cri.v1.runtime'.cni": {
            "bin_dirs": [str(cni_bin)],
            "conf_dir": str(paths.cni_conf_dir),
        },
    }
    lines = [
        "version = 3",
        f"root = {_toml(str(paths.containerd / 'root'))}",
        f"state = {_toml(str(state))}",
    ]
    for section, values in sections.items():
        lines += ["", f"[{section}]", *(f"{key} = {_toml(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"


def cni_network(paths: NodePaths, network: NodeNetwork) -> dict[str, Any]:
    """The pods' network: a bridge whose address is their gateway, routed (not NATed) to the
    node's address; host-local keeps its leases under the node's directory."""
    return {
        "cniVersion": "1.0.0",
        "name": "pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "hairpinMode": True,  # a pod reaches itself through its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": network.pod_subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.root / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_configuration(paths: NodePaths, *, cgroup_root: str) -> dict[str, Any]:
    pki = paths.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        # This machine has cgroup v1 (v2 only beside it); kubelet 1.37 refuses v1 unless told.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        # Pods' cgroups under a root of this node's own, so two nodes on one machine never meet.
        "cgroupRoot": cgroup_root,
        "failSwapOn": False,
        # A shared machine's disk and memory are not this node's to police: no evictions, no
        # reserved cgroups, no image garbage collection (imported images cannot be pulled back).
        "enforceNodeAllocatable": [],
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "resolvConf": "",  # no cluster DNS: pods fall back to the Default DNS policy
        "podLogsDir": str(paths.root / "pod-logs"),
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "serializeImagePulls": False,
    }


def kubelet_args(paths: NodePaths, network: NodeNetwork, node_name: str) -> list[str]:
    return [
        f"--config={paths.kubelet_config}",
        f"--kubeconfig={paths.kubeconfig('kubelet')}",
        f"--root-dir={paths.kubelet_root}",
        f"--hostname-override={node_name}",
        f"--node-ip={network.node_ip}",  # the kubelet refuses a loopback address
        "--v=1",
    ]


def kube_proxy_args(paths: NodePaths, network: NodeNetwork, node_name: str) -> list[str]:
    return [
        f"--kubeconfig={paths.kubeconfig('kube-proxy')}",
        f"--hostname-override={node_name}",
        "--proxy-mode=iptables",
        f"--cluster-cidr={network.pod_subnet}",
        # Leave the machine-wide conntrack table size and its own OOM score alone: root here may
        # not lower it.
        "--conntrack-max-per-core=0",
        "--oom-score-adj=0",
        "--healthz-bind-address=127.0.0.1:10256",
        "--metrics-bind-address=127.0.0.1:10249",
    ]
