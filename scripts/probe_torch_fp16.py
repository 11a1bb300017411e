"""Does a graph's module give inf in fp16 under torch on the same GPU? The torch side of
scripts/probe_ort_fp16.py: if torch's cuDNN convolutions are finite in fp16 where ONNX Runtime's CUDA
provider gives inf, the fault is in the kernels ORT picks, not in fp16's range.

    python scripts/probe_torch_fp16.py --model cosyvoice2-random --graph vocoder --json probe-torch.json

Runs the module at each point in fp32 (the reference) and under autocast fp16 (convolutions and
matmuls in fp16; what follows them stays fp16 unless autocast lists it for fp32), with cuDNN's
benchmark mode off and on (a module all in fp16 does not run: some of its tensors are made fp32); prints non-finite counts and the worst error scaled by the
reference's largest value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from models.registry import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cosyvoice2-random")
    ap.add_argument("--graph", default="vocoder")
    ap.add_argument("--points", default="min,opt,max")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default="probe_torch_fp16.json")
    args = ap.parse_args()

    model = load_model(args.model, device="cpu")
    spec = model.graph_specs()[args.graph]
    module = model.graph_module(args.graph).float().eval().to(args.device)
    rows = []
    for point in args.points.split(","):
        feed = [t.to(args.device) for t in spec.sample_feed(point, seed=0).values()]
        with torch.inference_mode():
            ref = module(*feed)
        ref = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
        variants = [("autocast-fp16", False), ("autocast-fp16", True)]
        for name, bench in variants:
            torch.backends.cudnn.benchmark = bench
            row = {"point": point, "variant": name, "cudnn_benchmark": bench}
            try:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    with torch.autocast("cuda" if args.device.startswith("cuda") else "cpu", dtype=torch.float16):
                        out = module(*feed)
                out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                row["s"] = round(time.perf_counter() - t0, 3)
                row["nonfinite"] = int(sum((~torch.isfinite(o.float())).sum().item() for o in out))
                worst = 0.0
                for o, r in zip(out, ref):
                    o = o.float()
                    ok = torch.isfinite(o)
                    if ok.any():
                        worst = max(worst, ((o - r).abs()[ok].max() / r.abs().max().clamp_min(1e-12)).item())
                row["scaled_error"] = worst
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result
                row["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "graph": args.graph, "torch": torch.__version__,
                           "cudnn": torch.backends.cudnn.version(), "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
