"""The ``prefect-gpu-operator`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prefect_gpu_operator import __version__

__all__ = ["main"]


def _version(_: argparse.Namespace) -> int:
    print(__version__)
    return 0


def _crd(_: argparse.Namespace) -> int:
    from prefect_gpu_operator.api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-gpu-operator",
        description="Keep one Prefect global concurrency limit per Kubernetes GPU node.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("version", help="print the version").set_defaults(handler=_version)
    commands.add_parser("crd", help="print the GPULimitPolicy CRD as YAML").set_defaults(
        handler=_crd
    )

    # Imported here so that `version` and `--help` stay fast.
    from prefect_gpu_operator.run import add_run_command

    add_run_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
