"""A real local control plane (etcd + kube-apiserver) and Prefect server on loopback.

Used by the test suite and by ``prefect-gpu-operator sandbox``: no Docker, no kubelet, real
servers with RBAC on.
"""
