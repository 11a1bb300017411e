"""Export one graph of a model to ONNX, with its spec inside, and check the result.

Names, dynamic axes and their ranges come from the graph's spec. The file carries metadata
(`tts.*` keys) so the runtime configures itself from it: family, stage, graph, the spec as JSON,
sample rate, precision, and the hash of the checkpoint it came from.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
import warnings

import torch

from models.errors import UserError
from models.family import TTSModel, provenance_fingerprint
from models.spec import GraphSpec
from export.validate import TOLERANCE, scaled_error
from runtime.artifacts import set_metadata

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to <graph>.onnx.data (protobuf caps files at 2 GB)


def torch_dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export dynamic shapes from the spec: one Dim per spec dim, `X*k` as a derived dim, and a
    free dim for sums such as `P+S` (torch.export cannot express them; the spec still checks them)."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(name):
        if name not in dims:
            d = spec.dim(name)
            dims[name] = torch.export.Dim(name, min=max(d.min, 1), max=max(d.max, 2))
        return dims[name]

    out = []
    for t in spec.inputs:
        axes = {}
        for i, s in enumerate(t.shape):
            if isinstance(s, int):
                continue
            if s.isidentifier():
                axes[i] = dim(s)
            elif m := re.fullmatch(r"([A-Za-z_]\w*)\*(\d+)", s):
                axes[i] = dim(m.group(1)) * int(m.group(2))
            else:
                axes[i] = torch.export.Dim.DYNAMIC
        out.append(axes or None)
    return tuple(out)


def example_feed(spec: GraphSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Trace inputs at the opt point, lifted to >= 2 on every dim (torch.export specialises 0 and 1)."""
    return spec.sample_feed({d.name: min(max(d.opt, 2), max(d.max, 2)) for d in spec.dims}, seed=seed)


def metadata(model: TTSModel, spec: GraphSpec, precision: str, source_sha256: str) -> dict[str, str]:
    made_from = model.provenance(spec.name)
    return {
        "tts.family": model.family,
        "tts.model": model.name,
        "tts.graph": spec.name,
        "tts.stage": spec.stage,
        "tts.spec": spec.to_json(),
        "tts.sample_rate": str(model.sample_rate),
        "tts.precision": precision,
        "tts.source": model.source,
        "tts.source_sha256": source_sha256,
        # what the runtime checks before it runs the file: the weights, config and spec it computes with
        "tts.fingerprint": provenance_fingerprint(made_from),
        "tts.provenance": json.dumps(made_from, sort_keys=True),
        "tts.exporter": f"torch {torch.__version__}",
    }


def export_graph(model: TTSModel, name: str, path: str, source_sha256: str = "", optimize: bool = True) -> dict:
    """Export graph `name` of `model` to `path` (fp32) and check it; returns timing and check facts."""

    spec = model.graph_specs()[name]
    module = model.graph_module(name).float().eval().to("cpu")
    feed = example_feed(spec)
    args = tuple(feed[t.name] for t in spec.inputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            dynamic = torch_dynamic_shapes(spec)
            params = inspect.signature(module.forward).parameters.values()
            if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
                dynamic = (dynamic,)  # forward(*inputs): torch.export wants one entry for the *args tuple
            with torch.inference_mode(False), torch.no_grad():
                program = torch.onnx.export(
                    module, args, None, dynamo=True, dynamic_shapes=dynamic,
                    input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                    opset_version=OPSET, optimize=optimize, verbose=False, report=False)
            if os.path.exists(path + ".data"):
                os.remove(path + ".data")
            program.save(path, external_data=external)
        except Exception as e:  # the exporter raises many types; the message is what helps
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"exporting graph {name} of {model.name} to ONNX failed: {first[:300]}",
                            "report this with the command you ran; the torch backend still works") from e
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)
    export_s = time.perf_counter() - t0
    set_metadata(path, metadata(model, spec, "fp32", source_sha256))
    return {"export_seconds": round(export_s, 2), **check_onnx(path, spec, module)}


def check_onnx(path: str, spec: GraphSpec, module: torch.nn.Module | None = None, point: str = "opt",
               seed: int = 7) -> dict:
    """onnx checker + shape inference + one ONNX Runtime run (against `module` when given)."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise UserError(f"{path} fails the ONNX checker: {str(e).splitlines()[0][:200]}", "export again") from None
    inferred = path + ".shapes.tmp"
    try:
        onnx.shape_inference.infer_shapes_path(path, inferred)
    finally:
        if os.path.exists(inferred):
            os.remove(inferred)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the optimizer's warnings (CastLike nodes it cannot fold) are not the user's
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if names != [t.name for t in spec.inputs]:
        raise UserError(f"{path} has inputs {names}, the spec says {[t.name for t in spec.inputs]}.",
                        "export again with the current code")
    feed = spec.sample_feed(point, seed=seed)
    outs = sess.run(None, {k: v.numpy() for k, v in feed.items()})
    facts = {"ort_inputs": names, "ort_outputs": [o.name for o in sess.get_outputs()]}
    if module is not None:
        with torch.no_grad():
            ref = module(*[feed[t.name] for t in spec.inputs])
        ref = (ref,) if isinstance(ref, torch.Tensor) else ref
        facts["ort_vs_torch_at_opt"] = errors = {t.name: scaled_error(o, r.float().numpy())[1]
                                                 for t, o, r in zip(spec.outputs, outs, ref)}
        # an exported graph that computes something else than its torch module is an export bug, not a
        # number to print and go on with (NaN compares false, so it fails too)
        bad = {k: v for k, v in errors.items() if not v <= TOLERANCE["fp32"]}
        if bad:
            name, err = max(bad.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
            raise UserError(f"the exported {spec.name} ({os.path.basename(path)}) differs from its torch module: output "
                            f"{name} is off by {err:.1e} of its scale at the opt shape (fp32 tolerance "
                            f"{TOLERANCE['fp32']:g}).", "report this with the command you ran; the torch backend still works")
    return facts

