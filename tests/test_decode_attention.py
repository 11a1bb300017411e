"""runtime.backends.decode_attention: every implementation against a float64 reference that takes
the softmax over each row's valid columns only, on tiny CPU shapes.

Tolerances are `atol + rtol * |ref|` with rtol = 2**-8 (rounding of a bf16 output) and atol near
the worst error seen over several seeds, with ~2x margin. In bf16 the CPU kernels of sdpa and flex
round scores / probabilities to bf16 on the way; matmul_bf16 rounds the scores by design (its
docstring), hence its larger atol.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from runtime.backends.decode_attention import (FLEX_KV_BLOCK, IMPLEMENTATIONS, attend_first_columns, bucket_columns,
                                               length_block_mask)

NAMES = list(IMPLEMENTATIONS)
B, T, HD = 4, 2 * FLEX_KV_BLOCK, 32
SCALE = HD ** -0.5
# length 1, inside a flex block, exactly one flex block, the whole cache
LENGTHS = [1, 77, FLEX_KV_BLOCK, T]
HEADS = {"mha": (4, 4), "gqa3": (6, 2)}  # (H, KVH): G = 1 and G = 3
ATOL_FP32 = 1e-6
ATOL_BF16 = {"reference_fp32": 1e-5, "matmul_bf16": 7e-3, "sdpa": 2e-3, "sdpa_grouped": 2e-3, "flex": 2.5e-3,
             "flex_grouped": 2.5e-3}
RTOL = 2 ** -8

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _quiet_flex():
    # eager flex warns that it is unfused (expected here: CPU correctness only)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def reference_f64(q, keys, values, lengths, scale):
    """Softmax over columns [0, length) only (no -inf arithmetic over the rest), in float64."""
    b, h, _, hd = q.shape
    g = h // keys.shape[1]
    out = torch.zeros(b, h, hd, dtype=torch.float64)
    for i in range(b):
        n = max(1, min(int(lengths[i]), keys.shape[2]))
        for head in range(h):
            k = keys[i, head // g, :n].double()
            v = values[i, head // g, :n].double()
            p = torch.softmax(k @ q[i, head, 0].double() * scale, dim=0)
            out[i, head] = p @ v
    return out.reshape(b, 1, h * hd)


def make_inputs(heads: str, dtype: torch.dtype, seed: int = 0):
    h, kvh = HEADS[heads]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, 1, HD, generator=gen).to(dtype)
    keys = torch.randn(B, kvh, T, HD, generator=gen).to(dtype)
    values = torch.randn(B, kvh, T, HD, generator=gen).to(dtype)
    return q, keys, values, torch.tensor(LENGTHS)


def assert_matches_reference(out, q, keys, values, lengths, atol):
    ref = reference_f64(q, keys, values, lengths, SCALE)
    excess = ((out.double() - ref).abs() - RTOL * ref.abs()).max().item()
    assert excess <= atol, f"max error beyond rtol {excess:.3g} > atol {atol:.3g}"


def tolerance(name: str, dtype: torch.dtype) -> float:
    return ATOL_FP32 if dtype == torch.float32 else ATOL_BF16[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, heads, dtype):
    q, keys, values, lengths = make_inputs(heads, dtype)
    out = IMPLEMENTATIONS[name](q, keys, values, lengths, SCALE)
    assert out.shape == (B, 1, q.shape[1] * HD) and out.dtype == dtype
    assert_matches_reference(out, q, keys, values, lengths, tolerance(name, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_columns_past_length_do_not_leak(name, dtype):
    q, keys, values, lengths = make_inputs("gqa3", dtype)
    clean = IMPLEMENTATIONS[name](q, keys, values, lengths, SCALE)
    dirty_k, dirty_v = keys.clone(), values.clone()
    past = torch.arange(T)[None, :] >= lengths[:, None]  # [B,T]
    assert past.any()
    # large and finite: a score of ~1e4 * 1e4 * HD would dominate any softmax it entered
    dirty_k[past[:, None, :, None].expand_as(keys)] = 1e4
    dirty_v[past[:, None, :, None].expand_as(values)] = -1e4
    dirty = IMPLEMENTATIONS[name](q, dirty_k, dirty_v, lengths, SCALE)
    assert torch.equal(dirty, clean)


@pytest.mark.parametrize("name", NAMES)
def test_free_slot_attends_to_column_zero(name):
    """Length 0 (a free slot) is clamped to 1: a finite row, the one of length 1."""
    q, keys, values, _ = make_inputs("gqa3", torch.float32)
    attend = IMPLEMENTATIONS[name]
    zero = attend(q, keys, values, torch.tensor([0, 0, 5, 0]), SCALE)
    one = attend(q, keys, values, torch.tensor([1, 1, 5, 1]), SCALE)
    assert torch.isfinite(zero).all()
    torch.testing.assert_close(zero, one, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_first_columns_bucket(name, dtype):
    """Attending over the first Tb columns gives the full-cache answer when Tb >= every length,
    whatever sits past Tb."""
    q, keys, values, _ = make_inputs("gqa3", dtype)
    lengths = torch.tensor([1, 40, 77, FLEX_KV_BLOCK])
    tb = bucket_columns(int(lengths.max()), T, multiple=FLEX_KV_BLOCK)
    assert tb == FLEX_KV_BLOCK
    keys[:, :, tb:] = float("nan")  # never read: a NaN would reach the output through any product
    values[:, :, tb:] = float("nan")
    out = attend_first_columns(IMPLEMENTATIONS[name], tb)(q, keys, values, lengths, SCALE)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, q, keys, values, lengths, tolerance(name, dtype))


def test_bucket_columns():
    assert bucket_columns(600, 1024) == 768
    assert bucket_columns(768, 1024) == 768
    assert bucket_columns(769, 1024) == 1024
    assert bucket_columns(1000, 1024) == 1024
    assert bucket_columns(1, 2048) == 256
    assert bucket_columns(0, 2048) == 256
    assert bucket_columns(2000, 1024) == 1024  # capped at the cache


def test_length_block_mask_lists_only_filled_blocks():
    lengths = torch.tensor([0, 1, 127, 128, 129, 256, 300])
    bm = length_block_mask(lengths, 1, 256, kv_block=128)
    full = bm.full_kv_num_blocks[:, 0, 0].tolist()
    partial = bm.kv_num_blocks[:, 0, 0].tolist()
    first_partial = bm.kv_indices[:, 0, 0, 0].tolist()
    # lengths clamped to [1, 256]: 1, 1, 127, 128, 129, 256, 256
    assert full == [0, 0, 0, 1, 1, 2, 2]
    assert partial == [1, 1, 1, 0, 1, 0, 0]
    assert [first_partial[i] for i in range(7) if partial[i]] == [0, 0, 0, 1]
    assert bm.full_kv_indices[0, 0, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="multiple of the flex KV block"):
        length_block_mask(lengths, 1, 200, kv_block=128)


@pytest.mark.parametrize("name", NAMES)
def test_compiles_fullgraph(name):
    """Traceable as one graph with static shapes (aot_eager: dynamo + AOTAutograd, no codegen; the
    inductor lowering is exercised on the GPU below and by scripts/bench_decode_attention.py)."""
    q, keys, values, lengths = make_inputs("gqa3", torch.bfloat16)
    attend = IMPLEMENTATIONS[name]
    compiled = torch.compile(attend, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(q, keys, values, lengths, SCALE), attend(q, keys, values, lengths, SCALE),
                               atol=0, rtol=0)
    bucketed = torch.compile(attend_first_columns(attend, FLEX_KV_BLOCK), fullgraph=True, dynamic=False,
                             backend="aot_eager")
    short = torch.tensor([1, 40, 77, FLEX_KV_BLOCK])
    assert_matches_reference(bucketed(q, keys, values, short, SCALE), q, keys, values, short, ATOL_BF16[name])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_inductor_cuda_graph(name):
    """Compiled with inductor and replayed in a CUDA graph; the lengths change between replays."""
    if name == "flex":
        # an illegal address poisons the CUDA context of the whole test process
        pytest.skip("flex (enable_gqa, G=3) hits an illegal memory access in inductor's main flex kernel on "
                    "torch 2.11 + H200 (decode_attention.flex docstring); flex_grouped is the CUDA path")
    q, keys, values, lengths = (x.cuda() for x in make_inputs("gqa3", torch.bfloat16))
    compiled = torch.compile(IMPLEMENTATIONS[name], fullgraph=True, dynamic=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            compiled(q, keys, values, lengths, SCALE)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(q, keys, values, lengths, SCALE)
    for new in ([3, 200, 129, 256], [256, 1, 128, 64]):
        lengths.copy_(torch.tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        # the GPU kernels keep scores in float32: the CPU bf16 tolerances hold with room
        assert_matches_reference(out.cpu(), q.cpu(), keys.cpu(), values.cpu(), lengths.cpu(), ATOL_BF16[name])
