"""Does an fp16 graph run on ONNX Runtime's CUDA provider, under which options, and how fast?

Made for CosyVoice2's HiFT vocoder, whose fp16 levels all scored "inf" in three GPU builds. The first
run of this probe on an H100 (docs/performance.md, seventh attempt) found no overflow: under the
runtime's cudnn_conv_algo_search=HEURISTIC, cuDNN's heuristic query finds no plan for one fp16 dilated
1-D convolution (HEURISTIC_QUERY_FAILED), the run fails, and a failed run scored inf. With the 1-D
convolutions padded to 2-D (cudnn_conv1d_pad_to_nc1d=1, now in the fp16 file's metadata) it runs
finite and faster than fp32. This runs the fp16 files under each option set, and a variant that
exposes every convolution's input and output:

    python scripts/probe_ort_fp16.py --engines-dir ENGINES/cosyvoice2-random --graph vocoder \
        --point opt --json probe.json

Prints one line per run (non-finite values in the output, worst error scaled by the reference's largest
value, ms per call, or the error) and writes them all to --json. "runtime" is what the runtime runs: its
own options (runtime/backends/onnxrt.py: cuda_provider_options) with the file's (ORT_CUDA_OPTIONS_KEY);
the reference is the fp32 file so. ORT's silent CPU retry of a failed CUDA run is turned off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from export.precision import FP16_LEVELS, to_fp16  # noqa: E402
from export.validate import run_error_summary  # noqa: E402
from models.spec import GraphSpec  # noqa: E402
from runtime.artifacts import ORT_CUDA_OPTIONS_KEY, Manifest, read_metadata  # noqa: E402
from runtime.backends.onnxrt import cuda_provider_options  # noqa: E402

# one change at a time from the runtime's options, then the two that matter together
OPTION_SETS = [
    ("runtime", {}, "all"),
    ("algo=EXHAUSTIVE", {"cudnn_conv_algo_search": "EXHAUSTIVE"}, "all"),
    ("algo=DEFAULT", {"cudnn_conv_algo_search": "DEFAULT"}, "all"),
    ("conv1d_pad_to_nc1d=1", {"cudnn_conv1d_pad_to_nc1d": "1"}, "all"),
    ("algo=DEFAULT,nc1d=1", {"cudnn_conv_algo_search": "DEFAULT", "cudnn_conv1d_pad_to_nc1d": "1"}, "all"),
    ("max_workspace=0", {"cudnn_conv_use_max_workspace": "0"}, "all"),
    ("prefer_nhwc=1", {"prefer_nhwc": "1"}, "all"),
    ("fuse_conv_bias=0", {"fuse_conv_bias": "0"}, "all"),
    ("graph_opt=basic", {}, "basic"),
    ("graph_opt=off", {}, "off"),
    # the file's own options undone: what three builds ran into
    ("without nc1d", {"cudnn_conv1d_pad_to_nc1d": "0"}, "all"),
]


CUDA = True


def session(path: str, overrides: dict, level: str, cuda: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    try:
        wanted = json.loads(read_metadata(path).get(ORT_CUDA_OPTIONS_KEY) or "{}")
    except ValueError:
        wanted = {}
    providers = ([("CUDAExecutionProvider", cuda_provider_options(0, **{**wanted, **overrides})), "CPUExecutionProvider"]
                 if cuda and CUDA else ["CPUExecutionProvider"])
    sess = ort.InferenceSession(path, opts, providers=providers)
    # ORT's Python session reruns a failed CUDA run on the CPU provider without a word: the first
    # probe on an H100 measured the CPU under the runtime's options that way. A failure is a result.
    sess.disable_fallback()
    return sess


def run_timed(sess, feed: dict, reps: int) -> tuple[list, float]:
    outs = sess.run(None, feed)  # the first run picks the kernels (EXHAUSTIVE benchmarks them here)
    t0 = time.perf_counter()
    for _ in range(reps):
        outs = sess.run(None, feed)
    return outs, (time.perf_counter() - t0) / max(reps, 1) * 1e3


def compare(outs: list, ref: list) -> dict:
    nonfinite = int(sum((~np.isfinite(o.astype(np.float32))).sum() for o in outs))
    worst = 0.0
    for o, r in zip(outs, ref):
        if o.shape != r.shape:
            return {"nonfinite": nonfinite, "scaled_error": None, "shape": list(o.shape)}
        o = o.astype(np.float32)
        ok = np.isfinite(o)
        scale = float(np.abs(r).max()) or 1.0
        if ok.any():
            worst = max(worst, float(np.abs(o[ok] - r[ok]).max()) / scale)
    return {"nonfinite": nonfinite, "scaled_error": worst}


def expose_convs(src: str, dst: str) -> list[dict]:
    """A copy of `src` whose every Conv / ConvTranspose input and output is also a graph output, and
    what each of those convolutions is (kernel, dilation, groups, channels), in graph order."""
    model = onnx.load(src)
    # the converter's value_info holds the tensors' fp16 types (its Cast nodes come after their
    # consumers in node order, so inferring the types again from scratch leaves most of them unknown)
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    inits = {t.name: t for t in model.graph.initializer}
    have = {o.name for o in model.graph.output}
    convs = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        w = inits.get(n.input[1])
        convs.append({"name": n.name, "op": n.op_type, "input": n.input[0], "output": n.output[0],
                      "weight_shape": list(w.dims) if w is not None else None,
                      "weight_type": onnx.TensorProto.DataType.Name(w.data_type) if w is not None else None,
                      **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()
                         if k in ("dilations", "group", "kernel_shape", "pads", "strides")}})
        for name in (n.input[0], n.output[0]):
            if name in have or name not in types:
                continue
            model.graph.output.append(types[name])
            have.add(name)
    onnx.save(model, dst)
    return convs


def conv1d_as_2d(src: str, dst: str) -> int:
    """A copy of `src` whose 1-D Conv / ConvTranspose nodes are 2-D ones over a height of 1 (Unsqueeze,
    the 2-D node, Squeeze): the same values through other cuDNN kernels. Returns how many it rewrote."""
    from onnx import helper, numpy_helper

    model = onnx.load(src)
    inits = {t.name: t for t in model.graph.initializer}
    axes = "probe_axis_2"
    model.graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), axes))
    nodes = []
    rewritten = 0
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 else None
        if w is None or len(w.dims) != 3:
            nodes.append(n)
            continue
        w.dims.insert(2, 1)  # [O, I/g, k] -> [O, I/g, 1, k]: the same bytes
        attrs = []
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            if a.name in ("kernel_shape", "dilations", "strides"):
                v = [1, *v]
            elif a.name == "pads":
                v = [0, v[0], 0, v[1]]
            elif a.name in ("output_padding", "output_shape"):
                v = [0, *v] if a.name == "output_padding" else [1, *v]
            attrs.append(helper.make_attribute(a.name, v))
        x4, y4 = f"{n.output[0]}__4d_in", f"{n.output[0]}__4d_out"
        nodes.append(helper.make_node("Unsqueeze", [n.input[0], axes], [x4], name=f"{n.name}__unsqueeze"))
        conv = helper.make_node(n.op_type, [x4, *n.input[1:]], [y4], name=n.name)
        conv.attribute.extend(attrs)
        nodes.append(conv)
        nodes.append(helper.make_node("Squeeze", [y4, axes], [n.output[0]], name=f"{n.name}__squeeze"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    onnx.save(model, dst)
    return rewritten


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines-dir", required=True)
    ap.add_argument("--graph", default="vocoder")
    ap.add_argument("--point", default="opt")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="probe_ort_fp16.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of this script")
    args = ap.parse_args()
    global CUDA
    CUDA = args.device == "cuda"

    manifest = Manifest.load(args.engines_dir)
    src = manifest.abspath(manifest.require(args.graph, "fp32", "onnx", "run python -m export onnx first"))
    spec = GraphSpec.from_json(read_metadata(src)["tts.spec"])
    feed = {k: v.numpy() for k, v in spec.sample_feed(args.point, seed=0).items()}
    print(f"{args.graph} at {args.point}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items()), flush=True)
    results: dict = {"graph": args.graph, "point": args.point, "runs": []}

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    ref, ms = run_timed(session(src, {}, "all"), feed, args.reps)
    print(f"reference fp32 (runtime options): {ms:.2f} ms, max |y| {max(float(np.abs(r).max()) for r in ref):.3g}", flush=True)
    tmp = tempfile.mkdtemp(prefix="probe-fp16-")
    files = {}
    for level in (FP16_LEVELS[0], FP16_LEVELS[-1]):  # all-fp16, and only the matmuls / convs in fp16
        dst = os.path.join(tmp, f"{level.name}.onnx")
        facts = to_fp16(src, dst, level)
        files[level.name] = dst
        print(f"{level.name}: matmul/conv in fp16 {facts['matmul_conv_in_fp16']}", flush=True)

    def record(label: str, file: str, build, reps: int = args.reps):
        row = {"file": file, "options": label}
        try:
            t0 = time.perf_counter()
            sess = build()
            row["session_s"] = round(time.perf_counter() - t0, 2)
            outs, ms = run_timed(sess, feed, reps)
            row.update(compare(outs, ref), ms=round(ms, 3), provider=sess.get_providers()[0])
        except Exception as e:  # noqa: BLE001 - a failing option set is a result like the others
            row["error"] = run_error_summary(e)
        results["runs"].append(row)
        save()
        err = row.get("scaled_error")
        print(f"{file:24s} {label:24s} nonfinite {row.get('nonfinite', '-'):>9} "
              f"error {('%.3g' % err) if err is not None else '-':>9} ms {row.get('ms', '-'):>8} {row.get('error', '')}",
              flush=True)

    def locate():
        """Where the first non-finite value appears (the runtime's options); exposing the tensors stops
        ORT from fusing them away, so the final output's state is recorded again."""
        exposed = os.path.join(tmp, "exposed.onnx")
        convs = expose_convs(files["all-fp16"], exposed)
        sess = session(exposed, {}, "all")
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        final = [o.name for o in onnx.load(src, load_external_data=False).graph.output]
        results["exposed_final_nonfinite"] = int(sum((~np.isfinite(values[n].astype(np.float32))).sum() for n in final))
        first = None
        for c in convs:
            for side in ("input", "output"):
                v = values.get(c[side])
                c[f"{side}_nonfinite"] = None if v is None else int((~np.isfinite(v.astype(np.float32))).sum())
                c[f"{side}_max_abs"] = (None if v is None else
                                        float(np.abs(np.where(np.isfinite(v), v, 0).astype(np.float32)).max(initial=0.0)))
            # the first convolution that makes a non-finite value out of a finite input
            if first is None and (c["output_nonfinite"] or 0) > 0 and not c["input_nonfinite"]:
                first = c
        results["convs"] = convs
        results["first_nonfinite_conv"] = first
        save()
        print(f"exposed variant: final output nonfinite {results['exposed_final_nonfinite']}; convs with "
              f"nonfinite output {sum(1 for c in convs if c['output_nonfinite'])} of {len(convs)}", flush=True)
        if first:
            print("first from a finite input: " + json.dumps({k: first[k] for k in first if k not in ("input", "output")}),
                  flush=True)

    # most telling first (a step limit may cut the rest): the runtime's options on both forms, where
    # the first non-finite value appears, then one option at a time
    as2d = os.path.join(tmp, "all-fp16-conv2d.onnx")
    print(f"all-fp16-conv2d: {conv1d_as_2d(files['all-fp16'], as2d)} 1-D convolutions as 2-D", flush=True)
    files["all-fp16-conv2d"] = as2d
    runs = [(name, label, overrides, level) for name in ("all-fp16", "all-fp16-conv2d")
            for label, overrides, level in OPTION_SETS[:1]]
    for name, label, overrides, level in runs:
        record(label, name, lambda f=files[name], o=overrides, lv=level: session(f, o, lv))
    try:
        locate()
    except Exception as e:  # noqa: BLE001 - the option sets below still tell something
        print(f"exposed variant failed: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}", flush=True)
    for label, overrides, level in OPTION_SETS[1:]:
        record(label, "all-fp16", lambda o=overrides, lv=level: session(files["all-fp16"], o, lv))
    for label, overrides, level in OPTION_SETS[1:4]:
        record(label, "all-fp16-conv2d", lambda o=overrides, lv=level: session(as2d, o, lv))
    record("cpu provider", "all-fp16", lambda: session(files["all-fp16"], {}, "all", cuda=False), reps=1)
    heavy = FP16_LEVELS[-1].name
    for label, overrides, level in OPTION_SETS[:5]:
        record(label, heavy, lambda o=overrides, lv=level: session(files[heavy], o, lv))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
