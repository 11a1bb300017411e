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
    name = model.name if model.source.startswith("preset:") else model.source
    out = f" --out-dir {engines_dir}" if engines_dir else ""
    # the command that makes the missing or stale artifact, for every error below
    make = {"ort": f"python -m export onnx --model {name}{out}" if precision == "fp32" else
                   f"python -m export build --model {name}{out} --precision {precision}",
            "aoti": f"python -m export build --model {name} --precision {precision} --aoti --device {device.type}{out}",
            "trt": f"python -m export build --model {name} --precision {precision} --trt{out}"}.get(kind)
    if make is None:
        raise UserError(f"unknown backend {kind!r}.", f"choose one of {', '.join(KINDS)}")
    manifest = Manifest.load(root, required=False)
    if not manifest.artifacts:
        raise UserError(f"no exported artifacts in {root} for stage {spec.stage} ({spec.name}).", f"run {make}")
    artifact = manifest.require(spec.name, precision, {"ort": "onnx", "aoti": "pt2", "trt": "plan"}[kind], fix=f"run {make}")
    if kind == "trt":
        onnx_art = manifest.get(spec.name, precision, "onnx")
        if onnx_art is not None and artifact.source_sha256 and artifact.source_sha256 != onnx_art.sha256:
            raise UserError(f"the {precision} plan of {spec.name} was built from an older ONNX file.", f"run {make}")
    path = manifest.verify(artifact, fix=f"run {make}")
    if kind == "ort":
        from runtime.backends.onnxrt import OrtBackend

        return OrtBackend(spec, device, path)
    if kind == "aoti":
        from runtime.backends.aoti import AotiBackend

        return AotiBackend(spec, device, path, artifact.built, make)
    from runtime.backends.tensorrt import TrtBackend

    return TrtBackend(spec, device, path, artifact.built, make)
