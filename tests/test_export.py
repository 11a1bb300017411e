"""ONNX export, Polygraphy validation and the ONNX Runtime backend, on all three tiny presets."""

import json
import os
import shutil

import onnx
import pytest
import torch
from click.testing import CliRunner

from export.cli import main as export_main
from models.errors import UserError
from models.registry import load_model
from runtime.artifacts import Manifest, read_metadata, spec_from_onnx
from runtime.backends import Option, create_backend
from runtime.pipeline import Pipeline

from tests.conftest import TINY_PRESETS as PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_graph_exported_with_metadata_and_hash(exported, name):
    model = load_model(name)
    manifest = Manifest.load(exported[name])
    for graph, spec in model.graph_specs().items():
        art = manifest.get(graph, "fp32", "onnx")
        assert art is not None, graph
        path = manifest.verify(art, fix="export again")
        meta = read_metadata(path)
        assert meta["tts.family"] == model.family and meta["tts.stage"] == spec.stage and meta["tts.graph"] == graph
        assert meta["tts.sample_rate"] == "24000" and meta["tts.precision"] == "fp32"
        assert meta["tts.source_sha256"].startswith("random-weights:")
        assert meta["tts.fingerprint"] == art.fingerprint == model.fingerprint(graph)
        assert spec_from_onnx(path) == spec  # the runtime can configure itself from the file
        proto = onnx.load(path)
        ops = {n.op_type for n in proto.graph.node}
        assert not ops & {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
        assert not any("parametrizations" in i.name or "weight_g" in i.name for i in proto.graph.initializer)
        assert [i.name for i in proto.graph.input] == [t.name for t in spec.inputs]
        assert art.profiles[spec.inputs[0].name][2] == list(spec.profile()[spec.inputs[0].name][2])


def test_optimized_export_equals_unoptimized(exported, tmp_path):
    """The exporter's ONNX optimizer (the default for users; the shared fixture skips it for time)
    changes the graph, not its outputs: on a small graph both files agree with torch and each other."""
    import onnxruntime as ort

    out = str(tmp_path / "opt")
    res = CliRunner().invoke(export_main, ["onnx", "--model", "cosyvoice3-tiny", "--graphs", "flow_encoder",
                                           "--out-dir", out], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    art = Manifest.load(out).get("flow_encoder", "fp32", "onnx")
    assert art.built["optimized"] is True
    plain = Manifest.load(exported["cosyvoice3-tiny"]).get("flow_encoder", "fp32", "onnx")
    assert plain.built["optimized"] is False
    spec = load_model("cosyvoice3-tiny").graph_specs()["flow_encoder"]
    feed = {k: v.numpy() for k, v in spec.sample_feed({"N": 37}, seed=2).items()}
    a = ort.InferenceSession(os.path.join(out, art.path)).run(None, feed)
    b = ort.InferenceSession(os.path.join(exported["cosyvoice3-tiny"], plain.path)).run(None, feed)
    for x, y in zip(a, b):
        assert abs(x - y).max() <= 1e-5 * abs(y).max()
    n_opt = len(onnx.load(os.path.join(out, art.path)).graph.node)
    n_plain = len(onnx.load(os.path.join(exported["cosyvoice3-tiny"], plain.path)).graph.node)
    assert n_opt < n_plain  # the optimizer really ran


@pytest.mark.parametrize("name", PRESETS)
def test_validate_passes_at_min_opt_max(exported, name):
    res = CliRunner().invoke(export_main, ["validate", "--model", name, "--seeds", "2", "--out-dir", exported[name]],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.load(open(os.path.join(exported[name], "validation.json")))
    assert report["passed"]
    assert {c["graph"] for c in report["certificates"]} == set(load_model(name).graph_specs())
    assert all(c["seeds"] == 2 and c["precision_reached"] == "fp32" for c in report["certificates"])
    graphs = {g["graph"] for g in report["graphs"]}
    assert graphs == set(load_model(name).graph_specs())
    for g in report["graphs"]:
        assert [p["point"] for p in g["points"]] == ["min", "opt", "max"]
        for p in g["points"]:
            assert p["finite"]
            for out in p["outputs"].values():
                assert float(out["max_rel_error"]) <= 1e-4
    # whole pipeline on ONNX Runtime vs torch, same speech tokens: the waveforms agree
    (audio,) = report["audio"]
    assert float(audio["snr_db"]) > 60 and audio["tokens_identical"] is True
    assert os.path.isfile(os.path.join(exported[name], "validation.md"))


def test_validate_says_which_graphs_it_could_not_validate(exported, tmp_path):
    """On the H100 a killed export left the Orpheus vocoder out of the manifest, and `export validate`
    printed PASS for the LLM alone. A graph without an artifact is now named with the command that makes
    it, listed in the report, and fails the run when the user asked for it (--graphs)."""
    root = str(tmp_path / "no-vocoder")
    shutil.copytree(exported["orpheus-tiny"], root)
    manifest = Manifest.load(root)
    manifest.artifacts.pop(("vocoder", "fp32", "onnx"))
    for key in [k for k in manifest.artifacts if k[1] == "int8"]:  # tests/test_precision.py builds them here
        manifest.artifacts.pop(key)
    manifest.save()
    fix = f"python -m export onnx --model orpheus-tiny --graphs vocoder --out-dir {root}"
    args = ["validate", "--model", "orpheus-tiny", "--points", "opt", "--seeds", "1", "--no-audio", "--out-dir", root]
    whole = CliRunner().invoke(export_main, args, catch_exceptions=False)
    assert whole.exit_code == 0, whole.output
    assert f"NOT VALIDATED: vocoder ort-fp32: no artifact in {root}. Fix: run {fix}" in whole.output
    assert f"PASS (1 not validated: vocoder ort-fp32): report in {root}/validation.md" in whole.output
    report = json.load(open(os.path.join(root, "validation.json")))
    assert report["passed"] and report["meta"]["not_validated"] == \
        [{"graph": "vocoder", "backend": "ort-fp32", "named": False, "fix": fix}]
    with open(os.path.join(root, "validation.md")) as f:
        md = f.read()
    assert f"- vocoder ort-fp32: `{fix}`" in md and "Overall: PASS (1 not validated)" in md
    named = CliRunner().invoke(export_main, [*args, "--graphs", "llm,vocoder"], catch_exceptions=False)
    assert named.exit_code == 1, named.output
    assert "FAIL (1 not validated: vocoder ort-fp32)" in named.output
    assert not json.load(open(os.path.join(root, "validation.json")))["passed"]

    nothing = CliRunner().invoke(export_main, [*args, "--precision", "int8"])
    assert nothing.exit_code == 2, nothing.output
    # the only verdict is the error: a PASS line before it read as a validation that passed
    assert "PASS" not in nothing.output and f"error: nothing to validate in {root} for ort int8." in nothing.output


def test_mixed_backends_and_flow_modes_agree(exported):
    model = load_model("cosyvoice3-tiny")
    root = exported["cosyvoice3-tiny"]
    ref = Pipeline(model, "torch").synthesize("Hello there.", seed=1, fixed_tokens=20)
    mixed = Pipeline(model, "llm=torch,flow=ort,vocoder=ort", engines_dir=root).synthesize("Hello there.", seed=1, fixed_tokens=20)
    assert ref.tokens == mixed.tokens
    assert (ref.audio - mixed.audio).abs().max() < 1e-4
    # host Euler loop over the exported estimator graph
    steps = Pipeline(model, "ort", engines_dir=root, options={"flow_mode": "steps"}).synthesize(
        "Hello there.", seed=1, fixed_tokens=20)
    assert (ref.audio - steps.audio).abs().max() < 1e-4


def test_missing_and_tampered_artifacts(exported, tmp_path):
    model = load_model("cosyvoice3-tiny")
    with pytest.raises(UserError, match=r"no exported artifacts in .* Fix: run python -m export onnx --model cosyvoice3-tiny"):
        Pipeline(model, "ort", engines_dir=str(tmp_path / "none"))
    copy = str(tmp_path / "copy")
    shutil.copytree(exported["cosyvoice3-tiny"], copy)
    with open(os.path.join(copy, "onnx", "fp32", "vocoder.onnx"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match=r"vocoder\.onnx does not match the sha256 in manifest\.json"):
        Pipeline(model, "ort", engines_dir=copy)
    os.remove(os.path.join(copy, "onnx", "fp32", "vocoder.onnx"))
    with pytest.raises(UserError, match="is listed in the manifest but missing"):
        Pipeline(model, "ort", engines_dir=copy)
    fp32_only = str(tmp_path / "fp32only")
    shutil.copytree(exported["cosyvoice3-tiny"], fp32_only)
    m = Manifest.load(fp32_only)
    m.artifacts = {k: a for k, a in m.artifacts.items() if a.precision == "fp32"}
    m.save()
    with pytest.raises(UserError, match=r"has no fp16 onnx artifact for graph llm.*export build --model cosyvoice3-tiny"):
        Pipeline(model, "ort", engines_dir=fp32_only, precision="fp16")


def test_shape_beyond_profile_is_refused(exported):
    model = load_model("cosyvoice3-tiny")
    spec = model.graph_specs()["vocoder"]
    backend = create_backend(Option("ort"), model, spec, torch.device("cpu"), engines_dir=exported["cosyvoice3-tiny"])
    too_long = spec.sample_feed({"T": spec.dim("T").max + 1})
    with pytest.raises(UserError, match=r"graph vocoder: mel frames = 1601 is outside the supported range \[1, 1600\]"):
        backend.infer(too_long)


def test_cuda_provider_missing_is_named():
    from runtime.backends.onnxrt import OrtBackend, available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    model = load_model("cosyvoice3-tiny")
    path = "unused.onnx"
    backend = OrtBackend(model.graph_specs()["vocoder"], torch.device("cuda"), path)
    with pytest.raises(UserError, match="no CUDA execution provider.*onnxruntime-gpu"):
        backend.activate()


def test_a_failing_candidate_stops_at_its_first_failing_seed_when_asked():
    """The build's candidate search asks only pass / fail (`fail_fast`): a wrong candidate stops at the
    first point and seed that fails instead of running the rest (the max point, the most expensive);
    a certificate (no fail_fast) still runs every point and seed."""
    from export.validate import validate_graph
    from runtime.backends.torch_eager import TorchBackend

    model = load_model("cosyvoice3-tiny")
    spec = model.graph_specs()["flow_encoder"]

    class Scaled(TorchBackend):
        """1 % off: past the fp32 tolerance (1e-4), within the fp16 one (2e-2)."""
        calls = 0

        def _infer(self, feed):
            Scaled.calls += 1
            return {k: v * 1.01 if v.is_floating_point() else v for k, v in super()._infer(feed).items()}

    def run(precision, fail_fast):
        Scaled.calls = 0
        res = validate_graph(model, "flow_encoder", Scaled(spec, torch.device("cpu"), lambda: model.graph_module("flow_encoder")),
                             "scaled", precision, seeds=3, fail_fast=fail_fast)
        return res, Scaled.calls

    res, calls = run("fp32", fail_fast=True)
    assert (res["passed"], res["stopped_at"], [p["point"] for p in res["points"]], calls) == (False, "min", ["min"], 1)
    assert res["points"][0]["outputs"]["mu"]["max_rel_error"] == pytest.approx(0.01, rel=1e-3)
    res, calls = run("fp32", fail_fast=False)
    assert (res["passed"], "stopped_at" in res, [p["point"] for p in res["points"]], calls) == (
        False, False, ["min", "opt", "max"], 9)
    res, calls = run("fp16", fail_fast=True)  # a passing candidate runs everything either way
    assert (res["passed"], "stopped_at" in res, [p["point"] for p in res["points"]], calls) == (
        True, False, ["min", "opt", "max"], 9)


def test_outputs_compared_piece_by_piece_give_the_whole_comparisons_verdict(capsys):
    """Real-size LLM caches are compared in pieces on the validation's device (the host took minutes
    per seed over 1.2G values): the worst error, the scale, the NaN/Inf count and both Polygraphy
    verdicts must be those of one whole-array comparison, whichever piece holds the worst value."""
    import numpy as np

    from export import validate as v

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5, 7)).astype(np.float32)
    scale = float(np.abs(ref).max())

    def check(got, tol, piece):
        return v.compare_output("out", ref, got, tol, "cpu", piece=piece)

    got = ref.copy()
    got.flat[101] += np.float32(0.5 * 1e-2 * scale)  # the worst error sits in one late piece
    whole, pieces = check(got, 1e-2, None), check(got, 1e-2, 7)
    assert whole == pieces
    assert (pieces["finite"], pieces["accurate"], pieces["nonfinite_values"]) == (True, True, 0)
    assert pieces["ref_max_abs"] == scale
    assert pieces["max_rel_error"] == pytest.approx(0.5e-2, rel=1e-4)
    got.flat[101] = ref.flat[101] + np.float32(1.5 * 1e-2 * scale)  # past the tolerance: fails
    failing = check(got, 1e-2, 7)
    assert (failing["accurate"], failing["max_rel_error"] > 1e-2) == (False, True)
    got.flat[3], got.flat[60] = np.nan, np.inf  # counted, not averaged away; the error is then infinite
    bad = check(got, 1e-2, 7)
    assert (bad["finite"], bad["nonfinite_values"], bad["max_rel_error"]) == (False, 2, float("inf"))
    cut = check(got[:2], 1e-2, 7)  # a shorter output never passes
    assert (cut["accurate"], cut["max_rel_error"]) == (False, float("inf"))
    # a device on which a Polygraphy statistic cannot be taken (here: meta tensors hold no values)
    # falls back to the host with one note, and gives the same answer
    v._DEVICE_COMPARE_FAILED.clear()
    try:
        moved = v.compare_output("out", ref, ref + np.float32(1e-3 * scale), 1e-2, "meta", piece=7)
        assert v._DEVICE_COMPARE_FAILED == ["meta"]
    finally:
        v._DEVICE_COMPARE_FAILED.clear()
    assert moved == check(ref + np.float32(1e-3 * scale), 1e-2, 7)
    assert capsys.readouterr().out.count("comparing outputs on meta failed") == 1
