"""The GPULimitPolicy CustomResourceDefinition, built from the pydantic models in ``policy.py``.

Descriptions and defaults come from the models' fields, so ``kubectl explain glp.spec`` and the
Python code say the same thing; types, bounds and CEL rules are written here. The chart's CRD file
is this module's output, and a unit test fails when the two differ. Regenerate it with
``make generate`` (``prefect-gpu-operator crd``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from prefect_gpu_operator.api.limit_names import FORBIDDEN_NAME_CHARACTERS, NODE_PLACEHOLDER
from prefect_gpu_operator.api.policy import (
    DNS_LABEL_PATTERN,
    GROUP,
    HEADER_NAME_PATTERN,
    KIND,
    MAX_HEADERS,
    PLURAL,
    RESERVED_HEADERS,
    RESOURCE_NAME_PATTERN,
    SHORT_NAME,
    SINGULAR,
    URL_PATTERN,
    VERSION,
    ApiKeySource,
    BasicAuthSource,
    CaBundleSource,
    Condition,
    ConfigMapKeySelector,
    GPULimitPolicySpec,
    GPULimitPolicyStatus,
    HeaderSource,
    LabelSelector,
    LabelSelectorRequirement,
    LimitEntry,
    PrefectServerReference,
    SecretKeySelector,
    SecretValueSource,
    ValueSource,
    WorkerNode,
)

__all__ = ["CRD_FILE", "build_crd", "render_crd_yaml"]

CRD_FILE = f"charts/prefect-gpu-operator/crds/{PLURAL}.{GROUP}.yaml"

Schema = dict[str, Any]


def _rule(rule: str, message: str) -> Schema:
    return {"rule": rule, "message": message}


def _default(field: FieldInfo) -> Any:
    """The field's default as JSON, or None when the CRD should not default it.

    Empty containers and nested models are left to the model: ``nodeSelector: {}`` on every object
    would only be noise, and an absent selector already means "every node".
    """
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined or value is None or isinstance(value, BaseModel):
        return None
    jsonable = to_jsonable_python(value)
    return jsonable if jsonable not in ([], {}) else None


def _object(
    model: type[BaseModel],
    properties: Mapping[str, Schema],
    *,
    required: Iterable[str] = (),
    rules: Iterable[Schema] = (),
) -> Schema:
    """An object schema whose properties are ``model``'s fields, named by their camelCase aliases.

    A property the model does not have raises KeyError: the schema cannot invent fields.
    """
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    annotated: dict[str, Schema] = {}
    for alias, schema in properties.items():
        field = fields[alias]
        annotated[alias] = {"description": field.description, **schema}
        if (default := _default(field)) is not None:
            annotated[alias]["default"] = default
    result: Schema = {"type": "object", "properties": annotated}
    if required := list(required):
        result["required"] = required
    if rules := list(rules):
        result["x-kubernetes-validations"] = rules
    return result


def _string(**constraints: Any) -> Schema:
    return {"type": "string", **constraints}


def _key_selector(model: type[BaseModel]) -> Schema:
    return _object(
        model,
        {"name": _string(minLength=1, maxLength=253), "key": _string(minLength=1, maxLength=253)},
        required=["name", "key"],
    )


def _from_secret(model: type[BaseModel]) -> Schema:
    """``valueFrom.secretKeyRef`` only: for credentials, which never come from a ConfigMap."""
    value_from = _object(
        SecretValueSource,
        {"secretKeyRef": _key_selector(SecretKeySelector)},
        required=["secretKeyRef"],
    )
    return _object(model, {"valueFrom": value_from}, required=["valueFrom"])


def _value_source() -> Schema:
    return _object(
        ValueSource,
        {
            "secretKeyRef": _key_selector(SecretKeySelector),
            "configMapKeyRef": _key_selector(ConfigMapKeySelector),
        },
        rules=[
            _rule(
                "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                "set exactly one of secretKeyRef or configMapKeyRef",
            )
        ],
    )


def _headers_schema() -> Schema:
    reserved = ", ".join(f"'{name}'" for name in RESERVED_HEADERS)
    header = _object(
        HeaderSource,
        {
            "name": _string(pattern=HEADER_NAME_PATTERN, maxLength=128),
            "valueFrom": _value_source(),
        },
        required=["name", "valueFrom"],
        rules=[
            _rule(
                f"!(self.name.lowerAscii() in [{reserved}])",
                f"the client sets this header itself ({', '.join(RESERVED_HEADERS)})",
            )
        ],
    )
    return {
        "type": "array",
        "items": header,
        "maxItems": MAX_HEADERS,
        "x-kubernetes-list-type": "atomic",
        "x-kubernetes-validations": [
            _rule(
                "self.all(h, self.exists_one(o, o.name.lowerAscii() == h.name.lowerAscii()))",
                "header names must be unique (case-insensitive)",
            )
        ],
    }


def _server_schema() -> Schema:
    return _object(
        PrefectServerReference,
        {
            "remoteApiUrl": _string(pattern=URL_PATTERN, maxLength=2048),
            "accountId": _string(minLength=1, maxLength=64),
            "workspaceId": _string(minLength=1, maxLength=64),
            "apiKey": _from_secret(ApiKeySource),
            "basicAuth": _from_secret(BasicAuthSource),
            "caBundle": _object(
                CaBundleSource, {"valueFrom": _value_source()}, required=["valueFrom"]
            ),
            "headers": _headers_schema(),
            "name": _string(pattern=DNS_LABEL_PATTERN, maxLength=63),
            "namespace": _string(pattern=DNS_LABEL_PATTERN, maxLength=63),
        },
        rules=[
            _rule(
                "has(self.remoteApiUrl) != has(self.name)",
                "set exactly one of remoteApiUrl (an external server or Prefect Cloud) "
                "or name+namespace (an in-cluster PrefectServer)",
            ),
            _rule("has(self.name) == has(self.namespace)", "name and namespace go together"),
            _rule(
                "has(self.accountId) == has(self.workspaceId)",
                "accountId and workspaceId must be set together",
            ),
            _rule(
                "!has(self.accountId) || has(self.remoteApiUrl)",
                "accountId and workspaceId need remoteApiUrl (Prefect Cloud)",
            ),
            _rule(
                "!(has(self.apiKey) && has(self.basicAuth))",
                "apiKey and basicAuth are mutually exclusive",
            ),
            _rule(
                "!(has(self.basicAuth) && has(self.accountId))",
                "basicAuth is for self-hosted servers: Prefect Cloud takes apiKey",
            ),
            _rule(
                "!has(self.headers) || !(has(self.apiKey) || has(self.basicAuth)) || "
                "self.headers.all(h, h.name.lowerAscii() != 'authorization')",
                "an Authorization header conflicts with apiKey or basicAuth",
            ),
        ],
    )


def _label_selector_schema() -> Schema:
    requirement = _object(
        LabelSelectorRequirement,
        {
            "key": _string(minLength=1, maxLength=317),  # prefix (253) + "/" + name (63)
            "operator": _string(enum=["In", "NotIn", "Exists", "DoesNotExist"]),
            "values": {
                "type": "array",
                "items": _string(maxLength=63),
                "maxItems": 256,
                "x-kubernetes-list-type": "atomic",
            },
        },
        required=["key", "operator"],
        rules=[
            _rule(
                "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            )
        ],
    )
    return _object(
        LabelSelector,
        {
            "matchLabels": {
                "type": "object",
                "additionalProperties": _string(maxLength=63),
                "maxProperties": 64,
            },
            "matchExpressions": {
                "type": "array",
                "items": requirement,
                "maxItems": 64,
                "x-kubernetes-list-type": "atomic",
            },
        },
    )


def _spec_schema() -> Schema:
    return _object(
        GPULimitPolicySpec,
        {
            "server": _server_schema(),
            "nodeSelector": _label_selector_schema(),
            "resources": {
                "type": "array",
                "items": _string(pattern=RESOURCE_NAME_PATTERN, maxLength=253),
                "minItems": 1,
                "maxItems": 32,
                "x-kubernetes-list-type": "set",
            },
            "capacityFrom": _string(enum=["Allocatable", "WorkerPods"]),
            "workerSelector": _label_selector_schema(),
            "slotsPerGpu": {"type": "integer", "format": "int32", "minimum": 1},
            "limitNameTemplate": _string(
                minLength=1,
                maxLength=200,
                **{
                    "x-kubernetes-validations": [
                        _rule(
                            f"self.contains('{NODE_PLACEHOLDER}')",
                            f"limitNameTemplate must contain {NODE_PLACEHOLDER}",
                        ),
                        _rule(
                            f"!self.matches('[{FORBIDDEN_NAME_CHARACTERS}]')",
                            "limitNameTemplate must not contain / % & > < "
                            "(Prefect rejects them in limit names)",
                        ),
                    ]
                },
            ),
            "slotDecayPerSecond": {"type": "number", "minimum": 0},
            "deletionPolicy": _string(enum=["Delete", "Retain"]),
        },
        required=["server"],
    )


def _status_schema() -> Schema:
    condition = _object(
        Condition,
        {
            "type": _string(maxLength=316),
            "status": _string(enum=["True", "False", "Unknown"]),
            "reason": _string(maxLength=1024),
            "message": _string(maxLength=32768),
            "lastTransitionTime": _string(format="date-time"),
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        },
        required=["type", "status", "reason", "message", "lastTransitionTime"],
    )
    entry = _object(
        LimitEntry,
        {
            "name": _string(minLength=1),
            "node": _string(minLength=1),
            "limit": {"type": "integer", "minimum": 0},
            "drainingTo": {"type": "integer", "minimum": 0},
        },
        required=["node", "limit"],  # no name: the name limitNameTemplate gives the node
    )
    worker = _object(
        WorkerNode,
        {"node": _string(minLength=1), "limit": _string(minLength=1)},
        required=["node"],
    )
    status = _object(
        GPULimitPolicyStatus,
        {
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "nodes": {"type": "integer", "minimum": 0},
            "totalSlots": {"type": "integer", "minimum": 0},
            "limits": {
                "type": "array",
                "items": entry,
                # Not a map keyed by name: names may be left out (limitNameTemplate), and a node
                # may appear twice while a renamed limit is replaced.
                "x-kubernetes-list-type": "atomic",
            },
            "workers": {
                "type": "array",
                "items": worker,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["node"],
            },
        },
    )
    # A wire-format field of the ledger, not of the model (see GPULimitPolicyStatus).
    status["properties"]["limitNameTemplate"] = {
        "description": "How the ledger names its limits: an entry of limits without a name is "
        "named by this template, {node} replaced by the entry's node. Names that follow it are "
        "left out, which about halves the ledger of a large cluster.",
        **_string(minLength=1),
    }
    return status


def build_crd() -> Schema:
    """The CustomResourceDefinition as a dict (apiextensions.k8s.io/v1)."""
    root = {
        "type": "object",
        "description": "GPULimitPolicy keeps one Prefect global concurrency limit per selected "
        "GPU node, with a limit equal to the node's allocatable GPUs times slotsPerGpu.",
        "properties": {
            "apiVersion": _string(),
            "kind": _string(),
            "metadata": {"type": "object"},
            "spec": {"description": "What to keep in Prefect, and where.", **_spec_schema()},
            "status": {"description": "What the operator observed.", **_status_schema()},
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes"},
                        {"name": "Slots", "type": "integer", "jsonPath": ".status.totalSlots"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML file shipped in the chart."""
    header = (
        "# Generated by `prefect-gpu-operator crd` (`make generate`) from operator/"
        "prefect_gpu_operator/api/crd.py.\n# Do not edit by hand: tests/unit/test_crd.py fails "
        "when this file is stale.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
