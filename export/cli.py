"""python -m export {onnx, validate, build}: artifacts for every stage of a model.

    python -m export onnx --model cosyvoice3-tiny [--stages llm,flow,vocoder] [--out-dir engines/cosyvoice3-tiny]
    python -m export validate --model cosyvoice3-tiny [--backends ort] [--precision fp32] [--points min,opt,max] [--seeds 8]
    python -m export build --model cosyvoice3-tiny [--precision fp32,fp16,int8] [--allow-fallback] [--bisect-rounds 24]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

import click

from models.errors import UserError, exit_on_user_error


def _split(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UserError(f"unknown {what} {', '.join(bad) or repr(value)}.", f"choose from {', '.join(allowed)}")
    return items


def _model(name: str, device: str = "cpu", seed: int = 0):
    from models.registry import load_model

    return load_model(name, device=device, seed=seed)


def _source_hash(model, stage: str) -> str:
    hashes = model.checkpoint_hashes()
    return hashes.get(stage, "") if hashes else f"random-weights:{model.name}:seed={getattr(model, 'seed', 0)}"


def check_out_dir(out_dir: str | None) -> None:
    """Refuse, before any export, an artifact folder that is a file or where nothing can be written
    (missing folders are created)."""
    from models.files import check_folder_writable

    if out_dir is None:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a folder.", "pass a folder for the artifacts with --out-dir")
    check_folder_writable(out_dir, out_dir, "--out-dir", create=True)


def torch_backends_fp32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@click.group()
def main():
    """Export, build and validate deployable artifacts of a TTS model."""


@main.command("onnx")
@click.option("--model", "model_name", required=True, help="Preset name or upstream model folder.")
@click.option("--stages", default=None, help="Stages to export (default: all of the model's: llm,flow,vocoder).")
@click.option("--graphs", default=None, help="Only these graphs (e.g. flow_solver,vocoder).")
@click.option("--out-dir", default=None, help="Artifact folder (default engines/<model>).")
@click.option("--seed", default=0, show_default=True, help="Seed of random-weight presets.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Run the exporter's ONNX optimizer (constant folding, rewrites). ONNX Runtime and TensorRT optimize "
                   "at load either way; --no-optimize exports a large graph (the unrolled flow solver) in a fraction "
                   "of the time.")
@exit_on_user_error
def onnx_cmd(model_name, stages, graphs, out_dir, seed, optimize):
    """Export every graph of the chosen stages to fp32 ONNX and check each (checker, shapes, ORT run)."""
    from export.onnx_export import export_graph
    from runtime.artifacts import Manifest, default_dir, file_artifact, onnx_path
    from runtime.progress import Progress

    check_out_dir(out_dir)
    model = _model(model_name, seed=seed)
    root = out_dir or default_dir(model.name)
    check_out_dir(root)
    chosen = _split(stages, model.stages, "stage") if stages else list(model.stages)
    specs = model.graph_specs()
    names = [g for g, s in specs.items() if s.stage in chosen]
    if graphs:
        names = [g for g in _split(graphs, list(specs), "graph") if g in names]
    manifest = Manifest.load(root, required=False)
    manifest.model, manifest.family, manifest.model_info = model.name, model.family, model.describe()
    if model.random_weights:
        click.echo(f"NOTE: {model.name} has random weights (real sizes for benchmarks, tiny for tests).", err=True)
    t_all = time.perf_counter()
    # one graph can take minutes: a bar (terminal) or a line per graph and every 30 s (logs) on stderr
    with Progress("export", len(names), announce=True) as progress:
        for i, g in enumerate(names, 1):
            path = onnx_path(root, "fp32", g)
            progress.step(g)
            facts = export_graph(model, g, path, _source_hash(model, specs[g].stage), optimize=optimize)
            art = file_artifact(root, path, g, "fp32", "onnx", source_sha256=_source_hash(model, specs[g].stage),
                                profiles=specs[g].profile(), spec=specs[g].to_dict(),
                                built={"export": facts, "tool": "torch.onnx (dynamo)", "optimized": optimize},
                                fingerprint=model.fingerprint(g), made_from=model.provenance(g))
            manifest.add(art)
            manifest.save()  # after every graph: an interrupted export keeps what is done
            err = max(facts.get("ort_vs_torch_at_opt", {0: 0.0}).values())
            progress.echo(f"[{i}/{len(names)}] {g:<15} {facts['export_seconds']:6.1f} s  {art.bytes / 1e6:9.1f} MB  "
                          f"checker ok, ORT vs torch at opt: {err:.1e}")
    click.echo(f"exported {len(names)} graph(s) to {root} in {time.perf_counter() - t_all:.1f} s")


@main.command("validate")
@click.option("--model", "model_name", required=True, help="Preset name or upstream model folder.")
@click.option("--backends", default="ort", show_default=True, help="Candidate backends to compare with torch.")
@click.option("--precision", "precisions", default="fp32", show_default=True, help="Comma list: fp32,fp16,int8.")
@click.option("--points", default="min,opt,max", show_default=True, help="Spec points to compare at.")
@click.option("--seeds", type=click.IntRange(min=1), default=8, show_default=True,
              help="Random feeds per point: the worst error and the NaN/Inf count are taken over all of them.")
@click.option("--graphs", default=None, help="Only these graphs.")
@click.option("--out-dir", default=None, help="Artifact folder (default engines/<model>).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (candidates and reference).")
@click.option("--audio/--no-audio", default=True, show_default=True, help="Also compare whole-pipeline audio.")
@click.option("--seed", default=0, show_default=True, help="Seed of random-weight presets.")
@exit_on_user_error
def validate_cmd(model_name, backends, precisions, points, seeds, graphs, out_dir, device, audio, seed):
    """Compare every artifact with the torch graph at min/opt/max (Polygraphy) over several seeds, check the
    audio, print and record each artifact's precision certificate; non-zero exit on failure."""
    from export.validate import certificate, certificate_lines, validate_graph, worst_error, write_report
    from runtime.artifacts import PRECISIONS, Manifest, default_dir
    from runtime.backends import KINDS, Option, create_backend
    from runtime.synthesize import check_device

    device = check_device(device)
    if device.startswith("cuda"):  # the fp32 reference must be fp32, not TF32
        torch_backends_fp32()
    model = _model(model_name, device="cpu", seed=seed)
    root = out_dir or default_dir(model.name)
    manifest = Manifest.load(root)
    kinds = _split(backends, [k for k, kind in KINDS.items() if kind.artifact in ("onnx", "plan")], "backend")
    precs = _split(precisions, PRECISIONS, "precision")
    pts = _split(points, ("min", "opt", "max"), "point")
    specs = model.graph_specs()
    wanted = _split(graphs, list(specs), "graph") if graphs else list(specs)
    results, audio_rows, certs, not_validated = [], [], [], []
    import torch

    for kind in kinds:
        art_kind = KINDS[kind].artifact
        for prec in precs:
            todo = [g for g in wanted if manifest.get(g, prec, art_kind)]
            if not todo:
                click.echo(f"{kind} {prec}: no artifacts in {root}; skipped", err=True)
                continue
            # a graph without this artifact is not validated, and the report says so: a PASS over the
            # graphs present must not read as the whole model's (a killed export left the Orpheus vocoder
            # out of a GPU validation that printed PASS for the LLM alone)
            for g in (g for g in wanted if g not in todo):
                how = "export onnx" if prec == "fp32" else f"export build --precision {prec}"
                not_validated.append({"graph": g, "backend": f"{kind}-{prec}", "named": bool(graphs),
                                      "fix": f"python -m {how} --model {model.name} --graphs {g} --out-dir {root}"})
                click.echo(f"NOT VALIDATED: {g} {kind}-{prec}: no artifact in {root}. Fix: run "
                           f"{not_validated[-1]['fix']}", err=True)
            done = []
            for g in todo:
                # the registry refuses a file made from other weights, seed or family (its fingerprint)
                backend = create_backend(Option(kind, prec), model, specs[g], torch.device(device), engines_dir=root)
                t0 = time.perf_counter()
                res = validate_graph(model, g, backend, f"{kind}-{prec}", prec, points=pts, ref_device=device, seeds=seeds)
                backend.deactivate()
                bad = sum(o["nonfinite_values"] for p in res["points"] for o in p["outputs"].values())
                click.echo(f"{g:<15} {kind}-{prec:<5} {'PASS' if res['passed'] else 'FAIL'}  max rel err {worst_error(res):.2e} "
                           f"(tol {res['points'][0]['tolerance']:g}), NaN/Inf {bad} over {seeds} seed(s)  "
                           f"{time.perf_counter() - t0:.1f} s")
                results.append(res)
                done.append((g, res))
            # the audio of the pipeline with these artifacts in their stages (torch in the others)
            stages = [st for st in model.stages if any(specs[g].stage == st for g in todo)]
            # the pipeline layout whose graphs all have artifacts here (a folder with the per-step
            # estimator but not the one-graph solver is heard in steps mode)
            options = _options_with(model, stages, lambda g: manifest.get(g, prec, art_kind) is not None)
            in_pipeline = [g for st in stages for g in model.stage_graphs(options)[st]] if options is not None else []
            row = None
            if audio and options is not None:
                row = _audio_check(model, kind, prec, root, device, stages, options)
                click.echo(f"audio {kind}-{prec} ({','.join(stages)}{_options_text(options)}): SNR {row['snr_db']:.1f} dB, log-mel distance "
                           f"{row['log_mel_distance']:.2e}, tokens identical: {row['tokens_identical']}"
                           f"{'; ' + '; '.join(row['problems']) if row['problems'] else ''}  {'PASS' if row['passed'] else 'FAIL'}")
                audio_rows.append(row)
            for g, res in done:
                art = manifest.get(g, prec, art_kind)
                cert = certificate(res, row if g in in_pipeline else None, _reached(manifest, art), device)
                if prec != "fp32" and cert["precision_reached"] == "fp32":
                    click.echo(f"NOTE: {g} {kind}-{prec} holds no {prec} matmul or convolution: it runs fp32 "
                               f"(a fallback its build was allowed to keep)", err=True)
                art.validation[f"{kind}:{device}"] = cert
                certs.append((g, f"{kind}-{prec}", cert))
    manifest.save()
    meta = {"model": model.name, "device": device, "when": time.strftime("%Y-%m-%d %H:%M"), "seeds": seeds,
            "command": "python -m export validate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "",
            "not_validated": not_validated}
    jpath, mpath = write_report(root, results, audio_rows, meta, certs)
    if certs:
        click.echo("\nPrecision certificates (worst error relative to each output's scale, over every seed):")
        for line in certificate_lines(certs):
            click.echo(line)
    ok = all(r["passed"] for r in results) and all(a["passed"] for a in audio_rows) and all(c["passed"] for *_, c in certs)
    # a graph the user named (--graphs) and that has no artifact fails the run; one left out of a
    # whole-model validation is listed beside the verdict
    ok = ok and not any(n["named"] for n in not_validated)
    gaps = f" ({len(not_validated)} not validated: {', '.join(n['graph'] + ' ' + n['backend'] for n in not_validated)})" \
        if not_validated else ""
    # nothing validated is no PASS (it printed one before the error that followed it)
    if not results:
        raise UserError(f"nothing to validate in {root} for {backends} {precisions}.", "export first: python -m export onnx")
    click.echo(f"{'PASS' if ok else 'FAIL'}{gaps}: report in {mpath} and {jpath}")
    if not ok:
        sys.exit(1)


def _options_with(model, stages: list[str], present) -> dict | None:
    """The first pipeline options (the family's defaults first) under which every graph of `stages` is
    `present`, or None when no layout's graphs all are."""
    import itertools

    names = list(model.options)
    for values in itertools.product(*(model.options[n] for n in names)):
        options = dict(zip(names, values))
        graphs = model.stage_graphs(options)
        if all(present(g) for st in stages for g in graphs[st]):
            return options
    return None


def _options_text(options: dict) -> str:
    return "".join(f", {k}={v}" for k, v in options.items())


def _audio_check(model, kind: str, prec: str, root: str, device: str, stages: list[str], options: dict) -> dict:
    """validate_audio, with a candidate that cannot run recorded as a failure instead of ending the run."""
    from export.validate import validate_audio

    try:
        return validate_audio(model, kind, prec, root, device, stages=stages, options=options)
    except (UserError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return {"backends": {s: f"{kind}:{prec}" for s in stages}, "precision": prec, "snr_db": float("-inf"),
                "log_mel_distance": float("inf"), "tokens_identical": False, "problems": [f"failed to run: {first}"],
                "passed": False}


def _reached(manifest, art) -> dict | None:
    """What an artifact's content really computes in: read from the ONNX itself (a plan: from the ONNX
    it was built from, when that is still the one in the manifest)."""
    from export.precision import reached_precision

    onnx_art = art if art.kind == "onnx" else manifest.get(art.graph, art.precision, "onnx")
    if onnx_art is None or (art is not onnx_art and art.source_sha256 != onnx_art.sha256):
        reached = art.notes.get("precision_reached")
        return {"reached": reached} if reached else None
    return reached_precision(manifest.abspath(onnx_art))


@main.command("build")
@click.option("--model", "model_name", required=True, help="Preset name or upstream model folder.")
@click.option("--precision", "precisions", default="fp32,fp16,int8", show_default=True, help="Comma list of precisions.")
@click.option("--trt/--no-trt", default=False, show_default=True, help="Also build TensorRT plans (when installed).")
@click.option("--aoti/--no-aoti", default=False, show_default=True,
              help="Also build AOTInductor packages (.pt2) for fp32/fp16 on --device.")
@click.option("--graphs", default=None, help="Only these graphs.")
@click.option("--out-dir", default=None, help="Artifact folder (default engines/<model>).")
@click.option("--device", default="cpu", show_default=True, help="Where candidates are validated (cpu or cuda).")
@click.option("--workspace-gb", default=8.0, show_default=True, help="TensorRT workspace limit.")
@click.option("--opt-level", default=3, show_default=True, help="TensorRT builder optimization level (0-5).")
@click.option("--hardware-compat/--no-hardware-compat", default=False, help="TensorRT plans for Ampere and newer GPUs.")
@click.option("--version-compat/--no-version-compat", default=False, help="TensorRT plans usable by later TensorRT versions.")
@click.option("--timing-cache", default=None, help="Persistent TensorRT timing cache (default <out-dir>/trt/timing.cache).")
@click.option("--seed", default=0, show_default=True, help="Seed of random-weight presets.")
@click.option("--calibration-texts", type=click.IntRange(min=1), default=None,
              help="INT8 calibration on the first N shipped texts only (default: all of them).")
@click.option("--allow-fallback", is_flag=True, default=False,
              help="Record a graph that reaches no fp16 / int8 matmul or convolution within the tolerance as what it "
                   "is (fp32, in the fp16 / int8 slot, said in the manifest and at load). Without it such a build fails.")
@click.option("--bisect-rounds", type=click.IntRange(min=0), default=24, show_default=True,
              help="Validations per graph and precision spent finding the nodes that must stay fp32 / unquantised "
                   "when the full conversion fails (0: keep a whole ladder level instead).")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Random feeds per point when validating candidates (python -m export validate uses 8).")
@exit_on_user_error
def build_cmd(model_name, precisions, trt, aoti, graphs, out_dir, device, workspace_gb, opt_level, hardware_compat,
              version_compat, timing_cache, seed, calibration_texts, allow_fallback, bisect_rounds, seeds):
    """FP32 / FP16 / INT8 ONNX artifacts (validated while built) and TensorRT plans from them."""
    import torch

    from export.calibration import load_or_capture
    from export.onnx_export import export_graph
    from export.precision import reached_precision, search_fp16, search_int8, write_sidecar
    from export.tensorrt_build import INSTALL_FIX, build_plan, import_tensorrt
    from export.validate import certificate, validate_graph
    from runtime.artifacts import (PRECISIONS, Manifest, default_dir, file_artifact, onnx_path, provenance_difference,
                                   read_metadata, set_metadata)
    from runtime.backends.onnxrt import OrtBackend
    from runtime.progress import Progress
    from runtime.synthesize import check_device

    device = check_device(device)
    precs = _split(precisions, PRECISIONS, "precision")
    check_out_dir(out_dir)
    if device.startswith("cuda"):
        torch_backends_fp32()
    model = _model(model_name, seed=seed)
    root = out_dir or default_dir(model.name)
    check_out_dir(root)
    specs = model.graph_specs()
    names = _split(graphs, list(specs), "graph") if graphs else list(specs)
    # a graph's fp32 export and its candidates can take minutes: a bar or periodic lines on stderr
    progress = Progress("build", len(names), announce=True)
    say = progress.echo
    manifest = Manifest.load(root, required=False)
    manifest.model, manifest.family, manifest.model_info = model.name, model.family, model.describe()
    if model.random_weights:
        click.echo(f"NOTE: {model.name} has random weights: artifacts are for tests and benchmarks.", err=True)

    def fp32_of(g):
        """The fp32 ONNX every other precision is made from: the one in the manifest when it was made
        from this very model (its fingerprint), else exported now."""
        art = manifest.get(g, "fp32", "onnx")
        if art is not None and art.fingerprint != model.fingerprint(g):
            why = provenance_difference(art.made_from, model.provenance(g)) if art.fingerprint else "it has no fingerprint"
            say(f"{g:<15} fp32  the fp32 ONNX in {root} was made from other weights ({why}): exporting it again", err=True)
            art = None
        if art is None:
            path = onnx_path(root, "fp32", g)
            say(f"{g:<15} fp32  exporting ...")
            facts = export_graph(model, g, path, _source_hash(model, specs[g].stage))
            art = manifest.add(file_artifact(root, path, g, "fp32", "onnx", source_sha256=_source_hash(model, specs[g].stage),
                                             profiles=specs[g].profile(), spec=specs[g].to_dict(), built={"export": facts},
                                             fingerprint=model.fingerprint(g), made_from=model.provenance(g)))
            manifest.save()
        return manifest.verify(art, fix=f"delete {root} and build again"), art

    def check(g, prec, path):
        """Validate a candidate file at min/opt/max over `seeds` feeds (a candidate that cannot run fails)."""
        backend = OrtBackend(specs[g], torch.device(device), path, graph_spec=specs[g])
        try:
            # pass / fail is all the search needs: a failing candidate stops at its first failing seed
            return validate_graph(model, g, backend, f"ort-{prec}", prec, ref_device=device, seeds=seeds, fail_fast=True)
        finally:
            backend.deactivate()

    feeds = {}
    if "int8" in precs:
        # the capture runs the torch pipeline over every text: on the GPU when building for one (the
        # Orpheus 3B LM writes the vocoder's codes: ~10 s a text on the CPU), in a copy of the model
        # there, since the one exported here must stay on the CPU (same weights: presets draw on the CPU)
        on_gpu = device.startswith("cuda")
        feeds = load_or_capture(model, names, os.path.join(root, "calibration"), device=device, log=click.echo,
                                count=calibration_texts,
                                capture_model=(lambda: _model(model_name, device=device, seed=seed)) if on_gpu else None)
        if on_gpu:
            torch.cuda.empty_cache()  # the copy is gone: its memory goes back for the ORT sessions
    def record(g, prec, dst, found, reached, src_art, interim=False):
        """Label `dst` with what it reached and record it in the manifest (with the node list beside it
        and its certificate). `interim`: a candidate that passed while the search goes on (its notes
        say so; the search's end records it again, or a better one)."""
        kept = found["kept"]
        meta = read_metadata(dst)
        meta.update({"tts.precision": prec, "tts.precision_reached": reached["reached"]})
        set_metadata(dst, meta)
        notes = {k: v for k, v in found["facts"].items() if k not in ("fp32_node_names", "unquantized_node_names")}
        notes.update(level=found["level"], tried=found["tried"], precision_reached=reached["reached"],
                     matmul_conv={k: v for k, v in reached.items() if k != "reached"},
                     fallback=found.get("fallback", False), kept_nodes=len(kept))
        if interim:
            notes["search"] = "under way: the last candidate that passed (a stopped build keeps this one)"
        if found.get("bisection"):
            notes["bisection"] = found["bisection"]
        names_file = dst.replace(".onnx", ".fp32_nodes.json" if prec == "fp16" else ".unquantized_nodes.json")
        write_sidecar(names_file, {"graph": g, "level": found["level"], "nodes": kept,
                                   "why": "kept in fp32" if prec == "fp16" else "left unquantised"})
        notes["kept_node_list"] = os.path.relpath(names_file, root)
        art = file_artifact(root, dst, g, prec, "onnx", source_sha256=src_art.sha256,
                            profiles=specs[g].profile(), spec=specs[g].to_dict(), notes=notes,
                            fingerprint=src_art.fingerprint, made_from=src_art.made_from)
        art.validation[f"ort:{device}"] = certificate(found["result"], None, reached, device)
        manifest.add(art)
        manifest.save()

    refused = []  # (graph, precision, why): not recorded, the build fails at the end
    with progress:
        for g in names:
            progress.step(g)
            src, src_art = fp32_of(g)
            for prec in precs:
                if prec == "fp32":
                    continue
                dst = onnx_path(root, prec, g)
                log = lambda line, g=g, prec=prec: say(f"{g:<15} {prec}  {line}")  # noqa: E731
                # candidates are written and validated beside the artifact (same file name, so an external
                # data file keeps its name), and each one that passes is moved into place and recorded at
                # once: a build stopped during a long bisection (a step limit, Ctrl-C) keeps the last
                # candidate that passed, labelled as such, instead of losing the level that passed
                trial = os.path.join(os.path.dirname(dst), ".candidates", os.path.basename(dst))
                promote = lambda found, g=g, prec=prec, dst=dst, trial=trial: _promote(  # noqa: E731
                    found, trial, dst, lambda f, r: record(g, prec, dst, f, r, src_art, interim=True))
                try:
                    if prec == "fp16":
                        found = search_fp16(src, trial, lambda: check(g, "fp16", trial), bisect_rounds, log, promote)
                    else:
                        cache = dst + ".ranges.json"  # this graph's calibration ranges, shared by its candidates
                        if os.path.exists(cache):
                            os.remove(cache)
                        try:
                            found = search_int8(src, trial, feeds.get(g, []), lambda: check(g, "int8", trial), bisect_rounds,
                                                log, cache=cache, on_pass=promote)
                        finally:
                            if os.path.exists(cache):
                                os.remove(cache)
                finally:
                    _remove_candidates(trial)
                reached = reached_precision(dst) if found["passed"] else {"reached": "none"}
                fallback = not found["passed"] or reached["reached"] == "fp32"
                if fallback and not allow_fallback:
                    why = ("no candidate passed the tolerance" if not found["passed"] else
                           f"what passed keeps every matmul and convolution in fp32 ({found['level']})")
                    say(f"{g:<15} {prec}  FAILED: {why}; not recorded (--allow-fallback records it as fp32)", err=True)
                    refused.append((g, prec, why))
                    for p in (dst, dst + ".data"):
                        if os.path.exists(p):
                            os.remove(p)
                    manifest.artifacts.pop((g, prec, "onnx"), None)
                    manifest.save()
                    continue
                if not found["passed"]:  # allowed: the fp32 file itself, which is what it is
                    shutil.copy(src, dst)
                    if os.path.exists(src + ".data"):
                        shutil.copy(src + ".data", dst + ".data")
                    found = {**found, "passed": True, "level": "fp32 (fallback)", "kept": [], "facts": {},
                             "result": check(g, prec, dst)}
                    reached = reached_precision(dst)
                kept = found["kept"]
                record(g, prec, dst, {**found, "fallback": fallback}, reached, src_art)
                share = reached[f"matmul_conv_{prec}"]
                which = f": {', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}" if kept else ""
                summary = (f"reached {reached['reached']} ({share}/{reached['matmul_conv']} matmul/conv in {prec}, "
                           f"{len(kept)} node(s) {'kept fp32' if prec == 'fp16' else 'unquantised'}{which}; "
                           f"level {found['level']})")
                if fallback:
                    say(f"{g:<15} {prec}  FALLBACK (allowed): recorded as fp32 in the {prec} slot: {summary}", err=True)
                else:
                    say(f"{g:<15} {prec}  {summary}")
    if aoti:
        from export.aoti import build_aoti

        for prec in [p for p in precs if p in ("fp32", "fp16")]:
            for g in names:
                path = os.path.join(root, "aoti", prec, f"{g}.pt2")
                dtype = torch.float16 if prec == "fp16" else torch.float32
                built = build_aoti(model, g, path, device=device, dtype=dtype)
                manifest.add(file_artifact(root, path, g, prec, "pt2", profiles=specs[g].profile(), spec=specs[g].to_dict(),
                                           built=built, fingerprint=model.fingerprint(g), made_from=model.provenance(g)))
                manifest.save()
                click.echo(f"{g:<15} {prec}  AOTInductor package built in {built['build_seconds']} s ({device})")
    if trt:
        if import_tensorrt() is None:
            click.echo(f"TensorRT plans skipped: the tensorrt package is not installed ({INSTALL_FIX}).")
        else:
            cache = timing_cache or os.path.join(root, "trt", "timing.cache")
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            for prec in precs:
                for g in names:
                    onnx_art = manifest.get(g, prec, "onnx")
                    if onnx_art is None:
                        continue
                    plan = os.path.join(root, "trt", prec, f"{g}.plan")
                    built = build_plan(manifest.verify(onnx_art, fix="build again"), plan, specs[g], workspace_gb,
                                       opt_level, cache, hardware_compat, version_compat, log=click.echo)
                    manifest.add(file_artifact(root, plan, g, prec, "plan", source_sha256=onnx_art.sha256,
                                               profiles=specs[g].profile(), spec=specs[g].to_dict(), built=built,
                                               fingerprint=onnx_art.fingerprint, made_from=onnx_art.made_from,
                                               notes={"precision_reached": onnx_art.notes.get("precision_reached", prec)}))
                    manifest.save()
                    click.echo(f"{g:<15} {prec}  plan built in {built['build_seconds']} s ({built['tensorrt']}, {built.get('gpu')})")
    manifest.save()
    click.echo(f"artifacts and manifest in {root}")
    if refused:
        listed = ", ".join(f"{g} {p}" for g, p, _ in refused)
        raise UserError(f"{len(refused)} artifact(s) reach no fp16 / int8 matmul or convolution within the tolerance and "
                        f"were not recorded: {listed} (their lines above say why).",
                        "pass --allow-fallback to record them as fp32 (the manifest and the runtime say so), "
                        "or build them without that precision")


if __name__ == "__main__":
    main()


def _promote(found: dict, trial: str, dst: str, record) -> None:
    """A candidate passed: move its file (and external data) from `trial` to `dst`, then
    `record(found, reached)` it unless it reached no fp16 / int8 matmul or convolution (a fallback,
    which only the end of the search may record, and only when allowed)."""
    from export.precision import reached_precision

    for suffix in ("", ".data"):
        if os.path.exists(trial + suffix):
            os.replace(trial + suffix, dst + suffix)
        elif suffix and os.path.exists(dst + suffix):  # an earlier artifact's data file, not this one's
            os.remove(dst + suffix)
    reached = reached_precision(dst)
    if reached["reached"] != "fp32":
        record(found, reached)


def _remove_candidates(trial: str) -> None:
    for p in (trial, trial + ".data"):
        if os.path.exists(p):
            os.remove(p)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(trial))
