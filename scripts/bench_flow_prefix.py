"""The flow's cost of one streaming round of B streams, recomputed against kept, on the GPU.

    python scripts/bench_flow_prefix.py --model cosyvoice3-random --rows 1,8,32 --json flow_prefix.json

Each stream's chunk brings N new mel frames after P it has already solved. `solver` is what the
engine runs with flow_mode solver: the one-graph 10-step solve over all P + N frames of every row,
captured as a CUDA graph per shape (`flow=cudagraph:bf16`, warmed before timing). `prefix` is
flow_mode prefix: the new frames only, against each stream's kept keys / values (the eager bf16 DiT
through `CosyVoice.solve_after_prefix`, which also stacks the streams' prefixes and splits the
extended ones back, as in service); on CUDA also `prefix captured`: the same with the DiT forward
replayed as one CUDA graph per padded call signature (`flow=cudagraph:bf16`, what that backend runs
in the engine; rows padded to a power of two, kept and new frames to the bucket sizes; captured in
the warm-up calls); with `--compiled`, also `prefix compiled`: the same with the
DiT forward compiled by the compile backend (`flow=compile:bf16`, dynamic shapes; its first calls per
new specialisation compile, before timing). The (P, N) pairs are a 5 s request's rounds (125 tokens: 50
frames, then 100 after 50, then 100 after 150) and a long request's later round (200 after 350).
Random weights: the work per frame is the real model's, the values are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models.registry import load_model
from runtime.pipeline import Pipeline

ROUNDS = ((0, 50), (50, 100), (150, 100), (350, 200))


def timed(fn, reps: int, sync) -> float:
    fn()
    fn()  # the first calls capture / allocate
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cosyvoice3-random")
    ap.add_argument("--rows", default="1,8,32", help="Streams per round (the flow graphs take 32 rows at the real size).")
    ap.add_argument("--rounds", default=",".join(f"{p}+{n}" for p, n in ROUNDS), help="P+N pairs.")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compiled", action="store_true", help="Also the prefix forward compiled (flow=compile:bf16).")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of this script on a tiny preset)")
    args = ap.parse_args()
    from models.cosyvoice import PrefixSolve
    from models.dit import DiTPrefix, dit_forward_rows_into

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = load_model(args.model, device=args.device)
    captured = Pipeline(model, "llm=torch,flow=cudagraph:bf16,vocoder=torch", device=args.device, stages=("flow",)).activate()
    eager = Pipeline(model, "llm=torch,flow=torch:bf16,vocoder=torch", device=args.device, stages=("flow",)).activate()
    solver = eager.runners["flow_solver"].eager_module()
    forwards = {"prefix": (solver, dit_forward_rows_into)}
    if dev.type == "cuda":  # the cudagraph backend's form: one CUDA graph per padded call signature
        runner = captured.runners["flow_solver"]
        forwards["prefix_captured"] = (runner.eager_module(), runner.compiled(dit_forward_rows_into))
    if args.compiled:
        comp = Pipeline(model, "llm=torch,flow=compile:bf16,vocoder=torch", device=args.device, stages=("flow",)).activate()
        runner = comp.runners["flow_solver"]
        forwards["prefix_compiled"] = (runner.eager_module(), runner.compiled(dit_forward_rows_into))
    dit = solver.estimator
    inner = dit.cfg.heads * dit.cfg.dim_head
    chunk = model._chunk_tokens * model.cfg.token_mel_ratio
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    rows_list = [int(x) for x in args.rows.split(",")]
    rounds = [tuple(int(v) for v in r.split("+")) for r in args.rounds.split(",")]
    out = []
    names = list(forwards)
    print(f"{'rows':>5} {'P':>5} {'N':>5} {'solver ms':>10} " + " ".join(f"{n + ' ms':>20}" for n in names), flush=True)
    for B in rows_list:
        for P, N in rounds:
            T = P + N
            feed = {"z": rnd(B, 80, T), "mask": torch.ones(B, 1, T, device=dev), "mu": rnd(B, 80, T),
                    "spks": rnd(B, 80), "cond": torch.zeros(B, 80, T, device=dev),
                    "chunk_frames": torch.tensor([chunk], dtype=torch.int64, device=dev)}
            solve_ms = timed(lambda: captured.call("flow_solver", feed), args.reps, sync)
            with torch.inference_mode():  # as the engine's kept prefixes (one kind of tensor for a compiled forward)
                kept = DiTPrefix(rnd(len(dit.transformer_blocks), 2, 2, P, inner).to(torch.bfloat16),
                                 torch.zeros(2, 30, dit.cfg.dim, device=dev, dtype=torch.bfloat16),
                                 torch.zeros(2, 30, dit.cfg.dim, device=dev, dtype=torch.bfloat16))
            steps = [kept] * solver.cfg.n_timesteps
            parts = [rnd(1, 80, N) for _ in range(3)]
            spks = rnd(1, 80)

            row = {"rows": B, "prefix_frames": P, "new_frames": N, "solver_ms": round(solve_ms, 2)}
            for name, (module, forward) in forwards.items():
                def prefix_round():
                    items = [PrefixSolve(module, forward, parts[0], parts[1], spks, parts[2],
                                         {"prefixes": list(steps) if P else None}) for _ in range(B)]
                    # each its own list: the solve consumes a stream's list step by step
                    model.solve_after_prefix(items)

                row[f"{name}_ms"] = round(timed(prefix_round, args.reps, sync), 2)
            out.append(row)
            print(f"{B:>5} {P:>5} {N:>5} {solve_ms:10.2f} " + " ".join(f"{row[n + '_ms']:20.2f}" for n in names), flush=True)
            del feed, kept, steps
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            extra = {n: f.stats() for n, (_, f) in forwards.items() if hasattr(f, "stats")}
            json.dump({"model": args.model, "captured": extra,
                       "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                       "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
