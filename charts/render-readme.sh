#!/usr/bin/env bash
# Render charts/prefect-gpu-operator/README.md with helm-docs from Chart.yaml, README.md.gotmpl
# and the `# --` comments in values.yaml, in their order.
# Usage: render-readme.sh [--dry-run]   (--dry-run prints it instead)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${HELM_DOCS:-helm-docs}" --chart-search-root "$here/prefect-gpu-operator" \
  --sort-values-order file --log-level warning "$@"
