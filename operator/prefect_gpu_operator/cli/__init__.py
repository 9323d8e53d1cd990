"""The ``prefect-gpu-operator`` command line.

Errors a user can act on (an invalid setting, no cluster configuration, an unreachable server)
are one line on stderr, never a traceback, and set the exit code: 1 for runtime errors, 2 for
usage and configuration errors (argparse's own code for bad arguments).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from prefect_gpu_operator import __version__

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "PROG", "build_parser", "main", "version_line"]

PROG = "prefect-gpu-operator"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EPILOG = """\
exit codes:
  0  success
  1  runtime error: the Kubernetes API server or Prefect unreachable, a policy not found
  2  usage or configuration error: bad arguments, an invalid PREFECT_GPU_OPERATOR_* setting,
     neither an in-cluster configuration nor a kubeconfig
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (none where there is none); the epilog kept as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def version_line() -> str:
    """The operator's version and kopf's. Not Prefect's: the operator does not install it."""
    try:
        kopf = version("kopf")
    except PackageNotFoundError:
        kopf = "missing"
    return f"{PROG} {__version__} (kopf {kopf}, Python {platform.python_version()})"


# The commands import what they need when they run, so that --version and --help stay fast.


def _version(_: argparse.Namespace) -> int:
    print(version_line())
    return EXIT_OK


def _crd(_: argparse.Namespace) -> int:
    from prefect_gpu_operator.api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from prefect_gpu_operator.run import run_operator
    from prefect_gpu_operator.settings import current_settings

    run_operator(current_settings(), verbose=args.verbose)
    return EXIT_OK


def _plan(args: argparse.Namespace) -> int:
    from prefect_gpu_operator.cli.plan import plan_command

    return plan_command(args.policy, args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Keep one Prefect global concurrency limit per Kubernetes GPU node.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, handler: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=summary, epilog=EPILOG, formatter_class=_HelpFormatter
        )
        sub.set_defaults(handler=handler)
        return sub

    command("version", "print the versions of the operator and kopf", _version)
    command("crd", "print the GPULimitPolicy CRD as YAML", _crd)
    run = command(
        "run", "run the operator (settings from PREFECT_GPU_OPERATOR_* environment variables)", _run
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    plan = command(
        "plan",
        "show the limits each policy would create, update or delete in Prefect now, against the "
        "current cluster and Prefect servers; nothing is written",
        _plan,
    )
    plan.add_argument(
        "policy", nargs="?", metavar="POLICY", help="plan this GPULimitPolicy only (default: all)"
    )
    plan.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    return parser


def _exit_code(error: Exception) -> int | None:
    """The exit code of an error the user can act on; None for a bug (its traceback helps)."""
    # Imported here, so that --version and --help load no client library.
    from prefect_gpu_operator.adapters.kube import KubeUnavailable, NoClusterConfig
    from prefect_gpu_operator.runtime.plan_preview import PolicyNotFound
    from prefect_gpu_operator.settings import InvalidSettings

    if isinstance(error, InvalidSettings | NoClusterConfig):
        return EXIT_USAGE
    if isinstance(error, KubeUnavailable | PolicyNotFound):
        return EXIT_ERROR
    return None


def error_line(message: object) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except KeyboardInterrupt:
        return 130  # the shell's code for SIGINT
    except Exception as error:
        code = _exit_code(error)
        if code is None:
            raise
        error_line(error)
        return code
    return result
