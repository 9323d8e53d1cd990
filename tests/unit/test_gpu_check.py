"""tests/gpu/check.sh without a GPU: it fails a step that falls back to the CPU, fails a pin that
CUDA ignores, and passes what it can check on a stand-in CUDA that honours the pin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UUID_A = "GPU-8a1b2c3d-0000-1111-2222-333344445555"
UUID_B = "GPU-9f8e7d6c-0000-1111-2222-333344445555"

# A stand-in for torch on a machine whose GPUs are FAKE_TORCH_GPUS. FAKE_TORCH_MODE: "honours"
# (reads CUDA_VISIBLE_DEVICES once, at first use, like CUDA), "ignores" (sees every GPU), "cpu"
# (a CPU-only build). Like torch, it reports UUIDs without their "GPU-" prefix.
FAKE_TORCH = """
import os
from types import SimpleNamespace

__version__ = "0.0-fake"
version = SimpleNamespace(cuda="0.0-fake")
_seen = None


def _devices():
    global _seen
    if _seen is None:
        gpus = [g for g in os.environ.get("FAKE_TORCH_GPUS", "").split(",") if g]
        mode = os.environ.get("FAKE_TORCH_MODE", "honours")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if mode == "cpu":
            _seen = []
        elif mode == "ignores" or visible is None:
            _seen = gpus
        else:
            _seen = []
            for token in visible.split(","):
                match = [g for g in gpus if g == token] or (
                    [gpus[int(token)]] if token.isdigit() and int(token) < len(gpus) else []
                )
                if not match:
                    break
                _seen += match
    return _seen


class _Device:
    def __init__(self, spec):
        self.type, _, index = spec.partition(":")
        self.index = int(index) if index else None

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"


class _Tensor:
    def __init__(self, device):
        self.device = _Device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and (self.device.index or 0) >= len(_devices()):
            raise RuntimeError("CUDA error: invalid device ordinal")

    def __matmul__(self, other):
        return self

    def sum(self):
        return self

    def item(self):
        return 1.0


def ones(*shape, device="cpu"):
    return _Tensor(device)


class cuda:
    @staticmethod
    def init():
        _devices()

    @staticmethod
    def is_available():
        return bool(_devices())

    @staticmethod
    def device_count():
        return len(_devices())

    @staticmethod
    def get_device_properties(index):
        return SimpleNamespace(uuid=_devices()[index].removeprefix("GPU-"))
"""


def run_check(tmp_path: Path, torch: bool, **env: str) -> tuple[int, dict[str, str], str]:
    """Run check.sh; its exit status, the verdict per property, and its output."""
    path = [str(tmp_path)] if torch else []
    if torch:
        (tmp_path / "torch").mkdir(exist_ok=True)
        (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.endswith("_VISIBLE_DEVICES") and not key.startswith("FAKE_TORCH")
    }
    environ.update(env, PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(path))
    done = subprocess.run(
        ["bash", str(REPO / "tests/gpu/check.sh")],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    verdicts = dict(
        (check, verdict)
        for verdict, check in re.findall(r"^(PASS|FAIL|SKIP)\s+(\S+)", done.stdout, re.M)
    )
    return done.returncode, verdicts, done.stdout + done.stderr


def test_a_step_that_silently_runs_on_the_cpu_fails(tmp_path: Path) -> None:
    status, verdicts, output = run_check(
        tmp_path, torch=True, NVIDIA_VISIBLE_DEVICES=UUID_A, FAKE_TORCH_MODE="cpu"
    )
    assert status == 1, output
    assert verdicts["on-gpu"] == "FAIL", output
    assert "the step asked for CUDA and ran on the CPU (cpu)" in output
    assert verdicts["pinned"] == verdicts["devices"] == "FAIL"
    assert output.rstrip().endswith("GPU check: FAIL (devices, pinned, on-gpu, cuda-first)")


def test_without_torch_every_gpu_property_fails(tmp_path: Path) -> None:
    status, verdicts, output = run_check(tmp_path, torch=False, NVIDIA_VISIBLE_DEVICES=UUID_A)
    assert status == 1, output
    assert verdicts == {
        "devices": "FAIL",
        "pinned": "FAIL",
        "on-gpu": "FAIL",
        "exclusive": "SKIP",
        "cuda-first": "FAIL",
        "mig": "SKIP",
    }, output
    assert "could not import torch" in output


def test_a_pin_that_cuda_ignores_fails(tmp_path: Path) -> None:
    status, verdicts, output = run_check(
        tmp_path,
        torch=True,
        NVIDIA_VISIBLE_DEVICES=f"{UUID_A},{UUID_B}",
        FAKE_TORCH_GPUS=f"{UUID_A},{UUID_B}",
        FAKE_TORCH_MODE="ignores",
    )
    assert status == 1, output
    assert verdicts["pinned"] == "FAIL", output
    assert "torch saw ['GPU-8a1b2c3d" in output
    assert verdicts["exclusive"] == "FAIL"  # both compute on the first GPU


@pytest.mark.parametrize(
    "environ",
    [
        {"NVIDIA_VISIBLE_DEVICES": f"{UUID_B},{UUID_A}"},  # what NVIDIA's device plugin sets
        {"NVIDIA_VISIBLE_DEVICES": "all"},  # no list: the devices are numbered, 0 and 1
    ],
)
def test_a_cuda_that_honours_the_pin_passes_all_but_the_libcuda_probe(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    status, verdicts, output = run_check(
        tmp_path, torch=True, FAKE_TORCH_GPUS=f"{UUID_A},{UUID_B}", **environ
    )
    assert verdicts == {
        "devices": "PASS",
        "pinned": "PASS",
        "on-gpu": "PASS",
        "exclusive": "PASS",
        "cuda-first": "FAIL",  # the stand-in loads no libcuda for the probe to find
        "mig": "SKIP",
    }, output
    assert status == 1
    assert "libcuda reported None after torch.cuda.init()" in output
