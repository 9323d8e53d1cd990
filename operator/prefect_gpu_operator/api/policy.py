"""The GPULimitPolicy custom resource: its identity and its pydantic models, spec and status.

Python attributes are snake_case; the Kubernetes field names are their camelCase aliases. These
models are the single source of every field's description and default: ``crd.py`` copies both into
the CRD's OpenAPI schema, and tests keep the two field sets identical.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

from prefect_gpu_operator.api.limit_names import (
    DEFAULT_LIMIT_NAME_TEMPLATE,
    limit_name,
    template_of,
    template_problems,
)

__all__ = [
    "DEFAULT_RESOURCES",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ApiKeySource",
    "BasicAuthSource",
    "CaBundleSource",
    "Condition",
    "ConfigMapKeySelector",
    "GPULimitPolicySpec",
    "GPULimitPolicyStatus",
    "HeaderSource",
    "LabelSelector",
    "LabelSelectorRequirement",
    "LimitEntry",
    "PrefectServerReference",
    "SecretKeySelector",
    "SecretValueSource",
    "ValueRef",
    "ValueSource",
    "WorkerNode",
]

# The resource's identity: apiVersion prefectgpu.io/v1alpha1, kind GPULimitPolicy (cluster-scoped).
GROUP = "prefectgpu.io"
VERSION = "v1alpha1"
KIND = "GPULimitPolicy"
PLURAL = "gpulimitpolicies"
SINGULAR = "gpulimitpolicy"
SHORT_NAME = "glp"

DEFAULT_RESOURCES = ("nvidia.com/gpu",)
IN_CLUSTER_PORT = 4200
# Patterns shared with the CRD schema (crd.py), so both sides accept the same strings.
URL_PATTERN = r"^https?://\S+$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# An extended resource name is domain-prefixed: vendor.example/resource.
RESOURCE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# An HTTP header name is an RFC 9110 token.
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
# Headers the operator's client sets itself (lower case): a policy cannot replace them.
RESERVED_HEADERS = (
    "connection",
    "content-length",
    "content-type",
    "host",
    "prefect-csrf-client",
    "prefect-csrf-token",
    "transfer-encoding",
)
MAX_HEADERS = 16


class _KubeModel(BaseModel):
    """camelCase Kubernetes field names on the wire; unknown fields are an error, as in the CRD."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# --- server reference (shaped like PrefectHQ/prefect-operator's PrefectServerReference) ----------


class ValueRef(NamedTuple):
    """One key of a Secret or ConfigMap in the operator's namespace."""

    kind: Literal["Secret", "ConfigMap"]
    name: str
    key: str


class SecretKeySelector(_KubeModel):
    name: str = Field(min_length=1, description="Name of the Secret, in the operator's namespace.")
    key: str = Field(min_length=1, description="Key in the Secret whose value is used.")


class ConfigMapKeySelector(_KubeModel):
    name: str = Field(
        min_length=1, description="Name of the ConfigMap, in the operator's namespace."
    )
    key: str = Field(min_length=1, description="Key in the ConfigMap whose value is used.")


class SecretValueSource(_KubeModel):
    secret_key_ref: SecretKeySelector = Field(
        description="Selects a key of a Secret in the operator's namespace."
    )

    def ref(self) -> ValueRef:
        return ValueRef("Secret", self.secret_key_ref.name, self.secret_key_ref.key)


class ValueSource(_KubeModel):
    """A value that is not secret by nature may come from a ConfigMap as well."""

    secret_key_ref: SecretKeySelector | None = Field(
        default=None, description="Selects a key of a Secret in the operator's namespace."
    )
    config_map_key_ref: ConfigMapKeySelector | None = Field(
        default=None, description="Selects a key of a ConfigMap in the operator's namespace."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ValueSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef or configMapKeyRef")
        return self

    def ref(self) -> ValueRef:
        if self.secret_key_ref is not None:
            return ValueRef("Secret", self.secret_key_ref.name, self.secret_key_ref.key)
        assert self.config_map_key_ref is not None
        return ValueRef("ConfigMap", self.config_map_key_ref.name, self.config_map_key_ref.key)


class ApiKeySource(_KubeModel):
    # No literal `value` (unlike prefect-operator): a key in a custom resource is readable by
    # everyone who can read policies, so only a Secret reference is accepted.
    value_from: SecretValueSource = Field(
        description="Where to read the API key from. Only secretKeyRef is supported: a literal "
        "key in the policy is rejected."
    )


class BasicAuthSource(_KubeModel):
    value_from: SecretValueSource = Field(
        description="Where to read the auth string (user:password, the server's "
        "PREFECT_SERVER_API_AUTH_STRING) from, e.g. the Secret of prefect-helm's "
        "basicAuth.existingSecret with key auth-string. Only secretKeyRef is supported."
    )


class CaBundleSource(_KubeModel):
    value_from: ValueSource = Field(
        description="Where to read the PEM certificates from: configMapKeyRef (e.g. a ca.crt "
        "key) or secretKeyRef."
    )


class HeaderSource(_KubeModel):
    name: str = Field(
        pattern=HEADER_NAME_PATTERN,
        max_length=128,
        description="HTTP header name, e.g. CF-Access-Client-Id. Not one the client sets itself "
        f"({', '.join(RESERVED_HEADERS)}), nor Authorization when apiKey or basicAuth is set.",
    )
    value_from: ValueSource = Field(
        description="Where to read the header's value from: secretKeyRef for credentials, "
        "configMapKeyRef for the rest. A literal value is rejected."
    )


class PrefectServerReference(_KubeModel):
    remote_api_url: str | None = Field(
        default=None,
        pattern=URL_PATTERN,
        description="API URL of a Prefect server outside the cluster or of Prefect Cloud, e.g. "
        "https://api.prefect.cloud/api. '/api' is appended when missing. Mutually exclusive "
        "with name/namespace.",
    )
    account_id: str | None = Field(
        default=None,
        min_length=1,
        description="Prefect Cloud account ID. Requires workspaceId and remoteApiUrl.",
    )
    workspace_id: str | None = Field(
        default=None,
        min_length=1,
        description="Prefect Cloud workspace ID. Requires accountId and remoteApiUrl.",
    )
    api_key: ApiKeySource | None = Field(
        default=None,
        description="API key for Prefect Cloud (sent as Authorization: Bearer). Mutually "
        "exclusive with basicAuth.",
    )
    basic_auth: BasicAuthSource | None = Field(
        default=None,
        description="Basic authentication for a self-hosted server started with "
        "PREFECT_SERVER_API_AUTH_STRING: the auth string is sent as Authorization: Basic, as "
        "Prefect's client does with PREFECT_API_AUTH_STRING. Mutually exclusive with apiKey; "
        "not for Prefect Cloud.",
    )
    ca_bundle: CaBundleSource | None = Field(
        default=None,
        description="PEM CA certificates the API's TLS certificate must chain to, instead of "
        "the image's trust store (a server behind an internal CA or a TLS-inspecting proxy). "
        "Absent: the trust store, or the operator's SSL_CERT_FILE.",
    )
    headers: tuple[HeaderSource, ...] = Field(
        default=(),
        max_length=MAX_HEADERS,
        description="Extra HTTP headers sent with every request, e.g. Cloudflare Access or "
        "Identity-Aware Proxy credentials (what PREFECT_CLIENT_CUSTOM_HEADERS does for "
        "Prefect's client). Values come from Secrets or ConfigMaps only; names are unique, "
        "case-insensitively.",
    )
    name: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Name of an in-cluster PrefectServer (its Service). Requires namespace; the "
        "API URL is http://<name>.<namespace>.svc:4200/api.",
    )
    namespace: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Namespace of the in-cluster PrefectServer.",
    )

    @model_validator(mode="after")
    def _one_way_to_name_the_server(self) -> PrefectServerReference:
        if (self.remote_api_url is None) == (self.name is None):
            raise ValueError("set exactly one of remoteApiUrl or name+namespace")
        if (self.name is None) != (self.namespace is None):
            raise ValueError("name and namespace must be set together")
        if (self.account_id is None) != (self.workspace_id is None):
            raise ValueError("accountId and workspaceId must be set together")
        if self.account_id is not None and self.remote_api_url is None:
            raise ValueError("accountId and workspaceId need remoteApiUrl (Prefect Cloud)")
        if self.api_key is not None and self.basic_auth is not None:
            raise ValueError("apiKey and basicAuth are mutually exclusive")
        if self.basic_auth is not None and self.account_id is not None:
            raise ValueError("basicAuth is for self-hosted servers: Prefect Cloud takes apiKey")
        names = [header.name.lower() for header in self.headers]
        if len(set(names)) != len(names):
            raise ValueError("header names must be unique (case-insensitive)")
        if reserved := sorted(set(names) & set(RESERVED_HEADERS)):
            raise ValueError(f"headers the client sets itself: {', '.join(reserved)}")
        if "authorization" in names and (self.api_key or self.basic_auth):
            raise ValueError("an Authorization header conflicts with apiKey or basicAuth")
        return self

    def value_refs(self) -> list[ValueRef]:
        """Every Secret and ConfigMap key the connection needs, in a stable order."""
        sources: list[SecretValueSource | ValueSource] = [
            *(source.value_from for source in (self.api_key, self.basic_auth) if source),
            *([self.ca_bundle.value_from] if self.ca_bundle else []),
            *(header.value_from for header in self.headers),
        ]
        return [source.ref() for source in sources]

    @property
    def api_url(self) -> str:
        """The Prefect API URL, built the way prefect-operator's GetAPIURL builds it."""
        if self.remote_api_url is not None:
            url = self.remote_api_url.rstrip("/")
            if not url.endswith("/api"):
                url += "/api"
            if self.account_id is not None and self.workspace_id is not None:
                url += f"/accounts/{self.account_id}/workspaces/{self.workspace_id}"
            return url
        return f"http://{self.name}.{self.namespace}.svc:{IN_CLUSTER_PORT}/api"


# --- node selector: a standard metav1.LabelSelector ----------------------------------------------


class LabelSelectorRequirement(_KubeModel):
    key: str = Field(min_length=1, description="The label key the requirement applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: tuple[str, ...] = Field(
        default=(),
        description="Label values. Non-empty for In and NotIn, empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case "In":
                return labels.get(self.key) in self.values
            case "NotIn":  # Kubernetes: a missing key satisfies NotIn
                return labels.get(self.key) not in self.values
            case "Exists":
                return self.key in labels
            case "DoesNotExist":
                return self.key not in labels


class LabelSelector(_KubeModel):
    match_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels a selected object must carry with exactly these values (ANDed with "
        "matchExpressions).",
    )
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field(
        default=(), description="Label requirements, all of which a selected object must satisfy."
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes semantics: every term must hold; an empty selector matches everything."""
        return all(labels.get(key) == value for key, value in self.match_labels.items()) and all(
            requirement.matches(labels) for requirement in self.match_expressions
        )


# --- spec ----------------------------------------------------------------------------------------

ResourceName = Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN, max_length=253)]


class GPULimitPolicySpec(_KubeModel):
    server: PrefectServerReference = Field(
        description="The Prefect API the limits are written to: remoteApiUrl (optionally with "
        "accountId/workspaceId for Prefect Cloud) or name/namespace of an in-cluster "
        "PrefectServer, and optionally how to reach it: apiKey or basicAuth, caBundle and "
        "headers, each read from a Secret or ConfigMap."
    )
    node_selector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="Which nodes get a limit. A standard label selector; empty or absent "
        "selects every node that has one of the resources.",
    )
    resources: tuple[ResourceName, ...] = Field(
        default=DEFAULT_RESOURCES,
        min_length=1,
        description="Extended resources summed per node to count its GPUs, e.g. nvidia.com/gpu, "
        "nvidia.com/mig-1g.10gb or amd.com/gpu. Nodes with none of them get no limit.",
    )
    capacity_from: Literal["Allocatable", "WorkerPods"] = Field(
        default="Allocatable",
        description="Where a node's GPU count comes from. Allocatable: the node's allocatable "
        "resources, every device the device plugin offers (right when one Prefect worker per "
        "node requests all of them). WorkerPods: the devices the node's Prefect worker pods "
        "(those workerSelector selects) were given, so the limit equals exactly the GPUs those "
        "pods can see; a node without such a pod gets limit 0.",
    )
    worker_selector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="With capacityFrom WorkerPods: which Prefect worker pods count (pods that "
        "carry WORKER_ID, labelled prefectgpu.io/has-worker-id). Empty selects all of them.",
    )
    slots_per_gpu: int = Field(
        default=1,
        ge=1,
        description="Slots per GPU: the limit is the node's GPUs x slotsPerGpu, for GPUs shared "
        "without the device plugin (e.g. several small models per GPU). Not applied on nodes "
        "whose device plugin time-slices the GPUs (label nvidia.com/gpu.replicas above 1): the "
        "plugin already counts every replica, so it would count twice.",
    )
    limit_name_template: str = Field(
        default=DEFAULT_LIMIT_NAME_TEMPLATE,
        min_length=1,
        max_length=200,
        description="Name of each node's global concurrency limit; {node} is replaced by the "
        "node name. Must contain {node} and none of / % & > <.",
    )
    slot_decay_per_second: float | None = Field(
        default=None,
        ge=0,
        description="slot_decay_per_second of the limits, for rate limiting. Absent means 0 "
        "(no decay: a slot is held until released).",
    )
    deletion_policy: Literal["Delete", "Retain"] = Field(
        default="Delete",
        description="What happens to a node's limit when the node leaves the policy or the "
        "policy is deleted: Delete removes it from Prefect, Retain leaves it there unmanaged.",
    )

    @model_validator(mode="after")
    def _template_makes_valid_names(self) -> GPULimitPolicySpec:
        if problems := template_problems(self.limit_name_template):
            raise ValueError(f"limitNameTemplate is invalid: {'; '.join(problems)}")
        return self


# --- status --------------------------------------------------------------------------------------


class Condition(_KubeModel):
    """A metav1.Condition."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="Ready, PrefectReachable or Conflict.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word for the condition's last transition.")
    message: str = Field(description="Human-readable details.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the condition was computed for."
    )


class LimitEntry(_KubeModel):
    """One global concurrency limit owned by the policy."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, description="The limit's name in Prefect.")
    node: str = Field(min_length=1, description="The node the limit is for.")
    limit: int = Field(ge=0, description="The limit last written to Prefect.")
    draining_to: int | None = Field(
        default=None,
        ge=0,
        description="Set while the limit drains: its target is 0 (the node has no GPUs left) but "
        "slots are still held, and Prefect cannot release a slot into a limit of 0, so the limit "
        "stays at 1 (no new holder can enter) until they are released.",
    )


class WorkerNode(_KubeModel):
    """A node that runs Prefect pods (pods given WORKER_ID)."""

    model_config = ConfigDict(extra="ignore")

    node: str = Field(min_length=1, description="The node running Prefect worker or flow-run pods.")
    limit: str | None = Field(
        default=None,
        description="This policy's limit for the node. Absent when the policy keeps none: GPU "
        "tasks on the node then fail unless another policy keeps its limit.",
    )


class GPULimitPolicyStatus(_KubeModel):
    # Status is written by the operator (and kopf may add its own keys): read it leniently.
    model_config = ConfigDict(extra="ignore")

    conditions: tuple[Condition, ...] = Field(
        default=(), description="Ready, PrefectReachable and Conflict conditions."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation last reconciled."
    )
    nodes: int = Field(default=0, ge=0, description="Number of nodes with a limit.")
    total_slots: int = Field(default=0, ge=0, description="Sum of the limits over all nodes.")
    limits: tuple[LimitEntry, ...] = Field(
        default=(),
        description="The ledger: the global concurrency limits this policy owns. The operator "
        "changes or deletes only limits listed here.",
    )
    workers: tuple[WorkerNode, ...] = Field(
        default=(),
        description="Nodes where scheduled Prefect pods carry WORKER_ID, each with this policy's "
        "limit for it, if any.",
    )

    # The ledger grows with every node, in one object that etcd caps at 1.5 MiB: on the wire an
    # entry whose name follows the ledger's template leaves its name out (``limitNameTemplate``,
    # the template most names follow), which about halves it. In Python every entry has its name.

    @model_validator(mode="before")
    @classmethod
    def _names_from_template(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "limitNameTemplate" not in data:
            return data
        template = data["limitNameTemplate"]
        entries = data.get("limits")
        if not isinstance(template, str) or not isinstance(entries, Sequence):
            return data
        return {**data, "limits": [_named(entry, template) for entry in entries]}

    @model_serializer(mode="wrap")
    def _compact_ledger(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        template = _ledger_template(self.limits)
        if info.by_alias and template is not None:
            body["limitNameTemplate"] = template
            body["limits"] = [_unnamed(entry, template) for entry in body["limits"]]
        return body


def _ledger_template(entries: Sequence[LimitEntry]) -> str | None:
    """The template most of the ledger's names follow (the first in name order on a tie)."""
    templates = Counter(
        template for entry in entries if (template := template_of(entry.name, entry.node))
    )
    return min(templates, key=lambda t: (-templates[t], t)) if templates else None


def _named(entry: Any, template: str) -> Any:
    if isinstance(entry, Mapping) and "name" not in entry and isinstance(entry.get("node"), str):
        return {**entry, "name": limit_name(template, entry["node"])}
    return entry


def _unnamed(entry: dict[str, Any], template: str) -> dict[str, Any]:
    if entry.get("name") == limit_name(template, entry["node"]):
        return {key: value for key, value in entry.items() if key != "name"}
    return entry
