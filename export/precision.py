"""FP16 and INT8 artifacts: precision lives in the ONNX file.

TensorRT 11 dropped weak typing (no FP16/INT8 builder flags, no calibrators): every network is
strongly typed, so the ONNX must already say which tensors are FP16 and where INT8 Q/DQ pairs sit.
We make those files with well-kept tools and choose how much to convert by measurement:

- FP16: ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`), graph I/O kept FP32.
  Candidates go from "everything FP16" to more FP32 islands (normalisations and reductions, then
  special functions and the modules the graph's spec declares (its fp32 islands and sensitive
  modules: f0 predictor, NSF source, (i)STFT, time embedding, ...)), validated at the spec's min /
  opt / max against the FP16 tolerance. When "everything FP16" fails, the build does not fall back a
  whole level: it bisects (`bisect_keep`) from the first level that passes (or from every float
  node) to the nodes responsible, and keeps exactly those in FP32 (listed in the manifest).
- INT8: ONNX Runtime static quantisation to explicit, symmetric Q/DQ (what TensorRT consumes),
  per-channel weights, MinMax calibration on captured pipeline inputs (export/calibration.py).
  Candidates: MatMul/Gemm + convolutions, then MatMul/Gemm only (the LLM body and the estimator's
  matmuls carry the FLOPs); when neither passes, the same bisection finds the nodes whose
  quantisation breaks the tolerance and leaves exactly those unquantised.

No level is "everything FP32": a file that reaches no FP16 matmul / convolution (or no INT8 one) is a
fallback, which `reached_precision` reads from the file's content and `python -m export build`
refuses unless `--allow-fallback` is given (then it is recorded as fp32, loudly).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from models.errors import UserError
from models.spec import GraphSpec
from runtime.artifacts import ORT_CUDA_OPTIONS_KEY

EXTERNAL_DATA_BYTES = 1 << 30

NORM_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare",
            "ReduceL2", "Pow", "Sqrt", "Reciprocal", "Softmax", "CumSum"]
# the activations that are whole special functions in one ONNX op (Mish = x tanh(softplus(x)), 43 of them in
# the CosyVoice2 estimator) belong with Exp / Tanh: on the H100 its fp16 estimator kept missing the tolerance
# with norms and the other special functions fp32 (2.19e-02 against 0.02) and passed with everything but
# matmul / conv fp32 (2.22e-03), while the same fp16 graph on ORT's CPU provider was 7.2e-03 off: the
# culprit is a CUDA fp16 kernel outside both lists. Keeping these four fp32 did not pass it either (2.14e-02
# on the H100, the next session); its bisection kept 460 light nodes fp32 instead (docs/performance.md)
SPECIAL_OPS = ["Exp", "Log", "Sin", "Cos", "Erf", "Tanh", "Mod", "Floor", "Round", "Div",
               "Mish", "Softplus", "Sigmoid", "Gelu"]
HEAVY_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose"]


@dataclass
class FP16Level:
    name: str
    block_ops: list = field(default_factory=list)
    spec_scopes: bool = False  # keep the graph's declared fp32 islands and sensitive modules in FP32
    only_heavy: bool = False  # keep everything but HEAVY_OPS in FP32
    all_fp32: bool = False


# tried in order; the first that passes is kept (all-fp16) or bisected down (the others)
FP16_LEVELS = [
    FP16Level("all-fp16"),
    FP16Level("fp32-norms", NORM_OPS),
    FP16Level("fp32-norms-special", NORM_OPS + SPECIAL_OPS, spec_scopes=True),
    FP16Level("fp16-matmul-conv-only", NORM_OPS + SPECIAL_OPS, spec_scopes=True, only_heavy=True),
]

INT8_LEVELS = [("matmul+conv", ["MatMul", "Gemm", "Conv", "ConvTranspose"]), ("matmul", ["MatMul", "Gemm"])]
INT8_OPS = INT8_LEVELS[0][1]


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [s for s in ast.literal_eval(p.value) if isinstance(s, str)]
            except (ValueError, SyntaxError):
                return []
    return []


def fp32_nodes(model: onnx.ModelProto, level: FP16Level, spec: GraphSpec) -> list[str]:
    """Names of the nodes that level keeps in FP32 (module scopes from the graph's spec: its fp32
    islands and sensitive modules, matched against the exporter's name scopes)."""
    scopes = set(spec.fp32_scopes) | set(spec.sensitive_scopes) if level.spec_scopes else set()
    names = []
    for n in model.graph.node:
        # any component of a scope path, as `GraphSpec.in_fp32_scope` reads parameter paths: a graph
        # whose module wraps the one declaring the islands (the CosyVoice2 vocoder's source cache around
        # HiFT: "hift.f0_predictor") has them one level down, where the first component alone never matched
        scoped = any(c in scopes for part in _scopes(n) for c in part.split("."))
        if level.all_fp32 or n.op_type in level.block_ops or scoped or (level.only_heavy and n.op_type not in HEAVY_OPS):
            names.append(n.name)
    return names


def _save(model: onnx.ModelProto, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if large:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save(model, path)


def _dedupe_casts(model: onnx.ModelProto) -> None:
    """Repair two defects of ORT's float16 converter when one tensor feeds several FP32 islands: it
    inserts the same Cast twice (same input, same output name) and names nodes alike. The second
    identical Cast is dropped (its output already exists); other duplicate node names get a suffix."""
    produced: dict[str, onnx.NodeProto] = {}
    keep, names = [], {}
    for n in model.graph.node:
        dup = [o for o in n.output if o in produced]
        if dup:
            first = produced[dup[0]]
            if n.op_type == first.op_type == "Cast" and list(n.input) == list(first.input) and n.attribute == first.attribute:
                continue
            raise ValueError(f"float16 conversion produced two different definitions of {dup[0]}")
        for o in n.output:
            produced[o] = n
        if n.name in names:
            names[n.name] += 1
            n.name = f"{n.name}__{names[n.name]}"
        else:
            names[n.name] = 0
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _exact_fp32_islands(model: onnx.ModelProto, src: str) -> int:
    """Make the nodes the converter was told to keep in FP32 really compute on FP32 values. The
    converter stores every float tensor as FP16 and casts at the edges of blocked nodes, so a value
    passed between two blocked nodes is rounded to FP16 (Cast to fp16, then back to fp32), and a weight
    they use is stored in FP16 (cast up at use): measured on the tiny Orpheus LLM, keeping every float
    node "in fp32" still missed the FP16 tolerance through its RoPE frequencies and tied embedding.
    Here a Cast to fp32 of an FP16 copy reads the FP32 original instead: the tensor before the
    down-cast, or the source model's initializer. Returns how many casts up were bypassed."""
    types = _elem_types(model)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    # the source's FP32 initializers, without their data: only those needed are read (a 3B LLM's
    # weights are not held twice)
    source = onnx.load(src, load_external_data=False)
    originals = {t.name: t for t in source.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    own_casts = {n.name for n in source.graph.node if n.op_type == "Cast"}  # the model's own roundings stay
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    drop, added = set(), {}
    for n in g.node:
        if n.op_type != "Cast" or not any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute):
            continue
        x = n.input[0]
        exact = None
        if x in inits and inits[x].data_type == onnx.TensorProto.FLOAT16 and x in originals:
            exact = f"{x}__fp32"
            if exact not in added:
                t = onnx.TensorProto()
                t.CopyFrom(originals[x])
                if onnx.external_data_helper.uses_external_data(t):
                    onnx.external_data_helper.load_external_data_for_tensor(t, os.path.dirname(os.path.abspath(src)))
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                t.name = exact
                added[exact] = t
        elif (x in producer and producer[x].op_type == "Cast" and producer[x].name not in own_casts
              and types.get(producer[x].input[0]) == onnx.TensorProto.FLOAT):
            exact = producer[x].input[0]
        if exact is None:
            continue
        if n.output[0] in outputs:  # a graph output keeps its name: the Cast becomes an Identity of the original
            n.op_type = "Identity"
            del n.attribute[:]
            n.input[0] = exact
        else:
            rename[n.output[0]] = exact
            drop.add(id(n))
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    keep = [n for n in g.node if id(n) not in drop]
    g.initializer.extend(added.values())
    # casts and FP16 copies nobody reads any more
    while True:
        used = {i for n in keep for i in n.input} | outputs
        dead = [n for n in keep if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        keep = [n for n in keep if n not in dead]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | outputs
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    produced = {o for n in keep for o in n.output}
    vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vi)
    return len(drop)


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def index_arithmetic(model: onnx.ModelProto, types: dict[str, int] | None = None) -> list[str]:
    """Nodes that turn integer indices (positions, lengths) into floats and compute on them with
    constants only: RoPE's positions x inverse frequencies and their cos / sin. They stay FP32 at every
    level, as the torch models compute them (in float32 whatever the model's dtype): FP16 has 11
    significant bits, so a position past 2048 rounds (4608 to a multiple of 4) and its rotation angle is
    off by radians. Measured on the real-size CosyVoice2 LLM on an H100: every FP16 level missed the
    tolerance at the max profile point (relative error 0.81, norms kept FP32 or not) while torch's own
    FP16 model is within 1.5e-3 there. Seeds are the Casts of integer / boolean tensors to a float type;
    a node joins when one of its float inputs is in the set and every other one is in it too or a
    constant (initializer or Constant node). Where an activation comes in (x * cos), the set ends; so
    does it at a constant past FP16's range: that is a mask's fill value ((1 - mask) * -1e10 in the
    CosyVoice2 estimator), which the converter clamps to -65504 in FP16 and which, kept FP32, would reach
    the FP16 scores as -inf at the boundary cast."""
    from onnx import numpy_helper

    types = types if types is not None else _elem_types(model)
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    # small float constants by the name a node reads them under (a Constant node's is its output)
    small = {t.name: t for t in g.initializer if not t.external_data and int(np.prod(t.dims)) <= 4096}
    small.update({n.output[0]: a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    out_of_fp16 = set()
    for name, t in small.items():
        if t.data_type in FLOAT_TYPES and int(np.prod(t.dims)) <= 4096:
            v = numpy_helper.to_array(t)
            if v.size and float(np.abs(v).max()) > 65504:
                out_of_fp16.add(name)

    def is_float(name):
        return types.get(name) in FLOAT_TYPES

    derived: set[str] = set()
    names = []
    for n in g.node:  # ONNX graphs are topologically sorted
        ins = [i for i in n.input if i]
        float_ins = [i for i in ins if is_float(i)]
        if n.op_type in ("Cast", "CastLike") and ins and not is_float(ins[0]) and any(is_float(o) for o in n.output):
            seed = n.op_type == "Cast" or all(i in consts or i in derived for i in float_ins)
        else:
            seed = False
        joins = bool(float_ins) and any(i in derived for i in float_ins) and \
            all(i in derived or (i in consts and i not in out_of_fp16) for i in float_ins)
        if seed or joins:
            derived.update(o for o in n.output if is_float(o))
            names.append(n.name)
    return names


def _load_inferred(src: str) -> onnx.ModelProto:
    """The model at `src` with every value's type inferred, which the FP16 converter needs to place its
    casts. ONNX's shape inference takes a serialised model, and one past protobuf's 2 GB cannot be
    serialised (the Orpheus LLM's 13 GB of weights: "Failed to serialize proto"): the inference runs on
    the graph without its weights (their shapes are in the proto), and the weights are loaded after."""
    model = onnx.load(src, load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    onnx.external_data_helper.load_external_data_for_model(inferred, os.path.dirname(os.path.abspath(src)))
    return inferred


def fp16_conv1d_nodes(model: onnx.ModelProto) -> list[str]:
    """The Conv / ConvTranspose nodes whose weight is a 1-D kernel stored in fp16."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 else None
        if w is not None and len(w.dims) == 3 and w.data_type == onnx.TensorProto.FLOAT16:
            out.append(n.name)
    return out


def ort_cuda_options_of_fp16(model: onnx.ModelProto) -> dict[str, str]:
    """The ONNX Runtime CUDA options an fp16 file needs on top of the runtime's own.

    fp16 1-D convolutions: with the runtime's cudnn_conv_algo_search=HEURISTIC (which keeps fp32 1-D
    convolutions out of ORT's slow fallback path), cuDNN's heuristic query finds no plan for some fp16
    dilated 1-D convolutions and the run fails (HiFT at opt on an H100: node_conv1d_74, 64 channels,
    kernel 7, dilation 5, HEURISTIC_QUERY_FAILED). Padding them to 2-D (NC1D) gives cuDNN kernels it
    has: the all-fp16 HiFT then ran finite, 7.5 ms against 10.9 ms in fp32 (docs/performance.md,
    seventh attempt)."""
    return {"cudnn_conv1d_pad_to_nc1d": "1"} if fp16_conv1d_nodes(model) else {}


def to_fp16(src: str, dst: str, level: FP16Level, keep: list[str] | None = None, label: str | None = None) -> dict:
    """Write an FP16 variant of `src` keeping `level`'s nodes (or exactly `keep`) in FP32; returns what was kept."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _load_inferred(src)
    meta = {p.key: p.value for p in model.metadata_props}
    if keep is None:
        keep = fp32_nodes(model, level, GraphSpec.from_json(meta["tts.spec"]))
    level = FP16Level(label, all_fp32=False) if label else level
    # index arithmetic stays FP32 at every level and in every bisection (index_arithmetic says why)
    index_nodes = [n for n in index_arithmetic(model, _elem_types(model, infer=False)) if n not in set(keep)]
    keep = [*keep, *index_nodes]
    # the counts come from the source graph: the converter rewrites `model` in place
    ops: dict[str, int] = {}
    kept = set(keep)
    for n in model.graph.node:
        if n.name in kept:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    total_compute = sum(1 for n in model.graph.node if n.op_type in HEAVY_OPS)
    fp16_compute = sum(1 for n in model.graph.node if n.op_type in HEAVY_OPS and n.name not in kept)
    total_nodes = len(model.graph.node)
    if level.all_fp32:
        converted = model
    else:
        # the value types come from _load_inferred (the converter's own inference fails past 2 GB)
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                             node_block_list=keep, disable_shape_infer=True)
        _dedupe_casts(converted)
        _exact_fp32_islands(converted, src)
    del converted.metadata_props[:]
    meta = {**meta, "tts.precision": "fp16", "tts.fp16_level": level.name}
    meta.pop(ORT_CUDA_OPTIONS_KEY, None)
    cuda_options = ort_cuda_options_of_fp16(converted)
    if cuda_options:
        meta[ORT_CUDA_OPTIONS_KEY] = json.dumps(cuda_options, sort_keys=True)
    for k, v in meta.items():
        converted.metadata_props.add(key=k, value=v)
    _save(converted, dst)
    return {"level": level.name, "fp32_nodes": len(keep), "index_arithmetic_fp32": len(index_nodes),
            "nodes": total_nodes, "fp32_ops": ops,
            "matmul_conv_in_fp16": f"{fp16_compute}/{total_compute}", "fp32_node_names": keep}


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over captured feeds."""

    def __init__(self, feeds: list[dict], input_names: list[str]):
        self._it = iter([{k: np.ascontiguousarray(f[k].numpy()) for k in input_names} for f in feeds])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by quantize_static
        pass


def to_int8(src: str, dst: str, feeds: list[dict], op_types: list[str], exclude: list[str] | None = None,
            cache: str | None = None) -> dict:
    """Write a Q/DQ INT8 variant of `src` (symmetric, per-channel weights) quantising the nodes of
    `op_types` except `exclude`. `cache`: a file for the calibration ranges, so that the candidates of
    one graph (same op types, other exclusions) calibrate once."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(src, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    inputs = [i.name for i in model.graph.input]
    exclude = list(exclude or [])
    quantizable = [n.name for n in model.graph.node if n.op_type in op_types]
    if not op_types or not set(quantizable) - set(exclude):
        shutil.copy(src, dst)
        if os.path.exists(src + ".data"):
            shutil.copy(src + ".data", dst + ".data")
        quantized = 0
    else:
        if not feeds:
            raise UserError(f"no calibration data for {os.path.basename(src)}.", "run the build again (it captures them)")
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        tmp = dst + ".tmp.onnx"
        logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer advises pre-processing on every call
        extra = {}
        if cache and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            extra["calibration_cache_path"] = cache  # newer onnxruntime only; older ones calibrate every time
        quantize_static(src, tmp, FeedReader(feeds, inputs), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=op_types, nodes_to_exclude=exclude or None,
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=os.path.exists(src + ".data"),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, **extra)
        q = onnx.load(tmp)
        for p in (tmp, tmp + ".data"):
            if os.path.exists(p):
                os.remove(p)
        quantized = sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear")
        del q.metadata_props[:]
        for k, v in meta.items():
            q.metadata_props.add(key=k, value=v)
        _save(q, dst)
    m = onnx.load(dst, load_external_data=False)
    del m.metadata_props[:]
    for k, v in {**meta, "tts.precision": "int8", "tts.int8_ops": ",".join(op_types) or "none"}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, dst)
    return {"ops": op_types, "dequantize_nodes": quantized, "calibration_samples": len(feeds),
            "unquantized_nodes": len([n for n in quantizable if n in set(exclude)]), "unquantized_node_names": exclude}


def write_sidecar(path: str, facts: dict) -> None:
    with open(path, "w") as f:
        json.dump(facts, f, indent=1)


# -- what a file really computes in -------------------------------------------------------------------
def _elem_types(model: onnx.ModelProto, infer: bool = True) -> dict[str, int]:
    """Tensor name -> ONNX element type, after type inference (no external data needed; `infer=False`
    for a model already inferred, whose weights may be past what inference can serialise)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False) if infer else model
    except Exception:  # noqa: BLE001 - inference is best effort; the declared types remain
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    types[n.output[0]] = a.t.data_type
        elif n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to":
                    types[n.output[0]] = a.i
    return types


def reached_precision(path: str) -> dict:
    """The precision a file's matmuls and convolutions (HEAVY_OPS, where the FLOPs are) really run
    in, read from its content, not its label: "fp16" / "int8" when all of them do, "fp16+fp32" /
    "int8+fp32" when some do, "fp32" when none does."""
    model = onnx.load(path, load_external_data=False)
    types = _elem_types(model)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    heavy = [n for n in model.graph.node if n.op_type in HEAVY_OPS]
    # an op is INT8 when both its operands (data and weight; not a bias) come out of DequantizeLinear:
    # an op left unquantised may still read an activation quantised for a sibling
    fp16 = sum(1 for n in heavy if any(types.get(i) == onnx.TensorProto.FLOAT16 for i in n.input[:2] if i))
    int8 = sum(1 for n in heavy if len(n.input) >= 2 and all(i in dequantized for i in n.input[:2]))
    low, name = (int8, "int8") if int8 else (fp16, "fp16")
    reached = "fp32" if not low else name if low == len(heavy) else f"{name}+fp32"
    return {"reached": reached, "matmul_conv": len(heavy), "matmul_conv_fp16": fp16, "matmul_conv_int8": int8}


def fp16_candidates(model: onnx.ModelProto) -> list[str]:
    """Nodes (topological order) the float16 converter would run in FP16: those touching a float32
    tensor, minus the op types it never converts. The bisection's search space."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    types = _elem_types(model)
    never = set(DEFAULT_OP_BLOCK_LIST)
    return [n.name for n in model.graph.node if n.op_type not in never
            and any(types.get(t) == onnx.TensorProto.FLOAT for t in (*n.input, *n.output) if t)]


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose two operands are both computed from the inputs (attention's Q x K^T and
    probabilities x V), as against a layer's activations x weights. Static int8 gives such a product one
    scale per tensor for values with no fixed range (softmax probabilities are mostly tiny, keys carry
    outliers): the CosyVoice2 estimator was 0.79-0.82 off with every MatMul quantised, on the CPU and on
    the H100 alike. A weight is an initializer, a Constant, or computed from those alone (a Transpose)."""
    const = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # graph order is topological
        if n.op_type == "Constant" or (n.input and all(i in const or not i for i in n.input)):
            const.update(n.output)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in const for i in n.input)]


def int8_candidates(src: str, op_types: list[str] = INT8_OPS) -> list[str]:
    model = onnx.load(src, load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types]


# -- bisection to the nodes responsible ---------------------------------------------------------------
@dataclass
class Bisection:
    keep: list  # nodes left in FP32 / unquantised: the result, which passed validation
    responsible: list  # nodes proven needed: converting each alone (with the rest of `keep`) failed
    unresolved: list  # nodes kept without proof because the round limit was reached
    rounds: int  # validations run


def bisect_keep(start: list[str], passes, max_rounds: int, converting_all_fails: bool = True) -> Bisection:
    """From `start`, a set of nodes kept in high precision that passes validation, find a small set
    that still passes. Converting a chunk is tried by halves (topological halves, breadth first, so
    large harmless chunks are converted before the round limit): a half that passes stays
    converted, a failing half is split again, down to single nodes, which are kept as responsible.
    When the first half of a failing chunk passes, the second is known to hold what fails and is
    split without a trial of its own. `passes(keep) -> bool` is the oracle (a build and a
    validation); `keep` only ever shrinks to a set that passed, so the result is a validated file,
    never a guess. At most `max_rounds` validations; chunks left untried then stay kept
    (`unresolved`). `converting_all_fails`: the caller already saw the candidate with nothing kept fail."""
    keep = list(start)
    responsible: list[str] = []
    unresolved: list[str] = []
    rounds = 0
    # (chunk id, chunk, id of the sibling whose pass makes this chunk known to fail; -1: none, -2: known
    # to fail already); each trial's outcome by chunk id
    queue = deque([(0, keep[:], -2 if converting_all_fails else -1)])
    outcome: dict[int, bool | None] = {}
    next_id = 1
    while queue:
        cid, chunk, sibling = queue.popleft()
        known_fail = sibling == -2 or (sibling >= 0 and outcome.get(sibling) is True)
        if not known_fail:
            if rounds >= max_rounds:
                unresolved.extend(chunk)
                outcome[cid] = None
                continue
            rounds += 1
            drop = set(chunk)
            trial = [n for n in keep if n not in drop]
            outcome[cid] = passes(trial)
            if outcome[cid]:
                keep = trial
                continue
        if len(chunk) == 1:
            responsible.extend(chunk)
            continue
        half = len(chunk) // 2
        queue.append((next_id, chunk[:half], -1))
        queue.append((next_id + 1, chunk[half:], next_id))
        next_id += 2
    return Bisection(keep, responsible, unresolved, rounds)


# -- the searches `python -m export build` runs -------------------------------------------------------
def _worst(res: dict) -> float:
    return max(o["max_rel_error"] for p in res["points"] for o in p["outputs"].values())


class _Search:
    """Candidates of one graph and precision, each written to `dst` and validated by `check(dst)`;
    remembers every trial (for the manifest) and the last passing one."""

    def __init__(self, write, check, log, on_pass=None):
        """on_pass(outcome): called with each passing candidate (an outcome as `outcome()` returns),
        whose file it then owns: the caller moves it where it keeps it (`export build` records it at
        once, so a build stopped during a long bisection keeps the last candidate that passed)."""
        self.write, self.check, self.log, self.on_pass = write, check, log, on_pass
        self.tried: list[dict] = []
        self.passing = None  # (label, kept nodes, facts, result) of the last candidate that passed

    def run(self, label: str, kept: list[str]) -> bool:
        t0 = time.perf_counter()
        facts = self.write(kept)
        res = self.check()
        worst = _worst(res)
        # a candidate that could not run scores inf: say why, or it reads as an overflow (the fp16
        # HiFT's cuDNN failure passed for inf values through three builds)
        error = next((p["error"] for p in res["points"] if p.get("error")), None)
        self.tried.append({"level": label, "kept": len(kept), "max_rel_error": worst, "passed": res["passed"],
                           **({"stopped_at": res["stopped_at"]} if res.get("stopped_at") else {}),
                           **({"error": error} if error else {})})
        where = f" at {res['stopped_at']}" if res.get("stopped_at") else ""
        if error:
            self.log(f"{label:<26} {len(kept):5d} kept  could not run{where}: {error}  {time.perf_counter() - t0:.1f} s")
        else:
            self.log(f"{label:<26} {len(kept):5d} kept  max rel err {worst:.2e} (tol {res['points'][0]['tolerance']:g}) "
                     f"{'PASS' if res['passed'] else 'fail' + where}  {time.perf_counter() - t0:.1f} s")
        if res["passed"]:
            self.passing = (label, list(kept), facts, res)
            if self.on_pass is not None:
                self.on_pass(self.outcome())
        return res["passed"]

    def bisect(self, label: str, start: list[str], max_rounds: int) -> dict:
        """Bisect from `start` (which just passed) and leave the kept set that passed last at `dst`."""
        count = [0]

        def passes(keep):
            count[0] += 1
            return self.run(f"bisect {count[0]}/{max_rounds}", keep)

        b = bisect_keep(start, passes, max_rounds)
        # the kept set only changes on a pass, so the last pass is b.keep's file and validation
        _, _, facts, res = self.passing
        if self.on_pass is None:  # the last trial may have failed: write the kept set again
            facts = self.write(b.keep)
        self.passing = (f"bisected from {label}", b.keep, facts, res)
        return {"start": label, "start_kept": len(start), "rounds": b.rounds, "max_rounds": max_rounds,
                "responsible": b.responsible, "unresolved": len(b.unresolved), "kept": len(b.keep)}

    def outcome(self, bisection: dict | None = None) -> dict:
        if self.passing is None:
            return {"passed": False, "tried": self.tried}
        label, kept, facts, res = self.passing
        return {"passed": True, "level": label, "kept": kept, "facts": facts, "result": res, "tried": self.tried,
                "bisection": bisection}


def search_fp16(src: str, dst: str, check, max_rounds: int, log, on_pass=None) -> dict:
    """The FP16 file of `src` with the fewest FP32 nodes found: all-fp16 if it passes `check()`
    (a validation of `dst`), else bisected from the first ladder level that passes (or from every
    float node kept) down to the nodes responsible, in at most `max_rounds` more validations
    (0: keep the whole level). Returns {"passed", "level", "kept", "facts", "result", "tried", "bisection"}.
    With `on_pass` (see `_Search`) every passing candidate is handed over as it passes, and `dst` is
    only the trials' scratch file."""
    model = onnx.load(src, load_external_data=False)
    spec = GraphSpec.from_json({p.key: p.value for p in model.metadata_props}["tts.spec"])
    candidates = fp16_candidates(model)
    allowed = set(candidates)
    state = {"label": "all-fp16"}
    search = _Search(lambda kept: to_fp16(src, dst, FP16_LEVELS[0], keep=kept, label=state["label"]), check, log,
                     on_pass)
    if search.run("all-fp16", []):
        return search.outcome()
    start = None
    for level in FP16_LEVELS[1:]:
        kept = [n for n in fp32_nodes(model, level, spec) if n in allowed]
        state["label"] = level.name
        if search.run(level.name, kept):
            start = (level.name, kept)
            break
    if start is None:
        state["label"] = "every-float-node-fp32"
        if not search.run("every-float-node-fp32", candidates):
            return search.outcome()
        start = ("every-float-node-fp32", candidates)
    if max_rounds <= 0:
        return search.outcome()
    state["label"] = f"bisected from {start[0]}"
    return search.outcome(search.bisect(start[0], start[1], max_rounds))


def search_int8(src: str, dst: str, feeds: list[dict], check, max_rounds: int, log, cache: str | None = None,
                on_pass=None) -> dict:
    """The INT8 file of `src` with the most quantised matmuls / convolutions found: all of them if
    that passes, else bisected from the first level that passes ("weight-matmul+conv": activation x
    activation products left out; "weight-matmul" / "matmul": convolutions too) or from nothing
    quantised, to the nodes whose quantisation breaks the tolerance. As `search_fp16`; `kept` lists
    the nodes left unquantised."""
    heavy = int8_candidates(src)
    model = onnx.load(src, load_external_data=False)
    types = {n.name: n.op_type for n in model.graph.node}
    search = _Search(lambda kept: to_int8(src, dst, feeds, INT8_OPS, exclude=kept, cache=cache), check, log, on_pass)
    if search.run("matmul+conv", []):
        return search.outcome()
    # then activations x weights only (attention's activation products left out, activation_matmuls says
    # why), then without the convolutions too; "weight-" only where a graph has activation products
    act = activation_matmuls(model)
    convs = [n for n in heavy if types[n] not in INT8_LEVELS[1][1]]
    levels = [("weight-matmul+conv", act)] if act else []
    if convs:
        levels.append(("weight-matmul" if act else "matmul", sorted(set(act) | set(convs), key=heavy.index)))
    start = next(((name, kept) for name, kept in levels if search.run(name, kept)), None)
    if start is None:
        if not search.run("nothing-quantised", heavy):
            return search.outcome()
        start = ("nothing-quantised", heavy)
    if max_rounds <= 0:
        return search.outcome()
    return search.outcome(search.bisect(start[0], start[1], max_rounds))
