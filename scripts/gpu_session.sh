#!/usr/bin/env bash
# The measurement steps run on the GPU machine, kept here so every number in docs/ has its command.
#   scripts/gpu_session.sh export  MODEL   # fp32 ONNX + Polygraphy validation (min/opt/max + audio)
#   scripts/gpu_session.sh onnx    MODEL   # fp32 ONNX only (the exporter's ORT check runs on the CPU)
#   scripts/gpu_session.sh validate MODEL  # Polygraphy validation of the fp32 ONNX on $DEVICE
#   scripts/gpu_session.sh build   MODEL   # fp16 + int8 artifacts (chosen by validation) + validation with audio
#   scripts/gpu_session.sh bench   MODEL BACKENDS [LENGTHS] [extra bench options]
#   scripts/gpu_session.sh report  MODEL BACKENDS [extra report options]   # report folder $OUT/MODEL-<gpu>
# Environment: DEVICE (default cuda), ENGINES (default /tmp/engines), OUT (results folder, default results/),
# GRAPHS (only these graphs), PRECISIONS (build; default fp16,int8), ALLOW_FALLBACK=1 (build: record a graph that
# reaches no fp16 / int8 as fp32 instead of failing the step).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
ENGINES="${ENGINES:-/tmp/engines}"
OUT="${OUT:-results}"
PY="${PY:-python3}"
mkdir -p "$OUT"
step="$1"; model="$2"; shift 2
dir="$ENGINES/$model"
case "$step" in
  onnx)
    $PY -m export onnx --model "$model" --out-dir "$dir" ${GRAPHS:+--graphs $GRAPHS}
    ;;
  validate)
    $PY -m export validate --model "$model" --out-dir "$dir" --device "$DEVICE" --precision fp32 ${GRAPHS:+--graphs $GRAPHS} || true
    cp "$dir/validation.md" "$OUT/validation-$model-fp32.md"
    ;;
  export)
    $PY -m export onnx --model "$model" --out-dir "$dir" ${GRAPHS:+--graphs $GRAPHS}
    $PY -m export validate --model "$model" --out-dir "$dir" --device "$DEVICE" --precision fp32 ${GRAPHS:+--graphs $GRAPHS} || true
    cp "$dir/validation.md" "$OUT/validation-$model-fp32.md"
    ;;
  build)
    $PY -m export build --model "$model" --out-dir "$dir" --device "$DEVICE" --precision "${PRECISIONS:-fp16,int8}" ${GRAPHS:+--graphs $GRAPHS} \
      ${ALLOW_FALLBACK:+--allow-fallback}
    $PY -m export validate --model "$model" --out-dir "$dir" --device "$DEVICE" --precision "${PRECISIONS:-fp16,int8}" ${GRAPHS:+--graphs $GRAPHS} || true
    cp "$dir/validation.md" "$OUT/validation-$model-fp16-int8.md"
    cp "$dir/manifest.json" "$OUT/manifest-$model.json"
    ;;
  bench)
    backends="$1"; lengths="${2:-50,500}"; shift 2 || shift $#
    tag=$(echo "$backends $*" | tr ',:|= ' '-__--' | tr -d '-' | cut -c1-60)
    $PY -m runtime.bench --model "$model" --device "$DEVICE" --engines-dir "$dir" --backends "$backends" \
      --lengths "$lengths" --json "$OUT/bench-$model-$tag.json" "$@"
    ;;
  report)
    backends="$1"; shift
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -o 'H[0-9][0-9]*' | head -n 1 | tr 'H' 'h')
    $PY -m runtime.report --model "$model" --device "$DEVICE" --backends "$backends" --out "$OUT/$model-${gpu:-gpu}" "$@"
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
