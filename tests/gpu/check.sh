#!/usr/bin/env bash
# The GPU check: on a real NVIDIA GPU, a step inside a gpu_slot() block sees only the device it
# holds, and a step that silently falls back to the CPU fails. Needs Python 3.9+ and PyTorch with
# CUDA; not Prefect, pip or a network (see tests/gpu/check_gpu.py for what it proves and what not).
#
#   bash tests/gpu/check.sh            # from the repository root; PYTHON=... picks the interpreter
#
# Prints PASS/FAIL/SKIP per property and exits 1 if any property failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' || {
  echo "GPU check: FAIL (needs Python 3.9+: set PYTHON)"
  exit 1
}
echo "GPU check on ${HOSTNAME:-this machine} with $("$python" --version 2>&1)"
cd "$root"
PYTHONPATH="$root/flows${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$root/tests/gpu/check_gpu.py"
