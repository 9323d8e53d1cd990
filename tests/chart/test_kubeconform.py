"""kubeconform, strict, offline, against Kubernetes v1.37.1 and the CRDs the chart renders objects
of: every value set renders only valid objects, and the schemas do catch mistakes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefect_gpu_sandbox.chart import Verdict, kubeconform
from prefect_gpu_sandbox.paths import CHART, REPOSITORY
from tests.chart.value_sets import VALUE_SETS

Documents = list[dict[str, Any]]


def _invalid(verdicts: list[Verdict]) -> list[Verdict]:
    return [verdict for verdict in verdicts if verdict.status != "valid"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_object_is_valid(
    name: str, rendered: dict[str, Documents], schema_dirs: list[Path]
) -> None:
    verdicts = kubeconform(rendered[name], schema_dirs)
    assert len(verdicts) == len(rendered[name])  # none skipped, none lost
    assert _invalid(verdicts) == []


def test_manifests_are_valid(schema_dirs: list[Path]) -> None:
    documents = [
        doc
        for path in sorted((REPOSITORY / "manifests").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    verdicts = kubeconform(documents, schema_dirs)
    assert len(verdicts) == len(documents) == 14
    assert _invalid(verdicts) == []


def _one(documents: Documents, kind: str) -> dict[str, Any]:
    (document,) = [doc for doc in documents if doc["kind"] == kind]
    return document


def _verdict(documents: Documents, schema_dirs: list[Path], kind: str) -> Verdict:
    (verdict,) = [v for v in kubeconform(documents, schema_dirs) if v.kind == kind]
    return verdict


def test_a_misspelled_field_is_caught(
    rendered: dict[str, Documents], schema_dirs: list[Path]
) -> None:
    documents = copy.deepcopy(rendered["defaults"])
    pod = _one(documents, "Deployment")["spec"]["template"]["spec"]
    context = pod["containers"][0]["securityContext"]
    context["readOnlyRootFilesytem"] = context.pop("readOnlyRootFilesystem")
    verdict = _verdict(documents, schema_dirs, "Deployment")
    assert verdict.status == "invalid"
    assert "additional properties 'readOnlyRootFilesytem' not allowed" in verdict.message


def test_a_policy_the_crd_refuses_is_caught(
    rendered: dict[str, Documents], schema_dirs: list[Path]
) -> None:
    """values.schema.json leaves the policy's spec to the CRD: kubeconform checks it."""
    documents = copy.deepcopy(rendered["default-policy"])
    _one(documents, "GPULimitPolicy")["spec"]["slotsPerGpu"] = 0
    verdict = _verdict(documents, schema_dirs, "GPULimitPolicy")
    assert verdict.status == "invalid"
    assert "at '/spec/slotsPerGpu': minimum: got 0, want 1" in verdict.message


def test_cert_managers_schemas_are_used(
    rendered: dict[str, Documents], schema_dirs: list[Path]
) -> None:
    documents = copy.deepcopy(rendered["tls-cert-manager"])
    (serving,) = [d for d in documents if d["kind"] == "Certificate" and "dnsNames" in d["spec"]]
    serving["spec"]["dnsName"] = serving["spec"].pop("dnsNames")
    verdicts = [v for v in kubeconform(documents, schema_dirs) if v.kind == "Certificate"]
    assert [v.status for v in verdicts].count("invalid") == 1
    assert any("additional properties 'dnsName' not allowed" in v.message for v in verdicts)


def test_a_kind_without_a_schema_is_an_error(schema_dirs: list[Path]) -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (verdict,) = kubeconform([widget], schema_dirs)
    assert verdict.status == "error"
    assert "could not find schema for Widget" in verdict.message


def _switches(values: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], bool]:
    """Every boolean of ``values``, by its path; security contexts are Kubernetes objects passed
    through, not the chart's switches."""
    found: dict[tuple[str, ...], bool] = {}
    for key, value in values.items():
        if key.endswith("SecurityContext"):
            continue
        if isinstance(value, bool):
            found[(*path, key)] = value
        elif isinstance(value, dict):
            found.update(_switches(value, (*path, key)))
    return found


def test_value_sets_flip_every_switch() -> None:
    defaults = _switches(yaml.safe_load((CHART / "values.yaml").read_text()))
    flipped = {
        path
        for values in VALUE_SETS.values()
        for path, value in _switches(values).items()
        if defaults.get(path) is not value
    }
    assert set(defaults) - flipped == set()
    sources = {
        values.get("webhook", {}).get("tls", {}).get("source") for values in VALUE_SETS.values()
    }
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    tls = schema["properties"]["webhook"]["properties"]["tls"]["properties"]["source"]
    assert set(tls["enum"]) - {"helm"} <= sources  # helm is the default
