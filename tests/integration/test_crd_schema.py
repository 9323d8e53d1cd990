"""The chart's CRD on a real kube-apiserver: installs, explains, defaults, rejects bad policies."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from prefect_gpu_operator.api.crd import CRD_FILE
from prefect_gpu_operator.api.policy import (
    GROUP,
    PLURAL,
    GPULimitPolicySpec,
    PrefectServerReference,
)
from prefect_gpu_sandbox.tools import tools_bin
from prefect_gpu_sandbox.waiting import eventually

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LABEL = "prefectgpu.io/test=crd-schema"
REMOTE = {"remoteApiUrl": "http://prefect.prefect.svc:4200/api"}
SECRET = {"valueFrom": {"secretKeyRef": {"name": "prefect-basic-auth", "key": "auth-string"}}}
CONFIG_MAP = {"valueFrom": {"configMapKeyRef": {"name": "prefect-ca", "key": "ca.crt"}}}
T = TypeVar("T")
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def manifest(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": f"{GROUP}/v1alpha1",
            "kind": "GPULimitPolicy",
            "metadata": {"name": name, "labels": {"prefectgpu.io/test": "crd-schema"}},
            "spec": spec,
        }
    )


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    # Own discovery cache: never read or write the user's ~/.kube.
    cache = tmp_path_factory.mktemp("kubectl-cache")

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(tools_bin() / "kubectl"),
                f"--kubeconfig={kubeconfig}",
                f"--cache-dir={cache}",
                *args,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> Iterator[None]:
    """The chart's CRD, applied and Established, with policies served by discovery."""
    applied = kubectl("apply", "-f", str(REPO / CRD_FILE))
    assert applied.returncode == 0, applied.stderr
    established = kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}"
    )
    assert established.returncode == 0, established.stderr

    # Established precedes discovery by a moment; kubectl re-reads discovery on a miss.
    def served() -> None:
        listed = kubectl("get", "glp")
        assert listed.returncode == 0, listed.stderr

    eventually(served, timeout=30, interval=0.2)
    yield
    # The CRD stays (other tests may use it); only this module's policies go.
    kubectl("delete", "glp", "-l", LABEL, "--ignore-not-found", "--wait=false")


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.usefixtures("crd")
def test_explain_shows_descriptions(kubectl: Kubectl) -> None:
    # explain reads the OpenAPI document, which is published a moment after Established.
    def explain() -> subprocess.CompletedProcess[str]:
        result = kubectl("explain", "glp.spec")
        assert result.returncode == 0, result.stderr
        assert "slotsPerGpu" in result.stdout
        return result

    explained = eventually(explain, timeout=30, interval=0.2)
    text = _flat(explained.stdout)
    for name, field in GPULimitPolicySpec.model_fields.items():
        assert (field.alias or name) in text
        assert field.description is not None
        assert _flat(field.description) in text, f"{field.alias} description missing"
    key = kubectl("explain", "glp.spec.server.apiKey.valueFrom")
    assert "secretKeyRef" in key.stdout
    assert "value " not in _flat(key.stdout).replace("valueFrom", "")
    server = _flat(kubectl("explain", "glp.spec.server").stdout)
    for name, field in PrefectServerReference.model_fields.items():
        assert field.description is not None
        assert _flat(field.description) in server, f"server.{field.alias or name} undocumented"
    auth = _flat(kubectl("explain", "glp.spec.server.basicAuth.valueFrom").stdout)
    assert "secretKeyRef" in auth
    assert "configMapKeyRef" not in auth
    header = _flat(kubectl("explain", "glp.spec.server.headers.valueFrom").stdout)
    assert "secretKeyRef" in header
    assert "configMapKeyRef" in header


@pytest.mark.usefixtures("crd")
def test_valid_policy_gets_the_models_defaults(kubectl: Kubectl) -> None:
    applied = kubectl("apply", "-f", "-", stdin=manifest("defaults", {"server": REMOTE}))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl("get", "glp", "defaults", "-o", "json").stdout)["spec"]
    assert stored == {
        "server": REMOTE,
        "resources": ["nvidia.com/gpu"],
        "capacityFrom": "Allocatable",
        "slotsPerGpu": 1,
        "limitNameTemplate": "gpu:{node}",
        "deletionPolicy": "Delete",
    }
    # The API server's defaults and the model's agree field by field.
    model = GPULimitPolicySpec.model_validate({"server": REMOTE})
    assert GPULimitPolicySpec.model_validate(stored) == model

    header = kubectl("get", "glp", "defaults").stdout.splitlines()[0].split()
    assert header == ["NAME", "NODES", "SLOTS", "READY", "AGE"]


@pytest.mark.usefixtures("crd")
def test_full_policy_round_trips(kubectl: Kubectl) -> None:
    spec = {
        "server": {
            "remoteApiUrl": "https://api.prefect.cloud/api",
            "accountId": "0b2c6d8e-acct",
            "workspaceId": "3f1a9c7e-ws",
            "apiKey": {"valueFrom": {"secretKeyRef": {"name": "prefect-api-key", "key": "key"}}},
        },
        "nodeSelector": {
            "matchLabels": {"nvidia.com/gpu.product": "A100"},
            "matchExpressions": [
                {"key": "pool", "operator": "In", "values": ["inference"]},
                {"key": "spot", "operator": "DoesNotExist"},
            ],
        },
        "resources": ["nvidia.com/mig-1g.10gb", "amd.com/gpu"],
        "capacityFrom": "WorkerPods",
        "workerSelector": {"matchLabels": {"app.kubernetes.io/name": "prefect-worker"}},
        "slotsPerGpu": 2,
        "limitNameTemplate": "inference:{node}",
        "slotDecayPerSecond": 0.5,
        "deletionPolicy": "Retain",
    }
    applied = kubectl("apply", "-f", "-", stdin=manifest("full", spec))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl("get", "glp", "full", "-o", "json").stdout)["spec"]
    assert stored == spec
    parsed = GPULimitPolicySpec.model_validate(stored)
    assert parsed.model_dump(by_alias=True, mode="json", exclude_defaults=True) == spec


@pytest.mark.usefixtures("crd")
def test_self_hosted_server_behind_a_gateway_round_trips(kubectl: Kubectl) -> None:
    spec = {
        "server": {
            "remoteApiUrl": "https://prefect.internal.example/api",
            "basicAuth": SECRET,
            "caBundle": CONFIG_MAP,
            "headers": [
                {"name": "CF-Access-Client-Id", **CONFIG_MAP},
                {"name": "CF-Access-Client-Secret", **SECRET},
            ],
        },
    }
    applied = kubectl("apply", "-f", "-", stdin=manifest("gateway", spec))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl("get", "glp", "gateway", "-o", "json").stdout)["spec"]
    assert stored["server"] == spec["server"]
    parsed = GPULimitPolicySpec.model_validate(stored)
    assert (
        parsed.model_dump(by_alias=True, mode="json", exclude_none=True)["server"] == spec["server"]
    )


# (id, spec, what kubectl must say). Each is also rejected by the pydantic model.
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    (
        "negative-slots",
        {"server": REMOTE, "slotsPerGpu": -1},
        "should be greater than or equal to 1",
    ),
    ("zero-slots", {"server": REMOTE, "slotsPerGpu": 0}, "should be greater than or equal to 1"),
    (
        "capacity-from-typo",
        {"server": REMOTE, "capacityFrom": "Workers"},
        'Unsupported value: "Workers"',
    ),
    (
        "worker-selector-bad-operator",
        {
            "server": REMOTE,
            "workerSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]},
        },
        'Unsupported value: "Is"',
    ),
    (
        "bad-operator",
        {"server": REMOTE, "nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}},
        'Unsupported value: "Has"',
    ),
    (
        "in-without-values",
        {"server": REMOTE, "nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "values must be non-empty for In and NotIn",
    ),
    ("unknown-field", {"server": REMOTE, "gpus": 4}, 'unknown field "spec.gpus"'),
    (
        "literal-api-key",
        {"server": {**REMOTE, "apiKey": {"value": "pnu_not_a_real_key"}}},
        'unknown field "spec.server.apiKey.value"',
    ),
    (
        "api-key-without-secret",
        {"server": {**REMOTE, "apiKey": {}}},
        "spec.server.apiKey.valueFrom: Required value",
    ),
    (
        "template-without-node",
        {"server": REMOTE, "limitNameTemplate": "gpu"},
        "limitNameTemplate must contain {node}",
    ),
    (
        "template-with-slash",
        {"server": REMOTE, "limitNameTemplate": "gpu/{node}"},
        "limitNameTemplate must not contain / % & > <",
    ),
    (
        "remote-and-in-cluster",
        {"server": {**REMOTE, "name": "prefect", "namespace": "prefect"}},
        "set exactly one of remoteApiUrl",
    ),
    ("no-server-named", {"server": {}}, "set exactly one of remoteApiUrl"),
    ("no-server", {}, "spec.server: Required value"),
    (
        "name-without-namespace",
        {"server": {"name": "prefect"}},
        "name and namespace go together",
    ),
    (
        "account-without-workspace",
        {"server": {**REMOTE, "accountId": "acct"}},
        "accountId and workspaceId must be set together",
    ),
    ("not-a-url", {"server": {"remoteApiUrl": "prefect:4200"}}, "spec.server.remoteApiUrl"),
    (
        "bad-deletion-policy",
        {"server": REMOTE, "deletionPolicy": "Forget"},
        'Unsupported value: "Forget"',
    ),
    ("non-string-resource", {"server": REMOTE, "resources": [1]}, "must be of type string"),
    ("no-resources", {"server": REMOTE, "resources": []}, "should have at least 1 items"),
    ("unprefixed-resource", {"server": REMOTE, "resources": ["gpu"]}, "spec.resources[0]"),
    ("negative-decay", {"server": REMOTE, "slotDecayPerSecond": -1}, "greater than or equal to 0"),
    (
        "api-key-and-basic-auth",
        {"server": {**REMOTE, "apiKey": SECRET, "basicAuth": SECRET}},
        "apiKey and basicAuth are mutually exclusive",
    ),
    (
        "basic-auth-on-cloud",
        {
            "server": {
                "remoteApiUrl": "https://api.prefect.cloud/api",
                "accountId": "a",
                "workspaceId": "w",
                "basicAuth": SECRET,
            }
        },
        "basicAuth is for self-hosted servers",
    ),
    (
        "literal-auth-string",
        {"server": {**REMOTE, "basicAuth": {"value": "admin:pass"}}},
        'unknown field "spec.server.basicAuth.value"',
    ),
    (
        "auth-string-from-a-config-map",
        {"server": {**REMOTE, "basicAuth": CONFIG_MAP}},
        'unknown field "spec.server.basicAuth.valueFrom.configMapKeyRef"',
    ),
    (
        "ca-bundle-from-nowhere",
        {"server": {**REMOTE, "caBundle": {"valueFrom": {}}}},
        "set exactly one of secretKeyRef or configMapKeyRef",
    ),
    (
        "literal-header",
        {"server": {**REMOTE, "headers": [{"name": "X-Token", "value": "t0ken"}]}},
        'unknown field "spec.server.headers[0].value"',
    ),
    (
        "bad-header-name",
        {"server": {**REMOTE, "headers": [{"name": "X Token", **SECRET}]}},
        "spec.server.headers[0].name",
    ),
    (
        "duplicate-headers",
        {"server": {**REMOTE, "headers": [{"name": "X-A", **SECRET}, {"name": "x-a", **SECRET}]}},
        "header names must be unique (case-insensitive)",
    ),
    (
        "reserved-header",
        {"server": {**REMOTE, "headers": [{"name": "Prefect-Csrf-Token", **SECRET}]}},
        "the client sets this header itself",
    ),
    (
        "authorization-twice",
        {"server": {**REMOTE, "apiKey": SECRET, "headers": [{"name": "Authorization", **SECRET}]}},
        "an Authorization header conflicts with apiKey or basicAuth",
    ),
    (
        "too-many-headers",
        {"server": {**REMOTE, "headers": [{"name": f"X-{i}", **SECRET} for i in range(17)]}},
        "must have at most 16 items",
    ),
]


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize(
    ("name", "spec", "message"), MALFORMED, ids=[case[0] for case in MALFORMED]
)
def test_malformed_policy_is_rejected(
    kubectl: Kubectl, name: str, spec: dict[str, Any], message: str
) -> None:
    applied = kubectl("apply", "-f", "-", stdin=manifest(f"bad-{name}", spec))
    assert applied.returncode != 0, f"accepted: {spec}"
    assert message in applied.stderr, applied.stderr
    assert kubectl("get", "glp", f"bad-{name}").returncode != 0
    # The operator's model is never looser than the API server.
    with pytest.raises(ValidationError):
        GPULimitPolicySpec.model_validate(spec)


def test_enough_distinct_malformed_cases() -> None:
    assert len({message for _, _, message in MALFORMED}) >= 10
