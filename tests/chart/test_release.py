"""The release's chart packaged for real by helm, and the workflows judged by actionlint."""

from __future__ import annotations

import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefect_gpu_sandbox.chart import helm
from prefect_gpu_sandbox.release import (
    DISTRIBUTIONS,
    Release,
    image_references,
    plan,
    repository_version,
    stage_chart,
)
from prefect_gpu_sandbox.tools import K8S_VERSION, ensure_tools

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
REGISTRY = "registry.example/team"


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(f"prefect-gpu-operator/{name}")
    assert member is not None, name
    return member.read()


def test_helm_packages_the_staged_chart_at_the_python_packages_version(tmp_path: Path) -> None:
    staged = stage_chart(REGISTRY, tmp_path / "chart")
    helm("lint", "--strict", str(staged))
    helm("package", str(staged), "--destination", str(tmp_path))
    version = repository_version()
    with tarfile.open(tmp_path / f"prefect-gpu-operator-{version}.tgz") as archive:
        chart = yaml.safe_load(_member(archive, "Chart.yaml"))
        values = yaml.safe_load(_member(archive, "values.yaml"))
        licence = _member(archive, "LICENSE")
    for directory in DISTRIBUTIONS.values():
        project = tomllib.loads((REPO / directory / "pyproject.toml").read_text())["project"]
        assert chart["version"] == chart["appVersion"] == project["version"]
    assert values["operator"]["image"]["repository"] == f"{REGISTRY}/prefect-gpu-operator"
    assert values["inferenceWorker"]["image"]["repository"] == f"{REGISTRY}/prefect-gpu-worker"
    assert licence == (REPO / "LICENSE").read_bytes()


def _images(rendered: str) -> set[str]:
    images = set()
    for document in yaml.safe_load_all(rendered):
        spec: Any = (document or {}).get("spec", {})
        pod = spec.get("template", {}).get("spec", spec)
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            images.add(container["image"])
    return images


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-worker", "cuda-worker"])
def test_the_packaged_chart_renders_only_images_the_release_pushes(
    tmp_path: Path, cuda: bool
) -> None:
    version = repository_version()
    staged = stage_chart(REGISTRY, tmp_path / "chart")
    worker = {"enabled": True, **({"image": {"tag": f"{version}-cuda"}} if cuda else {})}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"inferenceWorker": worker}))
    rendered = helm(
        "template", "release", str(staged), "--namespace", "prefect-gpu-operator",
        "--kube-version", K8S_VERSION, "--values", str(values),
    ).stdout  # fmt: skip
    pushed = image_references(REGISTRY, version)
    expected = {pushed["operator"], pushed["worker-cuda" if cuda else "worker"]}
    assert _images(rendered) == expected


def test_the_release_plan_s_chart_steps_run_for_real_up_to_the_push(tmp_path: Path) -> None:
    helm_binary = str(ensure_tools(("helm",)) / "helm")
    release = Release(
        registry=REGISTRY,
        version=repository_version(),
        base="unused",
        dist=tmp_path / "dist",
        helm=helm_binary,
        stages=("chart",),
    )
    steps = plan(release)
    assert steps[-1].argv[1] == "push"
    for step in steps[:-1]:  # pushing needs a registry
        if step.action is not None:
            step.action()
        else:
            subprocess.run(
                step.argv,
                check=True,
                cwd=REPO,
                env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
            )
    assert release.chart_archive.is_file()
    assert steps[-1].argv[2] == str(release.chart_archive)


# --- the workflows -------------------------------------------------------------------------


def _actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    binary = ensure_tools(("actionlint",)) / "actionlint"
    return subprocess.run(
        [str(binary), "-no-color", *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_actionlint_passes_the_workflows() -> None:
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert {w.name for w in workflows} == {"ci.yml", "release.yml"}
    result = _actionlint(*workflows)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_actionlint_catches_a_broken_release_workflow(tmp_path: Path) -> None:
    # What this guards against: a misspelled input of a known action and a job output typo.
    text = (WORKFLOWS / "release.yml").read_text()
    broken = text.replace("          target: ${{ matrix.target }}", "          targets: x").replace(
        "needs.prepare.outputs.host", "needs.prepare.outputs.hots"
    )
    assert broken != text
    path = tmp_path / ".github" / "workflows" / "release.yml"
    path.parent.mkdir(parents=True)
    path.write_text(broken)
    result = _actionlint(path)
    assert result.returncode == 1
    assert '"targets"' in result.stdout
    assert "hots" in result.stdout


def _workflow(name: str) -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    return loaded


def _uses(workflow: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    return {
        step["uses"].split("@")[0]: step.get("with", {})
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "uses" in step
    }


def test_the_release_workflow_runs_on_tags_and_uses_the_release_module() -> None:
    workflow = _workflow("release.yml")
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads `on` as True
    uses = _uses(workflow)
    build = uses["docker/build-push-action"]
    assert build["file"] == "Dockerfile"
    assert build["target"] == "${{ matrix.target }}"
    assert build["tags"] == "${{ matrix.reference }}"
    assert build["build-args"] == "BASE=${{ matrix.base }}"
    assert "pypa/gh-action-pypi-publish" in uses
    runs = "\n".join(
        step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]
    )
    assert "prefect_gpu_sandbox.release --only chart" in runs
    assert "--images-json" in runs
    assert all(f"python -m build --outdir dist/python {d}" in runs for d in DISTRIBUTIONS.values())
    assert workflow["jobs"]["pypi"]["permissions"] == {"id-token": "write"}


def test_the_ci_workflow_runs_ci_run_as_root() -> None:
    workflow = _workflow("ci.yml")
    runs = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any(run.startswith("sudo") and run.endswith(" .ci/run") for run in runs)
    assert "make test" in (REPO / ".ci" / "run").read_text()
