"""``prefect-gpu-operator run``: the operator, with kopf's flags chosen for it."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket

import kopf
from kopf._core.engines.peering import Identity

from prefect_gpu_operator.adapters.kube import IN_CLUSTER, check_reachable, load_cluster_config
from prefect_gpu_operator.settings import OperatorSettings

__all__ = ["check_cluster", "run_operator"]

_LOG_FORMATS = {
    "plain": kopf.LogFormat.PLAIN,
    "full": kopf.LogFormat.FULL,
    "json": kopf.LogFormat.JSON,
}


def check_cluster() -> None:
    """Fail now, not in kopf's start-up retries (every 60 s, forever), when there is no
    cluster to talk to. Raises ``NoClusterConfig`` or ``KubeUnavailable``.

    In a cluster only the configuration is checked: an API server that is briefly unreachable
    there is kopf's to wait for. Outside one, an unreachable server (a stopped local cluster, a
    VPN that is down) is a mistake to report at once."""
    if load_cluster_config() != IN_CLUSTER:
        check_reachable()


def run_operator(settings: OperatorSettings, *, verbose: bool = False) -> None:
    """Watch every namespace; peer with other replicas when ``settings.peering`` is set."""
    check_cluster()
    kopf.configure(verbose=verbose, log_format=_LOG_FORMATS[settings.log_format])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect request is noise
    import prefect_gpu_operator.handlers  # noqa: F401  (registers every handler)

    liveness = (
        f"http://{settings.health_address}:{settings.health_port}/healthz"
        if settings.health_port
        else None
    )
    identity = peering_identity() if settings.peering else None
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            standalone=settings.peering is None,
            peering_name=settings.peering,
            identity=identity,
            memo=kopf.Memo(identity=identity),  # the fence reads this replica's own record
            liveness_endpoint=liveness,
        )
    )


def peering_identity() -> Identity:
    """This replica's name in the peering object: its pod (or host), process and a nonce."""
    where = os.environ.get("POD_NAME") or socket.gethostname()
    return Identity(f"{where}/{os.getpid()}/{secrets.token_hex(3)}")
