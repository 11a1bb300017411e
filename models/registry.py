"""`--model` resolution: a preset name or an upstream model folder -> a family object."""

from __future__ import annotations

import importlib
import os

from models.errors import UserError
from models.family import TTSModel

# One line per family module. Each declares PRESETS (preset name -> (family, size)), detect(folder)
# (the family an upstream folder holds, or None) and from_preset / from_folder.
_FAMILY_MODULES = ("models.cosyvoice", "models.orpheus")


def _modules():
    return [importlib.import_module(m) for m in _FAMILY_MODULES]


# "tiny" runs in seconds on a CPU; "random" is the real size with seeded random weights (benchmarks:
# its audio is noise)
PRESETS = {name: (mod, *entry) for mod in _modules() for name, entry in mod.PRESETS.items()}
DEFAULT_MODEL = "cosyvoice3-tiny"


def detect_family(folder: str):
    """(family module, family name) of an upstream model folder, from the files it has."""
    for mod in _modules():
        family = mod.detect(folder)
        if family is not None:
            return mod, family
    raise UserError(f"{folder} is not a model folder this tool knows (no cosyvoice2.yaml, cosyvoice3.yaml or "
                    f"Llama config.json).", f"pass a model folder or one of the presets {', '.join(PRESETS)}")


def load_model(name: str, device: str = "cpu", seed: int = 0) -> TTSModel:
    """A preset name or a folder path -> a family object (weights are loaded lazily per graph)."""
    if name in PRESETS:
        mod, family, size = PRESETS[name]
        return mod.from_preset(name, family, size, device=device, seed=seed)
    if os.path.isdir(name):
        mod, family = detect_family(name)
        return mod.from_folder(name, family, device=device)
    if os.path.exists(name):
        raise UserError(f"model path {name} is a file, not a folder.", "pass the model folder or a preset name")
    raise UserError(f"unknown model {name!r}: not a preset and not a folder.",
                    f"pass a model folder or one of the presets {', '.join(PRESETS)}")
