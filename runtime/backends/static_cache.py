"""Fast autoregressive decoding: a static KV cache and one captured CUDA graph per decode step.

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
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.transformer_lm import apply_rope
from runtime.backends.base import LLMDecoder
from runtime.backends.cuda_graphs import capture, graph_mode, sync_if_cuda

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
                sync_if_cuda(self.device)
                self.graph, self.logits_out, self.compile_seconds, self.capture_seconds = capture(
                    self._step_fn, self._args(), self.device, self.graph_mode, warmup=warmup,
                    after_warmup=self._reset_state)
            elif self.compiled:
                t0 = time.perf_counter()
                self._step_fn(*self._args())  # compile now, not in the first real step
                sync_if_cuda(self.device)
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
