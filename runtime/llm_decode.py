"""Fast autoregressive decoding: a static KV cache, one captured CUDA graph per decode step, and
device-side samplers.

`StaticCacheDecoder` implements the `LLMDecoder` interface (`prefill(ids [B,S]) -> logits [B,V]`,
`step(ids [B,1]) -> logits [B,V]`, float32 logits of the last position) for the families' `llm`
modules (`CosyVoiceLM` / `OrpheusLM`: `embed`, `head`, `body` = `DecoderBody` with `layers`, `norm`,
`rope`). It reuses the model's own layers and weights (the module is cast in place to the decoder's
dtype, nothing is copied) and writes the cache update and the attention itself:

* Cache: keys / values [L,B,KVH,max_len,HD] in the decoder's dtype, preallocated on the device as
  one [B,KVH,max_len,HD] tensor per layer (`keys[i]`, `values[i]`; `stacked_cache()` gives the 5-D
  view). Separate tensors, not views of one 5-D tensor: inductor then writes the new column in place,
  whereas a mutated view of a graph input is functionalised into a full copy of the cache per layer
  and step (checked in the CPU output code). Column c of the cache is the c-th token fed (prompt and
  generated alike); `col_valid` [B,max_len] says which columns hold real tokens (False for left
  padding and for the unused tail).
* Device state: `cur` (int64 [1], the column the next step writes), `positions` (int64 [B], the RoPE
  position of the next token per row = number of real tokens so far). The step advances both on the
  device, so a step needs nothing from the host but the new ids; the host only keeps a Python count
  of used columns (`length`) to refuse overflows, which it knows without asking the device.
* Step: embed, RoPE at `positions`, per layer q/k/v, `index_copy_` of the new k/v into column `cur`,
  attention of the one query over ALL max_len columns with the unused / padded ones masked to -inf
  (static shapes: no slicing by a device value), MLP, norm, head. q/k/v and gate/up run as one GEMM
  each (`fuse_projections` lays those weights out back to back in place: no extra memory). Scores
  and softmax run in float32 whatever the cache dtype. The attention is written as broadcast-multiply
  + sum when the step is compiled (inductor fuses the casts into one bandwidth-bound reduction, the
  right shape for a single-query GEMV) and as matmuls in eager mode (no [B,KVH,G,T,HD] temporary).
* One step = one `torch.cuda.CUDAGraph.replay()` on CUDA: the step function (compiled with
  `torch.compile(dynamic=False, fullgraph=True)` when `compile=True`) is warmed up on a side stream
  with dummy state and captured once, at construction, into static buffers; then the state is reset.
  `step` copies the ids into the static id buffer and replays. No host sync.
* Prefill: eager (or compiled with dynamic S when `compile_prefill=True`): the model's own `llm`
  forward over the prompt with the cache's used columns as `past_*`, then the new keys / values are
  copied into the static cache. Prefill runs once per generation; its cost is that of the torch
  backend.

Returned logits: with `copy_logits=True` (default) each call returns a fresh tensor; with False the
step returns the graph's static output buffer, which the next `step` overwrites (saves one copy;
safe when the caller consumes the logits, e.g. samples on the same stream, before the next step).

Device sampling (`DeviceRASSampler`, `DeviceOrpheusSampler`, and the pure functions `ras_select` /
`orpheus_select` behind them) picks the next token without moving logits to the host: the same
selection rules as `models.sampling` (RAS: nucleus top-p/top-k with the repetition-aware redraw;
Orpheus: repetition penalty, temperature, top-k/top-p), with the random draw done by inverse-CDF on
uniforms from a device `torch.Generator` (two uniforms per row per token). The sampler state
(RAS window of the last `win_size` tokens, Orpheus `seen` mask over prompt + generated ids, step and
audio-token counters) lives on the device and is updated by the sampler itself, so the only host
sync per token is the caller reading the chosen id (`int(token)`) for its stop check. Random streams
differ from the host samplers (a CUDA Philox stream cannot reproduce a CPU Mersenne stream), the
distributions do not.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.sampling import nucleus_keep
from models.transformer_lm import apply_rope
from runtime.backends.base import LLMDecoder

NEG_INF = float("-inf")


# -------------------------------------------------------------------------------------------------
# the decode step
# -------------------------------------------------------------------------------------------------
def _attend_reduce(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row: q [B,H,1,HD], k/v [B,KVH,T,HD], bias [B,1,1,T] float32 (0 / -inf)
    -> [B,1,H*HD] float32. Broadcast-multiply + sum (fusable into one reduction per product)."""
    b, h, _, hd = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, 1, hd).float() * scale  # head h uses kv head h // G (HF repeat_kv)
    scores = (qg * k.unsqueeze(2).float()).sum(-1)  # [B,KVH,G,T]
    p = torch.softmax(scores + bias, dim=-1)
    out = (p.unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2)  # [B,KVH,G,HD]
    return out.reshape(b, 1, h * hd)


def _attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Same as `_attend_reduce` with matmuls (eager: no [B,KVH,G,T,HD] temporary)."""
    b, h, _, hd = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, hd).float() * scale  # [B,KVH,G,HD]
    scores = torch.matmul(qg, k.float().transpose(-1, -2))  # [B,KVH,G,T]
    p = torch.softmax(scores + bias, dim=-1)
    out = torch.matmul(p, v.float())  # [B,KVH,G,HD]
    return out.reshape(b, 1, h * hd)


def fuse_projections(lm: nn.Module) -> list[tuple]:
    """Per layer (qkv_weight, qkv_bias, gate_up_weight, gate_up_bias): q/k/v and gate/up weights laid
    out back to back in one tensor each, so a decode step runs 2 GEMMs where it ran 5. No copy is
    kept: the layers' own Parameters are re-pointed (`.data`) at row slices of the fused tensors, so
    the model (and its prefill) keeps working on the same memory. Idempotent (a second decoder on the
    same module finds the layout done). Cast / move the module BEFORE this, never after (a later
    `.to()` would re-point the Parameters and leave the fused tensors stale)."""
    fused = []
    for layer in lm.body.layers:
        att, mlp = layer.self_attn, layer.mlp
        fused.append((*_fuse([att.q_proj, att.k_proj, att.v_proj]), *_fuse([mlp.gate_proj, mlp.up_proj])))
    return fused


def _fuse_one(params: list) -> torch.Tensor:
    data = [p.data for p in params]
    rows = sum(d.shape[0] for d in data)
    shape = (rows, *data[0].shape[1:])
    ptr = data[0].untyped_storage().data_ptr()
    if all(d.is_contiguous() and d.untyped_storage().data_ptr() == ptr for d in data):
        offsets = [d.storage_offset() for d in data]
        sizes = [d.numel() for d in data]
        if offsets == [offsets[0] + sum(sizes[:i]) for i in range(len(data))]:
            # already back to back (an earlier decoder fused them): a view over the same memory
            return torch.as_strided(data[0], shape, torch.empty(shape, device="meta").stride(), offsets[0])
    with torch.no_grad():
        base = torch.cat([d.reshape(d.shape[0], -1) for d in data]).reshape(shape)
    row = 0
    for p in params:
        n = p.shape[0]
        p.data = base[row:row + n]
        row += n
    return base


def _fuse(linears: list) -> tuple:
    w = _fuse_one([m.weight for m in linears])
    if all(m.bias is None for m in linears):
        return w, None
    if any(m.bias is None for m in linears):  # mixed biases (no known checkpoint): zero-fill is a copy; refuse
        raise ValueError("fuse_projections: some projections have a bias and some do not")
    return w, _fuse_one([m.bias for m in linears])


class DecodeStep(nn.Module):
    """forward(ids [B,1], cur [1], positions [B], col_valid [B,T], keys, values (lists of L tensors
    [B,KVH,T,HD])) -> logits [B,V] float32. Writes the new keys / values into column `cur` and then
    advances the state in place: col_valid[:, cur] = True, cur += 1, positions += 1. With `fused`
    (from `fuse_projections`) q/k/v and gate/up each run as one GEMM."""

    def __init__(self, lm: nn.Module, fused_attention: bool, fused: list | None = None):
        super().__init__()
        self.lm = lm
        self.fused_attention = fused_attention
        self.n_fused = 0
        for i, (qkv_w, qkv_b, gu_w, gu_b) in enumerate(fused or []):
            self.register_buffer(f"qkv_w{i}", qkv_w, persistent=False)
            self.register_buffer(f"qkv_b{i}", qkv_b, persistent=False)
            self.register_buffer(f"gu_w{i}", gu_w, persistent=False)
            self.register_buffer(f"gu_b{i}", gu_b, persistent=False)
            self.n_fused += 1

    def forward(self, ids, cur, positions, col_valid, keys, values):
        lm = self.lm
        body = lm.body
        b = ids.shape[0]
        t = keys[0].shape[2]
        h = lm.embed(ids)  # [B,1,D]
        cos, sin = body.rope(positions.unsqueeze(1), h.dtype)  # [B,1,1,HD]
        k_idx = torch.arange(t, device=ids.device)
        allowed = col_valid | (k_idx == cur).unsqueeze(0)  # [B,T]: real cached tokens + this one
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=ids.device).masked_fill(~allowed, NEG_INF)
        bias = bias[:, None, None, :]
        attend = _attend_reduce if self.fused_attention else _attend_matmul
        for i, layer in enumerate(body.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            nq, nkv = att.num_heads * att.head_dim, att.num_kv_heads * att.head_dim
            if self.n_fused:
                q, k, v = F.linear(x, getattr(self, f"qkv_w{i}"), getattr(self, f"qkv_b{i}")).split([nq, nkv, nkv], -1)
            else:
                q, k, v = att.q_proj(x), att.k_proj(x), att.v_proj(x)
            q = q.reshape(b, 1, att.num_heads, att.head_dim).transpose(1, 2)
            k = k.reshape(b, 1, att.num_kv_heads, att.head_dim).transpose(1, 2)
            v = v.reshape(b, 1, att.num_kv_heads, att.head_dim).transpose(1, 2)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            keys[i].index_copy_(2, cur, k.to(keys[i].dtype))
            values[i].index_copy_(2, cur, v.to(values[i].dtype))
            o = attend(q, keys[i], values[i], bias, att.scale).to(h.dtype)
            h = h + att.o_proj(o)
            x = layer.post_attention_layernorm(h)
            if self.n_fused:
                gate, up = F.linear(x, getattr(self, f"gu_w{i}"), getattr(self, f"gu_b{i}")).chunk(2, dim=-1)
                h = h + layer.mlp.down_proj(F.silu(gate) * up)
            else:
                h = h + layer.mlp(x)
        logits = lm.head(body.norm(h)[:, -1]).float()
        col_valid.index_fill_(1, cur, True)
        positions.add_(1)
        cur.add_(1)
        return logits


def _check_lm(lm: nn.Module) -> None:
    for name in ("embed", "head", "body"):
        if not hasattr(lm, name):
            raise TypeError(f"StaticCacheDecoder needs an llm module with `{name}` (CosyVoiceLM / OrpheusLM), "
                            f"got {type(lm).__name__}")


def _sync_if_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_mode(cuda_graphs, device: torch.device) -> str:
    """'cuda', 'emulate' or 'off' from a backend's `cuda_graphs` option (None = 'cuda' on CUDA
    devices). 'emulate' (CPU tests): the same static-buffer bookkeeping, `replay` re-runs the
    function and copies its results into the static outputs."""
    if cuda_graphs is None:
        return "cuda" if device.type == "cuda" else "off"
    if cuda_graphs == "emulate":
        return "emulate"
    if cuda_graphs is True or cuda_graphs == "cuda":
        if device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        return "cuda"
    if cuda_graphs is False or cuda_graphs == "off":
        return "off"
    raise ValueError(f"cuda_graphs must be None, True, False or 'emulate', got {cuda_graphs!r}")


class EmulatedGraph:
    """Stand-in for torch.cuda.CUDAGraph on the CPU: `replay()` calls fn(*static_args) and copies
    the results into the outputs captured first, so callers see the same buffers as with a real graph."""

    def __init__(self, fn, args, outputs):
        self.fn, self.args, self.outputs = fn, args, outputs

    def replay(self) -> None:
        from torch.utils._pytree import tree_leaves

        for dst, src in zip(tree_leaves(self.outputs), tree_leaves(self.fn(*self.args))):
            dst.copy_(src)


def capture(fn, args, device: torch.device, mode: str, pool=None, warmup: int = 3, after_warmup=None):
    """Warm `fn(*args)` up and capture it: (graph, static outputs, first-call seconds, rest seconds).

    CUDA: `warmup` calls on a side stream (the first one compiles; timed separately), then
    `after_warmup()` (e.g. reset state the warm-up mutated), then one capture with torch.cuda.graph
    into `pool`. Emulated: one call, `after_warmup()`, outputs cloned as the static outputs."""
    from torch.utils._pytree import tree_map

    t0 = time.perf_counter()
    if mode == "emulate":
        outs = fn(*args)
        t1 = time.perf_counter()
        if after_warmup is not None:
            after_warmup()
        outs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, outs)
        return EmulatedGraph(fn, args, outs), outs, t1 - t0, 0.0
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    t1 = t0
    with torch.cuda.stream(side):
        for i in range(max(warmup, 1)):
            fn(*args)
            if i == 0:
                torch.cuda.synchronize(device)
                t1 = time.perf_counter()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outs = fn(*args)
    torch.cuda.synchronize(device)
    return graph, outs, t1 - t0, time.perf_counter() - t1


class StaticCacheDecoder(LLMDecoder):
    """Static-KV-cache decoder (see the module docstring).

    lm: the family's `llm` module (already on `device`; it is cast in place to `dtype`).
    batch, max_len: cache size (columns = prompt + generated tokens); a step beyond raises UserError.
    compile: torch.compile the step (`compile_backend`, `compile_mode`; `dynamic=False`, fullgraph).
    cuda_graphs: capture the step as one CUDA graph (None: on for CUDA devices; "emulate": the same
    bookkeeping on the CPU, for tests).
    compile_options: torch.compile `options` (inductor config, e.g. {"coordinate_descent_tuning": True};
    not together with compile_mode).
    copy_logits: return fresh logits (True) or the step's static output buffer (False).
    fuse: lay q/k/v and gate/up weights out back to back (`fuse_projections`, no extra memory) so a
    step runs 2 GEMMs where it would run 5 per layer.

    A decoder is reusable: `prefill` after `reset()` starts a new generation with the same captured
    graph (the backend keeps one per (batch, max_len bucket) and resets it)."""

    def __init__(self, lm: nn.Module, batch: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, compile: bool = True, cuda_graphs: bool | None = None,
                 compile_backend: str = "inductor", compile_mode: str | None = None,
                 compile_options: dict | None = None, compile_prefill: bool = False, copy_logits: bool = True,
                 fuse: bool = True, warmup: int = 3):
        _check_lm(lm)
        if max_len < 1 or batch < 1:
            raise ValueError(f"StaticCacheDecoder needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        w = lm.body.embed_tokens.weight
        self.device = torch.device(device) if device is not None else w.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.batch, self.max_len = batch, max_len
        self.graph_mode = graph_mode(cuda_graphs, self.device)
        if compile_mode in ("reduce-overhead", "max-autotune") and self.graph_mode == "cuda":
            raise ValueError(f"compile_mode {compile_mode!r} adds inductor's own CUDA graphs inside ours; use "
                             "'default' or 'max-autotune-no-cudagraphs'")
        self.copy_logits = copy_logits
        self.lm = lm.to(self.device, dtype).eval()
        cfg = lm.body.config
        self.layers, self.kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.compile_seconds = 0.0
        self.capture_seconds = 0.0
        self.compiled = compile
        with torch.inference_mode():
            shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
            self.col_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
            self.cur = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.positions = torch.zeros(batch, dtype=torch.int64, device=self.device)
            self.ids = torch.zeros(batch, 1, dtype=torch.int64, device=self.device)
        self.length = 0
        step = DecodeStep(self.lm, fused_attention=compile, fused=fuse_projections(self.lm) if fuse else None)
        self.fused = fuse
        if compile:
            kw = {} if compile_mode is None else {"mode": compile_mode}
            if compile_options:
                kw["options"] = dict(compile_options)
            self._step_fn: Callable = torch.compile(step, backend=compile_backend, dynamic=False, fullgraph=True, **kw)
        else:
            self._step_fn = step
        self._prefill_fn = self.lm
        if compile_prefill:
            kw = {"options": dict(compile_options)} if compile_options else {}
            self._prefill_fn = torch.compile(self.lm, backend=compile_backend, dynamic=True, **kw)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_out: torch.Tensor | None = None
        self._warm(warmup)

    # -- construction helpers -----------------------------------------------------------------------
    def _args(self):
        return self.ids, self.cur, self.positions, self.col_valid, self.keys, self.values

    def _warm(self, warmup: int) -> None:
        """First calls (compilation) and the capture, both on dummy state that is reset after."""
        with torch.inference_mode():
            if self.graph_mode != "off":
                _sync_if_cuda(self.device)
                self.graph, self.logits_out, self.compile_seconds, self.capture_seconds = capture(
                    self._step_fn, self._args(), self.device, self.graph_mode, warmup=warmup,
                    after_warmup=self._reset_state)
            elif self.compiled:
                t0 = time.perf_counter()
                self._step_fn(*self._args())  # compile now, not in the first real step
                _sync_if_cuda(self.device)
                self.compile_seconds = time.perf_counter() - t0
            self._reset_state()

    def _reset_state(self) -> None:
        self.cur.zero_()
        self.positions.zero_()
        self.col_valid.zero_()
        self.length = 0

    # -- LLMDecoder -----------------------------------------------------------------------------------
    def reset(self) -> "StaticCacheDecoder":
        """Start a new generation (the cache contents need no clearing: unused columns are masked)."""
        with torch.inference_mode():
            self._reset_state()
        return self

    def _room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise UserError(f"the LLM generation needs more than {self.max_len} cached tokens "
                            f"({self.length} used, {n} more asked).",
                            "ask for fewer tokens, or build the decoder with a larger max_len")

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        if b != self.batch:
            raise ValueError(f"decoder built for batch {self.batch}, prefill got {b} rows")
        self._room(s)
        with torch.inference_mode():
            ids = input_ids.to(self.device)
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device, torch.int64)
            p = self.length
            full = torch.cat([self.col_valid[:, :p].to(torch.int64), mask], dim=1)
            past_k = torch.stack([k[:, :, :p] for k in self.keys])
            past_v = torch.stack([v[:, :, :p] for v in self.values])
            logits, keys, values = self._prefill_fn(ids, full, past_k, past_v)
            for i in range(self.layers):
                self.keys[i][:, :, p:p + s].copy_(keys[i, :, :, p:])
                self.values[i][:, :, p:p + s].copy_(values[i, :, :, p:])
            self.col_valid[:, p:p + s].copy_(mask > 0)
            self.positions.copy_(full.sum(dim=1))
            self.cur.fill_(p + s)
            self.length = p + s
            return logits.float()

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tuple(input_ids.shape) != (self.batch, 1):
            raise ValueError(f"step takes ids [{self.batch}, 1], got {tuple(input_ids.shape)}")
        self._room(1)
        with torch.inference_mode():
            self.ids.copy_(input_ids, non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
                out = self.logits_out
            else:
                out = self._step_fn(*self._args())
            self.length += 1
            return out.clone() if self.copy_logits and out is self.logits_out else out

    def stacked_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [L,B,KVH,length,HD]: copies of the used columns (tests, debugging)."""
        n = self.length
        return torch.stack([k[:, :, :n] for k in self.keys]), torch.stack([v[:, :, :n] for v in self.values])

    def metadata(self) -> dict:
        return {"decoder": "static-cache", "batch": self.batch, "max_len": self.max_len,
                "dtype": str(self.dtype).replace("torch.", ""), "compiled": self.compiled, "fused": self.fused,
                "graph": self.graph_mode, "compile_seconds": round(self.compile_seconds, 3),
                "capture_seconds": round(self.capture_seconds, 3)}


# -------------------------------------------------------------------------------------------------
# device sampling
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
    """Upstream repetition-aware sampling on the device (`models.sampling.ras_sampling` rules).

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
    """Orpheus / vLLM sampling on the device (`models.sampling.orpheus_sampling` rules).

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


class _DeviceSampler:
    """Shared plumbing: a device generator, static buffers, optional torch.compile of the selection
    and optional capture of one call into a CUDA graph (logits copied into a static buffer unless the
    caller passes that very buffer)."""

    def __init__(self, batch: int, vocab: int, device, generator: torch.Generator | None, seed: int,
                 compile: bool, cuda_graph: bool | None, compile_backend: str,
                 logits_buffer: torch.Tensor | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch, self.vocab = batch, vocab
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
        if torch.device(generator.device).type != self.device.type:
            raise ValueError(f"the sampler's generator is on {generator.device}, its state on {self.device}")
        self.generator = generator
        self.graph_mode = graph_mode(cuda_graph, self.device)
        self._select = torch.compile(self._update, backend=compile_backend, dynamic=False, fullgraph=True) \
            if compile else self._update
        with torch.inference_mode():
            if logits_buffer is not None:  # e.g. StaticCacheDecoder.logits_out: no copy per token
                if tuple(logits_buffer.shape) != (batch, vocab) or logits_buffer.device != self.device:
                    raise ValueError(f"logits_buffer must be [{batch}, {vocab}] on {self.device}")
                self.logits_in = logits_buffer
            else:
                self.logits_in = torch.zeros(batch, vocab, dtype=torch.float32, device=self.device)
            self.u = torch.zeros(batch, 2, dtype=torch.float32, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.token_out: torch.Tensor | None = None

    def _update(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state(self) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _capture(self) -> None:
        saved = [t.clone() for t in self._state()]

        def restore():
            for t, v in zip(self._state(), saved):
                t.copy_(v)

        self.graph, self.token_out, _, _ = capture(self._select, (self.logits_in, self.u), self.device,
                                                   self.graph_mode, warmup=2, after_warmup=restore)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B,V] or [V] (any float dtype, on the device) -> chosen ids [B] int64 on the device
        (a fresh tensor). Updates the sampler state with the chosen ids."""
        with torch.inference_mode():
            x = logits.reshape(self.batch, self.vocab)
            self.u.uniform_(generator=self.generator)
            if self.graph_mode == "off":
                return self._select(x, self.u)
            if x.data_ptr() != self.logits_in.data_ptr():
                self.logits_in.copy_(x)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            return self.token_out.clone()


class DeviceRASSampler(_DeviceSampler):
    """CosyVoice's `RASSampler` on the device.

    While fewer than `min_len` tokens were drawn (counted on the device), and at every step when
    `fixed`, logit indices >= `stop_from` (speech_token_size: every stop token) are masked, as
    `RASSampler` does. The window of the last `win_size` drawn tokens is kept on the device."""

    def __init__(self, stop_from: int, vocab: int, min_len: int = 0, fixed: bool = False, top_p: float = 0.8,
                 top_k: int = 25, win_size: int = 10, tau_r: float = 0.1, batch: int = 1, device="cuda",
                 generator: torch.Generator | None = None, seed: int = 0, compile: bool = False,
                 cuda_graph: bool | None = None, compile_backend: str = "inductor",
                 logits_buffer: torch.Tensor | None = None):
        self.stop_from, self.min_len, self.fixed = stop_from, min_len, fixed
        self.top_p, self.top_k, self.win_size, self.tau_r = float(top_p), int(top_k), int(win_size), float(tau_r)
        super().__init__(batch, vocab, device, generator, seed, compile, cuda_graph, compile_backend, logits_buffer)
        with torch.inference_mode():
            self.window = torch.full((batch, self.win_size), -1, dtype=torch.int64, device=self.device)
            self.count = torch.zeros(1, dtype=torch.int64, device=self.device)

    def _state(self):
        return [self.window, self.count]

    def _update(self, logits, u):
        mask_stop = (self.count < self.min_len) | self.fixed
        ids = ras_select(logits, self.window, u, self.top_p, self.top_k, self.win_size, self.tau_r,
                         self.stop_from, mask_stop)
        self.window.copy_(torch.cat([self.window[:, 1:], ids.unsqueeze(-1)], dim=1))
        self.count.add_(1)
        return ids


class DeviceOrpheusSampler(_DeviceSampler):
    """Orpheus' `OrpheusSampler` on the device.

    `seen` (bool [B,V]) starts from the prompt ids and gains every drawn id (vLLM counts prompt and
    generated ids for the repetition penalty). `grammar=True`: only the audio token of the next frame
    position (AUDIO_TOKEN_BASE + pos * 4096 ... + 4095, pos = audio tokens drawn so far mod 7,
    counted on the device) and, unless `fixed`, the stop token are allowed; `fixed` without grammar
    only masks the stop token."""

    def __init__(self, vocab: int, prompt_ids, stop_id: int, grammar: bool = False, fixed: bool = False,
                 temperature: float = 0.6, top_p: float = 0.8, repetition_penalty: float = 1.3, top_k: int = -1,
                 audio_base: int = 128266, frame_tokens: int = 7, codebook: int = 4096, batch: int = 1,
                 device="cuda", generator: torch.Generator | None = None, seed: int = 0, compile: bool = False,
                 cuda_graph: bool | None = None, compile_backend: str = "inductor",
                 logits_buffer: torch.Tensor | None = None):
        self.stop_id, self.grammar, self.fixed = stop_id, grammar, fixed
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.repetition_penalty = repetition_penalty
        self.audio_base, self.frame_tokens, self.codebook = audio_base, frame_tokens, codebook
        super().__init__(batch, vocab, device, generator, seed, compile, cuda_graph, compile_backend, logits_buffer)
        with torch.inference_mode():
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)
            prompt = torch.as_tensor(prompt_ids, dtype=torch.int64).reshape(batch, -1).to(self.device)
            if prompt.numel():  # rows of equal length; negative ids are padding
                counts = torch.zeros(batch, vocab, dtype=torch.int64, device=self.device)
                counts.scatter_add_(1, prompt.clamp(min=0), (prompt >= 0).to(torch.int64))
                self.seen |= counts > 0
            self.audio_count = torch.zeros(batch, dtype=torch.int64, device=self.device)
            self.cols = torch.arange(vocab, device=self.device)

    def _state(self):
        return [self.seen, self.audio_count]

    def _allowed(self) -> torch.Tensor | None:
        cols = self.cols.unsqueeze(0)
        if self.grammar:
            lo = (self.audio_base + (self.audio_count % self.frame_tokens) * self.codebook).unsqueeze(-1)
            allowed = (cols >= lo) & (cols < lo + self.codebook)
            if not self.fixed:
                allowed = allowed | (cols == self.stop_id)
            return allowed
        if self.fixed:
            return cols != self.stop_id
        return None

    def _update(self, logits, u):
        ids = orpheus_select(logits, self.seen, u, self.temperature, self.top_p, self.repetition_penalty, self.top_k,
                             self._allowed())
        self.seen.scatter_(1, ids.unsqueeze(-1), torch.ones_like(ids, dtype=torch.bool).unsqueeze(-1))
        self.audio_count.add_((ids >= self.audio_base).to(torch.int64))
        return ids


def device_sampler_for(sampler, vocab: int, device, host_generator: torch.Generator | None = None, batch: int = 1,
                       **options) -> _DeviceSampler | None:
    """The device twin of a family's host sampler (`models.cosyvoice.RASSampler`,
    `models.orpheus.OrpheusSampler`) with the same parameters, or None for another sampler type.
    `host_generator` (default: the sampler's own) seeds the device generator (`device_generator`).
    `options` go to the sampler (compile, cuda_graph, logits_buffer, ...)."""
    from models.cosyvoice import RASSampler
    from models.orpheus import OrpheusSampler
    from models.snac import AUDIO_TOKEN_BASE, FRAME_TOKENS, ORPHEUS_CODEBOOK

    gen = device_generator(host_generator or sampler.generator, device)
    if isinstance(sampler, RASSampler):
        return DeviceRASSampler(sampler.stop_from, vocab, sampler.min_len, sampler.fixed, batch=batch, device=device,
                                generator=gen, **sampler.sampling, **options)
    if isinstance(sampler, OrpheusSampler):
        p = sampler.params
        return DeviceOrpheusSampler(vocab, sampler.prompt, p.stop_token_id, sampler.grammar, sampler.fixed,
                                    p.temperature, p.top_p, p.repetition_penalty, p.top_k, AUDIO_TOKEN_BASE,
                                    FRAME_TOKENS, ORPHEUS_CODEBOOK, batch=batch, device=device, generator=gen,
                                    **options)
    return None


class TokenReader:
    """Reads chosen ids on the host without waiting for work queued after them: `start(ids)` queues
    a copy into pinned memory and records an event; `wait()` blocks on that event only. Lets a caller
    queue the next decode step before reading the token for its stop check (the step then runs while
    the host checks; one wasted step after the stop token)."""

    def __init__(self, batch: int, device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(batch, dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None

    def start(self, ids: torch.Tensor) -> None:
        self.host.copy_(ids.reshape(-1), non_blocking=True)
        if self.event is not None:
            self.event.record()

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def device_generator(host_generator: torch.Generator, device) -> torch.Generator:
    """A generator on `device` seeded from `host_generator` (advances it by one draw), so a run's seed
    still determines the device stream."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=host_generator))
    return torch.Generator(torch.device(device)).manual_seed(seed)


__all__ = ["StaticCacheDecoder", "DecodeStep", "fuse_projections", "ras_select", "orpheus_select",
           "DeviceRASSampler", "DeviceOrpheusSampler", "device_sampler_for", "device_generator", "TokenReader",
           "capture", "graph_mode", "EmulatedGraph"]
