"""The kubeconform schema converter on small, hand-made specs."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_gpu_sandbox.kubeschemas import (
    crd_schemas,
    kubernetes_schemas,
    schema_file,
    strict_definitions,
)

Schema = dict[str, Any]
META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
SWAGGER: Schema = {
    "definitions": {
        META: {
            "description": "metadata",
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {
            "type": "string",
            "format": "int-or-string",
        },
        "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": "string"},
        "io.k8s.api.example.v1.Props": {
            "type": "object",
            # A property named like a keyword stays a property; the recursion stays a $ref.
            "properties": {
                "description": {"type": "string"},
                "$ref": {"type": "string"},
                "nested": {"$ref": "#/definitions/io.k8s.api.example.v1.Props"},
            },
        },
        "io.k8s.api.example.v1.Widget": {
            "x-kubernetes-group-version-kind": [
                {"group": "example.k8s.io", "kind": "Widget", "version": "v1"}
            ],
            "type": "object",
            "properties": {
                "metadata": {"$ref": f"#/definitions/{META}", "description": "its metadata"},
                "port": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
                "size": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.api.resource.Quantity"},
                "props": {"$ref": "#/definitions/io.k8s.api.example.v1.Props"},
                "raw": {"type": "object"},
            },
        },
    }
}


@pytest.mark.parametrize(
    ("kind", "group", "version", "file"),
    [
        ("Pod", "", "v1", "pod-v1.json"),
        ("Deployment", "apps", "v1", "deployment-apps-v1.json"),
        ("Issuer", "cert-manager.io", "v1", "issuer-cert-manager-v1.json"),
        ("GPULimitPolicy", "prefectgpu.io", "v1alpha1", "gpulimitpolicy-prefectgpu-v1alpha1.json"),
    ],
)
def test_file_names_are_kubeconforms(kind: str, group: str, version: str, file: str) -> None:
    assert schema_file(kind, group, version) == file


def _widget() -> Schema:
    (widget,) = kubernetes_schemas(strict_definitions(SWAGGER)).values()
    return widget


def test_a_kind_stands_alone_with_what_it_refers_to() -> None:
    schemas = kubernetes_schemas(strict_definitions(SWAGGER))
    assert list(schemas) == ["widget-example-v1.json"]
    assert set(_widget()["definitions"]) == {
        META,
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
        "io.k8s.apimachinery.pkg.api.resource.Quantity",
        "io.k8s.api.example.v1.Props",
    }


def test_objects_with_properties_are_closed_and_others_stay_open() -> None:
    widget = _widget()
    assert widget["additionalProperties"] is False
    assert widget["definitions"][META]["additionalProperties"] is False
    assert widget["properties"]["raw"] == {"type": "object"}
    labels = widget["definitions"][META]["properties"]["labels"]
    assert labels["additionalProperties"] == {"type": "string"}


def test_descriptions_go_but_properties_named_like_keywords_stay() -> None:
    widget = _widget()
    assert "description" not in widget["definitions"][META]
    assert widget["properties"]["metadata"] == {"$ref": f"#/definitions/{META}"}
    props = widget["definitions"]["io.k8s.api.example.v1.Props"]["properties"]
    assert set(props) == {"description", "$ref", "nested"}


def test_int_or_string_and_quantities_take_numbers() -> None:
    definitions = _widget()["definitions"]
    assert definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] == {
        "oneOf": [{"type": "string"}, {"type": "integer"}]
    }
    assert definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] == {
        "oneOf": [{"type": "string"}, {"type": "number"}]
    }


def _crd(schema: Schema) -> Schema:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": "example.com",
            "names": {"kind": "Gadget"},
            "versions": [{"name": "v1", "schema": {"openAPIV3Schema": schema}}],
        },
    }


def test_a_crd_is_closed_and_its_metadata_is_object_meta() -> None:
    spec = {
        "type": "object",
        "properties": {
            "size": {"type": "integer", "minimum": 1},
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}]},
            "note": {
                "type": "object",
                "nullable": True,
                "properties": {"text": {"type": "string"}},
            },
            "extra": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"known": {"type": "string"}},
            },
        },
    }
    root = {"type": "object", "properties": {"metadata": {"type": "object"}, "spec": spec}}
    documents = [_crd(root), {"kind": "Namespace"}]
    (gadget,) = crd_schemas(documents, strict_definitions(SWAGGER)).values()
    assert gadget["additionalProperties"] is False
    assert gadget["properties"]["metadata"] == {"$ref": f"#/definitions/{META}"}
    assert set(gadget["definitions"]) == {META}
    assert {"apiVersion", "kind"} <= set(gadget["properties"])
    fields = gadget["properties"]["spec"]["properties"]
    assert fields["size"] == {"type": "integer", "minimum": 1}
    assert fields["port"] == {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    closed_note = {"type": "object", "properties": {"text": {"type": "string"}}}
    assert fields["note"] == {
        "anyOf": [{**closed_note, "additionalProperties": False}, {"type": "null"}]
    }
    assert "additionalProperties" not in fields["extra"]


def test_a_crd_open_at_the_root_stays_open() -> None:
    """kopf's peering CRDs keep anything; only their metadata is checked."""
    root = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    (peering,) = crd_schemas([_crd(root)], strict_definitions(SWAGGER)).values()
    assert "additionalProperties" not in peering
    assert peering["properties"]["metadata"] == {"$ref": f"#/definitions/{META}"}
