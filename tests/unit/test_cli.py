"""The command line fails like a good tool: one line on stderr saying what to fix, the exit code
its kind (2 usage and configuration, 1 runtime), never a traceback or an endless retry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from prefect_gpu_operator import __version__
from prefect_gpu_operator.cli import EXIT_USAGE, main
from prefect_gpu_operator.settings import current_settings
from prefect_gpu_sandbox.processes import free_port


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    """Settings read again from this test's environment, and forgotten after it."""
    current_settings.cache_clear()
    yield
    current_settings.cache_clear()


@pytest.mark.usefixtures("fresh_settings")
@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LOG_FORMAT": "xml"},
            "PREFECT_GPU_OPERATOR_LOG_FORMAT='xml': input should be 'plain', 'full' or 'json'",
        ),
        (
            {"WEBHOOK_ENABLED": "true"},
            "PREFECT_GPU_OPERATOR_WEBHOOK_ENABLED=true needs PREFECT_GPU_OPERATOR_WEBHOOK_CERT_FILE"
            " and PREFECT_GPU_OPERATOR_WEBHOOK_KEY_FILE",
        ),
        (
            {"WEBHOOK_TLS_HOSTS": "[oops"},
            "PREFECT_GPU_OPERATOR_WEBHOOK_TLS_HOSTS is not valid JSON (Expecting value: "
            "line 1 column 2 (char 1))",
        ),
        (
            {"RESYNC_SECONDS": "0", "WEBHOOK_TLS_HOSTS": "[1]"},
            "PREFECT_GPU_OPERATOR_RESYNC_SECONDS='0': input should be greater than 0; "
            "PREFECT_GPU_OPERATOR_WEBHOOK_TLS_HOSTS[0]=1: input should be a valid string",
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_bad_setting_is_one_line_and_exit_code_2(
    command: str,
    env: dict[str, str],
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"PREFECT_GPU_OPERATOR_{name}", value)

    assert main([command]) == EXIT_USAGE

    captured = capsys.readouterr()
    assert captured.err == f"prefect-gpu-operator: error: {line}\n"
    assert captured.out == ""


def test_version_names_the_operator_and_kopf(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    line = f"prefect-gpu-operator {__version__} (kopf {version('kopf')}, Python "
    assert capsys.readouterr().out.startswith(line)
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith(line)


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["run", "--help"]])
def test_help_shows_defaults_and_exit_codes(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text
    assert "2  usage or configuration error" in text
    if argv[0] == "plan":
        assert "(default: table)" in text


def _cli(*argv: str, kubeconfig: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The console script's module in a fresh process, outside any cluster."""
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PREFECT_GPU_OPERATOR_HEALTH_PORT": "0"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_operator", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # kopf's start-up retries would never end
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize("command", ["run", "plan"])
def test_without_a_kubeconfig_it_exits_at_once(command: str) -> None:
    result, seconds = _cli(command, kubeconfig="/nonexistent")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr == (
        "prefect-gpu-operator: error: no Kubernetes configuration: not running in a cluster, "
        "and no kubeconfig at /nonexistent (set KUBECONFIG to a kubeconfig file)\n"
    )
    assert seconds < 20


def _kubeconfig(path: Path, server: str) -> str:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    return str(path)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_an_unreachable_api_server_outside_a_cluster_is_exit_code_1(
    command: str, tmp_path: Path
) -> None:
    server = f"https://127.0.0.1:{free_port()}"
    result, _ = _cli(command, kubeconfig=_kubeconfig(tmp_path / "kubeconfig", server))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"prefect-gpu-operator: error: cannot reach the Kubernetes API server at {server}: "
    )
    assert result.stderr.count("\n") == 1


def test_a_file_that_is_no_kubeconfig_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("just text\n")
    result, _ = _cli("plan", kubeconfig=str(tmp_path / "notes"))
    assert result.returncode == EXIT_USAGE
    assert result.stderr == (
        f"prefect-gpu-operator: error: kubeconfig {tmp_path / 'notes'} is not a kubeconfig file\n"
    )
