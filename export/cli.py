"""python -m export {onnx, validate, build}: artifacts for every stage of a model.

    python -m export onnx --model cosyvoice3-tiny [--stages llm,flow,vocoder] [--out-dir engines/cosyvoice3-tiny]
    python -m export validate --model cosyvoice3-tiny [--backends ort] [--precision fp32] [--points min,opt,max]
"""

from __future__ import annotations

import os
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
                                built={"export": facts, "tool": "torch.onnx (dynamo)", "optimized": optimize})
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
@click.option("--graphs", default=None, help="Only these graphs.")
@click.option("--out-dir", default=None, help="Artifact folder (default engines/<model>).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (candidates and reference).")
@click.option("--audio/--no-audio", default=True, show_default=True, help="Also compare whole-pipeline audio.")
@click.option("--seed", default=0, show_default=True, help="Seed of random-weight presets.")
@exit_on_user_error
def validate_cmd(model_name, backends, precisions, points, graphs, out_dir, device, audio, seed):
    """Compare every artifact with the torch graph at min/opt/max (Polygraphy); non-zero exit on failure."""
    from export.validate import validate_audio, validate_graph, write_report
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
    results, audio_rows = [], []
    import torch

    for kind in kinds:
        art_kind = KINDS[kind].artifact
        for prec in precs:
            todo = [g for g in wanted if manifest.get(g, prec, art_kind)]
            if not todo:
                click.echo(f"{kind} {prec}: no artifacts in {root}; skipped", err=True)
                continue
            for g in todo:
                backend = create_backend(Option(kind, prec), model, specs[g], torch.device(device), engines_dir=root)
                t0 = time.perf_counter()
                res = validate_graph(model, g, backend, f"{kind}-{prec}", prec, points=pts, ref_device=device)
                worst = max(o["max_rel_error"] for p in res["points"] for o in p["outputs"].values())
                click.echo(f"{g:<15} {kind}-{prec:<5} {'PASS' if res['passed'] else 'FAIL'}  max rel err {worst:.2e} "
                           f"(tol {res['points'][0]['tolerance']:g})  {time.perf_counter() - t0:.1f} s")
                art = manifest.get(g, prec, art_kind)
                art.validation[f"{kind}:{device}"] = {"passed": res["passed"], "max_rel_error": worst,
                                                      "points": pts, "when": time.strftime("%Y-%m-%d %H:%M")}
                results.append(res)
            needed = [g for graphs_ in model.stage_graphs().values() for g in graphs_]
            if audio and all(manifest.get(g, prec, art_kind) for g in needed):
                a = validate_audio(model, kind, prec, root, device)
                click.echo(f"audio {kind}-{prec}: SNR {a['snr_db']:.1f} dB, log-mel distance {a['log_mel_distance']:.2e}, "
                           f"tokens identical: {a['tokens_identical']}  {'PASS' if a['passed'] else 'FAIL'}")
                audio_rows.append(a)
    manifest.save()
    meta = {"model": model.name, "device": device, "when": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python -m export validate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""}
    jpath, mpath = write_report(root, results, audio_rows, meta)
    ok = all(r["passed"] for r in results) and all(a["passed"] for a in audio_rows)
    click.echo(f"{'PASS' if ok else 'FAIL'}: report in {mpath} and {jpath}")
    if not results:
        raise UserError(f"nothing to validate in {root} for {backends} {precisions}.", "export first: python -m export onnx")
    if not ok:
        sys.exit(1)


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
@exit_on_user_error
def build_cmd(model_name, precisions, trt, aoti, graphs, out_dir, device, workspace_gb, opt_level, hardware_compat,
              version_compat, timing_cache, seed, calibration_texts):
    """FP32 / FP16 / INT8 ONNX artifacts (validated while built) and TensorRT plans from them."""
    import torch

    from export.calibration import load_or_capture
    from export.onnx_export import export_graph
    from export.precision import FP16_LEVELS, INT8_LEVELS, to_fp16, to_int8, write_sidecar
    from export.tensorrt_build import INSTALL_FIX, build_plan, import_tensorrt
    from export.validate import validate_graph
    from runtime.artifacts import PRECISIONS, Manifest, default_dir, file_artifact, onnx_path
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
        art = manifest.get(g, "fp32", "onnx")
        if art is None:
            path = onnx_path(root, "fp32", g)
            say(f"{g:<15} fp32  exporting ...")
            facts = export_graph(model, g, path, _source_hash(model, specs[g].stage))
            art = manifest.add(file_artifact(root, path, g, "fp32", "onnx", source_sha256=_source_hash(model, specs[g].stage),
                                             profiles=specs[g].profile(), spec=specs[g].to_dict(), built={"export": facts}))
            manifest.save()
        return manifest.verify(art, fix=f"delete {root} and build again")

    def accept(g, prec, path, level_notes):
        """Validate a candidate file at min/opt/max; returns the validation dict."""
        backend = OrtBackend(specs[g], torch.device(device), path, graph_spec=specs[g])
        try:
            return validate_graph(model, g, backend, f"ort-{prec}", prec, ref_device=device)
        except (UserError, RuntimeError) as e:  # a candidate the runtime cannot run fails like a wrong one
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            say(f"{g:<15} {prec}  candidate failed to run: {first}", err=True)
            return {"passed": False, "error": first, "points": [{"tolerance": float("nan"),
                                                                  "outputs": {"error": {"max_rel_error": float("inf")}}}]}

    feeds = {}
    if "int8" in precs:
        feeds = load_or_capture(model, names, os.path.join(root, "calibration"), device="cpu", log=click.echo,
                                count=calibration_texts)
    with progress:
        for g in names:
            progress.step(g)
            src = fp32_of(g)
            for prec in precs:
                if prec == "fp32":
                    continue
                dst = onnx_path(root, prec, g)
                tried = []
                ladder = FP16_LEVELS if prec == "fp16" else INT8_LEVELS
                for level in ladder:
                    t0 = time.perf_counter()
                    if prec == "fp16":
                        facts = to_fp16(src, dst, level)
                        label = level.name
                    else:
                        label, ops = level
                        facts = to_int8(src, dst, feeds.get(g, []), ops)
                        facts["level"] = label
                    res = accept(g, prec, dst, facts)
                    worst = max(o["max_rel_error"] for p in res["points"] for o in p["outputs"].values())
                    tried.append({"level": label, "max_rel_error": worst, "passed": res["passed"]})
                    say(f"{g:<15} {prec}  {label:<22} max rel err {worst:.2e} (tol {res['points'][0]['tolerance']:g}) "
                        f"{'PASS' if res['passed'] else 'fail'}  {time.perf_counter() - t0:.1f} s")
                    if res["passed"]:
                        break
                names_file = dst.replace(".onnx", ".fp32_nodes.json") if prec == "fp16" else None
                notes = {k: v for k, v in facts.items() if k != "fp32_node_names"}
                notes["tried"] = tried
                if names_file:
                    write_sidecar(names_file, {"graph": g, "level": facts["level"], "fp32_nodes": facts["fp32_node_names"]})
                    notes["fp32_node_list"] = os.path.relpath(names_file, root)
                art = file_artifact(root, dst, g, prec, "onnx", source_sha256=manifest.get(g, "fp32", "onnx").sha256,
                                    profiles=specs[g].profile(), spec=specs[g].to_dict(), notes=notes)
                art.validation[f"ort:{device}"] = {"passed": res["passed"], "max_rel_error": worst,
                                                   "when": time.strftime("%Y-%m-%d %H:%M")}
                manifest.add(art)
                manifest.save()
                if not res["passed"]:
                    say(f"{g:<15} {prec}  no level met the {prec} tolerance; kept the last ({tried[-1]['level']})", err=True)
    if aoti:
        from export.aoti import build_aoti

        for prec in [p for p in precs if p in ("fp32", "fp16")]:
            for g in names:
                path = os.path.join(root, "aoti", prec, f"{g}.pt2")
                dtype = torch.float16 if prec == "fp16" else torch.float32
                built = build_aoti(model, g, path, device=device, dtype=dtype)
                manifest.add(file_artifact(root, path, g, prec, "pt2", profiles=specs[g].profile(), spec=specs[g].to_dict(), built=built))
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
                                               profiles=specs[g].profile(), spec=specs[g].to_dict(), built=built))
                    manifest.save()
                    click.echo(f"{g:<15} {prec}  plan built in {built['build_seconds']} s ({built['tensorrt']}, {built.get('gpu')})")
    manifest.save()
    click.echo(f"artifacts and manifest in {root}")


if __name__ == "__main__":
    main()
