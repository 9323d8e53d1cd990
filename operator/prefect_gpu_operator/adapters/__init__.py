"""Thin doors to the outside: the Kubernetes API, Prefect's REST API, certificates."""
