"""The GPU check: on a real NVIDIA GPU, a step inside a slot sees only the device it holds.

Run ``bash tests/gpu/check.sh`` from the repository root. It needs Python 3.9+ and, to pass,
PyTorch with CUDA; it does not need Prefect (nor a network): it drives the parts of gpu_slot()
that decide and pin devices, which use only the standard library (``prefect_gpu_flows._devices``,
``_locks`` and ``_cuda``, imported from ``flows/``), in child processes that act as GPU steps.

Each step process claims a slot file as gpu_slot() does, maps it to a device of the container
(``NVIDIA_VISIBLE_DEVICES``, ``CUDA_VISIBLE_DEVICES`` or NVML), pins it with the same code, then
imports torch inside the block and computes on ``cuda`` if torch offers it, else on the CPU, the
silent fallback that this check must catch. The parent compares what torch saw with the lease.

Properties (PASS, FAIL or SKIP with the reason; exit status 1 if any FAIL):

- ``devices``: the devices the container names are the GPU's own (UUIDs torch reports).
- ``pinned``: inside the block torch sees exactly one device, the held one, and the variable is
  restored after the block.
- ``on-gpu``: the step's tensor was computed on that device; on the CPU it FAILS.
- ``exclusive``: two concurrent steps hold, and compute on, different devices (2+ devices).
- ``cuda-first``: CUDA initialised before a block is detected through libcuda and reported,
  naming the devices it sees, instead of claiming a pin.
- ``mig``: a MIG device is pinned by its UUID (only where MIG is on).

Not covered here: the Prefect side (the node's limit, leases, the hand-over), which the
integration tests prove against a real server; onnxruntime's CUDA provider and the release of
its memory (onnxruntime-gpu is not installed on the GPU machine).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_gpu_flows import _cuda
from prefect_gpu_flows._devices import Devices, same_device
from prefect_gpu_flows._locks import SlotFile

STEP_TIMEOUT = 180.0


# ## The step: one child process, as a GPU task inside gpu_slot() would run


def _torch_uuid(torch: Any, index: int) -> str:
    uuid = str(torch.cuda.get_device_properties(index).uuid)  # torch leaves out the prefix
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def step(lock_dir: Path, release: Path | None, held: str | None, cuda_first: bool) -> None:
    """Claim a slot (or pin ``held``), then compute on CUDA if torch offers it; print JSON."""
    report: dict[str, Any] = {"before": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if cuda_first:  # CUDA initialised before the block, as by a module-level torch import + use
        importlib.import_module("torch").cuda.init()
        report["initialised_before"] = _cuda.initialised_devices()
    slot = None
    if held is None:
        devices = Devices.from_environment(os.environ, _cuda.nvml_devices)
        slot = next(
            candidate
            for candidate in map(lambda index: SlotFile(lock_dir, index), range(64))
            if candidate.try_lock()
        )
        held = devices.of_slot(slot.index)
        report["slot"] = slot.index
    report["held"] = held
    with _cuda.pinned((held,)) as pin:
        report.update(pinned=pin.pinned, reason=pin.reason, index=pin.index)
        report["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            torch = importlib.import_module("torch")  # only now, inside the block, as a step would
        except ImportError:
            report["torch"] = None
        else:
            report["torch"] = torch.__version__
            # A typical step: CUDA when torch has it, else (silently) the CPU.
            device = f"cuda:{pin.index or 0}" if torch.cuda.is_available() else "cpu"
            tensor = torch.ones(256, 256, device=device)
            report["result"] = float((tensor @ tensor).sum().item())
            report["computed_on"] = str(tensor.device)
            if tensor.is_cuda:
                report["computed_uuid"] = _torch_uuid(torch, tensor.device.index or 0)
                report["device_count"] = torch.cuda.device_count()
                report["seen"] = [_torch_uuid(torch, i) for i in range(torch.cuda.device_count())]
        if release is not None:  # hold the slot until the parent says so (concurrent steps)
            print(json.dumps({"inside": True}), flush=True)
            while not release.exists():
                time.sleep(0.01)
    report["after"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if slot is not None:
        slot.unlock()
    print(json.dumps(report), flush=True)


def inventory() -> None:
    """What CUDA shows this process without any pin (torch), and nvidia-smi's list."""
    report: dict[str, Any] = {"torch": None, "seen": [], "smi": []}
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        pass
    else:
        report["torch"] = torch.__version__
        report["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            report["seen"] = [_torch_uuid(torch, i) for i in range(torch.cuda.device_count())]
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        report["smi"] = listed.stdout.splitlines()
    print(json.dumps(report), flush=True)


# ## The parent: run steps, judge them


@dataclass
class Outcome:
    check: str
    verdict: str  # PASS | FAIL | SKIP
    detail: str


def _child(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _result(child: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = child.communicate(timeout=STEP_TIMEOUT)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        last = err.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"step exited {child.returncode}: {last[0]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _run(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return _result(_child(args, env))


def _judge_step(report: dict[str, Any], expected_uuid: str | None) -> list[Outcome]:
    held = report["held"]
    outcomes = []
    seen = report.get("seen")
    pinned_ok = (
        report["pinned"]
        and report["visible"] == held
        and report["after"] == report["before"]
        and seen is not None
        and len(seen) == 1
        and expected_uuid is not None
        and same_device(seen[0], expected_uuid)
    )
    outcomes.append(
        Outcome(
            "pinned",
            "PASS" if pinned_ok else "FAIL",
            f"held {held}; inside the block CUDA_VISIBLE_DEVICES={report['visible']!r}, "
            f"torch saw {seen if seen is not None else 'no CUDA device'} (expected "
            f"{expected_uuid}); after it {report['after']!r} (before {report['before']!r})"
            + ("" if report["pinned"] else f"; not pinned: {report['reason']}"),
        )
    )
    on = report.get("computed_on")
    if report.get("torch") is None:
        outcomes.append(Outcome("on-gpu", "FAIL", "the step could not import torch"))
    elif on is None or not on.startswith("cuda"):
        outcomes.append(
            Outcome(
                "on-gpu",
                "FAIL",
                f"the step asked for CUDA and ran on the CPU ({on}): torch "
                f"{report['torch']} saw no CUDA device inside the slot",
            )
        )
    else:
        uuid = report.get("computed_uuid", "")
        good = expected_uuid is not None and same_device(uuid, expected_uuid)
        outcomes.append(
            Outcome(
                "on-gpu",
                "PASS" if good else "FAIL",
                f"the step's tensor was computed on {on} = {uuid} (held {held})",
            )
        )
    return outcomes


def _expected_uuid(held: str, unpinned: list[str]) -> str | None:
    """The UUID of the held device: its own name, or for an index the unpinned list's entry."""
    if held.startswith(("GPU-", "MIG-")):
        return held
    index = int(held)
    return unpinned[index] if index < len(unpinned) else None


@dataclass
class Machine:
    devices: Devices
    names: tuple[str, ...]  # the devices gpu_slot() hands out here (indices when unknown)
    unpinned: list[str]  # the UUIDs torch sees without a pin
    mig: list[str]  # MIG device UUIDs nvidia-smi lists
    locks: Path


def check_devices(machine: Machine) -> list[Outcome]:
    real = [_expected_uuid(name, machine.unpinned) for name in machine.names]
    good = bool(machine.names) and all(
        uuid is not None and (is_mig or any(same_device(uuid, s) for s in machine.unpinned))
        for uuid, is_mig in ((uuid, uuid is not None and uuid.startswith("MIG-")) for uuid in real)
    )
    found = machine.unpinned or "none (torch sees no CUDA device)"
    detail = (
        f"the container's devices {list(machine.names)} ({machine.devices.source}) against "
        f"the GPU's {found}"
    )
    return [Outcome("devices", "PASS" if good else "FAIL", detail)]


def check_step(machine: Machine) -> list[Outcome]:
    report = _run("--step", "--locks", str(machine.locks))
    return _judge_step(report, _expected_uuid(report["held"], machine.unpinned))


def check_exclusive(machine: Machine) -> list[Outcome]:
    if len(machine.names) < 2:
        return [Outcome("exclusive", "SKIP", f"{len(machine.names)} device: two holders need two")]
    release = machine.locks / "release"
    children = []
    for _ in range(2):  # one after the other is inside: the second must take another slot
        child = _child(["--step", "--locks", str(machine.locks), "--hold", str(release)])
        assert child.stdout is not None
        child.stdout.readline()
        children.append(child)
    release.touch()
    a, b = (_result(child) for child in children)
    apart = not same_device(a["held"], b["held"]) and a.get("computed_uuid") != b.get(
        "computed_uuid"
    )
    detail = (
        f"concurrent steps held {a['held']} / {b['held']} and computed on "
        f"{a.get('computed_uuid')} / {b.get('computed_uuid')}"
    )
    return [Outcome("exclusive", "PASS" if apart and a.get("computed_uuid") else "FAIL", detail)]


def check_cuda_first(machine: Machine) -> list[Outcome]:
    """CUDA initialised before the block, on the real GPU; the block holds a device it cannot
    reach (a made-up UUID), so the pin must be refused, naming what CUDA sees."""
    made_up = "GPU-00000000-0000-0000-0000-000000000000"
    early = _run("--step", "--locks", str(machine.locks), "--held", made_up, "--cuda-first")
    before = early.get("initialised_before")
    reason = early.get("reason") or ""
    reported = (
        before is not None
        and len(before) == len(machine.unpinned) > 0
        and all(map(same_device, before, machine.unpinned))
        and not early["pinned"]
        and all(name in reason for name in before)
        and made_up in reason
    )
    detail = (
        f"libcuda reported {before!r} after torch.cuda.init() (torch sees {machine.unpinned}); "
        f"pinned={early['pinned']}, reason: {reason or 'none'}"
    )
    return [Outcome("cuda-first", "PASS" if reported else "FAIL", detail)]


def check_mig(machine: Machine) -> list[Outcome]:
    if not machine.mig:
        return [Outcome("mig", "SKIP", "no MIG devices on this GPU (nvidia-smi -L)")]
    report = _run("--step", "--locks", str(machine.locks), "--held", machine.mig[0])
    pinned = _judge_step(report, machine.mig[0])[0]
    return [Outcome("mig", pinned.verdict, pinned.detail)]


CHECKS = (
    (check_devices, ("devices",)),
    (check_step, ("pinned", "on-gpu")),
    (check_exclusive, ("exclusive",)),
    (check_cuda_first, ("cuda-first",)),
    (check_mig, ("mig",)),
)


def check() -> list[Outcome]:
    devices = Devices.from_environment(os.environ, _cuda.nvml_devices)
    listing = _run("--inventory")
    unpinned: list[str] = listing["seen"]
    print(f"torch {listing['torch']} (CUDA {listing.get('cuda')}); it sees {unpinned or 'none'}")
    print(f"gpu_slot() devices: {devices.names} from {devices.source}")
    for line in listing["smi"]:
        print(f"  nvidia-smi: {line}")
    names = devices.names if devices.names is not None else tuple(map(str, range(len(unpinned))))
    mig = [
        line.split("UUID: ")[1].rstrip(")").strip()
        for line in listing["smi"]
        if "UUID: MIG-" in line
    ]
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        machine = Machine(devices, names, unpinned, mig, Path(work))
        for each, properties in CHECKS:
            try:
                outcomes += each(machine)
            except Exception as error:  # a step that could not run fails its properties
                why = f"{type(error).__name__}: {error}"
                outcomes += [Outcome(name, "FAIL", why) for name in properties]
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inventory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--locks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--held", help=argparse.SUPPRESS)
    parser.add_argument("--cuda-first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inventory:
        inventory()
        return 0
    if args.step:
        step(args.locks, args.hold, args.held, args.cuda_first)
        return 0
    try:
        outcomes = check()
    except Exception as error:  # not even the inventory ran: a failure, said plainly
        outcomes = [Outcome("run", "FAIL", f"{type(error).__name__}: {error}")]
    for outcome in outcomes:
        print(f"{outcome.verdict:4}  {outcome.check:10}  {outcome.detail}")
    failed = [outcome.check for outcome in outcomes if outcome.verdict == "FAIL"]
    print(f"GPU check: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
