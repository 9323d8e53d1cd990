"""Files generated from one source each, checked against a fresh rendering: `make generate`
writes them all."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from prefect_gpu_operator.api.crd import CRD_FILE, build_crd, render_crd_yaml
from prefect_gpu_sandbox.paths import CHART, REPOSITORY
from prefect_gpu_sandbox.tools import tools_bin

CHART_README = CHART / "README.md"


def _documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _script(name: str, *args: str, **tools: str) -> str:
    """charts/NAME's output, run with ``tools`` (variable: binary of the tools directory) only."""
    env = {"PATH": "/usr/bin:/bin", **{var: str(tools_bin() / tool) for var, tool in tools.items()}}
    script = REPOSITORY / "charts" / name
    return subprocess.run(
        ["bash", str(script), *args], check=True, capture_output=True, text=True, env=env
    ).stdout


def test_chart_crd_file_is_generated_from_code() -> None:
    path = REPOSITORY / CRD_FILE
    assert path.read_text() == render_crd_yaml(), f"{CRD_FILE} is stale: run `make generate`"
    assert yaml.safe_load(path.read_text()) == build_crd()


def test_manifests_match_the_chart(tmp_path: Path) -> None:
    _script("render-manifests.sh", str(tmp_path), HELM="helm")
    committed = sorted((REPOSITORY / "manifests").glob("*.yaml"))
    assert [p.name for p in committed] == sorted(p.name for p in tmp_path.glob("*.yaml"))
    for path in committed:
        fresh = _documents((tmp_path / path.name).read_text())
        ours = _documents(path.read_text())
        assert ours == fresh, (
            f"manifests/{path.name} drifted from the chart: run charts/render-manifests.sh"
        )
        # The operator makes the webhook's certificate: no key is rendered, none is committed.
        assert "PRIVATE KEY" not in path.read_text()
        assert "Secret" not in [doc["kind"] for doc in ours]
    crds = _documents((REPOSITORY / "manifests" / "01-crds.yaml").read_text())
    chart_crds = [
        d for p in sorted((CHART / "crds").glob("*.yaml")) for d in _documents(p.read_text())
    ]
    assert crds == chart_crds


def test_chart_readme_is_generated_from_the_values() -> None:
    fresh = _script("render-readme.sh", "--dry-run", HELM_DOCS="helm-docs")
    assert CHART_README.read_text() == fresh, "the chart's README.md is stale: run `make generate`"


def test_every_value_in_the_chart_readme_is_described() -> None:
    """helm-docs leaves a value's description empty when its `# --` comment is missing or it
    misreads one (a ` --` inside the text starts an old-style `key -- text` comment)."""
    rows = [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in CHART_README.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| Key ")
    ]
    assert len(rows) > 40
    assert [key for key, _type, _default, description in rows if not description] == []
