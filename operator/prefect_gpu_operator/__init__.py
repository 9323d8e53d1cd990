"""Keeps one Prefect global concurrency limit per Kubernetes GPU node."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prefect-gpu-operator")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
