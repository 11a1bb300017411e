"""python -m export {onnx, validate, build}: artifacts for every stage of a model.

    python -m export onnx --model cosyvoice3-tiny [--stages llm,flow,vocoder] [--out-dir engines/cosyvoice3-tiny]
    python -m export validate --model cosyvoice3-tiny [--backends ort] [--precision fp32] [--points min,opt,max]
"""

from __future__ import annotations

import os
import sys
import time

import click

from models.errors import UserError


def _errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


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


@click.group()
def main():
    """Export, build and validate deployable artifacts of a TTS model."""


@main.command("onnx")
@click.option("--model", "model_name", required=True, help="Preset name or upstream model folder.")
@click.option("--stages", default=None, help="Stages to export (default: all of the model's: llm,flow,vocoder).")
@click.option("--graphs", default=None, help="Only these graphs (e.g. flow_solver,vocoder).")
@click.option("--out-dir", default=None, help="Artifact folder (default engines/<model>).")
@click.option("--seed", default=0, show_default=True, help="Seed of random-weight presets.")
@_errors
def onnx_cmd(model_name, stages, graphs, out_dir, seed):
    """Export every graph of the chosen stages to fp32 ONNX and check each (checker, shapes, ORT run)."""
    from export.onnx_export import export_graph
    from runtime.artifacts import Manifest, default_dir, file_artifact, onnx_path

    model = _model(model_name, seed=seed)
    root = out_dir or default_dir(model.name)
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
    for i, g in enumerate(names, 1):
        path = onnx_path(root, "fp32", g)
        click.echo(f"[{i}/{len(names)}] {g:<15} exporting ...", nl=False)
        facts = export_graph(model, g, path, _source_hash(model, specs[g].stage))
        art = file_artifact(root, path, g, "fp32", "onnx", source_sha256=_source_hash(model, specs[g].stage),
                            profiles=specs[g].profile(), built={"export": facts, "tool": "torch.onnx (dynamo)"})
        manifest.add(art)
        manifest.save()  # after every graph: an interrupted export keeps what is done
        err = max(facts.get("ort_vs_torch_at_opt", {0: 0.0}).values())
        click.echo(f"\r[{i}/{len(names)}] {g:<15} {facts['export_seconds']:6.1f} s  {art.bytes / 1e6:9.1f} MB  "
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
@_errors
def validate_cmd(model_name, backends, precisions, points, graphs, out_dir, device, audio, seed):
    """Compare every artifact with the torch graph at min/opt/max (Polygraphy); non-zero exit on failure."""
    from export.validate import validate_audio, validate_graph, write_report
    from runtime.artifacts import PRECISIONS, Manifest, default_dir
    from runtime.backends import create_backend
    from runtime.synthesize import check_device

    device = check_device(device)
    model = _model(model_name, device="cpu", seed=seed)
    root = out_dir or default_dir(model.name)
    manifest = Manifest.load(root)
    kinds = _split(backends, ("ort", "trt"), "backend")
    precs = _split(precisions, PRECISIONS, "precision")
    pts = _split(points, ("min", "opt", "max"), "point")
    specs = model.graph_specs()
    wanted = _split(graphs, list(specs), "graph") if graphs else list(specs)
    results, audio_rows = [], []
    import torch

    for kind in kinds:
        art_kind = {"ort": "onnx", "trt": "plan"}[kind]
        for prec in precs:
            todo = [g for g in wanted if manifest.get(g, prec, art_kind)]
            if not todo:
                click.echo(f"{kind} {prec}: no artifacts in {root}; skipped", err=True)
                continue
            for g in todo:
                backend = create_backend(kind, model, specs[g], torch.device(device), engines_dir=root, precision=prec)
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


if __name__ == "__main__":
    main()
