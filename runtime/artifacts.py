"""Exported artifacts and their manifest.

Layout of a model's artifact folder (default `engines/<model>/`):

    manifest.json                 every artifact with its hash, precision, profiles, build facts, validation
    onnx/<precision>/<graph>.onnx (+ .onnx.data when weights exceed 1 GB)
    trt/<precision>/<graph>.plan
    aoti/<graph>.pt2
    validation.json, validation.md

A backend never trusts a file by its name: it looks the file up in the manifest and checks its sha256
(and, for TensorRT plans, the GPU and TensorRT version it was built for) before using it. Nor does it
trust that a file belongs to the model it runs: every artifact carries the fingerprint of the weights,
config and graph spec it was made from (`TTSModel.fingerprint`; in the ONNX metadata as
`tts.fingerprint` and in the manifest), and the registry refuses one whose fingerprint is not the
live model's (`check_fingerprint`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from models.checkpoint import sha256_file
from models.errors import UserError
from models.files import write_text
from models.spec import GraphSpec

MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
# ONNX metadata: ONNX Runtime CUDA provider options a file needs (JSON object), written by the
# conversion that made the need and applied by the ort backend on top of its own
ORT_CUDA_OPTIONS_KEY = "tts.ort_cuda_options"


def default_dir(model_name: str) -> str:
    return os.path.join("engines", model_name)


def onnx_path(root: str, precision: str, graph: str) -> str:
    return os.path.join(root, "onnx", precision, f"{graph}.onnx")


@dataclass
class Artifact:
    graph: str
    precision: str
    kind: str  # "onnx" | "plan" | "pt2"
    path: str  # relative to the artifact folder
    sha256: str
    bytes: int
    data_files: list = field(default_factory=list)  # [(relative path, sha256)] for external ONNX data
    source_sha256: str = ""  # the ONNX a plan was built from, or the checkpoint an ONNX came from
    built: dict = field(default_factory=dict)  # tool versions, GPU, flags, time
    profiles: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # e.g. which nodes stay fp32, calibration set
    spec: dict = field(default_factory=dict)  # the GraphSpec it was made for (its limits: what it accepts)
    validation: dict = field(default_factory=dict)
    fingerprint: str = ""  # TTSModel.fingerprint of the graph it was made from (weights, config, spec)
    made_from: dict = field(default_factory=dict)  # TTSModel.provenance behind the fingerprint (for messages)

    def key(self) -> tuple[str, str, str]:
        return (self.graph, self.precision, self.kind)


class Manifest:
    def __init__(self, root: str, model: str = "", family: str = "", artifacts: list[Artifact] | None = None,
                 model_info: dict | None = None):
        self.root = root
        self.model = model
        self.family = family
        self.model_info = model_info or {}
        self.artifacts: dict[tuple, Artifact] = {a.key(): a for a in artifacts or []}

    @classmethod
    def load(cls, root: str, required: bool = True) -> "Manifest":
        path = os.path.join(root, MANIFEST)
        if not os.path.isfile(path):
            if required:
                raise UserError(f"no {MANIFEST} in {root}: nothing was exported there.",
                                "run python -m export onnx --model <model> first")
            return cls(root)
        try:
            with open(path) as f:
                d = json.load(f)
            arts = [Artifact(**a) for a in d.get("artifacts", [])]
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:120]}).",
                            "delete it and export again with python -m export onnx") from None
        return cls(root, d.get("model", ""), d.get("family", ""), arts, d.get("model_info", {}))

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        d = {"model": self.model, "family": self.family, "model_info": self.model_info,
             "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "artifacts": [asdict(a) for a in sorted(self.artifacts.values(), key=lambda a: a.key())]}
        write_text(os.path.join(self.root, MANIFEST), json.dumps(d, indent=1, sort_keys=False))

    def add(self, artifact: Artifact) -> Artifact:
        self.artifacts[artifact.key()] = artifact
        return artifact

    def get(self, graph: str, precision: str, kind: str) -> Artifact | None:
        return self.artifacts.get((graph, precision, kind))

    def require(self, graph: str, precision: str, kind: str, fix: str) -> Artifact:
        a = self.get(graph, precision, kind)
        if a is None:
            raise UserError(f"{self.root} has no {precision} {kind} artifact for graph {graph}.", fix)
        return a

    def abspath(self, artifact: Artifact) -> str:
        return os.path.join(self.root, artifact.path)

    def verify(self, artifact: Artifact, fix: str) -> str:
        """The artifact's absolute path after checking that it (and its external data) is the very
        file the manifest recorded; a missing, truncated or replaced file is a UserError."""
        path = self.abspath(artifact)
        files = [(artifact.path, artifact.sha256)] + [tuple(x) for x in artifact.data_files]
        for rel, digest in files:
            p = os.path.join(self.root, rel)
            if not os.path.isfile(p):
                raise UserError(f"{p} is listed in the manifest but missing.", fix)
            if sha256_file(p) != digest:
                raise UserError(f"{p} does not match the sha256 in {MANIFEST} (changed or corrupt).", fix)
        return path


def file_artifact(root: str, path: str, graph: str, precision: str, kind: str, **extra) -> Artifact:
    """An Artifact for a file just written under `root`, hashing it (and ONNX external data)."""
    rel = os.path.relpath(path, root)
    data = []
    if kind == "onnx":
        import onnx

        model = onnx.load(path, load_external_data=False)
        locations = set()
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    locations.add(e.value)
        for loc in sorted(locations):
            p = os.path.join(os.path.dirname(path), loc)
            data.append((os.path.relpath(p, root), sha256_file(p)))
    size = os.path.getsize(path) + sum(os.path.getsize(os.path.join(root, r)) for r, _ in data)
    return Artifact(graph, precision, kind, rel, sha256_file(path), size, data, **extra)


# -- ONNX metadata (the runtime configures itself from it) -------------------------------------------
def read_metadata(path: str) -> dict[str, str]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        m = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        # reached after the manifest's sha256 matched: the file was broken when it was hashed (an
        # export cut short, a full disk, an edit by hand), so only a new export helps
        raise UserError(f"{path} is not a readable ONNX model ({str(e).strip()[:120] or type(e).__name__}).",
                        "delete it (or its artifact folder) and export again with python -m export onnx") from None
    return {p.key: p.value for p in m.metadata_props}


def set_metadata(path: str, meta: dict[str, str]) -> None:
    """Rewrite only the model proto (external data files stay as they are)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)


def check_fingerprint(path: str, made: str, made_from: dict, live: str, live_from: dict, model_name: str,
                      fix: str) -> None:
    """UserError unless the artifact at `path` was made from what the live model computes with."""
    if not made:
        raise UserError(f"{path} does not say which weights it was made from (it predates artifact fingerprints).", fix)
    if made != live:
        raise UserError(f"{path} was made from other weights or config than {model_name} has now "
                        f"({provenance_difference(made_from, live_from)}).", fix)


def provenance_difference(made: dict, live: dict) -> str:
    """What differs between two `TTSModel.provenance` dicts, in words (artifact first, live model second)."""
    if not made:
        return "the artifact records no details"
    parts = []
    for key, what in (("family", "family"), ("preset", "preset"), ("seed", "seed")):
        if made.get(key) != live.get(key) and (key in made or key in live):
            parts.append(f"{what} {made.get(key, 'none')}, now {live.get(key, 'none')}")
    a, b = made.get("files", {}), live.get("files", {})
    if a or b:
        changed = sorted(n for n in set(a) & set(b) if a[n] != b[n])
        parts += [f"{n} changed since the export" for n in changed]
        parts += [f"{n} is gone" for n in sorted(set(a) - set(b))] + [f"{n} is new" for n in sorted(set(b) - set(a))]
    if not parts and made.get("config") != live.get("config"):
        parts.append("the module config differs")
    if not parts and made.get("spec") != live.get("spec"):
        parts.append("the graph spec (shapes, limits) differs")
    return "; ".join(parts) or "the fingerprints differ"


def spec_from_onnx(path: str) -> GraphSpec:
    meta = read_metadata(path)
    if "tts.spec" not in meta:
        raise UserError(f"{path} carries no tts.spec metadata: it was not exported by this tool.",
                        "export it with python -m export onnx")
    return GraphSpec.from_json(meta["tts.spec"])
