"""Which pods get ``WORKER_ID`` and the JSONPatch that gives it to them: pure functions of a pod.

``WORKER_ID`` is the node name, but a pod is not scheduled yet when it is admitted, so the value
is a Downward API reference (``fieldRef: spec.nodeName``) that the kubelet resolves at start.
The admission handler (``admission.py``) and the worker-pod watch (``workers.py``) both select
pods through ``Injection``, so the two never disagree about what a Prefect pod is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prefect_gpu_operator.settings import OperatorSettings

__all__ = [
    "CONTAINER_KINDS",
    "OPT_LABEL",
    "WEBHOOK_ID",
    "WEBHOOK_PATH",
    "WORKER_ID",
    "Injection",
    "LabelTerm",
    "env_names",
]

WEBHOOK_ID = "inject-worker-id"
# kopf routes POST /<handler id> to the handler: the webhook configuration's path must be this.
WEBHOOK_PATH = f"/{WEBHOOK_ID}"
WORKER_ID = "WORKER_ID"
OPT_LABEL = "prefectgpu.io/inject-worker-id"
# Ephemeral containers are added through a subresource, never on CREATE: nothing to inject there.
CONTAINER_KINDS = ("initContainers", "containers")

JsonPatch = list[dict[str, Any]]


@dataclass(frozen=True)
class LabelTerm:
    """One selector entry: ``key=value`` (the label has that value) or ``key`` (it exists)."""

    key: str
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> LabelTerm:
        key, sep, value = text.partition("=")
        if not key.strip():
            raise ValueError(f"label selector {text!r} has no key")
        return cls(key.strip(), value.strip() if sep else None)

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.value is None:
            return self.key in labels
        return labels.get(self.key) == self.value


def env_names(container: Mapping[str, Any]) -> set[str]:
    return {str(var.get("name")) for var in container.get("env") or ()}


def _containers(pod: Mapping[str, Any]) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    spec = pod.get("spec") or {}
    for kind in CONTAINER_KINDS:
        for index, container in enumerate(spec.get(kind) or ()):
            yield kind, index, container


@dataclass(frozen=True)
class Injection:
    """Which pods get which Downward API variables (``WORKER_ID`` first)."""

    selectors: tuple[LabelTerm, ...]
    excluded_namespaces: frozenset[str]
    env: tuple[tuple[str, str], ...] = ((WORKER_ID, "spec.nodeName"),)  # (name, fieldPath)

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> Injection:
        extra = tuple(
            (name, path) for name, path in settings.inject_extra_env.items() if name != WORKER_ID
        )
        return cls(
            selectors=tuple(LabelTerm.parse(text) for text in settings.inject_pod_selectors),
            excluded_namespaces=frozenset(
                [*settings.inject_excluded_namespaces, settings.namespace]
            ),
            env=((WORKER_ID, "spec.nodeName"), *extra),
        )

    def selects(self, pod: Mapping[str, Any], namespace: str | None = None) -> bool:
        """True for a Prefect pod that may be changed.

        ``namespace`` is the admission request's, for a body that does not carry its own.
        """
        metadata = pod.get("metadata") or {}
        if (metadata.get("namespace") or namespace) in self.excluded_namespaces:
            return False
        labels: Mapping[str, str] = metadata.get("labels") or {}
        opted = labels.get(OPT_LABEL)
        if opted in ("true", "false"):
            return opted == "true"
        return any(term.matches(labels) for term in self.selectors)

    def patch(self, pod: Mapping[str, Any], namespace: str | None = None) -> JsonPatch:
        """RFC 6902 operations adding the missing variables; empty when nothing is to be done.

        A container's own definition (literal or valueFrom) always wins. The variables go to the
        front of ``env`` so the container's own variables can refer to ``$(WORKER_ID)``:
        Kubernetes expands only references to variables defined earlier in the list.
        """
        if not self.selects(pod, namespace):
            return []
        ops: JsonPatch = []
        for kind, index, container in _containers(pod):
            defined = env_names(container)
            missing = [_env_var(name, path) for name, path in self.env if name not in defined]
            if not missing:
                continue
            env_path = f"/spec/{kind}/{index}/env"
            if "env" not in container or container["env"] is None:
                ops.append({"op": "add", "path": env_path, "value": missing})
            else:
                ops.extend(
                    {"op": "add", "path": f"{env_path}/{position}", "value": var}
                    for position, var in enumerate(missing)
                )
        return ops


def _env_var(name: str, field_path: str) -> dict[str, Any]:
    # apiVersion is what the API server would default: the stored pod shows exactly this.
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}
