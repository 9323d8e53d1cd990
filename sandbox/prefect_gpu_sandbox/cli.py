"""``prefect-gpu-sandbox``: a local cluster and Prefect server on 127.0.0.1 (or a real node in a
network namespace of its own), and the demo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.kubeschemas import ensure_schemas
from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.processes import process_alive, stop_process_group
from prefect_gpu_sandbox.tools import ALL_TOOLS, ensure_tools

__all__ = ["build_parser", "main", "node_up", "sandbox_down", "sandbox_up"]

DEFAULT_DIR = Path(".sandbox")
_STATE = "sandbox.json"


def sandbox_up(directory: Path) -> dict[str, Any]:
    """Start etcd, kube-apiserver and a Prefect server; write kubeconfig, env and state files."""
    directory = directory.resolve()
    if (directory / _STATE).exists() and any(_alive(directory).values()):
        raise SystemExit(f"a sandbox already runs in {directory}: `sandbox down --dir {directory}`")
    directory.mkdir(parents=True, exist_ok=True)
    control_plane = ControlPlane(directory / "cluster")
    prefect = PrefectServer(directory / "prefect")
    try:
        control_plane.start()
        prefect.start()
    except BaseException:
        prefect.stop()
        control_plane.stop()
        raise
    assert prefect.process is not None
    state = {
        "pids": {p.name: p.pid for p in [*control_plane.processes, prefect.process]},
        "kubeconfig": str(control_plane.kubeconfig),
        "kube_apiserver": control_plane.url,
        "prefect_api_url": prefect.api_url,
    }
    (directory / _STATE).write_text(json.dumps(state, indent=2))
    (directory / "kubeconfig").write_text(control_plane.kubeconfig.read_text())
    (directory / "kubeconfig").chmod(0o600)
    (directory / "env").write_text(
        f"export KUBECONFIG={shlex.quote(str(directory / 'kubeconfig'))}\n"
        f"export PREFECT_API_URL={shlex.quote(prefect.api_url)}\n"
        f'export PATH={shlex.quote(str(ensure_tools()))}:"$PATH"\n'
    )
    return state


def node_up(directory: Path) -> dict[str, Any]:
    """Start a real node, its control plane and a Prefect server in a network namespace; write
    kubeconfig, env and state files that work here and inside the namespace."""
    directory = directory.resolve()
    if (directory / _STATE).exists() and any(_alive(directory).values()):
        raise SystemExit(f"a sandbox already runs in {directory}: `sandbox down --dir {directory}`")
    node = NodeCluster(directory)
    node.start()
    state = {
        "node": node.node_name,
        "netns": node.netns.name,
        "pids": {process.name: process.pid for process in node.processes},
        "kubeconfig": str(node.kubeconfig),
        "kube_apiserver": node.api_url,
        "prefect_api_url": node.prefect_api_url,
        "pod_prefect_api_url": node.pod_prefect_api_url,
    }
    (directory / _STATE).write_text(json.dumps(state, indent=2))
    return state


def _state(directory: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((directory / _STATE).read_text())
    except FileNotFoundError:
        return {"pids": {}}
    return state


def _alive(directory: Path) -> dict[str, bool]:
    return {name: process_alive(pid) for name, pid in _state(directory)["pids"].items()}


def sandbox_down(directory: Path) -> list[str]:
    """Stop every process the sandbox in ``directory`` started; return their names."""
    state = _state(directory)
    pids: dict[str, int] = state["pids"]
    if "netns" in state:
        NodeCluster(directory).stop()
        (directory / _STATE).unlink(missing_ok=True)
        return list(pids)
    # Prefect first, the API server before etcd: each stops while what it depends on still runs.
    for name in ("prefect-server", "kube-apiserver", "etcd"):
        if name in pids and process_alive(pids[name]):
            stop_process_group(pids[name])
    (directory / _STATE).unlink(missing_ok=True)
    return list(pids)


def _up(args: argparse.Namespace) -> int:
    state = node_up(args.dir) if args.node else sandbox_up(args.dir)
    print(f"kube-apiserver  {state['kube_apiserver']}")
    print(f"prefect server  {state['prefect_api_url']}")
    print(f"kubeconfig      {state['kubeconfig']}")
    if args.node:
        print(f"node            {state['node']} (Prefect for pods: {state['pod_prefect_api_url']})")
        print(f"inside          nsenter --net=/var/run/netns/{state['netns']} bash")
    print(f"\nsource {args.dir.resolve() / 'env'}   # sets KUBECONFIG, PREFECT_API_URL, PATH")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = sandbox_down(args.dir)
    print(f"stopped: {', '.join(stopped)}" if stopped else f"no sandbox in {args.dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    alive = _alive(args.dir)
    if not alive:
        print(f"no sandbox in {args.dir}")
        return 1
    state = _state(args.dir)
    for name, running in alive.items():
        print(f"{name:16}{'running' if running else 'stopped'}  pid {state['pids'][name]}")
    print(f"{'kube-apiserver':16}{state['kube_apiserver']}")
    print(f"{'prefect':16}{state['prefect_api_url']}")
    return 0 if all(alive.values()) else 1


def _install_tools(_: argparse.Namespace) -> int:
    bin_dir = ensure_tools(ALL_TOOLS, install=True)
    ensure_schemas(install=True)
    print(bin_dir)  # alone on stdout: `$(prefect-gpu-sandbox install-tools)/helm`
    return 0


def _build_images(args: argparse.Namespace) -> int:
    from prefect_gpu_sandbox.image_builder import build_image
    from prefect_gpu_sandbox.images import IMAGES

    targets = args.target or ["operator", "worker", *(["worker-cuda"] if args.cuda else [])]
    for target in targets:
        print(f"{target}: building (or finding it cached)", file=sys.stderr)
        image = build_image(IMAGES[target])
        size = image.archive.stat().st_size / 2**20
        how = "cached" if image.cached else "built"
        print(f"{image.reference}  {image.archive}  {size:.0f} MiB  {how} in {image.seconds:.1f} s")
    return 0


def _lock_images(_: argparse.Namespace) -> int:
    from prefect_gpu_sandbox.image_builder import write_locks

    for path in write_locks():
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-gpu-sandbox",
        description="A local kube-apiserver + etcd + Prefect server on 127.0.0.1, and the demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, handler, text in [
        ("up", _up, "start the servers, write DIR/kubeconfig and DIR/env, and return"),
        ("down", _down, "stop the servers started by `up`"),
        ("status", _status, "say what runs"),
    ]:
        command = commands.add_parser(
            name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory")
        command.set_defaults(handler=handler)
        if name == "up":
            command.add_argument(
                "--node",
                action="store_true",
                help="a real node (kubelet, containerd, kube-proxy, ...) in a network namespace "
                "of its own, with its control plane and Prefect (needs root)",
            )
    commands.add_parser(
        "install-tools",
        help="build the control plane's and the node's binaries and the chart's checkers "
        "(kubeconform with its schemas, helm-docs, actionlint; cached by version) and install "
        "the Debian packages the node needs",
    ).set_defaults(handler=_install_tools)
    images = commands.add_parser(
        "build-images",
        help="build the Dockerfile's images offline (mmdebstrap base, buildah) as OCI archives",
    )
    images.add_argument("--cuda", action="store_true", help="also the worker-cuda image (GBs)")
    images.add_argument(
        "--target",
        action="append",
        choices=["operator", "worker", "worker-cuda"],
        help="only these targets (repeatable)",
    )
    images.set_defaults(handler=_build_images)
    commands.add_parser(
        "lock-images", help="regenerate constraints/<target>.txt from the pyprojects (uv)"
    ).set_defaults(handler=_lock_images)

    from prefect_gpu_sandbox.demo.run import add_demo_command  # imported late: it loads Prefect
    from prefect_gpu_sandbox.release import add_release_command

    add_demo_command(commands)
    add_release_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
