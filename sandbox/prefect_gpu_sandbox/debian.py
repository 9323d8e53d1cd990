"""Debian packages the sandbox runs (PostgreSQL, Redis), installed with apt-get when missing."""

from __future__ import annotations

import os
import subprocess

__all__ = ["ensure_packages", "missing_packages"]


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    """The packages dpkg does not report as installed."""
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_packages(*packages: str) -> None:
    """Install the missing ``packages`` (needs root); a no-op when all are installed."""
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing Debian packages: apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {result.stderr.strip()[-500:]}")
