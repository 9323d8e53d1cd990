"""The chart, offline: helm without a cluster, what it renders, and kubeconform's verdict on that.

Nothing here reads a kubeconfig or the user's helm configuration: each call gets a throwaway HOME.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefect_gpu_sandbox.kubeschemas import crd_schemas, kubernetes_definitions, write_schemas
from prefect_gpu_sandbox.paths import CHART
from prefect_gpu_sandbox.tools import K8S_VERSION, ensure_tools

__all__ = ["Verdict", "chart_crd_schemas", "helm", "kubeconform", "render_chart", "render_notes"]

# kubeconform's name for a kind's file: <kind>-<first part of the group>-<version>.json.
_SCHEMA_FILE = "{{ .ResourceKind }}{{ .KindSuffix }}.json"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``helm ARGS`` with a throwaway HOME (so no helm configuration) and no kubeconfig."""
    binary = ensure_tools(("helm",)) / "helm"
    with tempfile.TemporaryDirectory(prefix="helm-") as home:
        env = {"HOME": home, "PATH": "/usr/bin:/bin"}
        result = subprocess.run(
            [str(binary), *args], capture_output=True, text=True, env=env, timeout=120
        )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def render_chart(
    namespace: str,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "prefect-gpu-operator",
    show_only: str | None = None,
    include_crds: bool = False,
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """``helm template`` of the chart with ``values``: its documents, as dicts."""
    with tempfile.TemporaryDirectory(prefix="values-") as directory:
        values_file = Path(directory) / "values.yaml"
        values_file.write_text(yaml.safe_dump(dict(values or {})))
        args = [
            "template", release, str(chart), "--namespace", namespace,
            "--kube-version", K8S_VERSION, "--values", str(values_file),
        ]  # fmt: skip
        if show_only:
            args += ["--show-only", show_only]
        if include_crds:
            args.append("--include-crds")
        rendered = helm(*args)
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


# helm template leaves NOTES.txt out; a copy of the chart renders it as a define in a ConfigMap.
_NOTES_CONFIGMAP = """apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ include "notes.txt" . | toJson }}
"""


def render_notes(
    namespace: str,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "prefect-gpu-operator",
) -> str:
    """What ``helm install`` with ``values`` would print as the chart's NOTES.txt."""
    with tempfile.TemporaryDirectory(prefix="notes-") as directory:
        chart = Path(directory) / CHART.name
        shutil.copytree(CHART, chart)
        notes = (chart / "templates/NOTES.txt").read_text()
        (chart / "templates/NOTES.txt").unlink()
        define = '{{- define "notes.txt" -}}\n' + notes + "{{- end }}\n"
        (chart / "templates/_notes.tpl").write_text(define)
        (chart / "templates/notes.yaml").write_text(_NOTES_CONFIGMAP)
        (document,) = render_chart(
            namespace, values, release=release, show_only="templates/notes.yaml", chart=chart
        )
    return str(document["data"]["notes"])


def chart_crd_schemas(directory: Path) -> Path:
    """kubeconform schemas for the chart's own CRDs (``crds/``), written to ``directory``."""
    documents = [
        document
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]
    return write_schemas(crd_schemas(documents, kubernetes_definitions()), directory)


@dataclass(frozen=True)
class Verdict:
    """kubeconform on one object: ``status`` is valid, invalid, error or skipped."""

    kind: str
    name: str
    status: str
    message: str


def kubeconform(
    documents: Iterable[Mapping[str, Any]], schema_dirs: Sequence[Path]
) -> list[Verdict]:
    """``kubeconform -strict`` on ``documents`` against the schemas in ``schema_dirs`` only
    (the first that has a kind's file wins); a kind with no schema is an error, not a skip."""
    binary = ensure_tools(("kubeconform",)) / "kubeconform"
    locations = [arg for d in schema_dirs for arg in ("-schema-location", f"{d}/{_SCHEMA_FILE}")]
    argv = [str(binary), "-strict", "-verbose", "-output", "json", *locations, "-"]
    stream = yaml.safe_dump_all([dict(document) for document in documents])
    # Exit status 1 means "something is invalid": the verdicts say what.
    result = subprocess.run(argv, input=stream, capture_output=True, text=True, timeout=120)
    if result.returncode not in (0, 1) or not result.stdout:
        raise RuntimeError(f"kubeconform failed ({result.returncode}): {result.stderr}")
    return [
        Verdict(
            kind=resource["kind"],
            name=resource["name"],
            status=resource["status"].removeprefix("status").lower(),
            message=resource.get("msg", ""),
        )
        for resource in json.loads(result.stdout)["resources"]
    ]
