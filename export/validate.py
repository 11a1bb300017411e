"""Numerical validation of exported artifacts with Polygraphy.

Every artifact is compared with the eager PyTorch graph it came from, at the spec's min, opt and max
shapes, through Polygraphy's Comparator: a reference runner (our torch module) and a candidate runner
(the same runtime backend the pipeline uses: ONNX Runtime with IOBinding, TensorRT, ...), NaN/Inf
checks (`Comparator.validate`) and a per-output tolerance (`SimpleCompareFunc`). The tolerance is
relative to the output's scale: max |candidate - reference| <= tol * max |reference|, so one number
per precision works for logits, mels and audio alike.

The audio-level check runs the whole pipeline twice from the same speech tokens (torch fp32 vs the
candidate backends) and reports the waveform SNR and a log-mel distance, so a NaN or silent engine
cannot pass even if every graph looked fine in isolation.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from models.errors import UserError
from models.family import TTSModel
from models.spec import DTYPES, POINTS, GraphSpec
from runtime.backends.base import Backend

# max |err| / max |ref| per output, by precision
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}
# audio-level floors (dB SNR, log-mel L1 distance in natural-log units) by the least precise stage
AUDIO_SNR_DB = {"fp32": 60.0, "fp16": 15.0, "int8": 5.0}
AUDIO_MEL_DIST = {"fp32": 1e-3, "fp16": 0.5, "int8": 1.0}


def _polygraphy():
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata
        from polygraphy.comparator import Comparator, SimpleCompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:  # pragma: no cover - polygraphy is a hard dependency
        raise UserError("validation needs polygraphy.", "pip install polygraphy") from None
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # mismatches are summarised by our report, not logged
    return BaseRunner, TensorMetadata, Comparator, SimpleCompareFunc


def _metadata(spec: GraphSpec):
    _, TensorMetadata, _, _ = _polygraphy()
    meta = TensorMetadata()
    for t in spec.inputs:
        meta.add(t.name, DTYPES[t.dtype], [s if isinstance(s, int) else None for s in t.shape])
    return meta


def make_runner(name: str, spec: GraphSpec, infer, activate=lambda: None):
    """A Polygraphy runner around `infer(dict of torch tensors) -> dict of torch tensors`."""
    BaseRunner, _, _, _ = _polygraphy()

    class Runner(BaseRunner):
        def activate_impl(self):
            activate()

        def get_input_metadata_impl(self):
            return _metadata(spec)

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            out = infer({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
            self.inference_time = time.perf_counter() - t0
            return OrderedDict((t.name, np.ascontiguousarray(out[t.name].detach().float().cpu().numpy()))
                               for t in spec.outputs)

        def deactivate_impl(self):
            pass

    return Runner(name=name)


def torch_reference(model: TTSModel, graph: str, spec: GraphSpec, device: str = "cpu"):
    module = {}

    def activate():
        if "m" not in module:
            module["m"] = model.graph_module(graph).float().eval().to(device)

    def infer(feed):
        with torch.inference_mode():
            out = module["m"](*[feed[t.name].to(device) for t in spec.inputs])
        out = (out,) if isinstance(out, torch.Tensor) else out
        return dict(zip([t.name for t in spec.outputs], out))

    return make_runner(f"torch-fp32:{graph}", spec, infer, activate)


def backend_runner(backend: Backend, label: str):
    return make_runner(f"{label}:{backend.spec.name}", backend.spec, lambda feed: backend.infer(feed), backend.activate)


def scaled_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |got - ref|, that over max |ref|); inf when either has NaN/Inf."""
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if diff.size == 0:
        return 0.0, 0.0
    if not np.isfinite(diff).all():
        return float("inf"), float("inf")
    scale = float(np.abs(ref).max())
    top = float(diff.max())
    return top, (top / scale if scale > 0 else top)


def validate_graph(model: TTSModel, graph: str, candidate: Backend, label: str, precision: str,
                   points=POINTS, seed: int = 0, ref_device: str = "cpu", tolerance: float | None = None) -> dict:
    """Compare `candidate` with torch fp32 at each point; one dict per point with per-output errors."""
    _, _, Comparator, SimpleCompareFunc = _polygraphy()
    spec = candidate.spec
    tol = TOLERANCE[precision] if tolerance is None else tolerance
    ref_runner = torch_reference(model, graph, spec, ref_device)
    cand_runner = backend_runner(candidate, label)
    rows = []
    for i, point in enumerate(points):
        feed = spec.sample_feed(point, seed=seed + 101 * i)
        np_feed = OrderedDict((k, v.numpy()) for k, v in feed.items())
        results = Comparator.run([ref_runner, cand_runner], data_loader=[np_feed])
        ref_out = results[ref_runner.name][0]
        cand_out = results[cand_runner.name][0]
        finite = bool(Comparator.validate(results, check_inf=True, check_nan=True))
        atol = {t.name: tol * max(float(np.abs(ref_out[t.name]).max()) if ref_out[t.name].size else 0.0, 1e-30)
                for t in spec.outputs}
        compare = SimpleCompareFunc(check_shapes=True, rtol=0.0, atol=atol, check_error_stat="max")
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
        outputs = {}
        for t in spec.outputs:
            abs_err, rel_err = scaled_error(cand_out[t.name], ref_out[t.name])
            outputs[t.name] = {"max_abs_error": abs_err, "max_rel_error": rel_err,
                               "ref_max_abs": float(np.abs(ref_out[t.name]).max()) if ref_out[t.name].size else 0.0}
        ok = finite and bool(accuracy) and all(o["max_rel_error"] <= tol for o in outputs.values())
        rows.append({"graph": graph, "backend": label, "precision": precision, "point": point,
                     "sizes": spec.sizes_at(point), "tolerance": tol, "finite": finite, "passed": ok,
                     "outputs": outputs})
    return {"graph": graph, "backend": label, "precision": precision, "passed": all(r["passed"] for r in rows),
            "points": rows}


# -- audio level -------------------------------------------------------------------------------------
def snr_db(test: torch.Tensor, ref: torch.Tensor) -> float:
    n = min(test.numel(), ref.numel())
    if n == 0 or not torch.isfinite(test).all():
        return float("-inf")
    ref, test = ref[:n].double(), test[:n].double()
    noise = (test - ref).pow(2).sum().item()
    power = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(power, 1e-30) / noise)


def log_mel_distance(test: torch.Tensor, ref: torch.Tensor, sample_rate: int = 24000) -> float:
    from models.audio import cosyvoice_mel

    n = min(test.numel(), ref.numel())
    if n < 1920 or not torch.isfinite(test).all():
        return float("inf")
    a = cosyvoice_mel(test[:n].float().reshape(1, -1), sample_rate)
    b = cosyvoice_mel(ref[:n].float().reshape(1, -1), sample_rate)
    return float((a - b).abs().mean())


def validate_audio(model: TTSModel, backends: str, precision: str, engines_dir: str | None, device: str,
                   text: str = "Validation sentence number one. And a second, slightly longer one!",
                   tokens: int = 40, seed: int = 0) -> dict:
    """Whole-pipeline check: same text, seed and token count through torch fp32 and the candidate."""
    from runtime.pipeline import Pipeline

    ref_pipe = Pipeline(model, "torch", device=device)
    cand_pipe = Pipeline(model, backends, device=device, engines_dir=engines_dir, precision=precision)
    ref = ref_pipe.synthesize(text, seed=seed, fixed_tokens=tokens)
    cand = cand_pipe.synthesize(text, seed=seed, fixed_tokens=tokens)
    same_tokens = ref.tokens == cand.tokens
    # the waveform comparison feeds the reference tokens to both token -> audio paths, so an LLM
    # difference that flips one sampled token does not hide a flow or vocoder problem (or fake one)
    gen_a, gen_b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    speaker = model.make_speaker(None, None)
    waves = []
    for pipe, gen in ((ref_pipe, gen_a), (cand_pipe, gen_b)):
        pieces = []
        for sentence, toks in zip(ref.utterances, ref.tokens):
            utt = model.make_utterance(sentence, speaker)
            pieces.append(model.token2wav(toks, utt, pipe.run, gen, torch.device(device)).float().cpu())
        waves.append(torch.cat(pieces))
    snr = snr_db(waves[1], waves[0])
    dist = log_mel_distance(waves[1], waves[0], model.sample_rate)
    token_match = sum(a == b for ta, tb in zip(ref.tokens, cand.tokens) for a, b in zip(ta, tb))
    total = sum(len(t) for t in ref.tokens)
    ok = (snr >= AUDIO_SNR_DB[precision] and dist <= AUDIO_MEL_DIST[precision]
          and bool(torch.isfinite(waves[1]).all()) and float(waves[1].abs().max()) > 1e-4)
    return {"backends": {cand_pipe.stage_of[g]: str(x.option) for g, x in cand_pipe.loaded.items()}, "precision": precision, "snr_db": snr, "log_mel_distance": dist,
            "tokens_identical": same_tokens, "token_agreement": token_match / max(total, 1),
            "candidate_peak": float(waves[1].abs().max()), "samples": waves[0].numel(),
            "snr_floor_db": AUDIO_SNR_DB[precision], "mel_distance_ceiling": AUDIO_MEL_DIST[precision], "passed": ok}


# -- report ------------------------------------------------------------------------------------------
def write_report(root: str, graph_results: list[dict], audio: list[dict], meta: dict) -> tuple[str, str]:
    report = {"meta": meta, "graphs": graph_results, "audio": audio,
              "passed": all(g["passed"] for g in graph_results) and all(a["passed"] for a in audio)}
    jpath = os.path.join(root, "validation.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1, default=str)
    lines = [f"# Validation of {meta.get('model')} ({meta.get('when')})", "",
             f"Command: `{meta.get('command')}`", "", f"Device: {meta.get('device')}", "",
             "| graph | backend | precision | point | sizes | output | max abs err | max rel err | tol | finite | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in graph_results:
        for row in g["points"]:
            for name, o in row["outputs"].items():
                sizes = ",".join(f"{k}={v}" for k, v in row["sizes"].items())
                lines.append(f"| {row['graph']} | {row['backend']} | {row['precision']} | {row['point']} | {sizes} | {name} "
                             f"| {o['max_abs_error']:.3g} | {o['max_rel_error']:.3g} | {row['tolerance']:g} "
                             f"| {'yes' if row['finite'] else 'NO'} | {'yes' if row['passed'] else 'NO'} |")
    if audio:
        lines += ["", "Audio level (same speech tokens through both token -> audio paths):", "",
                  "| backends | precision | SNR dB | log-mel dist | tokens identical | pass |", "|---|---|---|---|---|---|"]
        for a in audio:
            b = ",".join(f"{k}={v}" for k, v in a["backends"].items())
            lines.append(f"| {b} | {a['precision']} | {a['snr_db']:.1f} | {a['log_mel_distance']:.2e} "
                         f"| {a['tokens_identical']} | {'yes' if a['passed'] else 'NO'} |")
    lines += ["", f"Overall: {'PASS' if report['passed'] else 'FAIL'}", ""]
    mpath = os.path.join(root, "validation.md")
    with open(mpath, "w") as f:
        f.write("\n".join(lines))
    return jpath, mpath
