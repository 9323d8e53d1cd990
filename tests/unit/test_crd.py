"""The generated CRD: in sync with the pydantic models, and structural (the chart's copy is
checked in tests/chart)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from prefect_gpu_operator.api.crd import build_crd, render_crd_yaml
from prefect_gpu_operator.api.policy import (
    GPULimitPolicySpec,
    GPULimitPolicyStatus,
    LabelSelectorRequirement,
)

Schema = dict[str, Any]


def _version() -> Schema:
    version: Schema = build_crd()["spec"]["versions"][0]
    return version


def _root() -> Schema:
    root: Schema = _version()["schema"]["openAPIV3Schema"]
    return root


def test_rendered_yaml_round_trips() -> None:
    assert yaml.safe_load(render_crd_yaml()) == build_crd()


def test_names_and_scope() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "gpulimitpolicies.prefectgpu.io"
    assert crd["spec"]["group"] == "prefectgpu.io"
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"] == {
        "kind": "GPULimitPolicy",
        "listKind": "GPULimitPolicyList",
        "plural": "gpulimitpolicies",
        "singular": "gpulimitpolicy",
        "shortNames": ["glp"],
    }
    version = _version()
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {
        column["name"].upper(): column["jsonPath"]
        for column in _version()["additionalPrinterColumns"]
    }
    assert columns == {
        "NODES": ".status.nodes",
        "SLOTS": ".status.totalSlots",
        "READY": '.status.conditions[?(@.type=="Ready")].status',
        "AGE": ".metadata.creationTimestamp",
    }


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in get_args(annotation):
        yield from _nested_models(argument)


def _pairs(
    model: type[BaseModel], schema: Schema, path: str
) -> Iterator[tuple[str, type[BaseModel], Schema]]:
    """Every (path, model, object schema) pair, following nested models into objects and arrays."""
    yield path, model, schema
    for name, field in model.model_fields.items():
        alias = field.alias or name
        prop = schema["properties"][alias]
        for nested in _nested_models(field.annotation):
            if prop["type"] == "array":
                yield from _pairs(nested, prop["items"], f"{path}.{alias}[]")
            else:
                yield from _pairs(nested, prop, f"{path}.{alias}")


MODEL_SCHEMAS = [
    *_pairs(GPULimitPolicySpec, _root()["properties"]["spec"], "spec"),
    *_pairs(GPULimitPolicyStatus, _root()["properties"]["status"], "status"),
]


def test_every_model_is_checked() -> None:
    paths = {path for path, _, _ in MODEL_SCHEMAS}
    assert {
        "spec.server.apiKey.valueFrom.secretKeyRef",
        "spec.server.basicAuth.valueFrom.secretKeyRef",
        "spec.server.caBundle.valueFrom.configMapKeyRef",
        "spec.server.headers[].valueFrom.secretKeyRef",
        "spec.nodeSelector.matchExpressions[]",
        "status.conditions[]",
        "status.limits[]",
    } <= paths


IDS = [path for path, _, _ in MODEL_SCHEMAS]


@pytest.mark.parametrize(("path", "model", "schema"), MODEL_SCHEMAS, ids=IDS)
def test_model_fields_match_schema_properties(
    path: str, model: type[BaseModel], schema: Schema
) -> None:
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    assert set(schema["properties"]) == set(fields) | WIRE_ONLY.get(path, set())
    required = {alias for alias, field in fields.items() if field.is_required()}
    assert set(schema.get("required", [])) == required - WIRE_OPTIONAL.get(path, set())


# The compact ledger (GPULimitPolicyStatus): on the wire the status names the template its
# ledger follows, and entries that follow it leave their names out.
WIRE_ONLY = {"status": {"limitNameTemplate"}}
WIRE_OPTIONAL = {"status.limits[]": {"name"}}


@pytest.mark.parametrize(("path", "model", "schema"), MODEL_SCHEMAS, ids=IDS)
def test_every_property_is_described(path: str, model: type[BaseModel], schema: Schema) -> None:
    for alias, prop in schema["properties"].items():
        assert prop.get("description"), f"{path}.{alias} has no description"


def _walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_closed() -> None:
    """Every node has a type; nothing preserves unknown fields, so unknown fields are rejected."""
    for path, node in _walk(_root()):
        assert "type" in node, f"{path or '<root>'} has no type"
        assert "x-kubernetes-preserve-unknown-fields" not in node, path


def _apply_defaults(schema: Schema, value: Any) -> Any:
    """What the API server's defaulting does to ``value``: fill absent properties' defaults."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    result = dict(value)
    for name, prop in schema["properties"].items():
        if name not in result and "default" in prop:
            result[name] = prop["default"]
        if name in result:
            result[name] = _apply_defaults(prop, result[name])
    return result


def test_schema_defaults_match_model_defaults() -> None:
    minimal = {"server": {"remoteApiUrl": "http://prefect:4200/api"}}
    defaulted = _apply_defaults(_root()["properties"]["spec"], minimal)
    model = GPULimitPolicySpec.model_validate(minimal).model_dump(by_alias=True, mode="json")
    assert defaulted == {
        "server": minimal["server"],
        "resources": ["nvidia.com/gpu"],
        "capacityFrom": "Allocatable",
        "slotsPerGpu": 1,
        "limitNameTemplate": "gpu:{node}",
        "deletionPolicy": "Delete",
    }
    for key, value in defaulted.items():
        assert model[key] == value or key == "server"
    # Fields the schema leaves absent default to "empty" or None in the model, never to a value.
    assert model["nodeSelector"] == {"matchLabels": {}, "matchExpressions": []}
    assert model["slotDecayPerSecond"] is None


def test_selector_operators_match_model() -> None:
    spec = _root()["properties"]["spec"]
    operator = spec["properties"]["nodeSelector"]["properties"]["matchExpressions"]["items"]
    enum = operator["properties"]["operator"]["enum"]
    assert enum == list(get_args(LabelSelectorRequirement.model_fields["operator"].annotation))


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        (("server",), "has(self.remoteApiUrl) != has(self.name)"),
        (("server",), "has(self.name) == has(self.namespace)"),
        (("server",), "has(self.accountId) == has(self.workspaceId)"),
        (("server",), "!(has(self.apiKey) && has(self.basicAuth))"),
        (("server",), "!(has(self.basicAuth) && has(self.accountId))"),
        (
            ("server", "caBundle", "valueFrom"),
            "has(self.secretKeyRef) != has(self.configMapKeyRef)",
        ),
        (("limitNameTemplate",), "self.contains('{node}')"),
        (("limitNameTemplate",), "!self.matches('[/%&><]')"),
    ],
)
def test_cel_rules(path: tuple[str, ...], fragment: str) -> None:
    node = _root()["properties"]["spec"]
    for part in path:
        node = node["properties"][part]
    assert fragment in [rule["rule"] for rule in node["x-kubernetes-validations"]]


@pytest.mark.parametrize("credential", ["apiKey", "basicAuth"])
def test_credentials_only_from_a_secret(credential: str) -> None:
    server = _root()["properties"]["spec"]["properties"]["server"]["properties"]
    source = server[credential]
    assert set(source["properties"]) == {"valueFrom"}
    assert source["required"] == ["valueFrom"]
    assert set(source["properties"]["valueFrom"]["properties"]) == {"secretKeyRef"}


def test_headers_have_no_literal_value_and_unique_names() -> None:
    server = _root()["properties"]["spec"]["properties"]["server"]
    headers = server["properties"]["headers"]
    assert set(headers["items"]["properties"]) == {"name", "valueFrom"}
    assert "exists_one" in headers["x-kubernetes-validations"][0]["rule"]
    assert headers["maxItems"] == 16
    rules = [rule["rule"] for rule in server["x-kubernetes-validations"]]
    assert any("'authorization'" in rule for rule in rules)
