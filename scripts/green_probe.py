"""Does a CUDA green context keep a heavy load off a latency-bound step's SMs? (GPU only)

A stand-in for the engine's two sides: the "step" is a CUDA graph of many small GEMMs (like one LM
decode step at a small batch), the "load" a CUDA graph of large GEMMs replayed back to back in another
thread (like the flow solver's calls). The step's device time is measured with CUDA events alone, with
the load on an ordinary stream, and with the load on a stream of a green context that leaves
`total - n` SMs to it, for each n of --free-sms. Prints a table and writes JSON.

    python scripts/green_probe.py --free-sms 8,16,32 --json results/green_probe.json
"""
import argparse
import json
import threading
import time

import torch


def make_graph(fn, stream):
    fn()  # warm: cuBLAS picks its kernels outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        fn()
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--free-sms", default="8,16,32")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    total = props.multi_processor_count
    from torch.cuda import green_contexts as gcs
    facts = {"gpu": props.name, "sms": total, "torch": torch.__version__, "green_supported": gcs.SUPPORTED,
             "green_has_stream": hasattr(gcs.GreenContext, "Stream")}
    print(facts, flush=True)
    # the step: 24 layers x (4 small GEMMs) at batch 16, bf16 (a 0.5B LM's decode step in shape)
    x = torch.randn(16, 896, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(896, 4864, device=dev, dtype=torch.bfloat16) / 30 for _ in range(2)]
    wd = torch.randn(4864, 896, device=dev, dtype=torch.bfloat16) / 70

    def step():
        h = x
        for _ in range(24):
            h = h + (torch.nn.functional.silu(h @ ws[0]) * (h @ ws[1])) @ wd
        return h

    step_stream = torch.cuda.Stream(dev)
    step_graph = make_graph(step, step_stream)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)

    def load():
        y = a
        for _ in range(8):
            y = (y @ a) / 64
        return y

    def time_steps() -> float:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
        with torch.cuda.stream(step_stream):
            for s, e in ev:
                s.record()
                step_graph.replay()
                e.record()
                e.synchronize()  # the engine reads every step's tokens before the next one
        return sum(s.elapsed_time(e) for s, e in ev) / len(ev)

    def with_load(stream, capture_stream=None) -> tuple[float, float]:
        g = make_graph(load, capture_stream or stream)
        stop = threading.Event()
        done = [0]

        def spin():
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    g.replay()
                    stream.synchronize()
                    done[0] += 1
        t = threading.Thread(target=spin)
        t0 = time.perf_counter()
        t.start()
        time.sleep(0.2)
        ms = time_steps()
        stop.set()
        t.join()
        return ms, done[0] / (time.perf_counter() - t0)

    rows = [{"case": "step alone", "step_ms": time_steps()}]
    ms, rate = with_load(torch.cuda.Stream(dev))
    rows.append({"case": "load on all SMs", "step_ms": ms, "load_calls_per_s": rate})
    for free in (int(v) for v in args.free_sms.split(",")):
        try:
            gc = gcs.GreenContext.create(num_sms=total - free, device_id=dev.index or 0)
            ms, rate = with_load(gc.Stream())
            rows.append({"case": f"load on a green context of {total - free} SMs", "step_ms": ms, "load_calls_per_s": rate})
        except Exception as e:  # noqa: BLE001 - a probe: report what failed and go on
            rows.append({"case": f"green context of {total - free} SMs", "error": f"{type(e).__name__}: {e}"[:300]})
    # the same green stream replaying a graph captured on an ordinary stream: where do its kernels run?
    free = max(int(v) for v in args.free_sms.split(","))
    try:
        gc = gcs.GreenContext.create(num_sms=total - free, device_id=dev.index or 0)
        ms, rate = with_load(gc.Stream(), capture_stream=torch.cuda.Stream(dev))
        rows.append({"case": f"captured elsewhere, replayed on {total - free} SMs", "step_ms": ms, "load_calls_per_s": rate})
    except Exception as e:  # noqa: BLE001
        rows.append({"case": "captured elsewhere", "error": f"{type(e).__name__}: {e}"[:300]})
    # captured on a second stream of the same green context (what the engine's batcher does: its
    # own stream carries the request threads' copies and must not capture)
    try:
        gc = gcs.GreenContext.create(num_sms=total - free, device_id=dev.index or 0)
        ms, rate = with_load(gc.Stream(), capture_stream=gc.Stream())
        rows.append({"case": f"captured on a sibling green stream, {total - free} SMs", "step_ms": ms,
                     "load_calls_per_s": rate})
    except Exception as e:  # noqa: BLE001
        rows.append({"case": "captured on a sibling green stream", "error": f"{type(e).__name__}: {e}"[:300]})
    for r in rows:
        print(f"{r['case']:<42} " + (f"step {r['step_ms']:.3f} ms" if "step_ms" in r else r["error"])
              + (f", load {r['load_calls_per_s']:.1f} calls/s" if "load_calls_per_s" in r else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
