"""Artifacts are what they say and belong to the model they run.

Fingerprints (a file made from other weights, seed, family or checkpoint is refused with the command
that rebuilds it), the precision a file really reaches (no silent fp32 in an fp16 / int8 slot; the
bisection that keeps exactly the nodes responsible in fp32), the other silent fallbacks (ORT nodes on
the CPU, eager parts of a compiled graph, an unchecked export), and `export validate` failing on
broken candidates, each built here from the tiny exported artifacts with onnx helper edits.
"""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from export.cli import main as export_main
from models.errors import UserError
from models.registry import load_model
from runtime.artifacts import Manifest, file_artifact, read_metadata, set_metadata
from runtime.backends import Option, create_backend
from runtime.pipeline import Pipeline

CV3 = "cosyvoice3-tiny"


def _copy(exported, tmp_path, name=CV3, graphs=None):
    """A copy of an exported artifact folder (only `graphs`' files and the manifest, when given)."""
    src, dst = exported[name], str(tmp_path / "engines")
    if graphs is None:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("calibration", "validation.*"))
    else:
        os.makedirs(os.path.join(dst, "onnx", "fp32"))
        shutil.copy(os.path.join(src, "manifest.json"), dst)
        for g in graphs:
            shutil.copy(os.path.join(src, "onnx", "fp32", f"{g}.onnx"), os.path.join(dst, "onnx", "fp32"))
    return dst


def _record(root, graph, precision, path, notes=None):
    """Put a (hand-edited) ONNX file in the manifest as the artifact of `graph` at `precision`."""
    meta = read_metadata(path)
    m = Manifest.load(root)
    m.add(file_artifact(root, path, graph, precision, "onnx", fingerprint=meta.get("tts.fingerprint", ""),
                        made_from=json.loads(meta["tts.provenance"]), spec=json.loads(meta["tts.spec"]),
                        notes=notes or {"precision_reached": precision}))
    m.save()


# -- 1. fingerprints ----------------------------------------------------------------------------------
def test_fingerprint_binds_weights_seed_family_and_spec():
    a, b = load_model(CV3), load_model(CV3, seed=1)
    assert a.fingerprint("vocoder") == load_model(CV3).fingerprint("vocoder")  # deterministic
    assert a.fingerprint("vocoder") != b.fingerprint("vocoder")
    assert a.fingerprint("vocoder") != a.fingerprint("flow_encoder")
    assert a.fingerprint("llm") != load_model("cosyvoice2-tiny").fingerprint("llm")
    assert a.provenance("vocoder")["seed"] == 0 and "files" not in a.provenance("vocoder")


def test_artifacts_of_another_seed_or_family_are_refused(exported):
    root = exported[CV3]
    meta = read_metadata(os.path.join(root, "onnx", "fp32", "vocoder.onnx"))
    assert meta["tts.fingerprint"] == load_model(CV3).fingerprint("vocoder")
    assert Manifest.load(root).get("vocoder", "fp32", "onnx").fingerprint == meta["tts.fingerprint"]
    # --seed 1 with engines exported at seed 0: the fix rebuilds for seed 1
    with pytest.raises(UserError, match=r"vocoder\.onnx was made from other weights or config than cosyvoice3-tiny has "
                                        r"now \(seed 0, now 1\)\. Fix: run python -m export onnx --model cosyvoice3-tiny "
                                        r"--seed 1 --out-dir "):
        Pipeline(load_model(CV3, seed=1), "llm=torch,flow=torch,vocoder=ort", engines_dir=root)
    # the CosyVoice3 LLM inside CosyVoice2
    with pytest.raises(UserError, match=r"llm\.onnx was made from other weights or config than cosyvoice2-tiny has now "
                                        r"\(family cosyvoice3, now cosyvoice2; preset cosyvoice3-tiny, now cosyvoice2-tiny\)"
                                        r"\. Fix: run python -m export onnx --model cosyvoice2-tiny"):
        Pipeline(load_model("cosyvoice2-tiny"), "llm=ort", engines_dir=root)


def test_artifact_without_fingerprint_is_refused(exported, tmp_path):
    root = _copy(exported, tmp_path, graphs=["vocoder"])
    path = os.path.join(root, "onnx", "fp32", "vocoder.onnx")
    meta = read_metadata(path)
    del meta["tts.fingerprint"]
    set_metadata(path, meta)
    _record(root, "vocoder", "fp32", path)
    with pytest.raises(UserError, match=r"vocoder\.onnx does not say which weights it was made from \(it predates artifact "
                                        r"fingerprints\)\. Fix: run python -m export onnx --model cosyvoice3-tiny"):
        create_backend(Option("ort"), load_model(CV3), load_model(CV3).graph_specs()["vocoder"], torch.device("cpu"), root)


def test_model_folder_checkpoint_changed_after_export(exported, tmp_path, cv3_folder):
    """An artifact of a model folder is bound to the sha256 of the stage's files: editing hift.pt
    afterwards (same names, same shapes) refuses the vocoder, not the other stages."""
    model = load_model(cv3_folder)
    prov = model.provenance("vocoder")
    assert set(prov["files"]) == {"hift.pt", "cosyvoice3.yaml"} and "seed" not in prov
    root = _copy(exported, tmp_path, graphs=["vocoder"])
    path = os.path.join(root, "onnx", "fp32", "vocoder.onnx")
    meta = read_metadata(path)  # stands in for an export of the folder: only the binding matters here
    meta.update({"tts.fingerprint": model.fingerprint("vocoder"), "tts.provenance": json.dumps(prov),
                 "tts.spec": model.graph_specs()["vocoder"].to_json()})
    set_metadata(path, meta)
    _record(root, "vocoder", "fp32", path)
    spec = model.graph_specs()["vocoder"]
    create_backend(Option("ort"), model, spec, torch.device("cpu"), root)  # it belongs to this folder
    sd = torch.load(os.path.join(cv3_folder, "hift.pt"), weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key] * 1.01
    torch.save(sd, os.path.join(cv3_folder, "hift.pt"))
    changed = load_model(cv3_folder)
    with pytest.raises(UserError, match=r"made from other weights or config than cosyvoice3-golden has now \(hift\.pt "
                                        r"changed since the export\)\. Fix: run python -m export onnx --model \S+cosyvoice3-golden"):
        create_backend(Option("ort"), changed, spec, torch.device("cpu"), root)
    assert changed.fingerprint("flow_encoder") == model.fingerprint("flow_encoder")


def test_build_does_not_reuse_an_fp32_onnx_of_another_seed(exported, tmp_path, monkeypatch):
    """`export build --seed 5` over seed-0 artifacts exports the fp32 ONNX again (stubbed here: the
    test is that it is not reused)."""
    import export.onnx_export

    root = _copy(exported, tmp_path, graphs=["flow_encoder"])

    def refuse(*a, **k):
        raise UserError("export_graph called")

    monkeypatch.setattr(export.onnx_export, "export_graph", refuse)
    res = CliRunner().invoke(export_main, ["build", "--model", CV3, "--seed", "5", "--graphs", "flow_encoder",
                                           "--precision", "fp16", "--out-dir", root])
    assert res.exit_code == 2
    assert "flow_encoder    fp32  the fp32 ONNX in" in res.output and "(seed 0, now 5): exporting it again" in res.output
    assert "export_graph called" in res.output


# -- 2. precision: labels are contents ----------------------------------------------------------------
def _beyond_fp16(path):
    """Insert x * 1e7 * 1e-7 after the token embedding of a flow encoder: exact in fp32, wrong in fp16
    whichever of the two constants it holds (1e7 is past fp16's largest value, 65504, and 1e-7 is a
    subnormal there, stored 19 % off)."""
    m = onnx.load(path)
    gather = next(n for n in m.graph.node if n.op_type == "Gather")
    out = gather.output[0]
    gather.output[0] = out + "_raw"
    m.graph.initializer.extend([numpy_helper.from_array(np.array(1e7, dtype=np.float32), "big_1e7"),
                                numpy_helper.from_array(np.array(1e-7, dtype=np.float32), "small_1e-7")])
    up = helper.make_node("Mul", [out + "_raw", "big_1e7"], [out + "_big"], name="scale_up")
    down = helper.make_node("Mul", [out + "_big", "small_1e-7"], [out], name="scale_down")
    i = list(m.graph.node).index(gather)
    m.graph.node.insert(i + 1, down)
    m.graph.node.insert(i + 1, up)
    onnx.save(m, path)


def test_fp16_bisection_keeps_exactly_the_nodes_responsible(exported, tmp_path):
    """A flow encoder with two inserted nodes whose constants fp16 cannot hold: every ladder level that
    converts them fails, and the bisection ends with those two (and nothing else) in fp32."""
    from export.precision import reached_precision, search_fp16
    from export.validate import validate_graph
    from runtime.backends.onnxrt import OrtBackend

    model = load_model(CV3)
    spec = model.graph_specs()["flow_encoder"]
    src = str(tmp_path / "fp32.onnx")
    shutil.copy(os.path.join(exported[CV3], "onnx", "fp32", "flow_encoder.onnx"), src)
    _beyond_fp16(src)
    dst = str(tmp_path / "fp16.onnx")

    def check():
        return validate_graph(model, "flow_encoder", OrtBackend(spec, "cpu", dst), "ort-fp16", "fp16", points=("opt",))

    lines = []
    found = search_fp16(src, dst, check, max_rounds=40, log=lines.append)
    assert found["passed"] and found["level"].startswith("bisected from")
    assert sorted(found["kept"]) == ["scale_down", "scale_up"]
    assert sorted(found["bisection"]["responsible"]) == ["scale_down", "scale_up"]
    assert found["bisection"]["unresolved"] == 0 and found["bisection"]["rounds"] <= 40
    assert found["tried"][0] == {**found["tried"][0], "level": "all-fp16", "passed": False}
    assert reached_precision(dst)["reached"] == "fp16"  # every matmul / conv runs fp16
    assert check()["passed"]  # the file left at dst is the one that passed
    # a round limit keeps what it could not resolve, and still leaves a file that passed
    bounded = search_fp16(src, dst, check, max_rounds=2, log=lines.append)
    assert bounded["passed"] and bounded["bisection"]["rounds"] == 2 and bounded["bisection"]["unresolved"] > 0
    assert {"scale_down", "scale_up"} <= set(bounded["kept"]) and check()["passed"]


def test_bisect_keep_finds_responsible_nodes_within_bounds():
    from export.precision import bisect_keep

    nodes = [f"n{i}" for i in range(64)]
    need = {"n3", "n40"}
    b = bisect_keep(nodes, lambda keep: need <= set(keep), max_rounds=64)
    assert sorted(b.keep) == sorted(need) == sorted(b.responsible) and not b.unresolved
    assert b.rounds <= 4 * 6  # ~2 trials per level for each responsible node
    b = bisect_keep(nodes, lambda keep: need <= set(keep), max_rounds=3)
    assert b.rounds == 3 and need <= set(b.keep) and len(b.keep) == len(b.unresolved) + len(b.responsible)


def test_build_refuses_a_silent_fallback_and_labels_an_allowed_one(exported, tmp_path, monkeypatch):
    """With a tolerance no fp16 file meets (but fp32 does), build fails naming --allow-fallback and
    records nothing; with --allow-fallback the file is recorded as fp32, loudly, and the runtime
    says so when it loads it."""
    import export.validate

    monkeypatch.setitem(export.validate.TOLERANCE, "fp16", 1e-5)
    root = _copy(exported, tmp_path, graphs=["flow_encoder"])
    args = ["build", "--model", CV3, "--graphs", "flow_encoder", "--precision", "fp16", "--bisect-rounds", "0",
            "--seeds", "1", "--out-dir", root]
    res = CliRunner().invoke(export_main, args)
    assert res.exit_code == 2, res.output
    assert "flow_encoder    fp16  FAILED: what passed keeps every matmul and convolution in fp32" in res.output
    assert ("error: 1 artifact(s) reach no fp16 / int8 matmul or convolution within the tolerance and were not recorded: "
            "flow_encoder fp16") in res.output and "Fix: pass --allow-fallback" in res.output
    assert Manifest.load(root).get("flow_encoder", "fp16", "onnx") is None
    assert not os.path.exists(os.path.join(root, "onnx", "fp16", "flow_encoder.onnx"))

    res = CliRunner().invoke(export_main, args + ["--allow-fallback"])
    assert res.exit_code == 0, res.output
    assert "flow_encoder    fp16  FALLBACK (allowed): recorded as fp32 in the fp16 slot: reached fp32 (0/3" in res.output
    art = Manifest.load(root).get("flow_encoder", "fp16", "onnx")
    assert art.notes["precision_reached"] == "fp32" and art.notes["fallback"] is True
    assert read_metadata(os.path.join(root, art.path))["tts.precision_reached"] == "fp32"
    cert = art.validation["ort:cpu"]
    assert cert["precision_reached"] == "fp32" and cert["passed"]
    pipe = Pipeline(load_model(CV3), "llm=torch,flow=ort:fp16/torch,vocoder=torch", engines_dir=root)
    assert "flow_encoder: ort:fp16 runs fp32 (its fp16 build fell back; see the manifest)" in pipe.describe_backends()


# -- 3. other silent fallbacks ------------------------------------------------------------------------
def test_export_check_is_thresholded(exported):
    """The export's ORT-vs-torch check fails the export instead of printing a large error."""
    from export.onnx_export import check_onnx

    path = os.path.join(exported[CV3], "onnx", "fp32", "flow_encoder.onnx")
    spec = load_model(CV3).graph_specs()["flow_encoder"]
    facts = check_onnx(path, spec, load_model(CV3).graph_module("flow_encoder"))
    assert max(facts["ort_vs_torch_at_opt"].values()) < 1e-5
    with pytest.raises(UserError, match=r"the exported flow_encoder \(flow_encoder\.onnx\) differs from its torch module: "
                                        r"output \S+ is off by \S+ of its scale at the opt shape \(fp32 tolerance 0\.0001\)"):
        check_onnx(path, spec, load_model(CV3, seed=3).graph_module("flow_encoder"))


def test_ort_nodes_on_the_cpu_are_an_error_or_a_recorded_fact(exported):
    """A CUDA session's placement is read back: compute nodes on the CPU are refused, shape nodes are
    listed (on this CPU-only machine a CPU session stands in for what ORT reports)."""
    import onnxruntime as ort

    from runtime.backends.onnxrt import ASSIGNMENT_KEY, check_placement, placement

    opts = ort.SessionOptions()
    opts.add_session_config_entry(ASSIGNMENT_KEY, "1")
    path = os.path.join(exported[CV3], "onnx", "fp32", "flow_encoder.onnx")
    where = placement(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
    assert where and set(where) == {"CPUExecutionProvider"}
    with pytest.raises(UserError, match=r"ONNX Runtime runs \d+ compute node\(s\) of flow_encoder on the CPU although CUDA "
                                        r"was asked for \(.*Conv.*\).*Fix: run stage flow with another backend"):
        check_placement(where, "flow_encoder", "flow")
    shapes_only = {"CUDAExecutionProvider": [("mm", "MatMul")],
                   "CPUExecutionProvider": [("s", "Shape"), ("g", "Gather"), ("s2", "Shape")]}
    assert check_placement(shapes_only, "g", "flow") == {"cpu_nodes": 3, "cpu_node_ops": {"Shape": 2, "Gather": 1}}
    assert "unknown" in check_placement(None, "g", "flow")["cpu_nodes"]


class _Breaks(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        print("", end="")  # a graph break: dynamo runs this line eagerly, between two graphs
        return y + 1


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


def _toy_spec():
    from models.spec import Dim, GraphSpec, TensorSpec

    return GraphSpec("toy", "flow", (TensorSpec("x", "float32", ("B", 4)),), (TensorSpec("y", "float32", ("B", 4)),),
                     (Dim("B", 1, 1, 8),))


def test_compile_graph_breaks_are_recorded_and_the_recompile_limit_is_an_error():
    from runtime.backends.compiled import CompiledBackend

    torch._dynamo.reset()
    spec = _toy_spec()
    b = CompiledBackend(spec, "cpu", _Breaks, compile_backend="eager", cuda_graphs=False)
    with pytest.warns(RuntimeWarning, match="graph toy has graph breaks, so parts of it run eagerly"):
        b.infer({"x": torch.ones(1, 4)})
    meta = b.metadata()
    assert meta["graph_breaks"] >= 1 and meta["compiled"].startswith("partly") and meta["graph_break_reasons"]
    plain = CompiledBackend(spec, "cpu", _Plain, compile_backend="eager", cuda_graphs=False, dynamic=False,
                            buckets=False)
    assert plain.metadata()["compiled"].startswith("not yet")
    plain.infer({"x": torch.ones(1, 4)})
    assert plain.metadata()["compiled"] == "whole graph" and plain.metadata()["graph_breaks"] == 0
    # dynamo's own patch, not pytest's monkeypatch: undoing a monkeypatch on a torch config module
    # hides the option for the rest of the session (its __delattr__), which broke every later compile
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.raises(UserError, match=r"torch\.compile reached its recompile limit \(1\) on graph toy: this call "
                                           r"would run eagerly, not compiled\. Fix: run stage flow with fewer distinct shapes"):
        plain.infer({"x": torch.ones(2, 4)})  # dynamic=False: a second shape is a recompile
    torch._dynamo.reset()


def test_the_recompile_limit_check_holds_while_any_thread_is_inside_a_compiled_call():
    # interleaved calls from two threads: the first one out must not switch the check off under the other
    from runtime.backends.compiled import _fail_on_recompile_limit

    cfg = torch._dynamo.config
    before = cfg.fail_on_recompile_limit_hit
    a, b = _fail_on_recompile_limit(), _fail_on_recompile_limit()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert cfg.fail_on_recompile_limit_hit is True
    b.__exit__(None, None, None)
    assert cfg.fail_on_recompile_limit_hit == before


# -- 4. the audio check never compares cut signals ----------------------------------------------------
def test_audio_lengths_must_match():
    from export.validate import log_mel_distance, snr_db

    ref = torch.sin(torch.arange(24000) / 7.0)
    assert snr_db(ref.clone(), ref) == float("inf")
    assert snr_db(ref[:12000].clone(), ref) == float("-inf")  # half the audio: was inf (cut to the shorter)
    assert log_mel_distance(ref[:12000].clone(), ref) == float("inf")
    assert log_mel_distance(ref.clone(), ref) == 0.0


# -- export validate fails on broken candidates -------------------------------------------------------
def _replace_output(m, name, make):
    """Rename the node output `name` to name_raw and append `make(raw, name) -> [nodes], [initializers]`."""
    prod = next(n for n in m.graph.node if name in n.output)
    prod.output[list(prod.output).index(name)] = name + "_raw"
    nodes, inits = make(name + "_raw", name)
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _perturbed(m):
    w = max((t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT), key=lambda t: np.prod(t.dims))
    a = numpy_helper.to_array(w).copy()
    a += 0.01 * a.std() * np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(a, w.name))


def _swapped(m):
    sin = next(n for n in m.graph.node if n.op_type == "Sin")
    cos = next(n for n in m.graph.node if n.op_type == "Cos")
    sin.op_type, cos.op_type = "Cos", "Sin"


def _truncated(m):
    _replace_output(m, "audio", lambda raw, out: (
        [helper.make_node("Shape", [raw], ["n_all"], start=1, end=2), helper.make_node("Div", ["n_all", "two"], ["n_half"]),
         helper.make_node("Slice", [raw, "zero", "n_half", "one"], [out])],
        [_i64("two", [2]), _i64("zero", [0]), _i64("one", [1])]))


def _silent(m):
    _replace_output(m, "audio", lambda raw, out: (
        [helper.make_node("Mul", [raw, "nought"], [out])], [numpy_helper.from_array(np.array(0, np.float32), "nought")]))


def _shifted(m):  # 480 samples (one mel frame) later, same length
    _replace_output(m, "audio", lambda raw, out: (
        [helper.make_node("Pad", [raw, "pads"], ["padded"]), helper.make_node("Shape", [raw], ["n_all"], start=1, end=2),
         helper.make_node("Slice", ["padded", "zero", "n_all", "one"], [out])],
        [_i64("pads", [0, 480, 0, 0]), _i64("zero", [0]), _i64("one", [1])]))


def _fp16_overflow(m):
    """A convolution weight that overflowed when cast to fp16 (+-inf, as a converter without clamping
    makes from values past 65504): Inf and NaN downstream. (An activation overflow needs fp16 kernels;
    ONNX Runtime's CPU provider computes most fp16 nodes in fp32, so on this machine the weight does it.)"""
    conv = [n for n in m.graph.node if n.op_type == "Conv"][-1]  # the last one (HiFT's conv_post)
    w = next(t for t in m.graph.initializer if t.name == conv.input[1])
    a = numpy_helper.to_array(w).astype(np.float16).copy()
    a.flat[0], a.flat[1] = np.inf, -np.inf
    w.CopyFrom(numpy_helper.from_array(a, w.name))


CASES = [("perturbed-initializer", "fp32", _perturbed, "graph"), ("swapped-node", "fp32", _swapped, "graph"),
         ("fp16-nan", "fp16", _fp16_overflow, "nonfinite"), ("truncated-audio", "fp32", _truncated, "error"),
         ("silent-audio", "fp32", _silent, "silent"), ("shifted-audio", "fp32", _shifted, "graph")]


@pytest.mark.parametrize("case,precision,edit,how", CASES, ids=[c[0] for c in CASES])
def test_validate_fails_on_a_broken_candidate(exported, tmp_path, case, precision, edit, how):
    """Each broken vocoder (the fingerprint is intact: only validation can tell) exits non-zero, and
    its certificate in the manifest, validation.json and validation.md says what is wrong."""
    root = _copy(exported, tmp_path, graphs=["vocoder"])
    fp32 = os.path.join(root, "onnx", "fp32", "vocoder.onnx")
    path = fp32
    if precision == "fp16":
        from export.precision import FP16_LEVELS, to_fp16

        path = os.path.join(root, "onnx", "fp16", "vocoder.onnx")
        to_fp16(fp32, path, FP16_LEVELS[0])
    m = onnx.load(path)
    edit(m)
    onnx.save(m, path)
    _record(root, "vocoder", precision, path)
    res = CliRunner().invoke(export_main, ["validate", "--model", CV3, "--graphs", "vocoder", "--precision", precision,
                                           "--points", "opt", "--seeds", "2", "--out-dir", root])
    assert res.exit_code == 1, res.output
    assert "FAIL: report in" in res.output and "Precision certificates" in res.output
    cert = Manifest.load(root).get("vocoder", precision, "onnx").validation["ort:cpu"]
    assert cert["passed"] is False and cert["seeds"] == 2 and cert["points"] == ["opt"]
    assert cert["precision"] == precision and cert["precision_reached"] == precision
    report = json.load(open(os.path.join(root, "validation.json")))
    assert report["passed"] is False and report["certificates"][0]["graph"] == "vocoder"
    audio = cert["audio"]
    assert audio is not None and audio["passed"] is False  # the pipeline with this vocoder fails too
    out = cert["outputs"]["audio"]
    if how == "graph":
        assert out["worst_rel_error"]["opt"] > 1e-4 and out["nonfinite_values"] == 0
    elif how == "nonfinite":
        assert out["nonfinite_values"] > 0 and out["nonfinite_runs"] == 2  # every seed
        assert any("NaN/Inf samples" in p for p in audio["problems"])
    elif how == "error":
        assert "computes audio of graph vocoder as" in " ".join(cert["errors"])
        assert any("failed to run" in p for p in audio["problems"])
    elif how == "silent":
        assert out["worst_rel_error"]["opt"] == pytest.approx(1.0) and "silent" in audio["problems"]
    md = open(os.path.join(root, "validation.md")).read()
    assert "## Precision certificates" in md and "| vocoder | ort-" in md and "| NO |" in md
