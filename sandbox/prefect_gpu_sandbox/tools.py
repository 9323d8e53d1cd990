"""Where the cluster's binaries and the chart's checkers live, and how they get there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "ALL_TOOLS",
    "CNI_PLUGINS",
    "K8S_VERSION",
    "NODE_TOOLS",
    "TOOLS",
    "ToolsMissingError",
    "cni_bin",
    "ensure_tools",
    "tools_bin",
]

K8S_VERSION = "v1.37.1"
# The loopback control plane's binaries and the chart's checkers, built by install-tools.sh.
TOOLS = ("etcd", "kube-apiserver", "kubectl", "helm", "kubeconform", "helm-docs", "actionlint")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
# A real node's, built by install-node.sh beside them (the CNI plugins in a directory of their
# own), and the Debian commands it installs when they are missing, found on PATH.
_NODE_BINARIES = (
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "runc",
    "fake-device-plugin",  # the tests' fake GPUs
    *(f"cni/{plugin}" for plugin in CNI_PLUGINS),
)
_SYSTEM_COMMANDS = ("iptables", "conntrack", "busybox")
NODE_TOOLS = (*_NODE_BINARIES, *_SYSTEM_COMMANDS)
ALL_TOOLS = (*TOOLS, *NODE_TOOLS)
_INSTALL_SCRIPT = Path(__file__).with_name("install-tools.sh")


class ToolsMissingError(RuntimeError):
    """Binaries (or schemas) that `install-tools` makes are not installed."""


def cache_dir() -> Path:
    if override := os.environ.get("PREFECT_GPU_OPERATOR_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefect-gpu-operator"


def tools_bin() -> Path:
    """The directory holding ``TOOLS`` for ``K8S_VERSION``."""
    if override := os.environ.get("PREFECT_GPU_OPERATOR_TOOLS_BIN"):
        return Path(override)
    return cache_dir() / "tools" / K8S_VERSION / "bin"


def cni_bin() -> Path:
    """The directory holding the CNI plugins."""
    return tools_bin() / "cni"


def _present(tool: str) -> bool:
    if tool in _SYSTEM_COMMANDS:
        return shutil.which(tool) is not None
    return os.access(tools_bin() / tool, os.X_OK)


def missing_tools(needed: tuple[str, ...] = TOOLS) -> list[str]:
    return [tool for tool in needed if not _present(tool)]


def ensure_tools(needed: tuple[str, ...] = TOOLS, *, install: bool = False) -> Path:
    """Return the tools directory; with ``install``, first build what is missing or of another
    version (the script checks versions; when all is cached it takes milliseconds)."""
    if install:
        env = {
            **os.environ,
            "K8S_VERSION": K8S_VERSION,
            "PREFECT_GPU_OPERATOR_TOOLS_BIN": str(tools_bin()),
        }
        # The script prints the bin directory on stdout and its progress on stderr.
        script = ["bash", str(_INSTALL_SCRIPT)]
        subprocess.run(script, check=True, env=env, stdout=subprocess.DEVNULL)
    missing = missing_tools(needed)
    if missing:
        raise ToolsMissingError(
            f"missing {', '.join(missing)} in {tools_bin()}: run "
            "`prefect-gpu-sandbox install-tools` (builds them with Go, cached by version)"
        )
    return tools_bin()
