#!/usr/bin/env bash
# onnxruntime-gpu for the GPU machine, which has only the CPU build and cannot download anything.
# The wheel (255 MB) is over what one device call may carry (64 MiB with the tree), so it travels in
# parts, one per call, into /tmp on the warm machine. Repacked with xz the parts are 4, not 5: the
# wheel is a zip of deflated libraries and xz shrinks them by a fifth (255 -> 203 MB).
#   here:  scripts/ort_gpu_carry.sh pack              # .ortgpu/part00..part03 (ignored by git)
#   there: call k (k = 0..3) carries .ortgpu/part0k and runs  scripts/ort_gpu_carry.sh keep 0k
#          the last one then runs                              scripts/ort_gpu_carry.sh unpack
#          and every later call on the same warm machine starts with  export PYTHONPATH=/tmp/ortsite
# A long job survives the end of its call only in a process session of its own (setsid): start it
# so in one call and let the next calls wait for it and copy its logs to $OUT; the machine goes back
# 30 s after a call returns, so the calls must follow each other at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${ORT_VERSION:-1.31.1}"
PARTS="${PARTS:-4}"
case "${1:-}" in
  pack)
    grep -qx "/.ortgpu/" .git/info/exclude 2>/dev/null || echo "/.ortgpu/" >> .git/info/exclude
    rm -rf .ortgpu && mkdir -p .ortgpu/wheel
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .ortgpu onnxruntime-gpu=="$VERSION"
    (cd .ortgpu/wheel && python3 -m zipfile -e ../onnxruntime_gpu-*.whl .)
    tar -C .ortgpu/wheel -cf - . | xz -9e -T0 > .ortgpu/ort.tar.xz
    (cd .ortgpu && split -n "$PARTS" -d ort.tar.xz part && rm -rf wheel ort.tar.xz onnxruntime_gpu-*.whl)
    ls -l .ortgpu
    ;;
  keep)
    mkdir -p /tmp/ort && cp ".ortgpu/part$2" /tmp/ort/
    ;;
  unpack)
    # the same files a `pip install --target` of the wheel leaves (a wheel is unpacked as it is)
    # into a side folder first: a chain already waiting for /tmp/ortsite (gpu_coverage.sh wait-ort)
    # must never import a half-written package
    rm -rf /tmp/ortsite.part && mkdir -p /tmp/ortsite.part
    cat /tmp/ort/part* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/ortsite.part', filter='data')"
    rm -rf /tmp/ortsite && mv /tmp/ortsite.part /tmp/ortsite
    PYTHONPATH=/tmp/ortsite python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
    ;;
  *)
    echo "usage: $0 pack | keep NN | unpack" >&2
    exit 2
    ;;
esac
