"""Backend selection: `--backend torch` or `--backend llm=torch,flow=ort,vocoder=ort`."""

from __future__ import annotations

import torch

from models.errors import UserError

KINDS = ("torch", "ort")


def parse_backends(choice: str | dict, stages: tuple[str, ...]) -> dict[str, str]:
    """Per-stage backend kinds from a string ("torch" or "llm=torch,flow=ort") or a dict."""
    if isinstance(choice, dict):
        table = dict(choice)
    elif "=" not in choice:
        table = {s: choice.strip() for s in stages}
    else:
        table = {}
        for part in choice.split(","):
            stage, sep, kind = part.partition("=")
            if not sep or not stage.strip() or not kind.strip():
                raise UserError(f"backend choice {part!r} is not of the form stage=kind.",
                                f"write e.g. {','.join(f'{s}=torch' for s in stages)}")
            table[stage.strip()] = kind.strip()
    unknown_stages = sorted(set(table) - set(stages))
    if unknown_stages:
        raise UserError(f"this model has no stage named {', '.join(unknown_stages)}.",
                        f"choose among the stages {', '.join(stages)}")
    for stage in stages:
        table.setdefault(stage, "torch")
    for stage, kind in table.items():
        if kind not in KINDS:
            raise UserError(f"unknown backend {kind!r} for stage {stage}.", f"choose one of {', '.join(KINDS)}")
    return table


def create_backend(kind: str, model, spec, device: torch.device, engines_dir: str | None = None,
                   precision: str = "fp32"):
    if kind == "torch":
        from runtime.backends.torch_eager import TorchBackend

        return TorchBackend(spec, device, lambda: model.graph_module(spec.name))
    from runtime.artifacts import Manifest, default_dir

    root = engines_dir or default_dir(model.name)
    if kind == "ort":
        from runtime.backends.onnxrt import OrtBackend

        make = (f"python -m export onnx --model {model.source if not model.source.startswith('preset:') else model.name}"
                + (f" --out-dir {engines_dir}" if engines_dir else ""))
        if precision != "fp32":
            make = make.replace("export onnx", "export build") + f" --precision {precision}"
        manifest = Manifest.load(root, required=False)
        if not manifest.artifacts:
            raise UserError(f"no exported artifacts in {root} for stage {spec.stage} ({spec.name}).", f"run {make}")
        art = manifest.require(spec.name, precision, "onnx", fix=f"run {make}")
        return OrtBackend(spec, device, manifest.verify(art, fix=f"run {make}"))
    raise UserError(f"unknown backend {kind!r}.", f"choose one of {', '.join(KINDS)}")
