"""The GPULimitPolicy pydantic models: parsing, defaults, validation, selectors, server URLs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from prefect_gpu_operator.api.policy import (
    GPULimitPolicySpec,
    GPULimitPolicyStatus,
    LabelSelector,
    PrefectServerReference,
    ValueRef,
)

REMOTE = {"remoteApiUrl": "http://prefect.example:4200/api"}
SECRET = {"valueFrom": {"secretKeyRef": {"name": "prefect", "key": "auth-string"}}}
CONFIG_MAP = {"valueFrom": {"configMapKeyRef": {"name": "prefect-ca", "key": "ca.crt"}}}


def spec(**fields: Any) -> GPULimitPolicySpec:
    return GPULimitPolicySpec.model_validate({"server": REMOTE, **fields})


def test_defaults() -> None:
    parsed = spec()
    assert parsed.resources == ("nvidia.com/gpu",)
    assert parsed.slots_per_gpu == 1
    assert parsed.limit_name_template == "gpu:{node}"
    assert parsed.slot_decay_per_second is None
    assert parsed.deletion_policy == "Delete"
    assert parsed.node_selector.matches({"any": "labels"})


def test_round_trip_uses_kubernetes_field_names() -> None:
    document = {
        "server": {
            "remoteApiUrl": "https://api.prefect.cloud/api",
            "accountId": "acc",
            "workspaceId": "ws",
            "apiKey": {"valueFrom": {"secretKeyRef": {"name": "prefect", "key": "api-key"}}},
            "caBundle": CONFIG_MAP,
            "headers": [{"name": "CF-Access-Client-Id", **CONFIG_MAP}],
        },
        "nodeSelector": {
            "matchLabels": {"pool": "gpu"},
            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}],
        },
        "resources": ["nvidia.com/mig-1g.10gb", "amd.com/gpu"],
        "capacityFrom": "WorkerPods",
        "workerSelector": {
            "matchLabels": {"app.kubernetes.io/name": "prefect-worker"},
            "matchExpressions": [],
        },
        "slotsPerGpu": 4,
        "limitNameTemplate": "inference:{node}",
        "slotDecayPerSecond": 0.5,
        "deletionPolicy": "Retain",
    }
    parsed = GPULimitPolicySpec.model_validate(document)
    dumped = parsed.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert dumped == document


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"slotsPerGpu": 0}, "greater than or equal to 1"),
        ({"slotsPerGpu": -2}, "greater than or equal to 1"),
        ({"slotDecayPerSecond": -0.1}, "greater than or equal to 0"),
        ({"resources": []}, "at least 1 item"),
        ({"resources": [1]}, "string"),
        ({"resources": ["gpu"]}, "pattern"),
        ({"limitNameTemplate": "gpu"}, "must contain {node}"),
        ({"limitNameTemplate": "gpu/{node}"}, "must not contain /"),
        ({"limitNameTemplate": "a&b<{node}>"}, "must not contain & < >"),
        ({"deletionPolicy": "Forget"}, "'Delete' or 'Retain'"),
        ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}, "operator"),
        ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "at least one"),
        (
            {
                "nodeSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
            "takes no values",
        ),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_spec_is_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({}, "exactly one of remoteApiUrl or name"),
        ({**REMOTE, "name": "prefect", "namespace": "prefect"}, "exactly one"),
        ({"name": "prefect"}, "name and namespace"),
        ({**REMOTE, "accountId": "a"}, "accountId and workspaceId"),
        (
            {"name": "p", "namespace": "n", "accountId": "a", "workspaceId": "w"},
            "need remoteApiUrl",
        ),
        ({"remoteApiUrl": "prefect:4200"}, "pattern"),
        ({**REMOTE, "apiKey": {"value": "pnu_secret"}}, "Extra inputs"),
        ({**REMOTE, "apiKey": {"valueFrom": {"secretKeyRef": {"name": "s"}}}}, "key"),
        ({**REMOTE, "apiKey": SECRET, "basicAuth": SECRET}, "mutually exclusive"),
        (
            {**REMOTE, "accountId": "a", "workspaceId": "w", "basicAuth": SECRET},
            "Prefect Cloud takes apiKey",
        ),
        ({**REMOTE, "basicAuth": {"value": "admin:pass"}}, "Extra inputs"),
        ({**REMOTE, "basicAuth": {"valueFrom": CONFIG_MAP["valueFrom"]}}, "secretKeyRef"),
        ({**REMOTE, "caBundle": {"valueFrom": {}}}, "exactly one of secretKeyRef"),
        (
            {
                **REMOTE,
                "caBundle": {"valueFrom": {**SECRET["valueFrom"], **CONFIG_MAP["valueFrom"]}},
            },
            "exactly one of secretKeyRef",
        ),
        ({**REMOTE, "headers": [{"name": "X-Team", "value": "gpu"}]}, "Extra inputs"),
        ({**REMOTE, "headers": [{"name": "Bad Name", **SECRET}]}, "pattern"),
        ({**REMOTE, "headers": [{"name": "X-A", **SECRET}, {"name": "x-a", **SECRET}]}, "unique"),
        ({**REMOTE, "headers": [{"name": "Prefect-Csrf-Token", **SECRET}]}, "sets itself"),
        (
            {**REMOTE, "apiKey": SECRET, "headers": [{"name": "authorization", **SECRET}]},
            "Authorization header conflicts",
        ),
        ({**REMOTE, "headers": [{"name": f"X-{i}", **SECRET} for i in range(17)]}, "at most 16"),
    ],
)
def test_invalid_server_is_rejected(server: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PrefectServerReference.model_validate(server)


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ({"remoteApiUrl": "http://prefect:4200/api"}, "http://prefect:4200/api"),
        ({"remoteApiUrl": "http://prefect:4200"}, "http://prefect:4200/api"),
        ({"remoteApiUrl": "http://prefect:4200/"}, "http://prefect:4200/api"),
        (
            {"remoteApiUrl": "https://api.prefect.cloud/api", "accountId": "a", "workspaceId": "w"},
            "https://api.prefect.cloud/api/accounts/a/workspaces/w",
        ),
        (
            {"name": "prefect-server", "namespace": "prefect"},
            "http://prefect-server.prefect.svc:4200/api",
        ),
    ],
)
def test_api_url(server: dict[str, Any], url: str) -> None:
    assert PrefectServerReference.model_validate(server).api_url == url


def test_a_bearer_header_of_ones_own_is_allowed_without_api_key_or_basic_auth() -> None:
    """Identity-Aware Proxy takes its OIDC token as Authorization: Bearer."""
    header = {"name": "Authorization", **SECRET}
    server = PrefectServerReference.model_validate({**REMOTE, "headers": [header]})
    assert server.headers[0].name == "Authorization"


def test_value_refs_name_every_secret_and_config_map_key() -> None:
    server = PrefectServerReference.model_validate(
        {
            **REMOTE,
            "basicAuth": SECRET,
            "caBundle": CONFIG_MAP,
            "headers": [{"name": "X-Id", **CONFIG_MAP}, {"name": "X-Secret", **SECRET}],
        }
    )
    assert server.value_refs() == [
        ValueRef("Secret", "prefect", "auth-string"),
        ValueRef("ConfigMap", "prefect-ca", "ca.crt"),
        ValueRef("ConfigMap", "prefect-ca", "ca.crt"),
        ValueRef("Secret", "prefect", "auth-string"),
    ]
    assert PrefectServerReference.model_validate(REMOTE).value_refs() == []


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({}, {}, True),
        ({"matchLabels": {"pool": "gpu"}}, {"pool": "gpu"}, True),
        ({"matchLabels": {"pool": "gpu"}}, {"pool": "cpu"}, False),
        ({"matchLabels": {"pool": "gpu"}}, {}, False),
        (
            {"matchExpressions": [{"key": "z", "operator": "In", "values": ["a", "b"]}]},
            {"z": "b"},
            True,
        ),
        (
            {"matchExpressions": [{"key": "z", "operator": "In", "values": ["a"]}]},
            {"z": "c"},
            False,
        ),
        ({"matchExpressions": [{"key": "z", "operator": "In", "values": ["a"]}]}, {}, False),
        (
            {"matchExpressions": [{"key": "z", "operator": "NotIn", "values": ["a"]}]},
            {"z": "c"},
            True,
        ),
        (
            {"matchExpressions": [{"key": "z", "operator": "NotIn", "values": ["a"]}]},
            {"z": "a"},
            False,
        ),
        # Kubernetes: a node without the key satisfies NotIn.
        ({"matchExpressions": [{"key": "z", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": "1"}, False),
        (  # all terms are ANDed
            {
                "matchLabels": {"pool": "gpu"},
                "matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}],
            },
            {"pool": "gpu", "spot": "true"},
            False,
        ),
    ],
)
def test_label_selector(selector: dict[str, Any], labels: dict[str, str], selected: bool) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is selected


def test_status_reads_leniently() -> None:
    status = GPULimitPolicyStatus.model_validate(
        {
            "observedGeneration": 3,
            "nodes": 1,
            "totalSlots": 4,
            "limits": [{"name": "gpu:a", "node": "a", "limit": 4}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Reconciled",
                    "message": "",
                    "lastTransitionTime": "2026-11-26T00:00:00Z",
                    "observedGeneration": 3,
                }
            ],
            "kopf": {"progress": {}},  # written by the framework, not ours
        }
    )
    assert status.limits[0].limit == 4
    assert status.conditions[0].observed_generation == 3
