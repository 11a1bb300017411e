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
* `RASSampler` adds the minimum length: while fewer than min_len tokens were generated, every stop
  index (>= speech_token_size) is masked. Upstream's `sampling_ids` masks only index
  speech_token_size, which for CosyVoice3 is sos rather than eos (eos is speech_token_size + 1), so
  upstream CosyVoice3 can stop before min_len; we apply the rule upstream intends.
* Orpheus (vLLM SamplingParams semantics, Orpheus-TTS defaults temperature 0.6, top_p 0.8,
  repetition_penalty 1.3): repetition penalty on logits (positive / penalty, negative * penalty) for
  every token in `history`, then temperature, then top-k (off by default) and top-p (smallest set whose
  probability reaches top_p), then a draw. vLLM counts prompt AND generated tokens for the repetition
  penalty: pass prompt + generated ids as `history` to mirror it exactly.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import torch

NEG_INF = float("-inf")

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


def _nucleus(x: torch.Tensor, generator: torch.Generator, top_p: float, top_k: int) -> torch.Tensor:
    probs = x.softmax(dim=-1)
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)
    kept = torch.where(nucleus_keep(sorted_p, top_p, top_k), sorted_p, torch.zeros_like(sorted_p))
    pick = torch.multinomial(kept, 1, replacement=True, generator=generator)  # [B,1] rank
    return sorted_idx.gather(-1, pick).squeeze(-1)


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


# -------------------------------------------------------------------------------------------------
# samplers: one object per request, host side, each with its device twin (`to_device`)
# -------------------------------------------------------------------------------------------------
def device_generator(generator: torch.Generator, device) -> torch.Generator:
    """A generator on `device` seeded from `generator` (a CPU generator; advances it by one draw),
    so a run's seed still determines the device's random stream. On the CPU it is `generator`
    itself, so CPU runs keep one exact random stream (upstream's, where the draws are upstream's)."""
    device = torch.device(device)
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


class Sampler(abc.ABC):
    """Chooses the next token of one request from last-position logits [V] (float32, any device).
    `to_device` gives the same rule as a `DeviceSampler` whose state lives on the device."""

    @abc.abstractmethod
    def __call__(self, logits: torch.Tensor, history: list[int], step: int) -> int: ...

    @abc.abstractmethod
    def to_device(self, vocab: int, device, batch: int = 1,
                  generator: torch.Generator | None = None) -> "DeviceSampler": ...

    @abc.abstractmethod
    def slots(self, rows: int, vocab: int, device) -> "SlotSampler":
        """An empty slot sampler for `rows` requests that sample by this rule (see SlotSampler)."""


class RASSampler(Sampler):
    """CosyVoice's repetition-aware sampling (top-p / top-k nucleus, window redraw; upstream defaults
    top-p 0.8, top-k 25, window 10, tau_r 0.1). Logit indices >= `stop_from` are stop tokens: masked
    while fewer than `min_len` tokens exist (see the module docstring) and, with `fixed`
    (benchmarks: a fixed token count), at every step."""

    def __init__(self, stop_from: int, sampling: dict, min_len: int, generator: torch.Generator, fixed: bool):
        self.stop_from = stop_from
        self.sampling = {k: sampling[k] for k in ("top_p", "top_k", "win_size", "tau_r") if k in sampling}
        self.min_len = min_len
        self.generator = generator
        self.fixed = fixed

    def __call__(self, logits: torch.Tensor, history: list[int], step: int) -> int:
        if self.fixed or step < self.min_len:
            logits = logits.clone()
            logits[self.stop_from:] = NEG_INF
        return int(ras_sampling(logits, history, self.generator, **self.sampling))

    def to_device(self, vocab, device, batch=1, generator=None) -> "DeviceRASSampler":
        gen = device_generator(generator or self.generator, device)
        return DeviceRASSampler(self.stop_from, vocab, self.min_len, self.fixed, batch=batch, device=device,
                                generator=gen, **self.sampling)

    def slots(self, rows, vocab, device) -> "SlotRASSampler":
        return SlotRASSampler(rows, vocab, device, self.stop_from, **self.sampling)


@dataclass(frozen=True)
class FrameGrammar:
    """Audio tokens come in frames of `frame_tokens` positions; position p of a frame may only be
    one of the `codebook` ids from `base + p * codebook` (Orpheus' SNAC layout)."""

    base: int
    frame_tokens: int
    codebook: int

    def allowed_range(self, audio_tokens_so_far: int) -> tuple[int, int]:
        lo = self.base + (audio_tokens_so_far % self.frame_tokens) * self.codebook
        return lo, lo + self.codebook


class OrpheusSampler(Sampler):
    """Orpheus sampling (temperature, top-p, repetition penalty over prompt + generated ids, as
    vLLM). With a `grammar`, every step is restricted to the audio token of the next frame position
    (plus the stop token unless `fixed`): random-weight presets use it so their output always
    decodes; a real model samples freely and undecodable tokens are reported, not hidden."""

    def __init__(self, params: OrpheusSampling, prompt_ids: list[int], generator: torch.Generator,
                 grammar: FrameGrammar | None, fixed: bool):
        self.params = params
        self.prompt = list(prompt_ids)
        self.generator = generator
        self.grammar = grammar
        self.fixed = fixed

    def __call__(self, logits: torch.Tensor, history: list[int], step: int) -> int:
        p = self.params
        if self.grammar is not None or self.fixed:
            logits = logits.clone()
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            if self.grammar is not None:
                lo, hi = self.grammar.allowed_range(sum(1 for t in history if t >= self.grammar.base))
                allowed[lo:hi] = True
            else:
                allowed[:] = True
            allowed[p.stop_token_id] = not self.fixed
            logits[~allowed] = NEG_INF
        return int(orpheus_sampling(logits, self.prompt + list(history), self.generator, temperature=p.temperature,
                                    top_p=p.top_p, repetition_penalty=p.repetition_penalty, top_k=p.top_k))

    def to_device(self, vocab, device, batch=1, generator=None) -> "DeviceOrpheusSampler":
        p = self.params
        gen = device_generator(generator or self.generator, device)
        return DeviceOrpheusSampler(vocab, self.prompt, p.stop_token_id, self.grammar, self.fixed, p.temperature,
                                    p.top_p, p.repetition_penalty, p.top_k, batch=batch, device=device, generator=gen)

    def slots(self, rows, vocab, device) -> "SlotOrpheusSampler":
        return SlotOrpheusSampler(rows, vocab, device, self.params, self.grammar)


# -------------------------------------------------------------------------------------------------
# device samplers: the same rules without moving logits to the host
# -------------------------------------------------------------------------------------------------
def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [B] drawn proportionally to non-negative `weights` [B,N] with uniforms u [B] in [0,1):
    the first index whose cumulative weight exceeds u * total, clamped to the last positive weight
    (float rounding can put u * total at the very end). No host sync."""
    cum = torch.cumsum(weights, dim=-1)
    target = (u.to(cum.dtype) * cum[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cum, target, right=True).squeeze(-1)
    n = weights.shape[-1]
    last = torch.where(weights > 0, torch.arange(n, device=weights.device), -1).amax(dim=-1).clamp(min=0)
    return torch.minimum(idx, last)


def ras_select(logits: torch.Tensor, window: torch.Tensor, u: torch.Tensor, top_p: float = 0.8, top_k: int = 25,
               win_size: int = 10, tau_r: float = 0.1, stop_from: int | None = None,
               mask_stop: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition-aware sampling on the device (`ras_sampling`'s rules).

    logits [B,V]; window [B,W] int64 the last `win_size` generated tokens (negative = empty);
    u [B,2] uniforms in [0,1) (u[:,0] draws the nucleus token, u[:,1] the redraw); stop_from /
    mask_stop (bool [B] or [1]): where mask_stop, logit indices >= stop_from are set to -inf first.
    Returns ids [B] int64. Nucleus: among the top_k most probable tokens (torch.topk order), keep rank
    i while the probability mass before it is < top_p; draw proportionally. If the drawn token occurs
    >= win_size * tau_r times in the window, draw again from the full distribution without it."""
    x = logits.float()
    b, v = x.shape
    if stop_from is not None and mask_stop is not None:
        stop_cols = torch.arange(v, device=x.device) >= stop_from
        x = x.masked_fill(stop_cols.unsqueeze(0) & mask_stop.reshape(-1, 1), NEG_INF)
    probs = x.softmax(dim=-1)
    k = min(int(top_k), v) if top_k > 0 else v
    top_p_sorted, top_idx = torch.topk(probs, k, dim=-1, largest=True, sorted=True)
    keep = nucleus_keep(top_p_sorted, top_p, k)
    rank = _inverse_cdf(torch.where(keep, top_p_sorted, torch.zeros_like(top_p_sorted)), u[:, 0])
    top = top_idx.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
    repeats = (window == top.unsqueeze(-1)).sum(dim=-1)
    repeat = repeats >= win_size * tau_r
    redraw_probs = x.scatter(-1, top.unsqueeze(-1), NEG_INF).softmax(dim=-1)
    redraw = _inverse_cdf(redraw_probs, u[:, 1])
    return torch.where(repeat, redraw, top)


def orpheus_select(logits: torch.Tensor, seen: torch.Tensor, u: torch.Tensor, temperature: float = 0.6,
                   top_p: float = 0.8, repetition_penalty: float = 1.3, top_k: int = -1,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Orpheus / vLLM sampling on the device (`orpheus_sampling`'s rules).

    logits [B,V]; seen bool [B,V] (token ids in prompt + generated, for the repetition penalty);
    u [B] or [B,1+] uniforms; allowed: optional bool [B,V] / [1,V] (False -> -inf before everything).
    Order: mask, repetition penalty (logit / p if > 0 else * p), temperature (<= 1e-5: greedy),
    top-k (<= 0: off), top-p over the renormalised top-k distribution (smallest prefix reaching
    top_p; always >= 1 token), draw. Returns ids [B] int64."""
    x = logits.float()
    if allowed is not None:
        x = x.masked_fill(~allowed, NEG_INF)
    if repetition_penalty != 1.0:
        x = torch.where(seen, torch.where(x > 0, x / repetition_penalty, x * repetition_penalty), x)
    if temperature <= 1e-5:
        return x.argmax(dim=-1)
    x = x / temperature
    u0 = u.reshape(u.shape[0], -1)[:, 0]
    v = x.shape[-1]
    if 0 < top_k < v:
        sorted_l, sorted_idx = torch.topk(x, top_k, dim=-1, largest=True, sorted=True)
    else:
        sorted_l, sorted_idx = x.sort(dim=-1, descending=True, stable=True)
    probs = sorted_l.softmax(dim=-1)
    if top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        keep = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1) < top_p
        keep[:, 0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    rank = _inverse_cdf(probs, u0)
    return sorted_idx.gather(-1, rank.unsqueeze(-1)).squeeze(-1)


class DeviceSampler:
    """A sampler whose state lives on the device: `__call__(logits [B,V] or [V]) -> ids [B]` (int64,
    on the device, no host sync) draws two uniforms per row from a device generator and updates the
    state with the chosen ids. Random streams differ from the host samplers (a CUDA Philox stream
    cannot reproduce a CPU Mersenne stream); the distributions do not."""

    def __init__(self, batch: int, vocab: int, device, generator: torch.Generator | None, seed: int):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch, self.vocab = batch, vocab
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
        if torch.device(generator.device).type != self.device.type:
            raise ValueError(f"the sampler's generator is on {generator.device}, its state on {self.device}")
        self.generator = generator
        with torch.inference_mode():
            self.u = torch.zeros(batch, 2, dtype=torch.float32, device=self.device)

    def select(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            self.u.uniform_(generator=self.generator)
            return self.select(logits.reshape(self.batch, self.vocab), self.u)


class DeviceRASSampler(DeviceSampler):
    """`RASSampler` on the device: while fewer than `min_len` tokens were drawn (counted on the
    device), and at every step when `fixed`, logit indices >= `stop_from` are masked; the window of
    the last `win_size` drawn tokens is kept on the device."""

    def __init__(self, stop_from: int, vocab: int, min_len: int = 0, fixed: bool = False, top_p: float = 0.8,
                 top_k: int = 25, win_size: int = 10, tau_r: float = 0.1, batch: int = 1, device="cuda",
                 generator: torch.Generator | None = None, seed: int = 0):
        self.stop_from, self.min_len, self.fixed = stop_from, min_len, fixed
        self.top_p, self.top_k, self.win_size, self.tau_r = float(top_p), int(top_k), int(win_size), float(tau_r)
        super().__init__(batch, vocab, device, generator, seed)
        with torch.inference_mode():
            self.window = torch.full((batch, self.win_size), -1, dtype=torch.int64, device=self.device)
            self.count = torch.zeros(1, dtype=torch.int64, device=self.device)

    def select(self, logits, u):
        mask_stop = (self.count < self.min_len) | self.fixed
        ids = ras_select(logits, self.window, u, self.top_p, self.top_k, self.win_size, self.tau_r,
                         self.stop_from, mask_stop)
        self.window.copy_(torch.cat([self.window[:, 1:], ids.unsqueeze(-1)], dim=1))
        self.count.add_(1)
        return ids


class DeviceOrpheusSampler(DeviceSampler):
    """`OrpheusSampler` on the device. `seen` (bool [B,V]) starts from the prompt ids and gains every
    drawn id (vLLM counts prompt and generated ids for the repetition penalty). With a `grammar`
    only the audio token of the next frame position (counted on the device) and, unless `fixed`,
    the stop token are allowed; `fixed` without a grammar only masks the stop token."""

    def __init__(self, vocab: int, prompt_ids, stop_id: int, grammar: FrameGrammar | None = None,
                 fixed: bool = False, temperature: float = 0.6, top_p: float = 0.8,
                 repetition_penalty: float = 1.3, top_k: int = -1, batch: int = 1, device="cuda",
                 generator: torch.Generator | None = None, seed: int = 0):
        self.stop_id, self.grammar, self.fixed = stop_id, grammar, fixed
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.repetition_penalty = repetition_penalty
        super().__init__(batch, vocab, device, generator, seed)
        with torch.inference_mode():
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)
            prompt = torch.as_tensor(prompt_ids, dtype=torch.int64).reshape(batch, -1).to(self.device)
            if prompt.numel():  # rows of equal length; negative ids are padding
                counts = torch.zeros(batch, vocab, dtype=torch.int64, device=self.device)
                counts.scatter_add_(1, prompt.clamp(min=0), (prompt >= 0).to(torch.int64))
                self.seen |= counts > 0
            self.audio_count = torch.zeros(batch, dtype=torch.int64, device=self.device)
            self.cols = torch.arange(vocab, device=self.device)

    def _allowed(self) -> torch.Tensor | None:
        cols = self.cols.unsqueeze(0)
        g = self.grammar
        if g is not None:
            lo = (g.base + (self.audio_count % g.frame_tokens) * g.codebook).unsqueeze(-1)
            allowed = (cols >= lo) & (cols < lo + g.codebook)
            if not self.fixed:
                allowed = allowed | (cols == self.stop_id)
            return allowed
        if self.fixed:
            return cols != self.stop_id
        return None

    def select(self, logits, u):
        ids = orpheus_select(logits, self.seen, u, self.temperature, self.top_p, self.repetition_penalty, self.top_k,
                             self._allowed())
        self.seen.scatter_(1, ids.unsqueeze(-1), torch.ones_like(ids, dtype=torch.bool).unsqueeze(-1))
        if self.grammar is not None:
            self.audio_count.add_((ids >= self.grammar.base).to(torch.int64))
        return ids


# -------------------------------------------------------------------------------------------------
# slot samplers: many requests in one device call, each row with its own rule state and random stream
# -------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflowing it (c split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (xorshift-multiply, "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(seed: torch.Tensor, step: torch.Tensor, n: int = 2) -> torch.Tensor:
    """[B, n] uniforms in [0, 1) that depend only on each row's (seed, step, k): a counter-based
    generator. A request's draws are then the same alone or among any neighbours, on the CPU or a
    GPU, and inside a captured graph (no generator state to register). seed: int64 [B] in
    [0, 2**32); step: int64 [B] >= 0."""
    k = torch.arange(n, device=seed.device, dtype=torch.int64)
    h = _mix32((seed & _M32).unsqueeze(-1) ^ 0x9E3779B9)
    h = _mix32(h ^ ((step & _M32).unsqueeze(-1)))
    h = _mix32(h ^ _mul32(k.unsqueeze(0) + 1, 0x85EBCA6B))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


class SlotSampler:
    """Device sampling for the rows (slots) of a continuous batch: row i holds one request's rule
    state, reset when a request takes the slot (`load`) and moved when rows are compacted (`move`).
    `__call__(logits [b,V])` samples rows 0..b-1 in one device call (graph-capturable: every update
    is in place), drawing each row's uniforms from its own (seed, step) counter."""

    def __init__(self, rows: int, vocab: int, device):
        self.rows, self.vocab, self.device = rows, vocab, torch.device(device)
        self.seed = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.step = torch.zeros(rows, dtype=torch.int64, device=self.device)

    def state(self) -> list[torch.Tensor]:
        """Every per-row tensor (dim 0 = row)."""
        return [self.seed, self.step]

    def load(self, row: int, sampler: "Sampler", seed: int) -> None:
        with torch.inference_mode():
            self.seed[row] = seed & _M32
            self.step[row] = 0
            self._load(row, sampler)

    def _load(self, row: int, sampler: "Sampler") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def move(self, dst: int, src: int) -> None:
        with torch.inference_mode():
            for t in self.state():
                t[dst] = t[src]

    def __call__(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Sample rows start .. start + B - 1 from logits [B,V]."""
        r = slice(start, start + logits.shape[0])
        u = counter_uniforms(self.seed[r], self.step[r])
        ids = self.select(logits, u, r)
        self.step[r] += 1
        return ids

    def select(self, logits: torch.Tensor, u: torch.Tensor, r: slice) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class SlotRASSampler(SlotSampler):
    """`RASSampler` per row: min_len and fixed per row; top-p / top-k / window are the model's."""

    def __init__(self, rows: int, vocab: int, device, stop_from: int, top_p: float = 0.8, top_k: int = 25,
                 win_size: int = 10, tau_r: float = 0.1):
        super().__init__(rows, vocab, device)
        self.stop_from, self.top_p, self.top_k, self.win_size, self.tau_r = stop_from, top_p, top_k, win_size, tau_r
        self.window = torch.full((rows, win_size), -1, dtype=torch.int64, device=self.device)
        self.min_len = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.fixed = torch.zeros(rows, dtype=torch.bool, device=self.device)

    def state(self):
        return super().state() + [self.window, self.min_len, self.fixed]

    def _load(self, row, sampler: RASSampler):
        self.window[row] = -1
        self.min_len[row] = sampler.min_len
        self.fixed[row] = sampler.fixed

    def select(self, logits, u, r):
        mask_stop = (self.step[r] < self.min_len[r]) | self.fixed[r]
        ids = ras_select(logits, self.window[r], u, self.top_p, self.top_k, self.win_size, self.tau_r,
                         self.stop_from, mask_stop)
        self.window[r] = torch.cat([self.window[r, 1:], ids.unsqueeze(-1)], dim=1)
        return ids


class SlotOrpheusSampler(SlotSampler):
    """`OrpheusSampler` per row: the repetition-penalty set (prompt + drawn ids), the frame position
    and `fixed` per row; temperature / top-p / penalty / grammar are the model's."""

    def __init__(self, rows: int, vocab: int, device, params: OrpheusSampling, grammar: FrameGrammar | None):
        super().__init__(rows, vocab, device)
        self.params, self.grammar = params, grammar
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=self.device)
        self.audio_count = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.fixed = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.cols = torch.arange(vocab, device=self.device)

    def state(self):
        return super().state() + [self.seen, self.audio_count, self.fixed]

    def _load(self, row, sampler: OrpheusSampler):
        self.seen[row] = False
        if sampler.prompt:
            self.seen[row, torch.tensor(sampler.prompt, device=self.device)] = True
        self.audio_count[row] = 0
        self.fixed[row] = sampler.fixed

    def select(self, logits, u, r):
        p, g, cols = self.params, self.grammar, self.cols.unsqueeze(0)
        fixed = self.fixed[r].unsqueeze(-1)
        if g is not None:
            lo = (g.base + (self.audio_count[r] % g.frame_tokens) * g.codebook).unsqueeze(-1)
            allowed = ((cols >= lo) & (cols < lo + g.codebook)) | ((cols == p.stop_token_id) & ~fixed)
        else:
            allowed = (cols != p.stop_token_id) | ~fixed
        ids = orpheus_select(logits, self.seen[r], u, p.temperature, p.top_p, p.repetition_penalty, p.top_k, allowed)
        self.seen[r].scatter_(1, ids.unsqueeze(-1), torch.ones_like(ids, dtype=torch.bool).unsqueeze(-1))
        if g is not None:
            self.audio_count[r] += (ids >= g.base).to(torch.int64)
        return ids
