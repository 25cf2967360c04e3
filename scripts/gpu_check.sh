#!/usr/bin/env bash
# GPU check (issue 17): the CUDA-marked tests (tests/gpu/, marker `gpu`) on a machine with a CUDA GPU, in
# well under 10 minutes: every form's bf16 forward/backward on CUDA, a QLoRA (nf4) step, the serving kernels
# (Triton path vs the torch reference), and timings (train step vs PEFT, decode vs base) written to
# $LORAKIT_GPU_OUT/timings.json (default bench/gpu_check/results; under $OUT when run through the device tool).
#
# usage: scripts/gpu_check.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export LORAKIT_GPU_OUT=${LORAKIT_GPU_OUT:-${OUT:-bench/gpu_check/results}}
"$PY" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
try:
    import bitsandbytes, triton  # noqa: F401
    print(f"gpu_check: bitsandbytes {bitsandbytes.__version__}, triton {triton.__version__}")
except ImportError as e:
    print(f"gpu_check: optional package missing ({e}); those checks skip")
PY
# -m gpu overrides the default "not slow" selection; -p no:cacheprovider keeps the tree clean
timeout 540 "$PY" -m pytest -p no:cacheprovider -m gpu tests/gpu -rs -s "$@"
echo "gpu_check: timings in $LORAKIT_GPU_OUT/timings.json"
