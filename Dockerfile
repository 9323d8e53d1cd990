# The prefect-gpu-operator image: the operator, and the flows package with its CPU model runtime
# (the [inference] extra), so the chart's inference worker runs the same image.
#
#   docker build -t prefect-gpu-operator:dev .
#
# No ENTRYPOINT: the chart passes the whole command as container args
# ([prefect-gpu-operator, run] for the operator, [prefect, worker, start, ...] for the worker).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /build/
COPY operator /build/operator
COPY flows /build/flows
RUN pip install /build "/build/flows[inference]" \
    && mkdir -p /opt/prefect-gpu-flows \
    && cp /build/flows/prefect.yaml /opt/prefect-gpu-flows/prefect.yaml \
    && rm -rf /build

# Non-root, as the chart's pod security context (runAsUser 65532); the root filesystem may be
# read-only, so Prefect keeps its home under /tmp (an emptyDir in the chart).
USER 65532:65532
ENV HOME=/tmp \
    PREFECT_HOME=/tmp/prefect
WORKDIR /tmp
CMD ["prefect-gpu-operator", "run"]
