#!/usr/bin/env bash
# The GPU coverage of CosyVoice2 and Orpheus at the real sizes (random weights), every step bounded (all of it
# outlasts one 600 s device call: start it under setsid and let the next calls wait for it),
# once onnxruntime-gpu is installed there (scripts/ort_gpu_carry.sh: four calls carry it, then `unpack`):
#   OUT=results ENGINES=/tmp/engines PYTHONPATH=/tmp/ortsite scripts/gpu_coverage.sh [steps...]
# steps (default all, in this order):
#   export     fp32 ONNX of whatever is missing (CosyVoice2 in the per-step flow layout, Orpheus whole)
#   validate   fp32 against torch on CUDA at min/opt/max, $SEEDS seeds, audio included
#   build      fp16 + int8 of the CosyVoice2 flow graphs and vocoder and the Orpheus vocoder, validated
#              while built, then validated again with $SEEDS seeds (certificates)
#   llm16      fp16 of both LLM graphs (bisected to the nodes that must stay fp32, $BISECT rounds)
#   bench      ORT fp32 / fp16 against torch eager, per stage, CosyVoice2 (steps) and Orpheus
# Every step is bounded by $STEP_S seconds so a slow one leaves the rest; one log ($OUT/coverage.log)
# plus the validation.md copies and the bench JSON come back (the device returns at most 8 files).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-results}"; ENGINES="${ENGINES:-/tmp/engines}"; PY="${PY:-python3}"
STEP_S="${STEP_S:-150}"; SEEDS="${SEEDS:-2}"; BISECT="${BISECT:-8}"; DEVICE="${DEVICE:-cuda}"
# the tiny presets and DEVICE=cpu run the same steps on a laptop (a smoke test of this script)
CV2="${CV2:-cosyvoice2-random}"; ORP="${ORP:-orpheus-random}"
CV2_GRAPHS=llm,flow_encoder,flow_estimator,vocoder
mkdir -p "$OUT"
log="$OUT/coverage.log"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null | tee -a "$log"
# ONNX Runtime's cuDNN frontend prints one line per convolution it finds no plan for: counted, not kept
quiet() { grep -v "cudnn_frontend\|plugin EP device\|^\s*$\|^.\[m$"; }
run() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$log"
  timeout -k 5 "$STEP_S" "$@" 2>&1 | quiet >> "$log"
  echo "   rc=${PIPESTATUS[0]} ($SECONDS s)" | tee -a "$log"
}
has() { [ -f "$ENGINES/$1/onnx/fp32/$2.onnx" ]; }
keep() { cp "$ENGINES/$1/validation.md" "$OUT/validation-$1-$2.md" 2>/dev/null; }
steps="${*:-export validate build llm16 bench}"
for s in $steps; do
  case "$s" in
    export)
      missing=$(for g in ${CV2_GRAPHS//,/ }; do has $CV2 $g || printf '%s,' $g; done)
      [ -n "$missing" ] && run export-cv2 $PY -m export onnx --model $CV2 --graphs "${missing%,}" --out-dir "$ENGINES/$CV2"
      has $ORP llm && has $ORP vocoder || run export-orpheus $PY -m export onnx --model $ORP --out-dir "$ENGINES/$ORP"
      ;;
    validate)
      run validate-cv2 $PY -m export validate --model $CV2 --out-dir "$ENGINES/$CV2" --device "$DEVICE" --graphs $CV2_GRAPHS --seeds "$SEEDS"
      keep $CV2 fp32
      run validate-orpheus $PY -m export validate --model $ORP --out-dir "$ENGINES/$ORP" --device "$DEVICE" --seeds "$SEEDS"
      keep $ORP fp32
      ;;
    build)
      run build-cv2 $PY -m export build --model $CV2 --out-dir "$ENGINES/$CV2" --device "$DEVICE" --precision fp16,int8 \
        --graphs flow_encoder,flow_estimator,vocoder --bisect-rounds "$BISECT"
      run validate-cv2-low $PY -m export validate --model $CV2 --out-dir "$ENGINES/$CV2" --device "$DEVICE" --precision fp16,int8 \
        --graphs flow_encoder,flow_estimator,vocoder --seeds "$SEEDS"
      keep $CV2 fp16-int8
      run build-orpheus-vocoder $PY -m export build --model $ORP --out-dir "$ENGINES/$ORP" --device "$DEVICE" --precision fp16,int8 \
        --graphs vocoder --bisect-rounds "$BISECT"
      ;;
    llm16)
      run llm16-cv2 $PY -m export build --model $CV2 --out-dir "$ENGINES/$CV2" --device "$DEVICE" --precision fp16 --graphs llm --bisect-rounds "$BISECT"
      run llm16-orpheus $PY -m export build --model $ORP --out-dir "$ENGINES/$ORP" --device "$DEVICE" --precision fp16 --graphs llm --bisect-rounds "$BISECT"
      run validate-orpheus-low $PY -m export validate --model $ORP --out-dir "$ENGINES/$ORP" --device "$DEVICE" --precision fp16,int8 --seeds "$SEEDS"
      keep $ORP fp16-int8
      ;;
    bench)
      run bench-cv2 $PY -m runtime.bench --model $CV2 --device "$DEVICE" --engines-dir "$ENGINES/$CV2" --flow-mode steps \
        --backends "torch|ort|llm=ort,flow=ort:fp16,vocoder=ort" --lengths 50,500 --reps 5 --json "$OUT/bench-$CV2.json"
      run bench-orpheus $PY -m runtime.bench --model $ORP --device "$DEVICE" --engines-dir "$ENGINES/$ORP" \
        --backends "torch,ort" --lengths 50,500 --reps 5 --json "$OUT/bench-$ORP.json"
      ;;
    *) echo "unknown step $s" | tee -a "$log"; exit 2 ;;
  esac
done
