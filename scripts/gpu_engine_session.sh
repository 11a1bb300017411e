#!/usr/bin/env bash
# One GPU session of engine measurements (H200), every step bounded so one failure leaves the rest:
#   OUT=results scripts/gpu_engine_session.sh [cv3|cudagraph|switch|lm]
# cv3: the CosyVoice3 load test (engine vs the sequential pipeline); cudagraph: the load tests of all three
# families with token2wav on the cudagraph backend; switch: the engine's
# thread switch interval against CPython's default; lm: the compiled LM step in the
# engine against the eager one; serve: the CosyVoice3 load test in process and through the HTTP server
# (runtime.serve, --warmup $WARMUP, full by default, timed), same levels; http: the server alone; ray: the
# same through Ray Serve with one replica; batcher: the token2wav batcher's policies (call, round) on
# CosyVoice3; orpheus-lm: Orpheus with the compiled LM step; priority (CosyVoice3), priority-orpheus: the LM stream's CUDA priority;
# lmsplit: where an LM step's time goes under load (launch, wait, device, deliver; CosyVoice3 at the default
# switch interval and at 0.5 ms, Orpheus);
# green: the token2wav calls on a CUDA green context leaving SMs to the LM (the probe, then CosyVoice3);
# prefill: the GPU capture tests, the LM's prefills eager against captured (CosyVoice3, same call, $RUNS
# runs per level, 3 by default), then the green probe;
# flowcompile: CosyVoice3 with every stage compiled (compile:bf16) and the captured prefill;
# sixth: the capture test, prefill-loads (the two load tests of prefill, RUNS=1), then flowcompile until $BUDGET s;
# prefix: the flow's kept prefix against recomputing it (scripts/bench_flow_prefix.py, eager and compiled),
# then the CosyVoice3 load test with --flow-mode prefix against the default, same configuration ($RUNS runs)
# (prefix-bench: without the compiled benchmark; prefix-compiled: that one alone; prefix-loads: the load tests);
# newshapes: the load test with --new-shapes capture against defer (C=16, $RUNS runs);
# default: the LM steps and the Orpheus load test.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT="${OUT:-results}"
PY="${PY:-python3}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
run() { local t=$1 name=$2; shift 2; echo "== $name"; timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? ($SECONDS s)"; tail -n 14 "$OUT/$name.log"; }
# the HTTP comparisons: one engine configuration, the same levels in process and through a server
SERVE_ARGS="${SERVE_ARGS:---model cosyvoice3-random --device cuda --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16
            --max-len 512 --max-streams 128}"
LEVELS="${LEVELS:---concurrency 1,16,64 --requests 64 --tokens 125}"
# start a server in the background ($1: log name, rest: its options), wait for GET /ready (the
# server's own warm-up seconds are in that answer and its log), then load-test it over HTTP
serve_and_load() {
  local name=$1 port=$2; shift 2
  echo "== $name (server)"
  $PY -m runtime.serve $SERVE_ARGS --port "$port" "$@" > "$OUT/$name-server.log" 2>&1 &
  local pid=$! t0=$SECONDS
  until $PY -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/ready').status_code != 200)" 2>/dev/null; do
    if ! kill -0 $pid 2>/dev/null || [ $((SECONDS - t0)) -gt 300 ]; then echo "   server not ready"; tail -n 20 "$OUT/$name-server.log"; kill $pid 2>/dev/null; return; fi
    sleep 1
  done
  echo "   ready after $((SECONDS - t0)) s"
  $PY -c "import httpx; print(httpx.get('http://127.0.0.1:$port/ready').text)" > "$OUT/$name-ready.json"
  run 260 "$name" $PY -m runtime.loadtest --url "http://127.0.0.1:$port" $LEVELS --json "$OUT/$name.json"
  kill -INT $pid; sleep 8; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
}
if [ "${1:-}" = serve ]; then
  run 200 loadtest-cv3-inprocess $PY -m runtime.loadtest $SERVE_ARGS $LEVELS --no-baseline \
      --json "$OUT/loadtest-cv3-inprocess.json"
  serve_and_load loadtest-cv3-http 8000 --warmup "${WARMUP:-full}"
  exit 0
fi
if [ "${1:-}" = http ]; then
  serve_and_load loadtest-cv3-http 8000 --warmup "${WARMUP:-full}"
  exit 0
fi
if [ "${1:-}" = ray ]; then
  serve_and_load loadtest-cv3-ray1 8001 --warmup "${WARMUP:-full}" --ray --replicas 1 --replica-cpus 8
  exit 0
fi
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
if [ "${1:-}" = lm ]; then
  # CosyVoice3 with the compiled LM step (flex attention, buckets 1,16,64,128) against the eager step,
  # token2wav on cudagraph, the batcher splitting calls of very different lengths, same run
  for lm in compile torch; do
    run 300 loadtest-cv3-lm-$lm $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=$lm:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --lm-buckets 1,16,64,128 --concurrency 1,16,64,128 --requests 64 --tokens 125 --no-baseline \
        --json "$OUT/loadtest-cv3-lm-$lm.json"
  done
  exit 0
fi
if [ "${1:-}" = batcher ]; then
  # the token2wav batcher's policies on CosyVoice3, same run, every level 3 times (the median run is kept);
  # C=1 is left out: with one stream both policies run the same calls
  for policy in call round; do
    run 200 loadtest-cv3-batcher-$policy $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 16,32,64 --requests 64 --tokens 125 --runs 3 --no-baseline --batcher-policy $policy \
        --json "$OUT/loadtest-cv3-batcher-$policy.json"
  done
  exit 0
fi
if [ "${1:-}" = priority ]; then
  # the LM stream's CUDA priority (high: decode steps ahead of the flow's pending blocks) against normal on
  # CosyVoice3, same call, 3 runs per level (median kept), crossed with the batcher's "urgent" policy (first
  # chunks jump the round); last "call" with high (it lost to "round" through GPU contention with the LM)
  for cfg in ${CONFIGS:-normal-round high-round normal-urgent high-urgent high-call}; do
    run 115 loadtest-cv3-prio-$cfg $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 16,32,64 --requests 64 --tokens 125 --runs 3 --no-baseline --lm-priority ${cfg%-*} \
        --batcher-policy ${cfg#*-} --json "$OUT/loadtest-cv3-prio-$cfg.json"
  done
  exit 0
fi
if [ "${1:-}" = lmsplit ]; then
  # the engine's LM step split into host and device time per level (loadtest logs and JSON: lm_step_ms)
  for ms in 0 0.5; do
    run 150 loadtest-cv3-split-$ms $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 1,16,64 --requests 64 --tokens 125 --no-baseline --switch-interval-ms $ms \
        --json "$OUT/loadtest-cv3-split-$ms.json"
  done
  run 170 loadtest-orpheus-split $PY -m runtime.loadtest --model orpheus-random --device cuda \
      --backend llm=torch:bf16,vocoder=cudagraph:bf16 --max-len 640 --max-streams 64 \
      --concurrency 16,64 --requests 64 --tokens 420 --no-baseline --json "$OUT/loadtest-orpheus-split.json"
  exit 0
fi
if [ "${1:-}" = green ]; then
  # a synthetic probe of the mechanism, then CosyVoice3 with 0 (off), 12 and 36 SMs kept from the flow/vocoder
  run 60 green-probe $PY scripts/green_probe.py --free-sms 4,12,36 --json "$OUT/green-probe.json"
  for sms in ${RESERVED:-0 12 36}; do
    run 130 loadtest-cv3-green-$sms $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 1,16,64 --requests 32 --runs 3 --tokens 125 --no-baseline --lm-reserved-sms $sms \
        --json "$OUT/loadtest-cv3-green-$sms.json"
  done
  exit 0
fi
if [ "${1:-}" = prefill ]; then
  run 120 pytest-capture $PY -m pytest -q -p no:cacheprovider tests/test_compiled.py -m gpu \
      -k "capture or decoder_cuda_graph"
  for mode in eager graph; do
    run 280 loadtest-cv3-prefill-$mode $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 1,16,64 --requests 64 --tokens 125 --runs "${RUNS:-3}" --no-baseline --prefill $mode \
        --json "$OUT/loadtest-cv3-prefill-$mode.json"
  done
  run 60 green-probe $PY scripts/green_probe.py --free-sms 4,12,36 --json "$OUT/green-probe.json"
  exit 0
fi
if [ "${1:-}" = sixth ]; then
  # one call for what the sixth round needs when little device time is left: the capture test, the
  # prefills eager against captured (one run per level), then every stage compiled for what time remains
  run 90 pytest-capture $PY -m pytest -q -p no:cacheprovider tests/test_compiled.py -m gpu -k copy_onto
  RUNS=1 "$0" prefill-loads
  run 40 green-probe $PY scripts/green_probe.py --free-sms 36 --json "$OUT/green-probe.json"
  LIMIT=$(( ${BUDGET:-560} - SECONDS )) "$0" flowcompile
  exit 0
fi
if [ "${1:-}" = prefix ] || [ "${1:-}" = prefix-bench ]; then
  run 110 bench-flow-prefix $PY scripts/bench_flow_prefix.py --model cosyvoice3-random --rows 1,8,32 \
      --json "$OUT/flow-prefix.json"
fi
if [ "${1:-}" = prefix ] || [ "${1:-}" = prefix-compiled ]; then
  run 150 bench-flow-prefix-compiled $PY scripts/bench_flow_prefix.py --model cosyvoice3-random \
      --rows 1,32 --rounds 50+100,150+100,350+200 --compiled --json "$OUT/flow-prefix-compiled.json"
  [ "${1:-}" = prefix-compiled ] && exit 0
fi
if [ "${1:-}" = prefix ] || [ "${1:-}" = prefix-bench ] || [ "${1:-}" = prefix-loads ]; then
  for mode in prefix solver; do
    # PREFIX_LEVELS=1,16,32,64,128 RUNS=3 STEP_S=280: the sweep that ranks the two modes (~300 s for both)
    run "${STEP_S:-200}" loadtest-cv3-flow-$mode $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency "${PREFIX_LEVELS:-1,16,32}" --requests 32 --tokens 125 --runs "${RUNS:-1}" --no-baseline --flow-mode $mode \
        --json "$OUT/loadtest-cv3-flow-$mode.json"
  done
  exit 0
fi
if [ "${1:-}" = newshapes ]; then
  for policy in capture defer; do
    run 200 loadtest-cv3-shapes-$policy $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 16 --requests 48 --tokens 125 --runs "${RUNS:-1}" --no-baseline --warmup levels \
        --new-shapes $policy --json "$OUT/loadtest-cv3-shapes-$policy.json"
  done
  exit 0
fi
if [ "${1:-}" = prefill-loads ]; then
  for mode in eager graph; do
    run 200 loadtest-cv3-prefill-$mode $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
        --backend llm=torch:bf16,flow=cudagraph:bf16,vocoder=cudagraph:bf16 --max-len 512 --max-streams 128 \
        --concurrency 1,16,64 --requests 64 --tokens 125 --runs "${RUNS:-3}" --no-baseline --prefill $mode \
        --json "$OUT/loadtest-cv3-prefill-$mode.json"
  done
  exit 0
fi
if [ "${1:-}" = flowcompile ]; then
  # every stage compiled (the LM step, the DiT, the causal HiFT: inductor, automatic dynamic shapes, one
  # static and one dynamic compile each, then a CUDA graph capture per (rows, length) key met in the
  # warm-up round) with the captured prefill: the configuration for first audio at C=1
  run ${LIMIT:-560} loadtest-cv3-all-compile $PY -m runtime.loadtest --model cosyvoice3-random --device cuda \
      --backend llm=compile:bf16,flow=compile:bf16,vocoder=compile:bf16 --max-len 512 --max-streams 128 \
      --concurrency ${LEVELS_C:-1,4,8,16,64} --requests 64 --tokens 125 --prefill graph --no-baseline \
      --json "$OUT/loadtest-cv3-all-compile.json"
  exit 0
fi
if [ "${1:-}" = priority-orpheus ]; then
  for prio in normal high; do
    run 150 loadtest-orpheus-prio-$prio $PY -m runtime.loadtest --model orpheus-random --device cuda \
        --backend llm=torch:bf16,vocoder=cudagraph:bf16 --max-len 640 --max-streams 64 \
        --concurrency 16,64 --requests 64 --tokens 420 --no-baseline --lm-priority $prio \
        --json "$OUT/loadtest-orpheus-prio-$prio.json"
  done
  exit 0
fi
if [ "${1:-}" = orpheus-lm ]; then
  # Orpheus with the compiled Llama step (flex attention; buckets 1,16,64), SNAC on cudagraph
  run 330 loadtest-orpheus-lm-compile $PY -m runtime.loadtest --model orpheus-random --device cuda \
      --backend llm=compile:bf16,vocoder=cudagraph:bf16 --max-len 640 --max-streams 64 --lm-buckets 1,16,64 \
      --concurrency 16,64 --requests 64 --tokens 420 --no-baseline --json "$OUT/loadtest-orpheus-lm-compile.json"
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
