"""Operator settings: what a bad combination says."""

from __future__ import annotations

import pytest

from prefect_gpu_operator.settings import OperatorSettings


def test_webhook_needs_its_certificate_files() -> None:
    with pytest.raises(ValueError, match="PREFECT_GPU_OPERATOR_WEBHOOK_CERT_FILE"):
        OperatorSettings(webhook_enabled=True)


def test_a_made_certificate_needs_its_hosts() -> None:
    with pytest.raises(ValueError, match="PREFECT_GPU_OPERATOR_WEBHOOK_TLS_HOSTS"):
        OperatorSettings(webhook_tls_secret="tls")
