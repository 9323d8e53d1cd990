"""The images' inputs: locks covering their pyprojects, the Dockerfile's context, the cache key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from prefect_gpu_sandbox.images import (
    IGNORED,
    IMAGES,
    INIT,
    ImageSpec,
    cache_key,
    context_files,
    context_paths,
    lock_inputs,
    parse_lock,
    uncovered,
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _pins(spec: ImageSpec) -> dict[str, Version]:
    return parse_lock((REPO / spec.lock).read_text())


@pytest.mark.parametrize("spec", IMAGES.values(), ids=list(IMAGES))
def test_each_lock_covers_its_pyproject(spec: ImageSpec) -> None:
    pyproject = tomllib.loads((REPO / spec.project).read_text())
    problems = uncovered(lock_inputs(pyproject, spec.extras), _pins(spec))
    assert not problems, f"{spec.lock} is stale, run `make lock`: {problems}"


def test_the_operator_lock_has_no_prefect_and_no_model_runtime() -> None:
    assert (
        not {"prefect", "onnxruntime", "onnxruntime-gpu", "numpy"}
        & _pins(IMAGES["operator"]).keys()
    )


def test_each_worker_lock_has_one_onnxruntime() -> None:
    cpu, cuda = _pins(IMAGES["worker"]), _pins(IMAGES["worker-cuda"])
    assert "onnxruntime" in cpu
    assert "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in cuda
    assert "onnxruntime" not in cuda
    assert any(name.startswith("nvidia-cudnn") for name in cuda)


def test_lock_inputs_are_the_dependencies_extras_build_requirements_and_init() -> None:
    pyproject = {
        "project": {"dependencies": ["a>=1"], "optional-dependencies": {"x": ["b"], "y": ["c"]}},
        "build-system": {"requires": ["setuptools>=77"]},
    }
    assert lock_inputs(pyproject, ["x"]) == ["a>=1", "b", "setuptools>=77", INIT]


def test_parse_lock_reads_pins_past_hashes_markers_and_comments() -> None:
    text = (
        "# header\n"
        "Foo_Bar==1.2.3 \\\n"
        "    --hash=sha256:abc\n"
        "    # via x\n"
        "baz==2.0.post1 ; python_version >= '3.11'\n"
    )
    assert parse_lock(text) == {"foo-bar": Version("1.2.3"), "baz": Version("2.0.post1")}


def test_uncovered_names_missing_and_out_of_range_requirements() -> None:
    pins = {"httpx": Version("0.28.1"), "kopf": Version("2.0")}
    assert uncovered(["httpx>=0.27,<1", "kopf>=1.38,<2", "pyyaml>=6"], pins) == [
        "kopf>=1.38,<2: the lock has 2.0",
        "pyyaml>=6: not in the lock",
    ]


def test_uncovered_skips_requirements_of_other_platforms() -> None:
    assert uncovered(["pywin32 ; sys_platform == 'win32'"], {}) == []
    linux = "uvloop ; sys_platform == 'linux'"
    assert uncovered([linux], {}) == [f"{linux}: not in the lock"]


def test_the_dockerfile_context_of_each_target() -> None:
    assert context_paths(DOCKERFILE, "operator") == [
        "README.md",
        "constraints/operator.txt",
        "operator",
        "pyproject.toml",
    ]
    for target in ("worker", "worker-cuda"):
        expected = [f"constraints/{target}.txt", "flows", "flows/prefect.yaml"]
        assert context_paths(DOCKERFILE, target) == expected


def test_each_target_installs_its_own_lock() -> None:
    for spec in IMAGES.values():
        assert spec.lock in context_paths(DOCKERFILE, spec.target)


def test_the_base_is_a_build_argument() -> None:
    assert re.search(r"^ARG BASE=docker\.io/library/python:3\.11-slim-bookworm$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BASE\} AS python$", DOCKERFILE, re.M)


def test_context_paths_follow_the_parent_stages_only() -> None:
    dockerfile = (
        "ARG BASE=x\n"
        "FROM ${BASE} AS common\n"
        "COPY a /a\n"
        "FROM scratch AS other\n"
        "COPY b /b\n"
        "FROM common AS final\n"
        "# COPY commented /out\n"
        "COPY --chown=1:1 c \\\n"
        "     d/ /dest/\n"
        "COPY --from=other /b /b\n"
        "RUN [ -e /a ] && echo yes\n"
        'ADD ["e", "/e"]\n'
    )
    assert context_paths(dockerfile, "final") == ["a", "c", "d", "e"]
    with pytest.raises(KeyError, match="no stage 'missing'"):
        context_paths(dockerfile, "missing")


def test_a_run_that_mounts_the_context_is_refused() -> None:
    dockerfile = "FROM x AS a\nRUN --mount=type=bind,target=/src pip install /src\n"
    with pytest.raises(ValueError, match="mounts the build context"):
        context_paths(dockerfile, "a")


def test_dockerignore_admits_what_the_dockerfile_copies_and_drops_what_is_never_hashed() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for target in IMAGES:
        for path in context_paths(DOCKERFILE, target):
            assert path.split("/")[0] in admitted, path
    for pattern in IGNORED:
        assert f"**/{pattern}" in lines


def test_context_files_leave_out_what_dockerignore_drops(tmp_path: Path) -> None:
    for name in ("pkg/mod.py", "pkg/__pycache__/mod.pyc", "pkg.egg-info/PKG-INFO", "top.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    files = context_files(tmp_path, ["pkg", "pkg.egg-info", "top.toml"])
    assert files == {"pkg/mod.py": b"pkg/mod.py", "top.toml": b"top.toml"}


def test_the_cache_key_changes_with_every_input() -> None:
    files = {"a.py": b"1", "b.py": b"2"}
    key = cache_key("Dockerfile", "worker", files=files)
    assert cache_key("Dockerfile", "worker", files=dict(files)) == key
    assert cache_key("Dockerfile", "worker", files={**files, "a.py": b"3"}) != key
    assert cache_key("Dockerfile", "worker", files={"a.py": b"1", "c.py": b"2"}) != key
    assert cache_key("Dockerfile", "operator", files=files) != key
    # Framed: moving bytes between two parts is a different input.
    assert cache_key("ab", "c", files={}) != cache_key("a", "bc", files={})
