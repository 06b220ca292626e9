#!/usr/bin/env bash
# Every GPU measurement in one run (< 9 minutes on one H100/H200), printed as one table:
#   bash bench/gpu_check.sh [--out docs/gpu_check.md]      (or: make bench-gpu)
# Python: the project's venv when there is one (make install TORCH_INDEX_URL=... for CUDA torch),
# else the machine's python3, which needs torch >= 2.11 with CUDA, timm and PyYAML. Packages that
# python lacks (omegaconf, deepspeed and their needs) can be brought as wheels in .whl/ at the
# repository root; they are installed into /tmp/robustmim-site first. DALI is optional (its
# loader row is then reported as not run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/robustmim-site .whl/*.whl
  export PYTHONPATH="/tmp/robustmim-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec "$PYTHON" -m bench.gpu_check "$@"
