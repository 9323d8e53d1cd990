"""The project's development harness: real servers on loopback, and the demo.

A local control plane (etcd + kube-apiserver), Prefect servers (SQLite or PostgreSQL) and the
tools they need, for the test suite, the benchmarks and ``prefect-gpu-sandbox``. No Docker: real
servers with RBAC on. Never shipped in the operator's or the flows' distribution.
"""
