"""How large a policy's status gets in a big cluster, measured with the real status model: etcd
refuses objects over 1.5 MiB, and the ledger (``status.limits``) grows with every node."""

from __future__ import annotations

import json

from prefect_gpu_operator.api.policy import GPULimitPolicyStatus, LimitEntry, WorkerNode
from prefect_gpu_operator.runtime.status_writer import status_body

ETCD_OBJECT_LIMIT = 1536 * 1024


def eks_node(index: int) -> str:
    """A node name as EKS gives them, the longest common kind."""
    octets = f"{index // 65536 % 256}-{index // 256 % 256}-{index % 256}"
    return f"ip-10-{octets}.us-west-2.compute.internal"


def status_bytes(nodes: int, workers: int) -> int:
    names = [eks_node(index) for index in range(nodes)]
    status = GPULimitPolicyStatus(
        nodes=nodes,
        total_slots=8 * nodes,
        limits=tuple(LimitEntry(name=f"gpu:{name}", node=name, limit=8) for name in names),
        workers=tuple(WorkerNode(node=name, limit=f"gpu:{name}") for name in names[:workers]),
    )
    return len(json.dumps(status_body(status), separators=(",", ":")))


def test_the_status_at_10000_nodes_fits_in_one_etcd_object() -> None:
    size = status_bytes(10_000, workers=300)
    print(f"status at 10,000 nodes and 300 worker nodes: {size / 1024:.0f} KiB")
    # Measured: ~62 B per ledger entry (117 B before names that follow the ledger's template
    # were left out), ~110 B per worker node: ~640 KiB at 10,000 nodes, under half of etcd's
    # limit with EKS's long node names.
    assert size < ETCD_OBJECT_LIMIT / 2
    assert status_bytes(10_001, workers=300) - size < 70  # bytes per extra node
