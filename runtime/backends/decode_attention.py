"""Single-query attention over a static, per-row-length KV cache (the decode step of a batch of
requests that joined at different times).

Every implementation has the signature

    attend(q [B,H,1,HD], keys [B,KVH,T,HD], values [B,KVH,T,HD], lengths int64 [B], scale) -> [B,1,H*HD]

Row i attends to cache columns [0, lengths[i]) (the column being decoded is already written and
counted). Heads are grouped as in HF's repeat_kv: query head h uses kv head h // G, G = H // KVH.
The output has q's dtype. All of them are capturable in a CUDA graph and trace with
`torch.compile(fullgraph=True, dynamic=False)`: the mask comes from `lengths` on the device, with no
host sync and no shape that depends on a tensor value.

Lengths are clamped to [1, T] on the device: a free slot (length 0) then attends to column 0 and
yields a finite row instead of NaN, and a length past T cannot make a block-sparse kernel read past
the cache. The rows' valid columns must start at column 0 (no left padding).

Filled columns only: the caller knows every request's length on the host (prompt + tokens generated
so far), so it can bound max(lengths) without reading the device. `bucket_columns` rounds that bound
up to a bucket Tb and `attend_first_columns(attend, Tb)` returns an `attend` over keys[:, :, :Tb]
(views of the same memory: no copy, the captured graph reads the live cache). A serving loop keeps
one captured graph per (batch bucket, Tb bucket), all captured on the same static buffers, and
replays the one for (B, bucket_columns(max host length)) each step; with T=2048 and Tb multiples of
256 that is 8 graphs per batch bucket (a shared graph memory pool keeps that cheap). Under
torch.compile every Tb is a separate specialisation: raise `torch._dynamo.config.recompile_limit`
(cache_size_limit in older releases) above the number of graphs.

Implementations (`IMPLEMENTATIONS`): `reference_fp32`, `matmul_bf16`, `sdpa`, `sdpa_grouped`, `flex`,
`flex_grouped`; their docstrings say what each reads. Numbers quoted in them ("H200 probe") come from
one-off checks on an H200 with torch 2.11+cu130: one layer, Llama-3.2-3B shapes (H=24, KVH=8,
HD=128), B=128, T=1024, lengths uniform in [64, 600], compiled (inductor) and replayed in a CUDA
graph. The full tables come from scripts/bench_decode_attention.py.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# KV columns per BlockMask block: the granularity at which flex skips unfilled columns (a row reads
# up to FLEX_KV_BLOCK - 1 columns past its length). 128 is flex's default tile.
FLEX_KV_BLOCK = 128
# Query rows per BlockMask block; one block covers the single query (or the G folded ones).
FLEX_Q_BLOCK = 128


def _clamped(lengths: torch.Tensor, columns: int) -> torch.Tensor:
    return lengths.clamp(1, columns)


def _valid_columns(lengths: torch.Tensor, columns: int) -> torch.Tensor:
    """[B, columns] bool: column c of row i is attended."""
    idx = torch.arange(columns, device=lengths.device)
    return idx.unsqueeze(0) < _clamped(lengths, columns).unsqueeze(1)


def _grouped_query(q: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """q [B,H,1,HD] -> [B,KVH,G,HD]: the G query heads sharing a kv head become G query rows of that
    head (a view; head h = kv * G + g, the repeat_kv order)."""
    b, h, _, hd = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, hd).to(dtype)


def reference_fp32(q, keys, values, lengths, scale):
    """Today's rule (runtime.llm_decode `_attend_reduce`): broadcast products and sums in float32
    over all T columns, masked columns at -inf before the softmax.

    Reads every column of K and V whatever the lengths. Compiled, inductor fuses the float32 casts
    into two reductions (q.k over HD, then p.v over T); the second reduces along T, a strided axis of
    V, and neither is a GEMM: the likely reason today's step is far from bandwidth-bound (42 ms per
    Llama-3B step at B=128, T=1024). Kept as the baseline."""
    b, h, _, hd = q.shape
    kvh, t = keys.shape[1], keys.shape[2]
    qg = _grouped_query(q, kvh, torch.float32).unsqueeze(3) * scale  # [B,KVH,G,1,HD]
    scores = (qg * keys.unsqueeze(2).float()).sum(-1)  # [B,KVH,G,T]
    valid = _valid_columns(lengths, t)[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    out = (p.unsqueeze(-1) * values.unsqueeze(2).float()).sum(-2)  # [B,KVH,G,HD]
    return out.reshape(b, 1, h * hd).to(q.dtype)


def matmul_bf16(q, keys, values, lengths, scale):
    """Two batched GEMMs in the cache dtype (cuBLAS accumulates in float32), softmax in float32.

    Per (row, kv head) the G grouped queries form a [G,HD] x [HD,T] product, so each K and V element
    is read once from memory, in its own dtype: no float32 copy of the cache, no G-fold re-read. It
    still reads all T columns (pair it with `attend_first_columns`). The extra traffic is the
    [B,KVH,G,T] scores / probabilities, G*T*4 bytes per (row, kv head) against 4*T*HD bytes of K/V
    (about 2 % for Llama-3B). Precision: the scores come out of the GEMM rounded to the cache dtype
    (bf16: ~3 significant digits, as HF's eager attention in bf16); the probabilities are rounded to
    it before the second GEMM. H200 probe: 144 us per layer over all 1024 columns (3.7 TB/s of K/V
    read), max abs error 8e-3 against float32."""
    b, h, _, hd = q.shape
    kvh, t = keys.shape[1], keys.shape[2]
    qg = _grouped_query(q, kvh, keys.dtype)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [B,KVH,G,T]
    valid = _valid_columns(lengths, t)[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    out = torch.matmul(p.to(values.dtype), values)  # [B,KVH,G,HD]
    return out.reshape(b, 1, h * hd).to(q.dtype)


def sdpa(q, keys, values, lengths, scale):
    """`scaled_dot_product_attention` with a boolean [B,1,1,T] mask and `enable_gqa=True`.

    What it reads depends on the backend torch picks. On CUDA a mask rules out flash attention and,
    in torch 2.11, GQA rules out the memory-efficient kernel; cuDNN accepts both and is what runs
    (H200 probe: flash and efficient refused, cuDNN and math accepted, cuDNN chosen, also inside
    the compiled graph; 144 us per layer, i.e. ~3.7 TB/s over all T columns). Where only the math
    backend is left (CPU, older cuDNN), it expands K and V to all H heads (G-fold copies) and
    materialises the scores: not bandwidth-efficient. The fused kernels still read every one of the
    T columns (the mask is a bias, not a length): pair it with `attend_first_columns`."""
    b, h, _, hd = q.shape
    t = keys.shape[2]
    mask = _valid_columns(lengths, t)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, 1, h * hd).to(q.dtype)


def sdpa_grouped(q, keys, values, lengths, scale):
    """`scaled_dot_product_attention` with the G query heads of a kv head folded into G query rows:
    q [B,KVH,G,HD] against K/V [B,KVH,T,HD], mask [B,1,1,T] broadcast over heads and rows.

    Same result as `sdpa`, but the call has as many query heads as kv heads, so it needs no GQA
    support: on CUDA the memory-efficient (cutlass) kernel accepts it with the mask as well as cuDNN
    (H200 probe: cuDNN chosen by default, 194 us per layer, slower than `sdpa`'s 144 us). Each
    (row, kv head) reads its K/V once, in bf16, but over all T columns (the mask is a bias, not a
    length), and the parallelism is B*KVH: little at small B (Qwen2-0.5B at B=1: 2). Pair it with
    `attend_first_columns`."""
    b, h, _, hd = q.shape
    kvh, t = keys.shape[1], keys.shape[2]
    mask = _valid_columns(lengths, t)[:, None, None, :]
    out = F.scaled_dot_product_attention(_grouped_query(q, kvh, keys.dtype), keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, 1, h * hd).to(q.dtype)


def length_block_mask(lengths: torch.Tensor, q_len: int, kv_len: int, kv_block: int = FLEX_KV_BLOCK):
    """A flex `BlockMask` for "row b sees columns [0, lengths[b])", built with tensor ops on the
    device (no host sync, capturable), instead of `create_block_mask`, which evaluates the mask
    over all B x T cells to find the blocks.

    Per row (one head entry, broadcast over heads; one query block): lengths // kv_block full blocks
    (attended without evaluating the mask) and at most one partial block, the one holding the last
    column, where the mask is evaluated. Blocks past it are never listed, so the kernel does not
    read them. q blocks for the backward pass are not computed (inference only)."""
    from torch.nn.attention.flex_attention import BlockMask

    if kv_len % kv_block:
        raise ValueError(f"kv_len {kv_len} is not a multiple of the flex KV block {kv_block}")
    n_blocks = kv_len // kv_block
    clamped = _clamped(lengths, kv_len)
    b = lengths.shape[0]
    full = (clamped // kv_block).to(torch.int32)
    partial = (clamped % kv_block != 0).to(torch.int32)
    # entries past a row's block count are ignored, so one arange serves every row's full blocks
    full_indices = torch.arange(n_blocks, dtype=torch.int32, device=lengths.device).expand(b, n_blocks)
    partial_index = full.clamp(max=n_blocks - 1).unsqueeze(1).expand(b, n_blocks)

    # The mask reads the caller's `lengths` and clamps inside: inductor's CPU flex template only
    # accepts graph inputs as captured buffers, not tensors computed in the graph. Only the lower
    # clamp matters here: the block lists above already stop at kv_len.
    def mask_mod(batch, head, q_idx, kv_idx):
        return kv_idx < lengths[batch].clamp(min=1)

    return BlockMask.from_kv_blocks(
        partial[:, None, None], partial_index[:, None, None, :].contiguous(),
        full[:, None, None], full_indices[:, None, None, :].contiguous(),
        BLOCK_SIZE=(FLEX_Q_BLOCK, kv_block), mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
        compute_q_blocks=False)


def flex(q, keys, values, lengths, scale):
    """FlexAttention with a length BlockMask (`length_block_mask`) and `enable_gqa=True`.

    Reads only the KV blocks that hold filled columns (each row's length rounded up to
    FLEX_KV_BLOCK), even over the full T: block sparsity does what the Tb bucket does, per row.
    Needs torch.compile (inductor) to be fast; eager flex materialises the scores. Inductor uses its
    split-KV decoding kernel for q_len 1 only when G is a power of two (a check in the lowering);
    Llama-3B (G=3) and Qwen2-0.5B (G=7) fall back to the main flex kernel, one program per query
    head with the single query padded to a tile and each K/V block fetched once per query head.

    Broken there on CUDA with torch 2.11 (H200 probe, G=3): this BlockMask gives an illegal memory
    access in the main kernel, and listing every block as partial instead gives wrong outputs
    (max abs error 1.1), while the same mask without GQA (K/V expanded to H heads) is correct.
    Correct on CPU (tests). Use `flex_grouped`, which never takes that path."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h, _, hd = q.shape
    block_mask = length_block_mask(lengths, 1, keys.shape[2])
    out = flex_attention(q.to(keys.dtype), keys, values, block_mask=block_mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, 1, h * hd).to(q.dtype)


def flex_grouped(q, keys, values, lengths, scale):
    """FlexAttention with the G query heads of a kv head folded into G query rows (q [B,KVH,G,HD],
    no enable_gqa) and the length BlockMask.

    As `flex`, reads only the filled blocks; with as many query heads as kv heads, the q length G
    (< 128) makes inductor pick its decoding kernel for any G: one program per (row, kv head, KV
    split) reads each K/V block once for all G queries, and the split over T fills the GPU at small
    B. Needs torch.compile (inductor) to be fast. H200 probe: the decoding kernel runs, 76 us per
    layer (B=256: 134 us; Qwen2-0.5B shapes at B=128: 21 us), max abs error 4e-3."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h, _, hd = q.shape
    kvh = keys.shape[1]
    qg = _grouped_query(q, kvh, keys.dtype)
    block_mask = length_block_mask(lengths, qg.shape[2], keys.shape[2])
    out = flex_attention(qg, keys, values, block_mask=block_mask, scale=scale)
    return out.reshape(b, 1, h * hd).to(q.dtype)


IMPLEMENTATIONS: dict[str, Attend] = {
    "reference_fp32": reference_fp32,
    "matmul_bf16": matmul_bf16,
    "sdpa": sdpa,
    "sdpa_grouped": sdpa_grouped,
    "flex": flex,
    "flex_grouped": flex_grouped,
}


def bucket_columns(max_length: int, total_columns: int, multiple: int = 256) -> int:
    """Host side: the smallest multiple of `multiple` >= max_length, capped at the cache size.
    Keep `multiple` a multiple of FLEX_KV_BLOCK so the flex implementations accept the slice."""
    if max_length < 1:
        max_length = 1
    return min(-(-max_length // multiple) * multiple, total_columns)


def attend_first_columns(attend: Attend, columns: int) -> Attend:
    """`attend` over cache columns [0, columns) only. The caller guarantees columns >= every row's
    length (lengths past it are clamped: those rows would silently lose their last columns)."""

    def attend_prefix(q, keys, values, lengths, scale):
        return attend(q, keys[:, :, :columns], values[:, :, :columns], lengths, scale)

    attend_prefix.__name__ = f"{getattr(attend, '__name__', 'attend')}_first_{columns}"
    return attend_prefix
