"""Numerical validation of exported artifacts with Polygraphy.

Every artifact is compared with the eager PyTorch graph it came from, at the spec's min, opt and max
shapes, through Polygraphy's Comparator: a reference runner (our torch module) and a candidate runner
(the same runtime backend the pipeline uses: ONNX Runtime with IOBinding, TensorRT, ...), NaN/Inf
checks (`Comparator.validate`) and a per-output tolerance (`SimpleCompareFunc`). The tolerance is
relative to the output's scale: max |candidate - reference| <= tol * max |reference|, so one number
per precision works for logits, mels and audio alike.

Every point is run with K seeds (different random feeds, `seeds`, 8 for `python -m export validate`),
and every output's NaN / Inf values are counted per seed: an FP16 graph that overflows on one input in
eight is caught and named, not averaged away.

The audio-level check runs the whole pipeline twice from the same speech tokens (torch fp32 vs the
candidate backends for the stages under test, torch elsewhere) and reports the waveform SNR and a
log-mel distance, so a NaN, silent, shifted or truncated engine cannot pass even if every graph
looked fine in isolation. Waveforms of different lengths fail: they are never cut to the shorter one.

`certificate` condenses one artifact's results into its precision certificate (worst error per output
at each point, NaN / Inf counts over the seeds, the audio SNR and log-mel distance, the precision the
file really reaches, pass / fail), which `python -m export validate` prints, stores in the manifest
and writes to validation.md.
"""

from __future__ import annotations

import json
import math
import os
import re
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


def make_runner(name: str, spec: GraphSpec, infer, activate=lambda: None, deactivate=lambda: None):
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
            deactivate()

    return Runner(name=name)


def torch_reference(model: TTSModel, graph: str, spec: GraphSpec, device: str = "cpu"):
    module = {}

    def activate():
        if "m" not in module:
            module["m"] = model.graph_module(graph).float().eval().to(device)

    def infer_rows(feed):
        with torch.inference_mode():
            out = module["m"](*[feed[t.name].to(device) for t in spec.inputs])
        out = (out,) if isinstance(out, torch.Tensor) else out
        return {t.name: o.cpu() for t, o in zip(spec.outputs, out)}

    def infer(feed):
        # the rows the backends would run per call (GraphSpec.largest): the reference's memory stays
        # bounded like theirs, and its values are the same either way (rows are independent)
        groups = spec.row_groups(spec.sizes_of(feed))
        if len(groups) == 1:
            return infer_rows(feed)
        return spec.join_rows([infer_rows(spec.take_rows(feed, a, b)) for a, b in groups])

    def deactivate():
        # torch's cached blocks would otherwise be what the candidate (its own allocator) lacks
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()

    return make_runner(f"torch-fp32:{graph}", spec, infer, activate, deactivate)


def backend_runner(backend: Backend, label: str):
    return make_runner(f"{label}:{backend.spec.name}", backend.spec, lambda feed: backend.infer(feed), backend.activate)


def scaled_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |got - ref|, that over max |ref|); inf when either has NaN/Inf."""
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    # float32 arithmetic (float64 for other dtypes): a difference of two close float32 values is
    # exact, and a float64 copy of a real-size LLM cache output (453M values) took seconds and 3.6 GB
    wide = np.float32 if got.dtype == np.float32 and ref.dtype == np.float32 else np.float64
    diff = np.abs(got.astype(wide, copy=False) - ref.astype(wide, copy=False))
    if diff.size == 0:
        return 0.0, 0.0
    if not np.isfinite(diff).all():
        return float("inf"), float("inf")
    scale = float(np.abs(ref).max())
    top = float(diff.max())
    return top, (top / scale if scale > 0 else top)


# elements per piece of an output compared at once: Polygraphy's statistics (differences, medians,
# histograms) over a whole real-size LLM cache output (453M values for CosyVoice2 at B=32, 1.2G for
# Orpheus at B=8) took minutes per seed on the host, and validations ran out of their time without a line
COMPARE_PIECE = 1 << 26
_DEVICE_COMPARE_FAILED: list[str] = []


def _pieces(n: int, piece: int):
    return [(a, min(a + piece, n)) for a in range(0, n, piece)] or [(0, 0)]


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, tol: float, device: str = "cpu",
                   ref_name: str = "reference", got_name: str = "candidate", piece: int | None = None) -> dict:
    """One output of one run: Polygraphy's NaN/Inf check (`Comparator.validate`) and its max-error check
    (`SimpleCompareFunc`, atol = tol * max |ref|) piece by piece on `device` (the GPU the validation runs
    on: there each piece takes milliseconds), with the worst absolute and scaled error and the count of
    non-finite candidate values. The verdicts equal those of one whole-array comparison: "max" is the
    check, and a maximum over pieces is the maximum. {"finite", "accurate", "max_abs_error",
    "max_rel_error", "ref_max_abs", "nonfinite_values"}."""
    _, _, Comparator, SimpleCompareFunc = _polygraphy()
    from polygraphy.comparator.struct import IterationResult, RunResults

    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        nonfinite = int(got.size - np.count_nonzero(np.isfinite(got))) if got.dtype.kind == "f" else 0
        return {"finite": nonfinite == 0, "accurate": False, "max_abs_error": float("inf"),
                "max_rel_error": float("inf"), "ref_max_abs": 0.0, "nonfinite_values": nonfinite}
    dev = torch.device(device)
    if str(dev) in _DEVICE_COMPARE_FAILED:
        dev = torch.device("cpu")
    r, g = np.ascontiguousarray(ref).reshape(-1), np.ascontiguousarray(got).reshape(-1)
    # float32 differences of float32 values are exact; other dtypes compare in float64
    wide = torch.float32 if ref.dtype == np.float32 and got.dtype == np.float32 else torch.float64
    parts = _pieces(r.size, piece or COMPARE_PIECE)

    def on(x, a, b):
        return torch.from_numpy(x[a:b]).to(dev, non_blocking=False)

    try:
        with torch.inference_mode():
            scale = max((float(on(r, a, b).abs().max()) for a, b in parts if b > a), default=0.0)
            atol = {name: tol * max(scale, 1e-30)}
            finite = accurate = True
            top, nonfinite = 0.0, 0
            for a, b in parts:
                if b == a:
                    continue
                rc, gc = on(r, a, b), on(g, a, b)
                one = RunResults([(ref_name, [IterationResult({name: rc}, runner_name=ref_name)]),
                                  (got_name, [IterationResult({name: gc}, runner_name=got_name)])])
                finite &= bool(Comparator.validate(one, check_inf=True, check_nan=True))
                accurate &= bool(Comparator.compare_accuracy(
                    one, compare_func=SimpleCompareFunc(check_shapes=True, rtol=0.0, atol=atol, check_error_stat="max")))
                if gc.is_floating_point():
                    nonfinite += int((~torch.isfinite(gc)).sum())
                diff = (gc.to(wide) - rc.to(wide)).abs()
                top = float("inf") if not bool(torch.isfinite(diff).all()) else max(top, float(diff.max()))
                del rc, gc, diff, one
    except Exception as e:  # noqa: BLE001 - whatever it was, the host gives the same verdict or raises it
        if dev.type == "cpu":
            raise
        # a Polygraphy statistic it cannot take on this device: the host does it (slower, same verdict)
        _DEVICE_COMPARE_FAILED.append(str(dev))
        print(f"NOTE: comparing outputs on {dev} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
              f"comparing on the CPU from now on")
        return compare_output(name, ref, got, tol, "cpu", ref_name, got_name, piece)
    rel = top / scale if scale > 0 else top
    return {"finite": finite, "accurate": accurate, "max_abs_error": top, "max_rel_error": rel,
            "ref_max_abs": scale, "nonfinite_values": nonfinite}


def validate_graph(model: TTSModel, graph: str, candidate: Backend, label: str, precision: str,
                   points=POINTS, seed: int = 0, ref_device: str = "cpu", tolerance: float | None = None,
                   seeds: int = 1, fail_fast: bool = False) -> dict:
    """Compare `candidate` with torch fp32 at each point over `seeds` random feeds; one dict per point
    with per-output worst errors and NaN / Inf counts. A candidate that cannot run fails (with its error).
    fail_fast: stop at the first seed that fails and leave the later points out (`stopped_at` names
    the failing point): the build's candidate search needs only pass / fail, and a failing
    candidate's remaining runs (the max point last, the most expensive) would only confirm it."""
    _, _, Comparator, _ = _polygraphy()

    spec = candidate.spec
    tol = TOLERANCE[precision] if tolerance is None else tolerance
    ref_runner = torch_reference(model, graph, spec, ref_device)
    candidate.release_scratch = True  # torch runs beside it on the same device
    cand_runner = backend_runner(candidate, label)
    rows = []
    for i, point in enumerate(points):
        # a named point gets the same feeds whichever other points are validated with it (build checks
        # min,opt,max; `validate --points opt,max` must see the same max feeds, or a borderline graph
        # passes one and fails the other); seed k = 0 is the feed a single-seed run always used, the
        # others are spread far apart
        i = POINTS.index(point) if isinstance(point, str) and point in POINTS else i
        n_seeds = max(int(seeds), 1)
        row = {"graph": graph, "backend": label, "precision": precision, "point": point,
               "sizes": spec.sizes_at(point), "tolerance": tol, "seeds": n_seeds}
        outputs = {t.name: {"max_abs_error": 0.0, "max_rel_error": 0.0, "ref_max_abs": 0.0, "nonfinite_values": 0,
                            "nonfinite_seeds": 0} for t in spec.outputs}
        finite = accurate = True
        error = None
        # one seed at a time: a real-size max point's feeds and outputs are GBs each (the LLM's caches
        # at B=32, P=4096), so holding every seed's at once, twice, ran the host out of time and memory
        for k in range(n_seeds):
            feed = spec.sample_feed(point, seed=seed + 101 * i + 7919 * k)
            data = [OrderedDict((name, v.numpy()) for name, v in feed.items())]
            del feed
            try:
                results = Comparator.run([ref_runner, cand_runner], data_loader=data)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run fails like a wrong one
                error = run_error_summary(e)
                break
            ref_out = results[ref_runner.name][0]
            cand_out = results[cand_runner.name][0]
            seed_failed = False
            for t in spec.outputs:
                c = compare_output(t.name, ref_out[t.name], cand_out[t.name], tol, ref_device,
                                   ref_runner.name, cand_runner.name)
                finite &= c["finite"]
                accurate &= c["accurate"]
                o = outputs[t.name]
                o["max_abs_error"] = max(o["max_abs_error"], c["max_abs_error"])
                o["max_rel_error"] = max(o["max_rel_error"], c["max_rel_error"])
                o["ref_max_abs"] = max(o["ref_max_abs"], c["ref_max_abs"])
                o["nonfinite_values"] += c["nonfinite_values"]
                o["nonfinite_seeds"] += int(c["nonfinite_values"] > 0)
                seed_failed |= c["nonfinite_values"] > 0 or c["max_rel_error"] > tol
            del results, ref_out, cand_out, data
            if fail_fast and (seed_failed or not (finite and accurate)):
                break
        if error is not None:
            rows.append({**row, "finite": False, "passed": False, "error": error,
                         "outputs": {t.name: {"max_abs_error": float("inf"), "max_rel_error": float("inf"),
                                              "ref_max_abs": 0.0, "nonfinite_values": 0, "nonfinite_seeds": 0}
                                     for t in spec.outputs}})
            if fail_fast:
                break
            continue
        ok = finite and accurate and all(o["max_rel_error"] <= tol and not o["nonfinite_values"] for o in outputs.values())
        rows.append({**row, "finite": finite, "passed": ok, "outputs": outputs})
        if fail_fast and not ok:
            break
    result = {"graph": graph, "backend": label, "precision": precision, "passed": all(r["passed"] for r in rows),
              "seeds": max(int(seeds), 1), "points": rows}
    if fail_fast and not result["passed"]:
        result["stopped_at"] = rows[-1]["point"]
    return result


def run_error_summary(e: BaseException) -> str:
    """One line for a run that raised: its first line, plus the cuDNN status that ORT buries after
    long source paths (e.g. HEURISTIC_QUERY_FAILED), which says more than the rest."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0][:200]
    status = re.search(r"CUDNN_FE failure \d+: (\w+)|(CUDNN_STATUS_\w+)", text)
    if status and (status.group(1) or status.group(2)) not in line:
        line += f" [{status.group(1) or status.group(2)}]"
    return line


def worst_error(result: dict) -> float:
    """The largest relative error of any output at any point of a `validate_graph` result."""
    return max(o["max_rel_error"] for p in result["points"] for o in p["outputs"].values())


# -- audio level -------------------------------------------------------------------------------------
def snr_db(test: torch.Tensor, ref: torch.Tensor) -> float:
    """Waveform SNR in dB; -inf when the lengths differ (a candidate returning half the audio must
    not be scored on the half it returned), when it is empty or holds NaN / Inf."""
    if test.numel() != ref.numel() or test.numel() == 0 or not torch.isfinite(test).all():
        return float("-inf")
    ref, test = ref.reshape(-1).double(), test.reshape(-1).double()
    noise = (test - ref).pow(2).sum().item()
    power = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(power, 1e-30) / noise)


def log_mel_distance(test: torch.Tensor, ref: torch.Tensor, sample_rate: int = 24000) -> float:
    from models.audio import cosyvoice_mel

    if test.numel() != ref.numel() or ref.numel() < 1920 or not torch.isfinite(test).all():
        return float("inf")  # different lengths are a failure, never compared on the common part
    a = cosyvoice_mel(test.float().reshape(1, -1), sample_rate)
    b = cosyvoice_mel(ref.float().reshape(1, -1), sample_rate)
    return float((a - b).abs().mean())


def validate_audio(model: TTSModel, backends: str, precision: str, engines_dir: str | None, device: str,
                   text: str = "Validation sentence number one. And a second, slightly longer one!",
                   tokens: int = 40, seed: int = 0, stages: list[str] | None = None,
                   options: dict | None = None) -> dict:
    """Whole-pipeline check: same text, seed and token count through torch fp32 and the candidate
    (`backends` for `stages`, default all; torch for the others), both with the pipeline `options`."""
    from runtime.pipeline import Pipeline

    ref_pipe = Pipeline(model, "torch", device=device, options=options)
    # stages not under test run the fp32 reference (the pipeline precision would apply to them too)
    choice = backends if stages is None else {s: (backends if s in stages else "torch:fp32") for s in model.stages}
    cand_pipe = Pipeline(model, choice, device=device, engines_dir=engines_dir, precision=precision, options=options)
    ref = ref_pipe.synthesize(text, seed=seed, fixed_tokens=tokens)
    lm_stage = model.graph_specs()[model.lm.graph].stage
    # with the LM on torch in both, the candidate's tokens are the reference's: not generated twice
    cand = cand_pipe.synthesize(text, seed=seed, fixed_tokens=tokens) if stages is None or lm_stage in stages else ref
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
    finite = bool(torch.isfinite(waves[1]).all())
    peak = float(waves[1].abs().max()) if waves[1].numel() else 0.0
    problems = []
    if waves[1].numel() != waves[0].numel():
        problems.append(f"{waves[1].numel()} samples, torch made {waves[0].numel()}")
    if not finite:
        problems.append(f"{int((~torch.isfinite(waves[1])).sum())} NaN/Inf samples")
    if peak <= 1e-4:
        problems.append("silent")
    ok = not problems and snr >= AUDIO_SNR_DB[precision] and dist <= AUDIO_MEL_DIST[precision]
    return {"backends": {cand_pipe.stage_of[g]: str(x.option) for g, x in cand_pipe.loaded.items()},
            "options": dict(cand_pipe.options), "precision": precision, "snr_db": snr, "log_mel_distance": dist,
            "tokens_identical": same_tokens, "token_agreement": token_match / max(total, 1),
            "candidate_peak": peak, "samples": waves[0].numel(), "candidate_samples": waves[1].numel(),
            "problems": problems, "snr_floor_db": AUDIO_SNR_DB[precision],
            "mel_distance_ceiling": AUDIO_MEL_DIST[precision], "passed": ok}


# -- certificate -------------------------------------------------------------------------------------
def certificate(result: dict, audio: dict | None, reached: dict | None, device: str) -> dict:
    """One artifact's precision certificate from its `validate_graph` result, the audio check of the
    pipeline it ran in (None when none could run) and what its content computes in (`reached_precision`)."""
    outputs: dict[str, dict] = {}
    errors = sorted({p["error"] for p in result["points"] if p.get("error")})
    for row in result["points"]:
        for name, o in row["outputs"].items():
            c = outputs.setdefault(name, {"worst_rel_error": {}, "worst_abs_error": {}, "nonfinite_values": 0,
                                          "nonfinite_runs": 0})
            c["worst_rel_error"][row["point"]] = o["max_rel_error"]
            c["worst_abs_error"][row["point"]] = o["max_abs_error"]
            c["nonfinite_values"] += o["nonfinite_values"]
            c["nonfinite_runs"] += o["nonfinite_seeds"]
    cert = {"passed": bool(result["passed"] and (audio is None or audio["passed"])), "precision": result["precision"],
            "precision_reached": (reached or {}).get("reached", "unknown"), "device": device,
            "seeds": result.get("seeds", 1), "points": [p["point"] for p in result["points"]],
            "tolerance": result["points"][0]["tolerance"] if result["points"] else None, "outputs": outputs,
            "audio": None if audio is None else {k: audio[k] for k in ("snr_db", "log_mel_distance", "passed", "problems")
                                                  if k in audio},
            "when": time.strftime("%Y-%m-%d %H:%M")}
    if reached:
        cert["matmul_conv"] = {k: v for k, v in reached.items() if k != "reached"}
    if errors:
        cert["errors"] = errors
    return cert


def certificate_lines(certs: list[tuple[str, str, dict]]) -> list[str]:
    """A markdown table of certificates: (graph, backend label, certificate) per row, one row per output."""
    lines = ["| graph | backend | label | reached | output | worst rel err min / opt / max | NaN/Inf (runs) "
             "| audio SNR dB | log-mel dist | pass |", "|---|---|---|---|---|---|---|---|---|---|"]
    for graph, label, c in certs:
        a = c.get("audio")
        snr = "-" if a is None else f"{a['snr_db']:.1f}"
        mel = "-" if a is None else f"{a['log_mel_distance']:.2e}"
        runs = c["seeds"] * len(c["points"])
        for name, o in c["outputs"].items():
            errs = " / ".join(f"{o['worst_rel_error'][p]:.2e}" if p in o["worst_rel_error"] else "-"
                              for p in ("min", "opt", "max"))
            bad = f"{o['nonfinite_values']} ({o['nonfinite_runs']}/{runs})"
            lines.append(f"| {graph} | {label} | {c['precision']} | {c['precision_reached']} | {name} | {errs} | {bad} "
                         f"| {snr} | {mel} | {'yes' if c['passed'] else 'NO'} |")
    return lines


# -- report ------------------------------------------------------------------------------------------
def write_report(root: str, graph_results: list[dict], audio: list[dict], meta: dict,
                 certificates: list[tuple[str, str, dict]] = ()) -> tuple[str, str]:
    report = {"meta": meta, "graphs": graph_results, "audio": audio,
              "certificates": [{"graph": g, "backend": b, **c} for g, b, c in certificates],
              "passed": all(g["passed"] for g in graph_results) and all(a["passed"] for a in audio)
              and all(c["passed"] for _, _, c in certificates)
              and not any(n.get("named") for n in meta.get("not_validated") or [])}
    jpath = os.path.join(root, "validation.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1, default=str)
    lines = [f"# Validation of {meta.get('model')} ({meta.get('when')})", "",
             f"Command: `{meta.get('command')}`", "", f"Device: {meta.get('device')}", ""]
    if certificates:
        lines += ["## Precision certificates", "",
                  "Per artifact and output: the worst error against fp32 torch (relative to the output's scale) at "
                  "each point over every seed, NaN/Inf values (and in how many runs), the audio of the pipeline it "
                  "ran in, and the precision its matmuls / convolutions really run in (`reached`).", "",
                  *certificate_lines(list(certificates)), "", "## Every point", ""]
    lines += ["| graph | backend | precision | point | sizes | seeds | output | max abs err | max rel err | NaN/Inf | tol "
              "| finite | pass |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in graph_results:
        for row in g["points"]:
            for name, o in row["outputs"].items():
                sizes = ",".join(f"{k}={v}" for k, v in row["sizes"].items())
                lines.append(f"| {row['graph']} | {row['backend']} | {row['precision']} | {row['point']} | {sizes} "
                             f"| {row.get('seeds', 1)} | {name} | {o['max_abs_error']:.3g} | {o['max_rel_error']:.3g} "
                             f"| {o.get('nonfinite_values', 0)} | {row['tolerance']:g} "
                             f"| {'yes' if row['finite'] else 'NO'} | {'yes' if row['passed'] else 'NO'} |")
            if row.get("error"):
                lines.append(f"| {row['graph']} | {row['backend']} | {row['precision']} | {row['point']} | | | "
                             f"error: {row['error'].replace('|', '/')} | | | | | NO | NO |")
    if audio:
        lines += ["", "Audio level (same speech tokens through both token -> audio paths):", "",
                  "| backends | precision | SNR dB | log-mel dist | tokens identical | problems | pass |",
                  "|---|---|---|---|---|---|---|"]
        for a in audio:
            b = ",".join(f"{k}={v}" for k, v in a["backends"].items())
            b += "".join(f" ({k} {v})" for k, v in a.get("options", {}).items())
            lines.append(f"| {b} | {a['precision']} | {a['snr_db']:.1f} | {a['log_mel_distance']:.2e} "
                         f"| {a['tokens_identical']} | {'; '.join(a.get('problems', [])) or '-'} "
                         f"| {'yes' if a['passed'] else 'NO'} |")
    missing = meta.get("not_validated") or []
    if missing:
        lines += ["", "Not validated (no artifact in this folder):", "",
                  *[f"- {n['graph']} {n['backend']}: `{n['fix']}`" for n in missing]]
    lines += ["", f"Overall: {'PASS' if report['passed'] else 'FAIL'}"
              f"{f' ({len(missing)} not validated)' if missing else ''}", ""]
    mpath = os.path.join(root, "validation.md")
    with open(mpath, "w") as f:
        f.write("\n".join(lines))
    return jpath, mpath
