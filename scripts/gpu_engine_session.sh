#!/usr/bin/env bash
# One GPU session of engine measurements (H200), every step bounded so one failure leaves the rest:
#   OUT=results scripts/gpu_engine_session.sh [cv3|cudagraph|switch|slack]
# cv3: the CosyVoice3 load test (engine vs the sequential pipeline); cudagraph: the load tests of all three
# families with token2wav on the cudagraph backend; switch: the engine's
# thread switch interval against CPython's default; slack: the batcher's hold policy, the compiled
# LM step, CosyVoice2 compile:bf16; default: the LM steps and the Orpheus load test.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT="${OUT:-results}"
PY="${PY:-python3}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
run() { local t=$1 name=$2; shift 2; echo "== $name"; timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? ($SECONDS s)"; tail -n 14 "$OUT/$name.log"; }
if [ "${1:-}" = cudagraph ]; then
  # token2wav as eager modules replayed as CUDA graphs per (batch, length) bucket (no compile)
  run 230 loadtest-cv3-cudagraph $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
      --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --concurrency 1,16,64,128 \
      --requests 64 --tokens 125 --baseline-requests 2 --json "$OUT/loadtest-cv3-cudagraph.json" \
      --plot "$OUT/loadtest-cv3-cudagraph.png"
  run 190 loadtest-orpheus-cudagraph $PY -m runtime.loadtest --model orpheus-random --device cuda \
      --backend llm=torch:bf16,vocoder=cudagraph:bf16 --max-len 640 --concurrency 16,64,256 --requests 64 \
      --tokens 420 --baseline-requests 1 --json "$OUT/loadtest-orpheus-cudagraph.json" \
      --plot "$OUT/loadtest-orpheus-cudagraph.png"
  run 140 loadtest-cv2-cudagraph $PY -m runtime.loadtest --model cosyvoice2-random --device cuda \
      --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --concurrency 1,32,128 \
      --requests 64 --tokens 125 --baseline-requests 2 --json "$OUT/loadtest-cv2-cudagraph.json" \
      --plot "$OUT/loadtest-cv2-cudagraph.png"
  exit 0
fi
if [ "${1:-}" = switch ]; then
  # the engine's thread switch interval: 0.5 ms (default) against CPython's 5 ms, same run
  for ms in 0.5 0; do
    run 120 loadtest-cv3-switch-$ms $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --concurrency 1,16,64,128 \
        --requests 64 --tokens 125 --no-baseline --switch-interval-ms $ms --json "$OUT/loadtest-cv3-switch-$ms.json"
  done
  run 200 loadtest-orpheus-switch-0.5 $PY -m runtime.loadtest --model orpheus-random --device cuda \
      --backend llm=torch:bf16,vocoder=cudagraph:bf16 --max-len 640 --concurrency 16,64,256 --requests 64 \
      --tokens 420 --no-baseline --switch-interval-ms 0.5 --json "$OUT/loadtest-orpheus-switch-0.5.json"
  exit 0
fi
if [ "${1:-}" = slack ]; then
  # the batcher holding calls with slack (500 ms) against running every round at once, same run;
  # then the compiled LM step and a CosyVoice2 compile:bf16 bench (its vocoder once crashed in bf16)
  for ms in 0 500; do
    run 110 loadtest-cv3-slack-$ms $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --concurrency 1,16,64,128 \
        --requests 64 --tokens 125 --no-baseline --batch-slack-ms $ms --json "$OUT/loadtest-cv3-slack-$ms.json"
  done
  run 130 step-cv3-compiled $PY scripts/bench_slot_step.py --model cosyvoice3-random --batches 1,16 \
      --compiled-batches 1,16 --max-len 512 --reps 30 --json "$OUT/step-cv3-compiled.json"
  run 170 bench-cv2-compile-bf16 $PY -m runtime.bench --model cosyvoice2-random --device cuda --backends compile:bf16 \
      --lengths 50 --reps 3 --warmup 1 --json "$OUT/bench-cv2-compile-bf16.json"
  exit 0
fi
if [ "${1:-}" = cv3 ]; then
  run 170 loadtest-cv3 $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
      --backend llm=torch:bf16,flow=torch:bf16,vocoder=torch:bf16 --max-len 512 --concurrency 1,32,128 \
      --requests 128 --tokens 125 --baseline-requests 2 --json "$OUT/loadtest-cv3.json" --plot "$OUT/loadtest-cv3.png"
  exit 0
fi
run 110 step-orpheus $PY scripts/bench_slot_step.py --model orpheus-random --batches 16,64,128,256 \
    --baseline-batches 128 --max-len 640 --reps 30 --json "$OUT/step-orpheus.json"
run 40 step-cv3 $PY scripts/bench_slot_step.py --model cosyvoice3-random --batches 1,32,128 --max-len 512 \
    --reps 30 --json "$OUT/step-cv3.json"
run 150 loadtest-orpheus $PY -m runtime.loadtest --model orpheus-random --device cuda \
    --backend llm=torch:bf16,vocoder=torch:bf16 --max-len 640 --concurrency 64,256 --requests 256 --tokens 420 \
    --baseline-requests 1 --json "$OUT/loadtest-orpheus.json" --plot "$OUT/loadtest-orpheus.png"
