"""The engine's LM decode step (runtime/backends/slot_decoder.py) per batch size, on the GPU.

    python scripts/bench_slot_step.py --model cosyvoice3-random --batches 1,32,128 --json step.json

For each batch B: B requests prefilled with prompts of different lengths, then the captured step of
bucket B replayed; the median of `--reps` steps (each ending in the host read of the sampled ids,
as in the engine) in ms, with the attention variant and whether the step was compiled. The
`--baseline` row is today's single-request-shaped static-cache decoder of the compile backend
(StaticCacheDecoder at the same batch, every row attending all 1024 columns in float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models.registry import load_model
from runtime.backends.slot_decoder import SlotDecoder

DEVICE = "cuda"


def measure(model, batch: int, max_len: int, compile: bool, attention: str | None, reps: int) -> dict:
    lm = model.graph_module(model.lm.graph)
    vocab = model.graph_specs()[model.lm.graph].outputs[0].shape[1]
    utt = model.make_utterance("Benchmark sentence for the decode step.", model.make_speaker(None, None))
    sampler = model.make_sampler(utt, torch.Generator(), 10_000)
    t0 = time.perf_counter()
    dec = SlotDecoder(lm, sampler.slots(batch, vocab, DEVICE), model.lm.token_offset, batch, max_len, DEVICE,
                      torch.bfloat16, compile=compile, attention=attention, buckets=[batch])
    dec.capture_all()
    setup = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    longest = min(600, max_len - reps - 16)  # room for the steps measured
    prompts = [torch.randint(0, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(min(64, longest - 1), longest, (batch,), generator=g)]
    for s in range(0, batch, 16):
        dec.prefill(s, prompts[s:s + 16], [sampler] * len(prompts[s:s + 16]), list(range(s, s + len(prompts[s:s + 16]))))
    for _ in range(5):
        dec.read(dec.step(batch))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dec.read(dec.step(batch))
        times.append((time.perf_counter() - t) * 1e3)
    return {"batch": batch, "ms_per_step": statistics.median(times), "p95_ms": sorted(times)[int(0.95 * (reps - 1))],
            "tokens_per_s": batch / statistics.median(times) * 1e3, "setup_s": round(setup, 1), **dec.metadata()}


def baseline(model, batch: int, reps: int) -> dict:
    from runtime.backends.static_cache import StaticCacheDecoder

    lm = model.graph_module(model.lm.graph)
    dec = StaticCacheDecoder(lm, batch, 1024, "cuda", torch.bfloat16, compile=True)
    dec.prefill(torch.zeros(batch, 64, dtype=torch.int64, device="cuda"))
    ids = torch.zeros(batch, 1, dtype=torch.int64, device="cuda")
    for _ in range(5):
        dec.step(ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dec.step(ids).cpu()
        times.append((time.perf_counter() - t) * 1e3)
    return {"batch": batch, "ms_per_step": statistics.median(times), "what": "StaticCacheDecoder compile bf16, 1024 cols"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--compiled-batches", default="", help="also measure the compiled (inductor) step at these")
    p.add_argument("--baseline-batches", default="", help="today's StaticCacheDecoder at these batches")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
    model = load_model(a.model, device=a.device)
    rows = []
    for b in [int(x) for x in a.batches.split(",") if x]:
        rows.append(measure(model, b, a.max_len, False, "matmul_bf16", a.reps))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    for b in [int(x) for x in a.compiled_batches.split(",") if x]:
        try:
            rows.append(measure(model, b, a.max_len, True, "flex_grouped", a.reps))
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append({"batch": b, "compiled": True, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    for b in [int(x) for x in a.baseline_batches.split(",") if x]:
        rows.append(baseline(model, b, a.reps))
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
