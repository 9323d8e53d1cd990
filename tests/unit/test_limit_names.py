"""The limit-name grammar the operator and the flows share, and the flows' copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_gpu_operator.api import limit_names
from prefect_gpu_operator.api.limit_names import LimitNameError, is_valid_limit_name, limit_name

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("template", "node_name", "name"),
    [
        ("gpu:{node}", "gpu-1", "gpu:gpu-1"),
        ("gpu:{node}", "gpu-1.example.com", "gpu:gpu-1.example.com"),
        ("{node}", "n", "n"),
        ("team-a:{node}:inference", "n", "team-a:n:inference"),
        ("{node}/{node}".replace("/", "-"), "n", "n-n"),
        ("gpu:{node}:{x}", "n", "gpu:n:{x}"),  # only {node} is a placeholder
    ],
)
def test_limit_name(template: str, node_name: str, name: str) -> None:
    assert limit_name(template, node_name) == name


@pytest.mark.parametrize("template", ["gpu", "gpu/{node}", "gpu:{node}%", "<{node}>", ""])
def test_limit_name_rejects(template: str) -> None:
    with pytest.raises(LimitNameError):
        limit_name(template, "n")


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("gpu:gpu-1.example.com", True),
        ("gpu:node", True),
        ("", False),
        ("gpu/node", False),
        ("gpu%node", False),
        ("a&b", False),
        ("a>b", False),
        ("a<b", False),
    ],
)
def test_prefect_name_rule(name: str, valid: bool) -> None:
    assert is_valid_limit_name(name) is valid


def test_the_flows_ship_the_same_grammar() -> None:
    """The flows package cannot import the operator: it carries a generated copy."""
    source = Path(limit_names.__file__).read_text()
    copy = (REPO / "flows" / "prefect_gpu_flows" / "_limit_names.py").read_text()
    header, _, body = copy.partition("\n\n")
    assert "make generate" in header
    assert body == source, "flows/prefect_gpu_flows/_limit_names.py is stale: run `make generate`"
