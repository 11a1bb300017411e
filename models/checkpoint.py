"""Safe checkpoint reading and upstream key normalisation.

Upstream checkpoints store weight-normed convolutions either with the parametrization keys
(`X.parametrizations.weight.original0/1`, torch >= 2.1) or the old hook keys (`X.weight_g/weight_v`).
Our modules are inference-only and hold plain `X.weight`, so both styles are folded into
`weight = g * v / ||v||` here, once, at load time: exported graphs then carry no weight-norm ops.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile

import torch

from models.errors import UserError


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a `.pt`/`.bin` (weights_only, never unpickling objects) or `.safetensors` file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist.", "check the model folder; it must hold the file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:  # a cut download fails the header's size check
            raise UserError(f"checkpoint {path} is truncated or damaged ({_first_line(e)[:160]}).",
                            "download the file again") from None
    else:
        # torch.save writes a zip archive (its directory sits at the end, so a cut file has none) or,
        # before torch 1.6, a pickle; torch.load would read anything else as a legacy pickle and fail
        # with a long message about weights_only that hides the real problem
        if not zipfile.is_zipfile(path) and not _legacy_pickle(path):
            raise UserError(f"checkpoint {path} is truncated or not a PyTorch checkpoint.",
                            "download the file again") from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
            raise UserError(f"checkpoint {path} cannot be read safely ({_first_line(e)[:160]}).",
                            "download the file again; only plain tensor state_dicts are accepted") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} is not a state_dict of tensors.", "pass the upstream llm.pt / flow.pt / hift.pt files")
    return sd


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _legacy_pickle(path: str) -> bool:
    """Whether `path` starts like a pre-1.6 torch.save file (a pickle: protocol opcode 0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def strip_prefix(sd: dict, prefix: str) -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # weight_norm(dim=0): the norm is taken over every dim but 0 (for ConvTranspose1d dim 0 is
    # in_channels). torch._weight_norm is the exact kernel upstream's parametrization runs, so the
    # folded weight is bitwise what upstream computes at every forward.
    return torch._weight_norm(v, g, 0)


def fold_weight_norm(sd: dict) -> dict:
    """Replace both weight-norm key styles by plain `.weight` tensors."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".parametrizations.weight.original0"):
            base = k[: -len(".parametrizations.weight.original0")]
            out[base + ".weight"] = _fold(v, sd[base + ".parametrizations.weight.original1"])
        elif k.endswith(".parametrizations.weight.original1"):
            continue
        elif k.endswith(".weight_g"):
            base = k[: -len(".weight_g")]
            out[base + ".weight"] = _fold(v, sd[base + ".weight_v"])
        elif k.endswith(".weight_v"):
            continue
        else:
            out[k] = v
    return out


def load_strict(module: torch.nn.Module, sd: dict, source: str, ignore: tuple[str, ...] = ()) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming what does not fit.

    `ignore` lists key prefixes that upstream files carry but we deliberately do not use
    (for example the tied `lm_head.weight`)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)} if ignore else sd
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} keys with wrong shapes (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        raise UserError(f"checkpoint {source} does not fit the model config: {'; '.join(parts)}.",
                        "use the checkpoint that belongs to this config (or the config that belongs to this checkpoint)")
    module.load_state_dict(sd, strict=True)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
