"""Where the sandbox finds the repository it runs from (it is installed editable, never shipped)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHART", "REPOSITORY"]

REPOSITORY = Path(__file__).resolve().parents[2]
CHART = REPOSITORY / "charts" / "prefect-gpu-operator"
