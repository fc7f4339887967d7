#!/usr/bin/env bash
# The GPU measurements of bench/gpu.py on one CUDA device, in at most 5 minutes:
#   bench/gpu.sh                          # collector vs bare forward, saeforge vs sparsify training, peak memory
#   SAEFORGE_BENCH_DRY=1 bench/gpu.sh     # toy-size dry run of the same code on CPU (no figures)
# Without CUDA (and without the dry-run switch) it fails loudly: exit 1 and one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "${SAEFORGE_BENCH_DRY:-0}" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); SAEFORGE_BENCH_DRY=1 bench/gpu.sh is a CPU dry run" >&2
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec timeout 300 "$PY" bench/gpu.py
