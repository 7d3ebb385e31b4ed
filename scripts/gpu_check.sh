#!/usr/bin/env bash
# Runs every GPU path on a CUDA machine and prints one table (scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh [--model PATH] [--data DIR] [--json OUT]
#
# Wheels in $GPU_CHECK_WHEELS (a folder; e.g. onnxruntime-gpu, gguf, a matching transformers) are installed into a
# private folder first, for machines that cannot reach a package index.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
if [[ -n "${GPU_CHECK_WHEELS:-}" ]] && compgen -G "$GPU_CHECK_WHEELS/*.whl" > /dev/null; then
    site="$(mktemp -d)"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$GPU_CHECK_WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/scripts/gpu_check.py" "$@"
