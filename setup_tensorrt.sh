#!/usr/bin/env bash
# Install the TensorRT Python wheel that matches the CUDA major version of the installed torch,
# then check that it imports and can see the GPU. Safe to re-run.
#   ./setup_tensorrt.sh            # uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python ./setup_tensorrt.sh
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
if [ -z "$cuda" ]; then
  echo "setup_tensorrt: the torch in $PY is a CPU build (torch.version.cuda is empty)."
  echo "  TensorRT needs a CUDA build of torch: TORCH='torch==<version> --index-url <CUDA wheel index>' make setup"
  exit 1
fi
major="${cuda%%.*}"
case "$major" in
  12|13) pkg="tensorrt-cu${major}" ;;
  *) echo "setup_tensorrt: torch is built for CUDA $cuda; TensorRT wheels exist for CUDA 12 and 13 only."; exit 1 ;;
esac

echo "setup_tensorrt: torch uses CUDA $cuda -> installing $pkg into $PY"
"$PY" -m pip install --upgrade "$pkg"

"$PY" - <<'PYCHECK'
import sys
import tensorrt as trt
import torch
print(f"setup_tensorrt: tensorrt {trt.__version__} imports")
if not torch.cuda.is_available():
    print("setup_tensorrt: but torch sees no CUDA GPU here, so no plan can be built on this machine")
    sys.exit(1)
builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
p = torch.cuda.get_device_properties(0)
print(f"setup_tensorrt: TensorRT builder created on {p.name} (compute capability {p.major}.{p.minor})")
print("setup_tensorrt: done; build plans with: make engines  (or python -m export build --model <model> --trt)")
PYCHECK
