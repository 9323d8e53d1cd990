"""The README documents every operator setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_gpu_operator.settings import OperatorSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(OperatorSettings.model_fields))
def test_setting_is_documented(field: str) -> None:
    variable = f"PREFECT_GPU_OPERATOR_{field.upper()}"
    short = "_" + field.upper()
    assert variable in README or f"/ `{short}`" in README or f"/ `{short}" in README, variable
