"""Continuous-batching decode: a static KV cache whose rows ("slots") requests take and leave at any
step, one captured step per batch bucket, sampling inside the step.

Layout. Per layer `keys[l]`, `values[l]`: [rows, KVH, max_len, HD] in the decoder's dtype. A slot's
valid columns are [0, lengths[slot]): its prompt first, then one column per generated token, so the
RoPE position of the next token is its column. Active requests always occupy rows 0..n-1 (the caller
compacts with `move` when one leaves), so a step over the first `b` rows covers them all, with b the
smallest bucket >= n; rows n..b-1 are idle (length 0, their results ignored).

Step (`step(n)`), for rows [0, b): embed the row's next input id (`ids`, kept on the device: the
sampled token plus the family's token offset), RoPE at `lengths`, q/k/v (fused projections), write
k/v into column `lengths` of each row, attend over columns [0, lengths + 1) (`attention`, see
decode_attention.py; on CUDA one graph per bucket), MLP, head, then sample every row with the slot
sampler (models/sampling.py: each row its own rule state and counter-based uniforms, so a request's
tokens do not depend on its neighbours) and advance `lengths`, `ids` in place. The host then reads
the sampled ids once for the stop checks (`read`): one device-to-host copy per step for the batch.

Prefill (`prefill(start, prompts)`): the new prompts, right-padded to one length, through the
model's own body in one call (positions follow the mask, so padding at the end changes nothing for
the real tokens), their keys / values copied into the rows' first columns, the logits at each
row's last real token sampled as its first token. Several arrivals cost one forward. On CUDA the
forward and the cache writes are one captured graph per (rows bucket, width bucket): eager, a
Qwen2-0.5B prefill is ~700 kernel launches from Python; an eager prefill of one short prompt took
27.6 ms of the LM thread on an H100 while every running stream's next step waited (docs/serving.md).
One prompt's width rounds up to `bucket_size` (at most 25 % padding), several prompts' to a power of
two (the padded columns are written but lie past each row's length, where a step overwrites them
before any step reads them): `capture_all` captures every (rows, width) pair a request can meet, so
no capture happens in service (one would hold the LM thread for a compile and a capture). Rows round
up to a power of two by repeating the first prompt into its own row again (the same values written
twice), and more than `prefill_rows` arrivals go in pieces. Sampling stays eager (a few kernels, and
the sampler's rows start at `start`).

`move(dst, src)`: a row's cache columns, length, next id and sampler state copied to another row
(compaction when a request leaves). The host keeps every row's length (`host_lengths`) without
reading the device: it knows each prompt length and counts steps.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.sampling import SlotSampler
from models.transformer_lm import apply_rope
from runtime.backends import decode_attention
from runtime.backends.compiled import bucket_size
from runtime.backends.cuda_graphs import capture, graph_mode, sync_if_cuda
from runtime.backends.static_cache import fuse_projections


def batch_buckets(rows: int, factor: int = 2) -> list[int]:
    """1, factor, factor**2, ... up to `rows` (and `rows` itself): the batch sizes that get a captured
    step. 2 for eager steps (a capture costs well under a second, and a padded row costs time);
    a compiled step costs a compile per bucket (~40 s for Qwen2-0.5B on the H200) while its time
    barely grows with the batch (1.33 ms at 1 row, 1.18 ms at 16: docs/serving.md), so 4 buckets
    apart are the better trade."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= factor
    return out + [rows]


class SlotStep(nn.Module):
    """One decode step for rows [0, b) (see the module docstring); forward(ids, lengths, keys, values)
    -> sampled ids [b]; updates lengths, ids, the caches and the sampler state in place.

    compile: torch.compile the forward up to the logits only. The sampler runs eagerly after it, inside
    the same CUDA graph capture (so its kernels replay with the step at no launch cost): Inductor on
    the H200 (torch 2.11, Triton) fails to generate code for the split cumsum of a top-p over
    Orpheus's 156,940-token vocabulary (`InductorError ... get_block_shape`), and a graph break is not
    an option under fullgraph."""

    def __init__(self, lm: nn.Module, sampler: SlotSampler, token_offset: int, attend, fused: list | None,
                 compile: bool = False):
        super().__init__()
        self.lm, self.sampler, self.token_offset, self.attend = lm, sampler, token_offset, attend
        self.fused = fused or []
        self._logits = torch.compile(self.logits, dynamic=False, fullgraph=True) if compile else self.logits

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, keys: list, values: list) -> torch.Tensor:
        tok = self.sampler(self._logits(ids, lengths, keys, values))
        lengths.add_(1)
        ids.copy_(tok + self.token_offset)
        return tok

    def logits(self, ids: torch.Tensor, lengths: torch.Tensor, keys: list, values: list) -> torch.Tensor:
        """The step up to float32 logits [b, V]; writes this token's keys and values into the caches."""
        lm = self.lm
        body = lm.body
        b = ids.shape[0]
        rows = torch.arange(b, device=ids.device)
        h = lm.embed(ids.unsqueeze(1))  # [b,1,D]
        cos, sin = body.rope(lengths.unsqueeze(1), h.dtype)
        seen = lengths + 1  # columns each row attends to, this token's included
        # idle rows (past the active ones, up to the bucket) keep stepping on garbage: clamp their
        # column so it stays inside the cache (active rows never reach the end: the host checks)
        col = lengths.clamp(max=keys[0].shape[2] - 1)
        for i, layer in enumerate(body.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            nq, nkv = att.num_heads * att.head_dim, att.num_kv_heads * att.head_dim
            if self.fused:
                qkv_w, qkv_b, gu_w, gu_b = self.fused[i]
                q, k, v = F.linear(x, qkv_w, qkv_b).split([nq, nkv, nkv], -1)
            else:
                q, k, v = att.q_proj(x), att.k_proj(x), att.v_proj(x)
            q = apply_rope(q.reshape(b, 1, att.num_heads, att.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.reshape(b, 1, att.num_kv_heads, att.head_dim).transpose(1, 2), cos, sin)
            v = v.reshape(b, 1, att.num_kv_heads, att.head_dim).transpose(1, 2)
            # row r's new key goes to column lengths[r]: [b, KVH, HD] scattered in place
            keys[i][rows, :, col] = k[:, :, 0].to(keys[i].dtype)
            values[i][rows, :, col] = v[:, :, 0].to(values[i].dtype)
            o = self.attend(q, keys[i], values[i], seen, att.scale).to(h.dtype)
            h = h + att.o_proj(o)
            x = layer.post_attention_layernorm(h)
            if self.fused:
                gate, up = F.linear(x, gu_w, gu_b).chunk(2, dim=-1)
                h = h + layer.mlp.down_proj(F.silu(gate) * up)
            else:
                h = h + layer.mlp(x)
        return lm.head(body.norm(h)[:, -1]).float()


class SlotDecoder:
    """The continuous-batching decoder (see the module docstring).

    lm: the family's LM module (moved / cast in place to `device`, `dtype`); sampler: an empty slot
    sampler for `rows` rows (the family's `make_sampler(...).slots(...)`); token_offset: input id =
    sampled token + offset. attention: a name of decode_attention.IMPLEMENTATIONS (default: flex_grouped
    when compiling on CUDA, which reads only filled columns; matmul_bf16 otherwise). compile: torch.compile
    the step (inductor, one static compile per batch bucket); cuda_graphs: None = on for CUDA devices,
    "emulate" for CPU tests of the graph bookkeeping. prefill_graphs: capture the prefill too (when
    graphs are on; False keeps it eager, for comparison); prefill_rows: the most prompts one captured
    prefill takes (a power of two; more go in pieces)."""

    def __init__(self, lm: nn.Module, sampler: SlotSampler, token_offset: int, rows: int, max_len: int,
                 device, dtype: torch.dtype = torch.float32, compile: bool = False, cuda_graphs=None,
                 attention: str | None = None, buckets: list[int] | None = None, warmup: int = 2,
                 prefill_graphs: bool = True, prefill_rows: int = 16):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rows, self.max_len, self.dtype = rows, max_len, dtype
        self.graph_mode = graph_mode(cuda_graphs, self.device)
        self.lm = lm.to(self.device, dtype).eval()
        cfg = lm.body.config
        if attention is None:
            attention = "flex_grouped" if compile and self.device.type == "cuda" else "matmul_bf16"
        if attention not in decode_attention.IMPLEMENTATIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {list(decode_attention.IMPLEMENTATIONS)}")
        if attention.startswith("flex") and max_len % decode_attention.FLEX_KV_BLOCK:
            raise ValueError(f"flex attention needs max_len to be a multiple of {decode_attention.FLEX_KV_BLOCK}")
        self.attention, self.compiled = attention, compile
        self.sampler = sampler
        self.token_offset = token_offset
        with torch.inference_mode():
            shape = (rows, cfg.num_kv_heads, max_len, cfg.head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
            self.lengths = torch.zeros(rows, dtype=torch.int64, device=self.device)
            self.ids = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.host_lengths = [0] * rows
        if compile:
            cfg_dynamo = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg_dynamo, "recompile_limit") else "cache_size_limit"
            setattr(cfg_dynamo, name, max(getattr(cfg_dynamo, name), 64))
        self._step_fn = SlotStep(self.lm, sampler, token_offset, decode_attention.IMPLEMENTATIONS[attention],
                                 fuse_projections(self.lm), compile=compile)
        self.buckets = sorted(set(buckets or batch_buckets(rows, 4 if compile else 2)))
        if self.buckets[-1] != rows:
            raise ValueError(f"the largest batch bucket must be rows={rows}, got {self.buckets}")
        self._graphs: dict[int, tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graph_mode == "cuda" else None
        if prefill_rows < 1 or prefill_rows & (prefill_rows - 1):
            raise ValueError(f"prefill_rows must be a power of two, got {prefill_rows}")
        self.prefill_graphs = prefill_graphs and self.graph_mode != "off"
        self.prefill_rows = prefill_rows
        # (rows bucket, width bucket) -> (graph, static inputs, logits); a pool of their own, so a
        # prefill's intermediates never share memory with the step graphs' outputs
        self._prefills: dict[tuple[int, int], tuple] = {}
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.graph_mode == "cuda" else None
        self.warmup_calls = warmup
        self.compile_seconds = self.capture_seconds = 0.0
        self._host_ids = torch.zeros(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self._read_done = torch.cuda.Event() if self.device.type == "cuda" else None

    # -- the captured steps ---------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _args(self, b: int):
        return (self.ids[:b], self.lengths[:b], [k[:b] for k in self.keys], [v[:b] for v in self.values])

    def capture_all(self) -> "SlotDecoder":
        """Compile and capture every step bucket and every prefill (rows, width) pair now (a server
        warms up before it says it is ready). The prefill captures write zeros' keys into row 0:
        call this before any request holds a row."""
        for b in self.buckets:
            self._graph(b)
        if self.prefill_graphs:
            for rows in (1 << i for i in range(self.prefill_rows.bit_length())):
                for w in sorted({self.prefill_width(rows, n) for n in range(1, self.max_len + 1)}):
                    self._prefill_graph(rows, w)
        return self

    def prefill_width(self, rows: int, longest: int) -> int:
        """The captured prefill's width for `rows` prompts whose longest has `longest` tokens: the
        lone prompt (the common arrival at low load, where its time is first-audio latency) pads at
        most 25 %, a group up to 2x, which keeps the captures to ~4 per doubling of max_len per
        rows bucket (a group's prefill is a small part of the step time it saves)."""
        width = bucket_size(longest) if rows == 1 else max(16, 1 << (longest - 1).bit_length())
        return min(width, self.max_len)

    def _graph(self, b: int):
        entry = self._graphs.get(b)
        if entry is None:
            saved = [t.clone() for t in (self.ids, self.lengths, *self.sampler.state())]

            def restore():  # the warm-up steps ran on live state: put it back
                for t, v in zip((self.ids, self.lengths, *self.sampler.state()), saved):
                    t.copy_(v)

            sync_if_cuda(self.device)
            with torch.inference_mode():
                if self.graph_mode == "off":
                    t0 = time.perf_counter()
                    self._step_fn(*self._args(b))
                    sync_if_cuda(self.device)
                    restore()
                    self.compile_seconds += time.perf_counter() - t0
                    entry = (None, None)
                else:
                    graph, out, first, rest = capture(self._step_fn, self._args(b), self.device, self.graph_mode,
                                                      self._pool, self.warmup_calls, after_warmup=restore)
                    self.compile_seconds += first
                    self.capture_seconds += rest
                    entry = (graph, out)
            self._graphs[b] = entry
        return entry

    # -- requests ---------------------------------------------------------------------------------------
    def room(self, prompt_len: int, max_new: int) -> None:
        check_room(prompt_len, max_new, self.max_len)

    def prefill(self, start: int, prompts: list[list[int]], samplers: list, seeds: list[int]) -> torch.Tensor:
        """Rows start..start+k-1 take these prompts; returns their first sampled tokens [k] (device)."""
        k = len(prompts)
        lens = [len(p) for p in prompts]
        width = max(lens)
        if start + k > self.rows or width > self.max_len:
            raise ValueError(f"prefill of {k} prompts (up to {width} tokens) at row {start} does not fit")
        with torch.inference_mode():
            for i, (sampler, seed) in enumerate(zip(samplers, seeds)):
                self.sampler.load(start + i, sampler, seed)
            if self.prefill_graphs:
                step = self.prefill_rows
                logits = torch.cat([self._prefill_captured(start + i, prompts[i:i + step])
                                    for i in range(0, k, step)])
            else:
                ids, mask, last, rows = self._prefill_inputs(start, prompts, k, width)
                logits = self._prefill_fn(ids.to(self.device), mask.to(self.device), last.to(self.device),
                                          rows.to(self.device))
            self.lengths[start:start + k] = torch.tensor(lens, device=self.device)
            tok = self.sampler(logits, start)
            self.ids[start:start + k] = tok + self.token_offset
        for i, n in enumerate(lens):
            self.host_lengths[start + i] = n
        return tok

    @staticmethod
    def _prefill_inputs(start: int, prompts: list[list[int]], rows: int, width: int):
        """Host tensors (ids, mask [rows, width], last [rows], destination rows [rows]) for these
        prompts; rows past the prompts repeat the first prompt and its destination row."""
        ids = torch.zeros(rows, width, dtype=torch.int64)
        mask = torch.zeros(rows, width, dtype=torch.int64)
        last = torch.zeros(rows, dtype=torch.int64)
        dest = torch.full((rows,), start, dtype=torch.int64)
        for i in range(rows):
            p = prompts[i] if i < len(prompts) else prompts[0]
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
            last[i] = len(p) - 1
            if i < len(prompts):
                dest[i] = start + i
        return ids, mask, last, dest

    def _prefill_fn(self, ids, mask, last, rows) -> torch.Tensor:
        """The prefill as a pure device function: logits [k, V] float32 at each row's last real token;
        the keys / values of columns [0, width) written into cache rows `rows`."""
        lm = self.lm
        width = ids.shape[1]
        hidden, keys, values = lm.body(lm.embed(ids), mask)
        logits = lm.head(hidden[torch.arange(ids.shape[0], device=ids.device), last]).float()
        for layer in range(len(self.keys)):
            self.keys[layer][rows, :, :width] = keys[layer].to(self.keys[layer].dtype)
            self.values[layer][rows, :, :width] = values[layer].to(self.values[layer].dtype)
        return logits

    def _prefill_graph(self, rows: int, width: int, host_inputs: tuple | None = None):
        """The captured prefill for (rows, width): (graph, static inputs, logits). Capturing runs it
        once (the warm-up) on `host_inputs`, writing their rows: a capture in mid-service gets the real
        request's inputs (so it writes what the replay writes again); `capture_all` dummies in row 0."""
        entry = self._prefills.get((rows, width))
        if entry is None:
            if host_inputs is None:
                host_inputs = self._prefill_inputs(0, [[0]], rows, width)
            sync_if_cuda(self.device)
            with torch.inference_mode():  # the cache is an inference tensor (capture_all runs outside prefill)
                inputs = tuple(t.to(self.device) for t in host_inputs)
                graph, logits, first, rest = capture(self._prefill_fn, inputs, self.device, self.graph_mode,
                                                     self._prefill_pool, warmup=1)
            self.compile_seconds += first
            self.capture_seconds += rest
            entry = self._prefills[(rows, width)] = (graph, inputs, logits)
        return entry

    def _prefill_captured(self, start: int, prompts: list[list[int]]) -> torch.Tensor:
        """Up to `prefill_rows` prompts through their captured prefill; their logits (a copy: the next
        replay of the same graph overwrites its output)."""
        k = len(prompts)
        rows = 1 << (k - 1).bit_length()
        width = self.prefill_width(rows, max(len(p) for p in prompts))
        host = self._prefill_inputs(start, prompts, rows, width)
        graph, inputs, logits = self._prefill_graph(rows, width, host)
        for dst, src in zip(inputs, host):
            dst.copy_(src)
        graph.replay()
        return logits[:k].clone()

    def step(self, n: int) -> torch.Tensor:
        """One token for each of rows 0..n-1 (device tensor [n]; `read` brings it to the host)."""
        b = self.bucket(n)
        for i in range(n):
            if self.host_lengths[i] >= self.max_len:
                raise UserError(f"slot {i} is full ({self.max_len} columns).", "stop the request before it fills its slot")
        graph, out = self._graph(b)
        with torch.inference_mode():
            if graph is None:
                tok = self._step_fn(*self._args(b))
            else:
                graph.replay()
                tok = out
        for i in range(n):
            self.host_lengths[i] += 1
        return tok[:n]

    def read(self, tok: torch.Tensor) -> list[int]:
        """The sampled ids on the host (the one device-to-host copy and sync per step)."""
        n = tok.shape[0]
        host = self._host_ids[:n]
        host.copy_(tok, non_blocking=True)
        if self.device.type == "cuda":  # wait for this stream only: other threads' streams keep running
            self._read_done.record()
            self._read_done.synchronize()
        return host.tolist()

    def move(self, dst: int, src: int) -> None:
        """Row `src`'s request continues in row `dst` (compaction)."""
        if dst == src:
            return
        n = self.host_lengths[src]
        with torch.inference_mode():
            for k, v in zip(self.keys, self.values):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]
            self.lengths[dst] = self.lengths[src]
            self.ids[dst] = self.ids[src]
        self.sampler.move(dst, src)
        self.host_lengths[dst] = n

    def free(self, row: int) -> None:
        """Row `row` holds no request any more (its columns are dropped by length 0)."""
        with torch.inference_mode():
            self.lengths[row] = 0
        self.host_lengths[row] = 0

    def metadata(self) -> dict:
        return {"decoder": "slots", "rows": self.rows, "max_len": self.max_len, "buckets": self.buckets,
                "dtype": str(self.dtype).replace("torch.", ""), "attention": self.attention, "compiled": self.compiled,
                "graph": self.graph_mode, "graphs": len(self._graphs), "prefill_graphs": len(self._prefills),
                "compile_seconds": round(self.compile_seconds, 3), "capture_seconds": round(self.capture_seconds, 3)}


def check_room(prompt_len: int, max_new: int, max_len: int) -> None:
    """Refuse a request whose prompt and generated tokens cannot fit `max_len` cache columns (also
    checked by an engine without a decoder of its own: the token2wav side of a disaggregated placement)."""
    max_new = max(max_new, 1)  # a prompt that fills the cache leaves no room for even one token
    if prompt_len + max_new > max_len:
        raise UserError(f"a request needs {prompt_len} prompt + up to {max_new} generated tokens, more than the "
                        f"{max_len} cache columns of this engine.",
                        "split the text into shorter sentences, or start the engine with a larger --max-len",
                        param="tokens")
