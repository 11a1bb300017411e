"""The backend registry, backend choices and loading.

Every backend declares a `BackendKind` in its own file (`KIND`); adding a backend is one file and one
line in `_MODULES`. A choice (`--backend`) is per stage a list of options tried in order:

    torch                                  every stage on torch, fp32
    compile:bf16                           every stage compiled in bf16
    llm=compile:bf16,flow=ort:fp16         per stage (unnamed stages: torch)
    flow=trt:fp16/compile:bf16/torch       a fallback chain: the first option that loads is used

A stage's option is `kind[:precision]` (the precision defaults to the pipeline's). A fallback is used
only when the choice names one: options are tried in order at load time (a plan for another GPU, a
missing provider, a failed compile: anything raising UserError while loading and checking), and the
one that runs is recorded with the reason each earlier option was passed over. Without `/`, a
backend that cannot load is an error with its fix, never a silent substitute.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field

import torch

from models.errors import UserError
from models.spec import GraphSpec
from runtime.backends.base import Backend, BackendKind

# one line per backend: its module under runtime/backends defines KIND
_MODULES = ("torch_eager", "compiled", "cuda_graphed", "aoti", "onnxrt", "tensorrt")
KINDS: dict[str, BackendKind] = {}
for _name in _MODULES:
    _kind = importlib.import_module(f"runtime.backends.{_name}").KIND
    KINDS[_kind.name] = _kind


@dataclass(frozen=True)
class Option:
    """One backend option of a stage: `kind[:precision]` (precision None: the pipeline's)."""

    kind: str
    precision: str | None = None

    def resolved(self, default_precision: str) -> "Option":
        return Option(self.kind, self.precision or default_precision)

    def __str__(self) -> str:
        return self.kind + (f":{self.precision}" if self.precision else "")


@dataclass(frozen=True)
class BackendChoice:
    """Per stage, the ordered options to try (one option: no fallback); per graph, options that
    override its stage's (e.g. `flow=ort:fp16,flow_estimator=ort:int8`: a graph may reach a
    precision that another graph of its stage does not)."""

    stages: dict = field(default_factory=dict)  # stage -> tuple[Option, ...]
    graphs: dict = field(default_factory=dict)  # graph -> tuple[Option, ...], overriding its stage's

    @classmethod
    def for_model(cls, choice: "str | dict | BackendChoice", model) -> "BackendChoice":
        """`parse` with the model's stages and graphs."""
        return cls.parse(choice, model.stages, {g: s.stage for g, s in model.graph_specs().items()})

    @classmethod
    def parse(cls, choice: "str | dict | BackendChoice", stages: tuple[str, ...],
              graphs: dict[str, str] | None = None) -> "BackendChoice":
        """`graphs`: graph -> its stage, the graph names a choice may name besides the stages."""
        if isinstance(choice, BackendChoice):
            return choice
        graphs = {g: st for g, st in (graphs or {}).items() if g not in stages}  # a stage's name is the stage
        if isinstance(choice, dict):
            parts = [(s, v) for s, v in choice.items()]
        elif "=" not in choice:
            parts = [(s, choice) for s in stages]
        else:
            parts = []
            for part in choice.split(","):
                stage, sep, value = part.partition("=")
                if not sep or not stage.strip() or not value.strip():
                    raise UserError(f"backend choice {part!r} is not of the form stage=kind.",
                                    f"write e.g. {','.join(f'{s}=torch' for s in stages)}")
                parts.append((stage.strip(), value))
        table: dict[str, tuple[Option, ...]] = {}
        per_graph: dict[str, tuple[Option, ...]] = {}
        for stage, value in parts:
            if stage not in stages and stage not in graphs:
                also = f" (or one of its graphs: {', '.join(sorted(graphs))})" if graphs else ""
                raise UserError(f"this model has no stage named {stage}.", f"choose among the stages {', '.join(stages)}{also}")
            into = table if stage in stages else per_graph
            if stage in into:
                raise UserError(f"the backend choice names {'stage' if into is table else 'graph'} {stage} twice.",
                                f"give each {'stage' if into is table else 'graph'} one choice; try several in order with /, "
                                f"e.g. {stage}=compile:bf16/torch")
            into[stage] = tuple(_option(stage, v) for v in value.split("/"))
        return cls({s: table.get(s, (Option("torch"),)) for s in stages}, per_graph)

    def of(self, stage: str, graph: str | None = None) -> tuple:
        """The options of one graph of `stage` (its own, else its stage's)."""
        return self.graphs.get(graph) or self.stages[stage]

    def first(self, stage: str, graph: str | None = None) -> Option:
        return self.of(stage, graph)[0]

    def as_dict(self) -> dict[str, str]:
        return {s: "/".join(map(str, opts)) for s, opts in {**self.stages, **self.graphs}.items()}

    def __str__(self) -> str:
        return ",".join(f"{s}={v}" for s, v in self.as_dict().items())


def _option(stage: str, text: str) -> Option:
    kind, _, precision = text.strip().partition(":")
    if kind not in KINDS:
        raise UserError(f"unknown backend {kind!r} for stage {stage}.", f"choose one of {', '.join(KINDS)}")
    if precision and precision not in KINDS[kind].precisions:
        raise UserError(f"backend {kind} has no precision {precision!r} (stage {stage}).",
                        f"choose one of {', '.join(KINDS[kind].precisions)}")
    return Option(kind, precision or None)


def model_ref(model) -> str:
    """How a command line names this model: its preset name (with `--seed` when the weights come
    from another seed than 0) or its folder."""
    if not model.source.startswith("preset:"):
        return model.source
    seed = int(getattr(model, "seed", 0))
    return model.name + (f" --seed {seed}" if seed else "")


def create_backend(option: Option, model, spec: GraphSpec, device: torch.device,
                   engines_dir: str | None = None) -> Backend:
    """The backend of one option for one graph (cheap: nothing is loaded until activate). Artifact
    backends find their file in the manifest, check its sha256 and that it was made from the live
    model (its fingerprint: weights, config, graph spec), and adopt the spec it was made for."""
    from models.family import provenance_fingerprint
    from runtime.artifacts import Manifest, check_fingerprint, default_dir, read_metadata

    kind = KINDS[option.kind]
    precision = option.precision or "fp32"
    if precision not in kind.precisions:
        raise UserError(f"backend {kind.name} has no precision {precision!r}.", f"choose one of {', '.join(kind.precisions)}")
    device = torch.device(device)
    if kind.artifact is None:
        return kind.make(model, spec, device, precision)
    root = engines_dir or default_dir(model.name)
    fix = f"run {kind.rebuild_command(model_ref(model), precision, device, engines_dir)}"
    manifest = Manifest.load(root, required=False)
    if not manifest.artifacts:
        raise UserError(f"no exported artifacts in {root} for stage {spec.stage} ({spec.name}).", fix)
    artifact = manifest.require(spec.name, precision, kind.artifact, fix=fix)
    source = manifest.get(spec.name, precision, "onnx")
    if kind.artifact != "onnx" and source is not None and artifact.source_sha256 and artifact.source_sha256 != source.sha256:
        raise UserError(f"the {precision} {kind.artifact} of {spec.name} was built from an older ONNX file.", fix)
    path = manifest.verify(artifact, fix=fix)
    made, made_from = artifact.fingerprint, artifact.made_from
    if kind.artifact == "onnx":
        # the file's own metadata is what travels with it (a copied file, an edited manifest)
        meta = read_metadata(path)
        if "tts.spec" not in meta:
            raise UserError(f"{path} carries no tts.spec metadata: it was not exported by this tool.", fix)
        file_spec = GraphSpec.from_json(meta["tts.spec"])
        made = meta.get("tts.fingerprint", "")
        made_from = json.loads(meta.get("tts.provenance", "{}"))
    elif artifact.spec:
        file_spec = GraphSpec.from_dict(artifact.spec)
    else:
        raise UserError(f"the manifest entry of {path} does not say which graph spec it was built for.", fix)
    # the one place artifacts are opened: a file made from other weights, another seed, another
    # family or an edited checkpoint computes something else and is refused here, before it runs
    live_from = model.provenance(spec.name)
    check_fingerprint(path, made, made_from, provenance_fingerprint(live_from), live_from, model.name, fix)
    backend = kind.make(file_spec, device, path, artifact.built, fix.removeprefix("run "), spec)
    backend.precision_reached = artifact.notes.get("precision_reached", precision)
    return backend


@dataclass
class Loaded:
    """The backend that runs a graph, and why earlier options of its stage were passed over."""

    backend: Backend
    option: Option
    passed_over: list = field(default_factory=list)  # [(option text, reason)]


def load_backend(options: tuple[Option, ...], model, spec: GraphSpec, device: torch.device,
                 engines_dir: str | None, default_precision: str) -> Loaded:
    """The first option that loads for this graph. With one option, its error is raised as it is;
    with a chain, each option is created and checked (`Backend.check`: load, and for compiling
    backends a first compile), and the last error is raised only when none works."""
    if len(options) == 1:
        return Loaded(create_backend(options[0].resolved(default_precision), model, spec, device, engines_dir),
                      options[0].resolved(default_precision))
    tried = []
    for opt in (o.resolved(default_precision) for o in options):
        try:
            backend = create_backend(opt, model, spec, device, engines_dir)
            backend.check()
            return Loaded(backend, opt, tried)
        except Exception as e:  # noqa: BLE001 - a chain passes over whatever stops an option (compile errors too)
            reason = e.problem if isinstance(e, UserError) else f"{type(e).__name__}: {_first_line(e)}"
            tried.append((str(opt), reason.rstrip(".")))
            fix = e.fix if isinstance(e, UserError) and e.fix else "end the chain with a backend that loads (e.g. /torch)"
    raise UserError(f"no backend in the chain {'/'.join(map(str, options))} loads for {spec.name}: "
                    + "; ".join(f"{o}: {r}" for o, r in tried) + ".", fix)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
