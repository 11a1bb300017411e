"""`--model` resolution: a preset name or an upstream model folder -> a family object."""

from __future__ import annotations

import json
import os

from models.errors import UserError
from models.family import TTSModel

# preset name -> (family, size); "tiny" runs in seconds on a CPU, "random" is the real size with seeded
# random weights (for benchmarks: its audio is noise)
PRESETS = {
    "cosyvoice3-tiny": ("cosyvoice3", "tiny"),
    "cosyvoice3-random": ("cosyvoice3", "random"),
    "cosyvoice2-tiny": ("cosyvoice2", "tiny"),
    "cosyvoice2-random": ("cosyvoice2", "random"),
    "orpheus-tiny": ("orpheus", "tiny"),
    "orpheus-random": ("orpheus", "random"),
}
DEFAULT_MODEL = "cosyvoice3-tiny"


def _family_module(family: str):
    if family in ("cosyvoice2", "cosyvoice3"):
        from models import cosyvoice as mod
    elif family == "orpheus":
        from models import orpheus as mod
    else:  # pragma: no cover - PRESETS and detect_family only produce the names above
        raise ValueError(family)
    return mod


def detect_family(folder: str) -> str:
    """Which family an upstream model folder holds, from the files it has."""
    if os.path.isfile(os.path.join(folder, "cosyvoice3.yaml")):
        return "cosyvoice3"
    if os.path.isfile(os.path.join(folder, "cosyvoice2.yaml")):
        return "cosyvoice2"
    if os.path.isfile(os.path.join(folder, "cosyvoice.yaml")):
        raise UserError(f"{folder} holds a CosyVoice (v1) model, which this tool does not support.",
                        "use a CosyVoice2 or CosyVoice3 model folder")
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                arch = json.load(f).get("architectures") or []
        except (json.JSONDecodeError, OSError):
            arch = []
        if any("Llama" in a for a in arch):
            return "orpheus"
    raise UserError(f"{folder} is not a model folder this tool knows (no cosyvoice2.yaml, cosyvoice3.yaml or "
                    f"Llama config.json).", f"pass a model folder or one of the presets {', '.join(PRESETS)}")


def load_model(name: str, device: str = "cpu", seed: int = 0) -> TTSModel:
    """A preset name or a folder path -> a family object (weights are loaded lazily per graph)."""
    if name in PRESETS:
        family, size = PRESETS[name]
        return _family_module(family).from_preset(name, family, size, device=device, seed=seed)
    if os.path.isdir(name):
        family = detect_family(name)
        return _family_module(family).from_folder(name, family, device=device)
    if os.path.exists(name):
        raise UserError(f"model path {name} is a file, not a folder.", "pass the model folder or a preset name")
    raise UserError(f"unknown model {name!r}: not a preset and not a folder.",
                    f"pass a model folder or one of the presets {', '.join(PRESETS)}")
