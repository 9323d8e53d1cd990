"""The node's configuration builders: the settings a real node on a cgroup v1 machine without
CAP_SYS_RESOURCE needs, and every path under the node's own directory."""

from __future__ import annotations

import tomllib
from pathlib import Path

from prefect_gpu_sandbox.node_config import (
    PAUSE_IMAGE,
    NodeNetwork,
    NodePaths,
    apiserver_args,
    cni_network,
    containerd_config,
    controller_manager_args,
    kube_proxy_args,
    kubelet_args,
    kubelet_configuration,
)

PATHS = NodePaths(Path("/srv/node"))
NETWORK = NodeNetwork(apiserver_port=40123)


def _paths_in(value: object) -> list[str]:
    if isinstance(value, dict):
        return [path for item in value.values() for path in _paths_in(item)]
    if isinstance(value, list):
        return [path for item in value for path in _paths_in(item)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_containerd_config_is_toml_with_the_settings_that_matter() -> None:
    config = tomllib.loads(
        containerd_config(PATHS, runc=Path("/tools/runc"), cni_bin=Path("/tools/cni"))
    )
    assert config["version"] == 3
    plugins = config["plugins"]
    runtime = plugins["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"]["SystemdCgroup"] is False
    assert runc["options"]["BinaryName"] == "/tools/runc"
    assert runtime["cni"] == {"bin_dirs": ["/tools/cni"], "conf_dir": "/srv/node/cni/net.d"}
    assert plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == PAUSE_IMAGE
    assert plugins["io.containerd.nri.v1.nri"]["disable"] is True


def test_containerd_keeps_everything_under_the_node_directory() -> None:
    config = tomllib.loads(containerd_config(PATHS, runc=Path("/t/runc"), cni_bin=Path("/t/cni")))
    outside = [p for p in _paths_in(config) if not p.startswith(("/srv/node/", "/t/"))]
    assert outside == []


def test_kubelet_runs_on_cgroup_v1_with_cgroupfs_and_no_evictions() -> None:
    config = kubelet_configuration(PATHS, cgroup_root="/node-a")
    assert config["failCgroupV1"] is False
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["cgroupRoot"] == "/node-a"
    assert config["evictionHard"] == {}
    assert config["enforceNodeAllocatable"] == []
    assert config["authentication"]["anonymous"] == {"enabled": False}
    assert config["containerRuntimeEndpoint"] == "unix:///srv/node/containerd/containerd.sock"
    files = {key: value for key, value in config.items() if key != "cgroupRoot"}
    assert all(path.startswith("/srv/node/") for path in _paths_in(files))


def test_kubelet_uses_the_node_address() -> None:
    args = kubelet_args(PATHS, NETWORK, "gpu-1")
    assert "--node-ip=10.250.0.2" in args
    assert "--hostname-override=gpu-1" in args
    assert "--root-dir=/srv/node/kubelet" in args


def test_apiserver_listens_in_the_namespace_and_admits_service_accounts() -> None:
    args = apiserver_args(PATHS, NETWORK)
    assert "--bind-address=0.0.0.0" in args
    assert "--secure-port=40123" in args
    assert "--authorization-mode=Node,RBAC" in args
    assert "--enable-aggregator-routing=true" in args
    assert not [arg for arg in args if arg.startswith("--disable-admission-plugins")]


def test_controller_manager_has_no_node_ipam_and_publishes_the_root_ca() -> None:
    args = controller_manager_args(PATHS, NETWORK)
    assert "--controllers=*,-node-ipam-controller" in args
    assert "--root-ca-file=/srv/node/pki/ca.crt" in args


def test_kube_proxy_leaves_conntrack_size_and_its_oom_score_alone() -> None:
    args = kube_proxy_args(PATHS, NETWORK, "gpu-1")
    assert {"--proxy-mode=iptables", "--conntrack-max-per-core=0", "--oom-score-adj=0"} <= set(args)
    assert f"--cluster-cidr={NETWORK.pod_subnet}" in args


def test_pods_get_addresses_from_the_pod_subnet_through_a_gateway_bridge() -> None:
    bridge = cni_network(PATHS, NETWORK)["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["isGateway"] is True
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.251.0.0/24"}]]
    assert bridge["ipam"]["dataDir"].startswith("/srv/node/")


def test_kubernetes_service_ip_is_the_first_of_the_service_range() -> None:
    assert NETWORK.kubernetes_service_ip == "10.0.0.1"
    assert NodeNetwork(service_subnet="10.96.0.0/12").kubernetes_service_ip == "10.96.0.1"
