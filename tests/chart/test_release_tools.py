"""The release path with the real tools: actionlint judges the workflows, and helm packages and
lints the chart the release stages (its registry filled), as `release --only chart` does."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import yaml

from prefect_gpu_sandbox.chart import helm
from prefect_gpu_sandbox.release import declared_versions, stage_chart
from prefect_gpu_sandbox.tools import ensure_tools

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.yml"))


def test_actionlint_finds_nothing_in_the_workflows() -> None:
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "release.yml"}
    actionlint = ensure_tools(("actionlint",)) / "actionlint"
    found = subprocess.run(
        [str(actionlint), "-no-color", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert found.returncode == 0, found.stdout + found.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    steps = "    steps:\n      - run: echo ${{ github.nope }}\n"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n" + steps)
    actionlint = ensure_tools(("actionlint",)) / "actionlint"
    found = subprocess.run(
        [str(actionlint), "-no-color", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.returncode != 0
    assert "nope" in found.stdout


def test_the_staged_chart_packages_at_the_projects_version(tmp_path: Path) -> None:
    staged = stage_chart("registry.example/team", tmp_path / "stage")
    assert "[ERROR]" not in helm("lint", "--strict", str(staged)).stdout
    helm("package", str(staged), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("*.tgz")
    versions = set(declared_versions().values())
    (version,) = versions  # the chart, the app and both distributions share one version
    assert archive.name == f"prefect-gpu-operator-{version}.tgz"
    with tarfile.open(archive) as packaged:
        chart = yaml.safe_load(packaged.extractfile("prefect-gpu-operator/Chart.yaml").read())  # type: ignore[union-attr]
        values = packaged.extractfile("prefect-gpu-operator/values.yaml").read().decode()  # type: ignore[union-attr]
        names = packaged.getnames()
    assert (chart["version"], chart["appVersion"]) == (version, version)
    assert "registry.example/team/prefect-gpu-operator" in values
    assert "prefect-gpu-operator/LICENSE" in names
    assert "prefect-gpu-operator/README.md.gotmpl" not in names  # .helmignore
