"""Running commands inside a node's containers, as a user would: ``kubectl exec`` through the API
server, the kubelet and containerd."""

from __future__ import annotations

import subprocess

from kubernetes import client

from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.tools import tools_bin


def kubectl_exec(node: NodeCluster, pod: client.V1Pod, script: str) -> str:
    """Run the shell ``script`` in the pod's (first) container; return its output."""
    kubectl = [str(tools_bin() / "kubectl"), f"--kubeconfig={node.kubeconfig}", "exec"]
    target = [f"--namespace={pod.metadata.namespace}", pod.metadata.name]
    done = subprocess.run(
        [*kubectl, *target, "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
