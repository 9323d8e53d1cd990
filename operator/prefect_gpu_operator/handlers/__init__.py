"""kopf wiring: importing this package registers every handler (policies, nodes, pods, webhook)."""

from prefect_gpu_operator.handlers import admission, policies

__all__ = ["admission", "policies"]
