"""The render tier: the chart as helm renders it and kubeconform judges it, with no cluster.

The session fixtures that start servers are overridden here, so a test of this tier that asks for
one fails at once instead of quietly starting a control plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import pytest

from prefect_gpu_sandbox.chart import chart_crd_schemas, render_chart
from prefect_gpu_sandbox.kubeschemas import ensure_schemas
from tests.chart.value_sets import NAMESPACE, RELEASE, VALUE_SETS


@pytest.fixture(scope="session")
def control_plane() -> NoReturn:
    pytest.fail("the chart tier starts no control plane: move this test to tests/integration")


@pytest.fixture(scope="session")
def prefect_server() -> NoReturn:
    pytest.fail("the chart tier starts no Prefect server: move this test to tests/integration")


@pytest.fixture(scope="session")
def schema_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """kubeconform's schemas: the chart's CRDs as they are now, then Kubernetes and cert-manager."""
    chart = chart_crd_schemas(tmp_path_factory.mktemp("chart-schemas"))
    return [chart, *ensure_schemas()]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """The chart rendered (CRDs included) with each value set, by the set's name. Tests that
    change a document copy it first."""
    return {
        name: render_chart(NAMESPACE, values, release=RELEASE, include_crds=True)
        for name, values in VALUE_SETS.items()
    }
