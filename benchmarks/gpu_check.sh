#!/usr/bin/env bash
# The GPU check of issues 16, 21 and 25, at most 8 minutes on one GPU; prints one JSON object on stdout.
#   benchmarks/gpu_check.sh              # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-only   # CI size on the CPU: the same code, GPU figures null
# Further options go to benchmarks/gpu_check.py (--budget-s, --parts, --keep DIR); what it measures
# is in that file's docstring and in benchmarks/README.md. PYTHON picks the interpreter (default:
# the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# The script stops measuring at its own budget (450 s) and reports; this is the hard stop.
exec timeout --signal=INT --kill-after=20 480 "$PYTHON" benchmarks/gpu_check.py "$@"
