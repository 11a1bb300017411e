"""Benchmark the decode-attention implementations of runtime.backends.decode_attention.

For each (model, batch, cache columns) point and each implementation, the attention of one decode
step is compiled (torch.compile fullgraph, dynamic=False) and captured in ONE CUDA graph that runs it
once per layer, each layer on its own cache tensors as in the real step (so a layer's K/V come from
HBM, not from an L2 still warm from the previous call). The graph is replayed many times and timed
with CUDA events; the median replay / layers is the per-layer time. Two modes per implementation:
`full` attends over all T cache columns, `Tb` over the first Tb = next multiple of 256 >= max(length)
(runtime.backends.decode_attention.attend_first_columns).

Reported per row: per-layer time, time x layers, effective bandwidth = bytes of K/V in the filled
columns (sum of lengths x KVH x HD x 2 tensors x 2 bytes) / per-layer time, the bandwidth over all
the columns the mode attends (T or Tb per row), the max abs error of layer 0 against a float32
reference, and the kernel inductor generated (flex decoding vs main kernel, SDPA backend) when it
can be read from the generated code. Eager probes say which SDPA backends accept the inputs.

Points run in order of importance, and a point / implementation that does not start before
--budget-s seconds is reported as skipped, so one run stays within its time box. Failures (compile,
capture, out of memory) are reported with the first line of the error and the rest continues. The
JSON (--json) is rewritten after every measurement.

  python scripts/bench_decode_attention.py --json decode_attention.json       # H200, ~4 min
  python scripts/bench_decode_attention.py --device cpu --quick               # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.backends.decode_attention import IMPLEMENTATIONS, attend_first_columns, bucket_columns  # noqa: E402

MODELS = {
    "llama-3.2-3b": dict(heads=24, kv_heads=8, head_dim=128, layers=28),
    "qwen2-0.5b": dict(heads=14, kv_heads=2, head_dim=64, layers=24),
    # --quick: same head grouping ideas at toy sizes
    "tiny-g3": dict(heads=6, kv_heads=2, head_dim=32, layers=2),
    "tiny-g7": dict(heads=7, kv_heads=1, head_dim=16, layers=2),
}
# most important first: the budget cuts from the end
POINTS = [("llama-3.2-3b", 128, 1024), ("qwen2-0.5b", 128, 1024), ("llama-3.2-3b", 256, 1024),
          ("llama-3.2-3b", 64, 1024), ("qwen2-0.5b", 32, 1024), ("llama-3.2-3b", 16, 1024),
          ("llama-3.2-3b", 1, 1024), ("qwen2-0.5b", 1, 1024), ("llama-3.2-3b", 128, 2048)]
QUICK_POINTS = [("tiny-g3", 4, 512), ("tiny-g7", 3, 512)]
LENGTH_RANGE = (64, 600)
QUICK_LENGTH_RANGE = (16, 300)
# markers in inductor's generated code -> the kernel that runs
CODE_MARKERS = [("SPLIT_KV", "flex decoding (split-KV)"), ("_scaled_dot_product_flash_attention_for_cpu", "sdpa cpu flash"),
                ("_scaled_dot_product_efficient_attention", "sdpa efficient"),
                ("_scaled_dot_product_flash_attention", "sdpa flash"), ("_scaled_dot_product_cudnn_attention", "sdpa cudnn")]


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


@contextlib.contextmanager
def collect_inductor_code(sink: list):
    """Appends the output code of every graph inductor lowers inside the block (private hook, the one
    torch._inductor.utils.run_and_get_code uses; nothing is collected if it moved or on a cache hit)."""
    try:
        from torch._inductor.graph import GraphLowering
        original = GraphLowering.save_output_code
    except (ImportError, AttributeError):
        yield
        return

    def save_output_code(code):
        sink.append(code)
        if callable(original):
            original(code)

    GraphLowering.save_output_code = staticmethod(save_output_code)
    try:
        yield
    finally:
        GraphLowering.save_output_code = original


def kernel_from_code(name: str, codes: list, backend: str, device: torch.device) -> str:
    if backend != "inductor":
        return f"n/a ({backend})"
    if not codes:
        return "unknown (no code collected)"
    code = "\n".join(codes)
    found = [label for marker, label in CODE_MARKERS if marker in code]
    found = found[:1] if found and found[0] == "sdpa cpu flash" else found  # its name contains the CUDA one's
    if name.startswith("flex") and not found:
        found = ["flex main kernel" if device.type == "cuda" else f"flex {device.type} template"]
    if name.startswith("sdpa") and not found:
        found = ["sdpa math (decomposed)"]
    if not found:
        found = ["bmm/extern" if "extern_kernels.bmm" in code else "triton"]
    return ", ".join(found)


def make_point(model: str, batch: int, columns: int, device: torch.device, seed: int, length_range):
    cfg = MODELS[model]
    gen = torch.Generator().manual_seed(seed * 100003 + batch * 7 + columns)
    lo, hi = length_range
    lengths = torch.randint(lo, min(hi, columns) + 1, (batch,), generator=gen)
    shape = (batch, cfg["kv_heads"], columns, cfg["head_dim"])
    caches = []
    for _ in range(cfg["layers"]):
        k = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
        v = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
        caches.append((k, v))
    # the step's q is a transposed view of the projection output [B,1,H,HD]
    q = torch.randn(batch, 1, cfg["heads"], cfg["head_dim"], generator=gen).to(device, torch.bfloat16).transpose(1, 2)
    return cfg, q, caches, lengths.to(device), lengths


def reference_layer0(q, keys, values, lengths, scale):
    """float32 matmul reference over the valid columns (masked softmax), for the error column."""
    b, h, _, hd = q.shape
    kvh, t = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, kvh, h // kvh, hd).float()
    scores = qg @ keys.float().transpose(-1, -2) * scale
    valid = torch.arange(t, device=q.device)[None, :] < lengths.clamp(1, t)[:, None]
    p = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return (p @ values.float()).reshape(b, 1, h * hd)


def time_cuda_graph(graph, target_s: float = 0.25, min_reps: int = 20, max_reps: int = 300) -> tuple[float, int]:
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    estimate = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(estimate, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), reps


def measure(name, attend, q, caches, lengths, scale, device, backend) -> dict:
    def layer(q, k, v, lengths):
        return attend(q, k, v, lengths, scale)

    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)

    def all_layers():
        return [compiled(q, k, v, lengths) for k, v in caches]

    codes: list = []
    t0 = time.perf_counter()
    with collect_inductor_code(codes):
        first = compiled(q, *caches[0], lengths)
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    err = (first.float() - reference_layer0(q, *caches[0], lengths, scale)).abs().max().item()
    row = dict(compile_s=round(compile_s, 2), max_abs_err=err, kernel=kernel_from_code(name, codes, backend, device))
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                all_layers()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = all_layers()
        step_ms, reps = time_cuda_graph(graph)
        del graph, outs
    else:
        all_layers()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            all_layers()
            times.append((time.perf_counter() - t0) * 1e3)
        step_ms, reps = statistics.median(times), len(times)
    row.update(step_ms=step_ms, per_layer_us=step_ms * 1e3 / len(caches), reps=reps)
    return row


def probe_sdpa(q, keys, values, lengths, scale) -> dict:
    """Which SDPA backends accept each sdpa implementation's inputs (eager), and which kernels run by
    default (profiler)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, n) for n in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
                if hasattr(SDPBackend, n)]
    report = {}
    for name in ("sdpa", "sdpa_grouped"):
        attend = IMPLEMENTATIONS[name]
        entry = {}
        for backend in backends:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        attend(q, keys, values, lengths, scale)
                    torch.cuda.synchronize()
                    entry[backend.name] = "ok"
                except Exception as e:  # noqa: BLE001 - the probe reports every refusal
                    reasons = [str(w.message).splitlines()[0] for w in caught][:4]
                    entry[backend.name] = "refused: " + first_line(e) + (" | " + " | ".join(reasons) if reasons else "")
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                attend(q, keys, values, lengths, scale)
                torch.cuda.synchronize()
            names = sorted({evt.key for evt in prof.key_averages() if evt.device_type.name == "CUDA"})
            entry["default_kernels"] = [n[:100] for n in names][:8]
        except Exception as e:  # noqa: BLE001
            entry["default_kernels"] = "profiler failed: " + first_line(e)
        report[name] = entry
    return report


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, python=sys.version.split()[0], device=str(device))
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def print_row(r: dict) -> None:
    mode = "full" if r["tb"] is None else f"Tb={r['tb']}"
    head = f"{r['model']:<13} B={r['batch']:<4} T={r['columns']:<5} {r['impl']:<15} {mode:<8}"
    if r["status"] != "ok":
        print(f"{head} {r['status']}: {r.get('error', '')}", flush=True)
        return
    print(f"{head} {r['per_layer_us']:9.1f} us/layer {r['step_ms']:8.3f} ms x{r['layers']:<3}"
          f" {r['needed_GBps']:7.0f} GB/s filled {r['attended_GBps']:7.0f} GB/s attended"
          f"  err {r['max_abs_err']:.1e}  compile {r['compile_s']:5.1f}s  {r['kernel']}", flush=True)


def main(argv=None) -> int:
    start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test, e.g. on the CPU)")
    ap.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated, from: " + ", ".join(IMPLEMENTATIONS))
    ap.add_argument("--points", default=None, help="comma-separated model:batch:columns (default: the built-in list)")
    ap.add_argument("--modes", default="full,Tb", help="full, Tb or both")
    ap.add_argument("--bucket", type=int, default=None, help="Tb multiple (default 256; 128 with --quick)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no measurement after this many seconds")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = [n for n in impls if n not in IMPLEMENTATIONS]
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.points:
        points = [(m, int(b), int(t)) for m, b, t in (p.split(":") for p in args.points.split(","))]
    else:
        points = QUICK_POINTS if args.quick else POINTS
    length_range = QUICK_LENGTH_RANGE if args.quick else LENGTH_RANGE
    bucket = args.bucket or (128 if args.quick else 256)
    warnings.filterwarnings("ignore")

    payload = dict(environment=environment(device), compile_backend=backend, length_range=list(length_range),
                   bucket_multiple=bucket, sdpa_probe=None, results=[])
    print(json.dumps(payload["environment"]), flush=True)
    for model, batch, columns in points:
        cfg = MODELS[model]
        base = dict(model=model, batch=batch, columns=columns, layers=cfg["layers"])
        if time.perf_counter() - start > args.budget_s:
            for name in impls:
                for mode in modes:
                    payload["results"].append(dict(base, impl=name, tb=None if mode == "full" else -1,
                                                   status="skipped", error="time budget"))
            continue
        try:
            cfg, q, caches, lengths, host_lengths = make_point(model, batch, columns, device, args.seed, length_range)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
            print(f"{model} B={batch} T={columns}: could not allocate: {first_line(e)}", flush=True)
            payload["results"].append(dict(base, status="failed", error=first_line(e)))
            continue
        scale = cfg["head_dim"] ** -0.5
        tb = bucket_columns(int(host_lengths.max()), columns, multiple=bucket)
        elem = cfg["kv_heads"] * cfg["head_dim"] * 2 * 2  # bytes per column per row: K and V, bf16
        needed_bytes = int(host_lengths.sum()) * elem
        if device.type == "cuda" and payload["sdpa_probe"] is None:
            payload["sdpa_probe"] = dict(point=f"{model}:{batch}:{columns}", **probe_sdpa(q, *caches[0], lengths, scale))
            print("sdpa probe:", json.dumps(payload["sdpa_probe"], indent=1), flush=True)
        for name in impls:
            for mode in modes:
                cols = columns if mode == "full" else tb
                row = dict(base, impl=name, tb=None if mode == "full" else tb, mean_length=float(host_lengths.float().mean()),
                           max_length=int(host_lengths.max()), needed_bytes_per_layer=needed_bytes)
                if time.perf_counter() - start > args.budget_s:
                    row.update(status="skipped", error="time budget")
                else:
                    attend = IMPLEMENTATIONS[name] if mode == "full" else attend_first_columns(IMPLEMENTATIONS[name], tb)
                    try:
                        row.update(measure(name, attend, q, caches, lengths, scale, device, backend), status="ok")
                        seconds = row["per_layer_us"] * 1e-6
                        row["needed_GBps"] = needed_bytes / seconds / 1e9
                        row["attended_GBps"] = batch * cols * elem / seconds / 1e9
                    except Exception as e:  # noqa: BLE001 - report and continue with the next one
                        row.update(status="failed", error=first_line(e))
                    torch._dynamo.reset()
                payload["results"].append(row)
                print_row(row)
                write_json(args.json, payload)
        del q, caches, lengths
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.json, payload)
    print_table(payload["results"])
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def print_table(results: list) -> None:
    print("\nper-layer us (x layers = step ms) [GB/s over filled columns]")
    impls = list(dict.fromkeys(r["impl"] for r in results if "impl" in r))
    keys = list(dict.fromkeys((r["model"], r["batch"], r["columns"], r["tb"] is None) for r in results if "impl" in r))
    print(f"{'point':<32}" + "".join(f"{n:>24}" for n in impls))
    for model, batch, columns, full in keys:
        cells = []
        label = f"{model} B={batch} T={columns} {'full' if full else 'Tb'}"
        for name in impls:
            r = next((r for r in results if r.get("impl") == name and (r["model"], r["batch"], r["columns"]) ==
                      (model, batch, columns) and (r["tb"] is None) == full), None)
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
            else:
                cells.append(f"{r['per_layer_us']:.0f} ({r['step_ms']:.2f}) [{r['needed_GBps']:.0f}]")
        print(f"{label:<32}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
