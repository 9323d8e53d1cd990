"""``prefect-gpu-operator run``: the operator, with kopf's flags chosen for it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket

import kopf
from kopf._core.engines.peering import Identity

from prefect_gpu_operator.settings import OperatorSettings, current_settings

__all__ = ["add_run_command", "run_operator"]

_LOG_FORMATS = {
    "plain": kopf.LogFormat.PLAIN,
    "full": kopf.LogFormat.FULL,
    "json": kopf.LogFormat.JSON,
}


def run_operator(settings: OperatorSettings, *, verbose: bool = False) -> None:
    """Watch every namespace; peer with other replicas when ``settings.peering`` is set."""
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


def _run(args: argparse.Namespace) -> int:
    run_operator(current_settings(), verbose=args.verbose)
    return 0


def add_run_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="run the operator (settings from PREFECT_GPU_OPERATOR_* environment variables)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=_run)
