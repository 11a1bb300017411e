"""Token samplers (host side, pure torch, explicit `torch.Generator` so runs are reproducible).

Logits are `[V]` or `[B,V]`; ids come back with the leading shape (`[]` or `[B]`, int64) on the
logits' device. Random draws happen on the generator's device (logits are moved there; a host sync
when the logits live on a GPU, which is acceptable while sampling stays on the host). No Python loops
over the vocabulary: sort + cumsum.

`history` (the tokens generated so far) is, per row, a list of ints or a LongTensor; for a batch, a
list of such rows or a LongTensor [B,H] whose negative entries are padding (left-pad shorter rows).

* CosyVoice (upstream `cosyvoice.utils.common.ras_sampling`, repetition-aware sampling of VALL-E 2):
  nucleus sampling over the sorted distribution keeping tokens while `cum_prob < top_p and
  count < top_k` (the first token always; the token that crosses top_p is included); if the chosen
  token occurs >= win_size * tau_r times in the last `win_size` generated tokens, it is masked out and a
  token is drawn from the full remaining distribution instead.
* `cosyvoice_sampling_ids` adds upstream's `sampling_ids`: while fewer than min_len tokens were
  generated, logit index `speech_token_size` is masked. That is eos for CosyVoice2. For CosyVoice3 it is
  *sos* (eos is speech_token_size + 1, and every index >= speech_token_size stops), so upstream CV3 does
  not actually enforce min_len; we keep upstream's behaviour on purpose.
* Orpheus (vLLM SamplingParams semantics, Orpheus-TTS defaults temperature 0.6, top_p 0.8,
  repetition_penalty 1.3): repetition penalty on logits (positive / penalty, negative * penalty) for
  every token in `history`, then temperature, then top-k (off by default) and top-p (smallest set whose
  probability reaches top_p), then a draw. vLLM counts prompt AND generated tokens for the repetition
  penalty: pass prompt + generated ids as `history` to mirror it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

History = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None


def _as_2d(logits: torch.Tensor, generator: torch.Generator):
    squeeze = logits.dim() == 1
    x = logits.reshape(1, -1) if squeeze else logits
    if x.dim() != 2:
        raise ValueError(f"logits must be [V] or [B,V], got {tuple(logits.shape)}")
    return x.to(device=generator.device, dtype=torch.float32), squeeze


def _out(ids: torch.Tensor, squeeze: bool, device) -> torch.Tensor:
    ids = ids.reshape(-1).to(device)
    return ids[0] if squeeze else ids


def history_tensor(history: History, batch: int, last: int | None = None, device=None) -> torch.Tensor:
    """Normalise `history` to a LongTensor [B,H] (negative = padding), optionally keeping the `last`
    entries of every row (rows left-padded with -1)."""
    if history is None:
        rows: list = [[] for _ in range(batch)]
    elif isinstance(history, torch.Tensor):
        h = history.to(torch.int64)
        h = h.reshape(1, -1) if h.dim() <= 1 else h
        if h.shape[0] != batch:
            raise ValueError(f"history has {h.shape[0]} rows for {batch} logits rows")
        if last is not None:
            h = h[:, max(h.shape[1] - last, 0):]
        return h.to(device)
    else:
        seq = list(history)
        if len(seq) == 0:
            rows = [[] for _ in range(batch)]
        elif not isinstance(seq[0], (list, tuple, torch.Tensor)):
            rows = [seq]  # one flat row
        else:
            rows = [list(torch.as_tensor(r).reshape(-1).tolist()) if isinstance(r, torch.Tensor) else list(r) for r in seq]
        if len(rows) != batch:
            raise ValueError(f"history has {len(rows)} rows for {batch} logits rows")
    if last is not None:
        rows = [r[max(len(r) - last, 0):] for r in rows]
    width = max((len(r) for r in rows), default=0)
    out = torch.full((batch, width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r):] = torch.as_tensor([int(v) for v in r], dtype=torch.int64)
    return out.to(device)


def nucleus_keep(probs_sorted: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Boolean [B,V] over probabilities sorted descending: upstream's rule `keep adding while
    cum_prob < top_p and count < top_k`, i.e. position i is kept iff (sum of the probabilities before
    it) < top_p and i < top_k. Position 0 is always kept (when top_k >= 1)."""
    cum = torch.cumsum(probs_sorted, dim=-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # exclusive cumsum
    rank = torch.arange(probs_sorted.shape[-1], device=probs_sorted.device)
    return (before < top_p) & (rank < top_k)


def nucleus_sampling(logits: torch.Tensor, generator: torch.Generator, top_p: float = 0.8, top_k: int = 25) -> torch.Tensor:
    """Upstream `nucleus_sampling` (top-p and top-k together) for [V] or [B,V] logits."""
    x, squeeze = _as_2d(logits, generator)
    return _out(_nucleus(x, generator, top_p, top_k), squeeze, logits.device)


def _nucleus(x: torch.Tensor, generator: torch.Generator, top_p: float, top_k: int) -> torch.Tensor:
    probs = x.softmax(dim=-1)
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)
    kept = torch.where(nucleus_keep(sorted_p, top_p, top_k), sorted_p, torch.zeros_like(sorted_p))
    pick = torch.multinomial(kept, 1, replacement=True, generator=generator)  # [B,1] rank
    return sorted_idx.gather(-1, pick).squeeze(-1)


def random_sampling(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Upstream `random_sampling`: one draw from softmax(logits)."""
    x, squeeze = _as_2d(logits, generator)
    ids = torch.multinomial(x.softmax(dim=-1), 1, replacement=True, generator=generator).squeeze(-1)
    return _out(ids, squeeze, logits.device)


def ras_sampling(logits: torch.Tensor, history: History, generator: torch.Generator, top_p: float = 0.8,
                 top_k: int = 25, win_size: int = 10, tau_r: float = 0.1) -> torch.Tensor:
    """Upstream repetition-aware sampling (see the module docstring). Does not modify `logits`."""
    x, squeeze = _as_2d(logits, generator)
    b = x.shape[0]
    top_ids = _nucleus(x, generator, top_p, top_k)
    window = history_tensor(history, b, last=win_size, device=x.device)
    rep = (window == top_ids[:, None]).sum(dim=-1)
    repeat = rep >= win_size * tau_r
    if bool(repeat.any()):  # host sync: only the repeating rows draw a second time (as upstream)
        rows = repeat.nonzero().squeeze(-1)
        masked = x[rows].scatter(-1, top_ids[rows, None], float("-inf"))
        redraw = torch.multinomial(masked.softmax(dim=-1), 1, replacement=True, generator=generator).squeeze(-1)
        top_ids = top_ids.index_copy(0, rows, redraw)
    return _out(top_ids, squeeze, logits.device)


def cosyvoice_sampling_ids(logits: torch.Tensor, history: History, generator: torch.Generator, speech_token_size: int,
                           ignore_eos: bool, top_p: float = 0.8, top_k: int = 25, win_size: int = 10,
                           tau_r: float = 0.1) -> torch.Tensor:
    """Upstream `TransformerLM.sampling_ids` + `ras_sampling`: with `ignore_eos` (upstream: step < min_len)
    logit index `speech_token_size` is set to -inf first. For CosyVoice3 that index is sos, not eos
    (eos = speech_token_size + 1): upstream behaviour, kept deliberately (see the module docstring)."""
    if ignore_eos:
        logits = logits.clone()
        logits[..., speech_token_size] = float("-inf")
    return ras_sampling(logits, history, generator, top_p, top_k, win_size, tau_r)


@dataclass(frozen=True)
class OrpheusSampling:
    """Orpheus-TTS defaults (vLLM SamplingParams in canopyai/Orpheus-TTS)."""

    temperature: float = 0.6
    top_p: float = 0.8
    repetition_penalty: float = 1.3
    top_k: int = -1  # off
    max_tokens: int = 1200
    stop_token_id: int = 128258


def apply_repetition_penalty(logits: torch.Tensor, history: History, penalty: float) -> torch.Tensor:
    """New logits where every token id present in `history` (per row) is penalised:
    logit / penalty if logit > 0 else logit * penalty (HF / vLLM rule). penalty 1.0 = no-op."""
    x = logits.reshape(1, -1) if logits.dim() == 1 else logits
    if penalty == 1.0:
        return logits.clone()
    h = history_tensor(history, x.shape[0], device=x.device)
    counts = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, h.clamp(min=0), (h >= 0).to(torch.int64))
    seen = counts > 0
    out = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    return out.reshape(logits.shape)


def top_p_top_k_mask(logits: torch.Tensor, top_p: float = 1.0, top_k: int = -1) -> torch.Tensor:
    """vLLM-style filtering of [B,V] logits: top-k (k <= 0: off), then top-p keeps the smallest set of
    highest-probability tokens whose mass reaches top_p (always at least one). Masked logits = -inf."""
    sorted_l, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    keep = torch.ones_like(sorted_l, dtype=torch.bool)
    if top_k > 0:
        keep &= rank < top_k
        sorted_l = sorted_l.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        cum = torch.cumsum(sorted_l.softmax(dim=-1), dim=-1)
        keep &= torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1) < top_p
    keep[..., 0] = True
    filtered = sorted_l.masked_fill(~keep, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, filtered)


def orpheus_sampling(logits: torch.Tensor, history: History, generator: torch.Generator, temperature: float = 0.6,
                     top_p: float = 0.8, repetition_penalty: float = 1.3, top_k: int = -1) -> torch.Tensor:
    """Orpheus sampler (vLLM order: repetition penalty -> temperature -> top-k/top-p -> draw).
    temperature <= 1e-5 means greedy (as vLLM)."""
    x, squeeze = _as_2d(logits, generator)
    x = apply_repetition_penalty(x, history, repetition_penalty)
    if temperature <= 1e-5:
        return _out(x.argmax(dim=-1), squeeze, logits.device)
    x = top_p_top_k_mask(x / temperature, top_p, top_k)
    ids = torch.multinomial(x.softmax(dim=-1), 1, replacement=True, generator=generator).squeeze(-1)
    return _out(ids, squeeze, logits.device)
