# The project's images, one build target each:
#
#   operator     the operator alone (prefect-gpu-operator): no Prefect, no model runtime
#   worker       a Prefect process worker with prefect-gpu-flows[inference] (onnxruntime, CPU)
#   worker-cuda  the same with prefect-gpu-flows[cuda] (onnxruntime-gpu with CUDA and cuDNN wheels)
#
# With Docker:
#   docker build --target operator    -t ghcr.io/prefect-gpu-operator/prefect-gpu-operator:0.1.0 .
#   docker build --target worker      -t ghcr.io/prefect-gpu-operator/prefect-gpu-worker:0.1.0 .
#   docker build --target worker-cuda -t ghcr.io/prefect-gpu-operator/prefect-gpu-worker:0.1.0-cuda .
# Without Docker (a Debian base made by mmdebstrap, buildah, OCI archives for
# `ctr -n k8s.io images import`; needs root):
#   prefect-gpu-sandbox build-images [--cuda]
#
# The base is a build argument; pin it by digest for a reproducible build, e.g.
#   --build-arg BASE=docker.io/library/python:3.11-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect docker.io/library/python:3.11-slim-bookworm` prints it).
# Any Debian-like base with python3.11 and its venv module works.
#
# Every Python package comes from constraints/<target>.txt: exact versions with hashes, generated
# from the pyprojects by `make lock`. A build behind a TLS-inspecting proxy passes the proxy's CA
# bundle as a secret: --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt
#
# The chart passes the command as container args; the entrypoint stays the init process.

ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
# A virtual environment behaves the same on python:slim and on Debian's python3, whose system
# site-packages is externally managed (PEP 668). The user has a name, as some libraries look it up.
RUN python3 -m venv /opt/venv \
    && echo 'nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'nonroot:x:65532:' >> /etc/group
# What every image runs with (each sets USER 65532 once its packages are installed). The pods
# run with a read-only root filesystem and an emptyDir at /tmp, so every home lives there.
# dumb-init (from each lock) is PID 1: it forwards signals and reaps the flow runs' orphans.
ENV HOME=/tmp \
    PREFECT_HOME=/tmp/prefect
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/dumb-init", "--"]

FROM python AS operator
COPY constraints/operator.txt /tmp/lock.txt
RUN --mount=type=secret,id=ca-certificates \
    if [ -e /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi; \
    pip install --require-hashes --no-deps -r /tmp/lock.txt && rm /tmp/lock.txt
COPY pyproject.toml README.md /tmp/src/
COPY operator /tmp/src/operator
# No index and no dependencies: everything else came from the lock, and `pip check` proves the
# lock satisfies the project.
RUN pip install --no-index --no-deps --no-build-isolation /tmp/src && pip check && rm -rf /tmp/src
USER 65532:65532
CMD ["prefect-gpu-operator", "run"]

FROM python AS worker
COPY constraints/worker.txt /tmp/lock.txt
RUN --mount=type=secret,id=ca-certificates \
    if [ -e /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi; \
    pip install --require-hashes --no-deps -r /tmp/lock.txt && rm /tmp/lock.txt
COPY flows /tmp/src
COPY flows/prefect.yaml /opt/prefect-gpu-flows/prefect.yaml
RUN pip install --no-index --no-deps --no-build-isolation /tmp/src && pip check && rm -rf /tmp/src
USER 65532:65532
CMD ["prefect", "worker", "start", "--type", "process", "--pool", "gpu-process-pool"]

# The worker with onnxruntime-gpu instead of onnxruntime (the two must not be mixed).
FROM python AS worker-cuda
COPY constraints/worker-cuda.txt /tmp/lock.txt
RUN --mount=type=secret,id=ca-certificates \
    if [ -e /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi; \
    pip install --require-hashes --no-deps -r /tmp/lock.txt && rm /tmp/lock.txt
COPY flows /tmp/src
COPY flows/prefect.yaml /opt/prefect-gpu-flows/prefect.yaml
RUN pip install --no-index --no-deps --no-build-isolation /tmp/src && pip check && rm -rf /tmp/src
USER 65532:65532
CMD ["prefect", "worker", "start", "--type", "process", "--pool", "gpu-process-pool"]
