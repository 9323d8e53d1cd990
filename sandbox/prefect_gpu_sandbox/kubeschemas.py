"""Strict standalone JSON schemas for kubeconform, made offline from Go modules.

kubeconform validates each object against ``<kind>-<group>-<version>.json`` (its ``KindSuffix``
naming) in a schema directory. Each file made here stands alone: the kind's schema plus every
definition it refers to under ``definitions``, so no file reaches out to another (and recursive
types such as ``JSONSchemaProps`` need no inlining). Strict means what the API server means:

- objects with listed properties accept no others (``additionalProperties: false``): the server
  drops unknown fields with a warning, or refuses them under strict field validation;
- int-or-string fields and Quantities accept numbers as well as strings, as its decoders do;
- a CRD's ``nullable`` fields accept null; other nulls are refused (a rendered null is a
  template slip even where the server would drop it);
- a custom resource's ``metadata`` is checked as ObjectMeta, as the server checks it.

Sources: ``api/openapi-spec/swagger.json`` of ``k8s.io/kubernetes``, cert-manager's
``deploy/crds/`` and the Prometheus Operator's ServiceMonitor and PodMonitor CRDs, converted once
per version into the cache; the chart's own CRDs, converted where they are used (they change with
the code).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from prefect_gpu_sandbox.tools import K8S_VERSION, ToolsMissingError, cache_dir

__all__ = [
    "CERT_MANAGER_VERSION",
    "Schema",
    "crd_schemas",
    "ensure_schemas",
    "kubernetes_definitions",
    "kubernetes_schemas",
    "schema_file",
    "schemas_root",
    "strict_definitions",
    "write_schemas",
]

CERT_MANAGER_VERSION = "v1.21.2"
# The newest release of the module the Go module proxy serves here (its CRDs are in example/).
PROMETHEUS_OPERATOR_VERSION = "v0.85.0"
PROMETHEUS_OPERATOR_KINDS = ("servicemonitors", "podmonitors")
"""The Prometheus Operator kinds the chart renders: the operator's and the GPU workers' scrapes."""
Schema = dict[str, Any]

_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_REF_PREFIX = "#/definitions/"
_INT_OR_STRING: Schema = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
_NUMBER_OR_STRING: Schema = {"oneOf": [{"type": "string"}, {"type": "number"}]}
_COMPLETE = ".complete"
# Not a kind's name (no kind starts with "_"), so kubeconform never picks it as a schema.
_DEFINITIONS = "_definitions.json"


def schema_file(kind: str, group: str, version: str) -> str:
    """kubeconform's file name for a kind: ``deployment-apps-v1.json``, ``pod-v1.json``."""
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind}{suffix}.json".lower()


def _map_subschemas(node: Schema, change: Callable[[Schema], Schema]) -> Schema:
    """``node`` with ``change`` applied bottom-up to it and every schema inside it. Only schema
    positions are followed, so a property *named* ``description`` or ``$ref`` stays a property."""
    result = dict(node)
    if isinstance(node.get("properties"), dict):
        result["properties"] = {
            name: _map_subschemas(sub, change) for name, sub in node["properties"].items()
        }
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            result[key] = _map_subschemas(node[key], change)
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            result[key] = [_map_subschemas(sub, change) for sub in node[key]]
    return change(result)


def _references(node: object) -> Iterator[str]:
    """The definition names that ``node`` refers to, directly."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
            yield ref.removeprefix(_REF_PREFIX)
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def _standalone(root: Schema, definitions: Mapping[str, Schema]) -> Schema:
    """``root`` with every definition it needs, transitively, embedded."""
    needed: dict[str, Schema] = {}
    pending = list(_references(root))
    while pending:
        name = pending.pop()
        if name not in needed:
            needed[name] = definitions[name]
            pending.extend(_references(needed[name]))
    return {**root, "definitions": dict(sorted(needed.items()))} if needed else root


def _strict(node: Schema) -> Schema:
    """One schema node made strict (see the module docstring); descriptions are dropped, since
    kubeconform never shows them and they are most of the size."""
    node = {key: value for key, value in node.items() if key != "description"}
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        return dict(_INT_OR_STRING)
    open_ = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and not open_:
        node["additionalProperties"] = False
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def strict_definitions(swagger: Schema) -> dict[str, Schema]:
    """Every definition of a Kubernetes OpenAPI v2 spec, made strict."""
    definitions: dict[str, Schema] = {}
    for name, definition in swagger["definitions"].items():
        if name == _QUANTITY:
            definitions[name] = dict(_NUMBER_OR_STRING)
        else:
            definitions[name] = _map_subschemas(definition, _strict)
    return definitions


def kubernetes_schemas(definitions: Mapping[str, Schema]) -> dict[str, Schema]:
    """A schema file per group-version-kind among the (strict) ``definitions``."""
    schemas: dict[str, Schema] = {}
    for definition in definitions.values():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            file = schema_file(gvk["kind"], gvk["group"], gvk["version"])
            schemas[file] = _standalone(definition, definitions)
    return schemas


def crd_schemas(
    documents: Iterable[Schema], definitions: Mapping[str, Schema]
) -> dict[str, Schema]:
    """A schema file per version of each CustomResourceDefinition among ``documents`` (others
    are skipped); ObjectMeta comes from the Kubernetes ``definitions``."""
    schemas: dict[str, Schema] = {}
    for crd in documents:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            root = _map_subschemas(version["schema"]["openAPIV3Schema"], _strict)
            root["properties"] = {
                **root.get("properties", {}),
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"$ref": _REF_PREFIX + _OBJECT_META},
            }
            file = schema_file(spec["names"]["kind"], spec["group"], version["name"])
            schemas[file] = _standalone(root, definitions)
    return schemas


def write_schemas(schemas: Mapping[str, Schema], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for file, schema in schemas.items():
        (directory / file).write_text(json.dumps(schema, separators=(",", ":")))
    return directory


def _module_dir(module: str, version: str) -> Path:
    """Where the Go module cache holds ``module@version`` (downloaded on first use)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/go/bin", "/usr/lib/go/bin"])
    go = shutil.which("go", path=search)
    if go is None:
        raise ToolsMissingError("Go is required to fetch the Kubernetes API schemas")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    download = [go, "mod", "download", "-json", f"{module}@{version}"]
    found = subprocess.run(download, check=True, capture_output=True, text=True, env=env)
    return Path(json.loads(found.stdout)["Dir"])


def _kubernetes() -> dict[str, Schema]:
    module = _module_dir("k8s.io/kubernetes", K8S_VERSION)
    swagger = json.loads((module / "api/openapi-spec/swagger.json").read_text())
    definitions = strict_definitions(swagger)
    # Kept beside the kinds for CRD schemas made later (the chart's own): they need ObjectMeta.
    return {**kubernetes_schemas(definitions), _DEFINITIONS: {"definitions": definitions}}


def _cert_manager() -> dict[str, Schema]:
    module = _module_dir("github.com/cert-manager/cert-manager", CERT_MANAGER_VERSION)
    documents = [
        document
        for path in sorted((module / "deploy" / "crds").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]
    return crd_schemas(documents, kubernetes_definitions())


def _prometheus_operator() -> dict[str, Schema]:
    module = _module_dir(
        "github.com/prometheus-operator/prometheus-operator", PROMETHEUS_OPERATOR_VERSION
    )
    crds = module / "example/prometheus-operator-crd"
    documents = [
        document
        for kind in PROMETHEUS_OPERATOR_KINDS
        for document in yaml.safe_load_all(
            (crds / f"monitoring.coreos.com_{kind}.yaml").read_text()
        )
        if document
    ]
    return crd_schemas(documents, kubernetes_definitions())


def schemas_root() -> Path:
    return cache_dir() / "schemas" / K8S_VERSION


def kubernetes_definitions() -> dict[str, Schema]:
    """The strict Kubernetes definitions the cached schemas were made from."""
    text = (schemas_root() / "kubernetes" / _DEFINITIONS).read_text()
    definitions: dict[str, Schema] = json.loads(text)["definitions"]
    return definitions


def ensure_schemas(*, install: bool = False) -> list[Path]:
    """The cached schema directories (Kubernetes ``K8S_VERSION``, then cert-manager and the
    Prometheus Operator), made from the Go module cache when missing if ``install`` is set."""
    sources = {
        "kubernetes": _kubernetes,
        f"cert-manager-{CERT_MANAGER_VERSION}": _cert_manager,
        # Named by its kinds too: a cache made with fewer kinds is not taken for this one.
        "-".join(
            ["prometheus-operator", PROMETHEUS_OPERATOR_VERSION, *PROMETHEUS_OPERATOR_KINDS]
        ): _prometheus_operator,
    }
    root = schemas_root()
    directories = []
    for name, make in sources.items():
        directory = root / name
        if not (directory / _COMPLETE).exists():
            if not install:
                raise ToolsMissingError(
                    f"no schemas in {directory}: run `prefect-gpu-sandbox install-tools`"
                )
            root.mkdir(parents=True, exist_ok=True)
            # Made beside and renamed into place, so no reader sees half a directory.
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            write_schemas(make(), staging)
            (staging / _COMPLETE).touch()
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        directories.append(directory)
    return directories
