#!/usr/bin/env bash
# GPU benchmark of spade_sd: one prepared run of about six minutes (under eight) on one CUDA GPU.
#
#   bash benchmarks/gpu.sh            # from the repository root; extra arguments go to benchmarks/gpu.py
#   bash benchmarks/gpu.sh --smoke    # tiny sizes on any device: checks the script, its numbers mean nothing
#
# Writes gpu_results.json, gpu_results.md and gpu_log.txt to $OUT when set, else to benchmarks/results; both results
# files are rewritten after every part, so a run cut short still reports. PYTHON picks the interpreter (python3).
# What the parts measure, and why: the docstring of benchmarks/gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

# find_spec looks the packages up without importing them (importing torch alone takes seconds)
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("timm")))' 2>/dev/null; then
  echo "torch or timm missing for $PY; trying pip (fails quickly where no registry can be reached)"
  timeout 300 "$PY" -m pip install -q --retries 1 --timeout 15 torch timm ||
    { echo "Could not install torch and timm: install them, or set PYTHON to an interpreter that has them." >&2; exit 1; }
fi
# spade_sd itself is not installed here: gpu.py imports it from src/ (or falls back to local copies of its code)

# the parts keep to their own budget (gpu.py --budget, 420 s); this outer limit only guards against a hang
timeout -k 10 "${GPU_BENCH_TIMEOUT:-470}" "$PY" benchmarks/gpu.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_log.txt"
exit "${PIPESTATUS[0]}"
