"""Backend selection: `--backend torch`, or per stage `--backend llm=torch,flow=ort:fp16,vocoder=ort:int8`.

A stage's choice is `kind[:precision]`; the precision defaults to the pipeline's `--precision`.
Artifact precisions (ort, trt) are fp32 / fp16 / int8; torch runs its modules in fp32 / fp16 / bf16."""

from __future__ import annotations

import torch

from models.errors import UserError

KINDS = ("torch", "compile", "aoti", "ort", "trt")
PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "compile": ("fp32", "fp16", "bf16"), "aoti": ("fp32", "fp16"), "ort": ("fp32", "fp16", "int8"), "trt": ("fp32", "fp16", "int8")}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def split_choice(choice: str, default_precision: str = "fp32") -> tuple[str, str]:
    kind, _, precision = choice.partition(":")
    return kind, precision or default_precision


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
    for stage, value in table.items():
        kind, precision = split_choice(value)
        if kind not in KINDS:
            raise UserError(f"unknown backend {kind!r} for stage {stage}.", f"choose one of {', '.join(KINDS)}")
        if ":" in value and precision not in PRECISIONS[kind]:
            raise UserError(f"backend {kind} has no precision {precision!r} (stage {stage}).",
                            f"choose one of {', '.join(PRECISIONS[kind])}")
    return table


def create_backend(kind: str, model, spec, device: torch.device, engines_dir: str | None = None,
                   precision: str = "fp32"):
    if precision not in PRECISIONS.get(kind, (precision,)):
        raise UserError(f"backend {kind} has no precision {precision!r}.", f"choose one of {', '.join(PRECISIONS[kind])}")
    if kind == "torch":
        from runtime.backends.torch_eager import TorchBackend

        return TorchBackend(spec, device, lambda: model.graph_module(spec.name), TORCH_DTYPES[precision])
    if kind == "compile":
        from runtime.backends.compiled import CompiledBackend

        # a private copy of the weights when casting, so a model shared with other backends keeps fp32
        return CompiledBackend(spec, device, lambda: model.graph_module(spec.name), TORCH_DTYPES[precision],
                               copy_module=precision != "fp32")
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
    if kind == "aoti":
        from runtime.backends.aoti import AotiBackend

        name = model.source if not model.source.startswith("preset:") else model.name
        rebuild = (f"python -m export build --model {name} --precision {precision} --aoti --device {device.type}"
                   + (f" --out-dir {engines_dir}" if engines_dir else ""))
        manifest = Manifest.load(root, required=False)
        art = manifest.require(spec.name, precision, "pt2", fix=f"run {rebuild}")
        return AotiBackend(spec, device, manifest.verify(art, fix=f"run {rebuild}"), art.built, rebuild)
    if kind == "trt":
        from runtime.backends.tensorrt import TrtBackend

        name = model.source if not model.source.startswith("preset:") else model.name
        rebuild = (f"python -m export build --model {name} --precision {precision} --trt"
                   + (f" --out-dir {engines_dir}" if engines_dir else ""))
        manifest = Manifest.load(root, required=False)
        art = manifest.require(spec.name, precision, "plan", fix=f"run {rebuild}")
        onnx_art = manifest.get(spec.name, precision, "onnx")
        if onnx_art is not None and art.source_sha256 and art.source_sha256 != onnx_art.sha256:
            raise UserError(f"the {precision} plan of {spec.name} was built from an older ONNX file.", f"run {rebuild}")
        return TrtBackend(spec, device, manifest.verify(art, fix=f"run {rebuild}"), art.built, rebuild)
    raise UserError(f"unknown backend {kind!r}.", f"choose one of {', '.join(KINDS)}")
