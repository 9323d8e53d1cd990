"""Nodes and pods that look like a real GPU cluster's, for benchmarks on the real API server.

A real Node is ~15 KB: NVIDIA GPU feature discovery (GFD) and node feature discovery (NFD) labels,
topology labels, ~50 cached images with long names and sha256 digests, conditions, addresses and
nodeInfo. Pods carry realistic specs (probes, env, mounts, resources). Bodies are plain dicts the
API server validates on create; they are deterministic in their index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from tests.support.nodes import gpu_node_body

__all__ = [
    "GFD_TIMESTAMP",
    "WORKER_LABEL",
    "realistic_node_body",
    "realistic_pod_body",
]

GFD_TIMESTAMP = "nvidia.com/gfd.timestamp"
WORKER_LABEL = "prefectgpu.io/has-worker-id"
_ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
_PRODUCTS = (
    ("NVIDIA-A100-SXM4-80GB", "81920", "ampere", "8", "0"),
    ("NVIDIA-H100-80GB-HBM3", "81559", "hopper", "9", "0"),
)
_REGISTRIES = (
    "registry.k8s.io",
    "nvcr.io/nvidia",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/platform",
    "ghcr.io/example-org/data-platform",
    "docker.io/prefecthq",
)
_IMAGES = (
    "kube-proxy",
    "pause",
    "coredns/coredns",
    "k8s-device-plugin",
    "gpu-feature-discovery",
    "dcgm-exporter",
    "driver",
    "container-toolkit",
    "gpu-operator-validator",
    "node-feature-discovery",
    "prefect",
    "pytorch-training-cuda12",
    "tritonserver",
    "vllm-openai",
    "fluent-bit",
    "node-exporter",
    "aws-node",
    "ebs-csi-driver",
    "cilium",
    "istio/proxyv2",
)


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _images(count: int) -> list[dict[str, object]]:
    """Cached images as the kubelet reports them: a digest name and a tagged name each."""
    images = []
    for index in range(count):
        repo = f"{_REGISTRIES[index % len(_REGISTRIES)]}/{_IMAGES[index % len(_IMAGES)]}"
        tag = f"v{index % 7}.{index % 13}.{index}-cuda12.4.1-ubuntu22.04"
        images.append(
            {
                "names": [f"{repo}@{_digest(repo + tag)}", f"{repo}:{tag}"],
                "sizeBytes": 50_000_000 + 7_919_000 * index,
            }
        )
    return images


def _gpu_labels(index: int, gpus: int) -> dict[str, str]:
    product, memory, family, major, minor = _PRODUCTS[index % len(_PRODUCTS)]
    deploy = (
        "container-toolkit",
        "dcgm",
        "dcgm-exporter",
        "device-plugin",
        "driver",
        "gpu-feature-discovery",
        "node-status-exporter",
        "operator-validator",
    )
    return {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.memory": memory,
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.family": family,
        "nvidia.com/gpu.compute.major": major,
        "nvidia.com/gpu.compute.minor": minor,
        "nvidia.com/gpu.machine": "p4d.24xlarge",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.mode": "compute",
        "nvidia.com/cuda.driver.major": "550",
        "nvidia.com/cuda.driver.minor": "54",
        "nvidia.com/cuda.driver.rev": "15",
        "nvidia.com/cuda.driver-version.full": "550.54.15",
        "nvidia.com/cuda.runtime.major": "12",
        "nvidia.com/cuda.runtime.minor": "4",
        "nvidia.com/cuda.runtime-version.full": "12.4",
        "nvidia.com/mig.capable": "true",
        "nvidia.com/mig.strategy": "single",
        "nvidia.com/mig.config": "all-disabled",
        "nvidia.com/mig.config.state": "success",
        GFD_TIMESTAMP: str(1_764_000_000 + index),
        **{f"nvidia.com/gpu.deploy.{name}": "true" for name in deploy},
        "feature.node.kubernetes.io/pci-10de.present": "true",
    }


def _nfd_labels() -> dict[str, str]:
    cpuid = ("ADX", "AESNI", "AVX", "AVX2", "AVX512BW", "AVX512CD", "AVX512DQ", "AVX512F",
             "AVX512VL", "AVX512VNNI", "FMA3", "SHA", "VMX", "X87")  # fmt: skip
    return {
        **{f"feature.node.kubernetes.io/cpu-cpuid.{flag}": "true" for flag in cpuid},
        "feature.node.kubernetes.io/cpu-model.vendor_id": "Intel",
        "feature.node.kubernetes.io/cpu-model.family": "6",
        "feature.node.kubernetes.io/cpu-model.id": "106",
        "feature.node.kubernetes.io/cpu-hardware_multithreading": "true",
        "feature.node.kubernetes.io/kernel-version.full": "6.1.109-118.189.amzn2023.x86_64",
        "feature.node.kubernetes.io/kernel-version.major": "6",
        "feature.node.kubernetes.io/kernel-version.minor": "1",
        "feature.node.kubernetes.io/system-os_release.ID": "amzn",
        "feature.node.kubernetes.io/system-os_release.VERSION_ID": "2023",
        "feature.node.kubernetes.io/storage-nonrotationaldisk": "true",
        "feature.node.kubernetes.io/network-sriov.capable": "true",
    }


def realistic_node_body(
    name: str, index: int, resources: Mapping[str, int] | None = None, *, images: int = 50
) -> dict[str, object]:
    """A ~15 KB Node: GFD labels and ``resources`` (e.g. nvidia.com/gpu) when given, NFD and
    topology labels, ``images`` cached images, conditions, addresses and nodeInfo."""
    gpus = sum((resources or {}).values())
    zone = _ZONES[index % len(_ZONES)]
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/instance-type": "p4d.24xlarge" if resources else "m6i.4xlarge",
        "node.kubernetes.io/instance-type": "p4d.24xlarge" if resources else "m6i.4xlarge",
        "topology.kubernetes.io/region": "us-east-1",
        "topology.kubernetes.io/zone": zone,
        "failure-domain.beta.kubernetes.io/region": "us-east-1",
        "failure-domain.beta.kubernetes.io/zone": zone,
        "topology.ebs.csi.aws.com/zone": zone,
        "eks.amazonaws.com/nodegroup": "gpu-a100" if resources else "general",
        "eks.amazonaws.com/capacityType": "ON_DEMAND",
        "karpenter.sh/nodepool": "gpu" if resources else "default",
        **_nfd_labels(),
        **(_gpu_labels(index, gpus) if resources else {}),
    }
    body = gpu_node_body(name, resources or {}, labels)
    ip = f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"
    heartbeat = "2026-12-01T00:00:00Z"
    conditions = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    status: dict[str, object] = {
        **body["status"],  # type: ignore[dict-item]
        "conditions": [
            {
                "type": kind,
                "status": state,
                "reason": reason,
                "message": f"kubelet condition {kind} is {state}",
                "lastHeartbeatTime": heartbeat,
                "lastTransitionTime": "2026-11-01T00:00:00Z",
            }
            for kind, state, reason in conditions
        ],
        "addresses": [
            {"type": "InternalIP", "address": ip},
            {"type": "InternalDNS", "address": f"ip-{ip.replace('.', '-')}.ec2.internal"},
            {"type": "Hostname", "address": f"ip-{ip.replace('.', '-')}.ec2.internal"},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": hashlib.md5(name.encode()).hexdigest(),
            "systemUUID": hashlib.md5(name.encode() + b"u").hexdigest(),
            "bootID": hashlib.md5(name.encode() + b"b").hexdigest(),
            "kernelVersion": "6.1.109-118.189.amzn2023.x86_64",
            "osImage": "Amazon Linux 2023.5.20241001",
            "containerRuntimeVersion": "containerd://1.7.22",
            "kubeletVersion": "v1.31.0-eks-a737599",
            "kubeProxyVersion": "v1.31.0-eks-a737599",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
        "images": _images(images),
    }
    spec = {"providerID": f"aws:///{zone}/i-{hashlib.sha1(name.encode()).hexdigest()[:17]}"}
    return {**body, "spec": {**body["spec"], **spec}, "status": status}  # type: ignore[dict-item]


def realistic_pod_body(
    name: str, node: str, *, worker: bool = False, gpus: int = 0
) -> dict[str, object]:
    """A Pod bound to ``node`` (no scheduler needed): a Prefect worker labelled as the webhook
    labels them, requesting ``gpus`` nvidia.com/gpu, or an ordinary service pod."""
    app = "prefect-worker" if worker else f"svc-{sum(name.encode()) % 40}"
    labels = {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": f"{app}-prod",
        "app.kubernetes.io/part-of": "data-platform",
        "pod-template-hash": hashlib.sha1(app.encode()).hexdigest()[:10],
        **({WORKER_LABEL: "true", "app.kubernetes.io/component": "worker"} if worker else {}),
    }
    limits: dict[str, str] = {"cpu": "2", "memory": "4Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    image = "docker.io/prefecthq/prefect:3-python3.12" if worker else f"ghcr.io/example-org/{app}"
    env: list[dict[str, object]] = [
        {"name": f"SETTING_{index}", "value": f"value-{index}"} for index in range(8)
    ]
    if worker:
        env.append({"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    probe = {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                "kubectl.kubernetes.io/default-container": "main",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
            },
        },
        "spec": {
            "nodeName": node,
            "tolerations": [
                {"key": "prefectgpu.io/simulated", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            ],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "containers": [
                {
                    "name": "main",
                    "image": f"{image}@{_digest(image)}",
                    "args": ["prefect", "worker", "start", "--pool", "gpu"] if worker else [],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": env,
                    "resources": {"requests": dict(limits), "limits": limits},
                    "readinessProbe": probe,
                    "livenessProbe": probe,
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True,
                    },
                }
            ],
            "volumes": [{"name": "config", "configMap": {"name": f"{app}-config"}}],
        },
    }
