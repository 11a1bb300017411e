"""CosyVoice2 flow modules (token encoder + U-Net estimator) against the upstream golden data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import models.conformer
import models.unet
from torch.export import Dim, export

from models.checkpoint import load_strict
from models.conformer import (
    ConformerEncoderConfig,
    CosyVoice2TokenEncoder,
    TokenEncoderConfig,
    rel_position_table,
    rel_shift,
)
from models.errors import UserError
from models.layers import chunk_attention_mask
from models.unet import CausalConditionalDecoder, UNetConfig
from tests.mutants import CHUNK_MASK_MUTANTS

GOLDEN = Path(__file__).parent / "data" / "golden" / "cosyvoice2"
# Golden tolerances, about 10x what this code measures (float32, CPU) and far below what the mutation
# probes at the end of this file cost (>= 5e-3):
EST_TOL = 3e-5  # U-Net velocity (|v| <= 3.7): measured 2.9e-6 offline, 3.3e-6 streaming
ENC_TOL = 1e-5  # encoder mu / spks: measured 0 (bit-exact), upstream fp64 probe 9.3e-7
EST_PREFIX = "decoder.estimator."


def _load(name: str):
    return torch.load(GOLDEN / name, map_location="cpu", weights_only=True)


def _select(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def config():
    return json.loads((GOLDEN / "config.json").read_text())


@pytest.fixture(scope="module")
def flow_sd():
    return _load("flow.pt")


@pytest.fixture(scope="module")
def estimator(config, flow_sd):
    m = CausalConditionalDecoder(UNetConfig.from_upstream(config["flow.decoder.estimator"]["kwargs"])).eval()
    load_strict(m, _select(flow_sd, EST_PREFIX), "flow.pt")
    return m


@pytest.fixture(scope="module")
def token_encoder(config, flow_sd):
    cfg = TokenEncoderConfig.from_upstream(config["flow"]["kwargs"], config["flow.encoder"]["kwargs"])
    m = CosyVoice2TokenEncoder(cfg).eval()
    load_strict(m, {k: v for k, v in flow_sd.items() if not k.startswith("decoder.")}, "flow.pt")
    return m


# -- configs and keys -------------------------------------------------------------------------------

def test_configs_from_upstream(config):
    cfg = TokenEncoderConfig.from_upstream(config["flow"]["kwargs"], config["flow.encoder"]["kwargs"])
    enc = cfg.encoder
    assert (enc.input_size, enc.output_size, enc.attention_heads, enc.linear_units, enc.num_blocks) == (32, 32, 2, 64, 2)
    assert (enc.num_up_blocks, enc.static_chunk_size, enc.pre_lookahead_len, enc.upsample_stride) == (4, 25, 3, 2)
    assert (cfg.vocab_size, cfg.output_size, cfg.spk_embed_dim) == (100, 80, 192)
    unet = UNetConfig.from_upstream(config["flow.decoder.estimator"]["kwargs"])
    assert unet.channels == (16,) and unet.static_chunk_size == 50 and unet.act_fn == "gelu"
    with pytest.raises(UserError):
        ConformerEncoderConfig.from_upstream({**config["flow.encoder"]["kwargs"], "use_cnn_module": True})
    with pytest.raises(UserError):
        ConformerEncoderConfig.from_upstream({**config["flow.encoder"]["kwargs"], "bogus": 1})
    with pytest.raises(UserError):
        UNetConfig.from_upstream({**config["flow.decoder.estimator"]["kwargs"], "act_fn": "snake"})


def test_state_dict_keys_cover_flow_pt(flow_sd, estimator, token_encoder):
    ours = {EST_PREFIX + k for k in estimator.state_dict()} | set(token_encoder.state_dict())
    assert ours == set(flow_sd)


# -- estimator ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix,chunk", [("", 0), ("_streaming", 50)])
def test_estimator_matches_golden(estimator, suffix, chunk):
    io = _load("estimator_io.pt")
    args = [io[k + suffix] for k in ("x", "mask", "mu", "t", "spks", "cond")]
    with torch.inference_mode():
        out = estimator(*args, torch.tensor([chunk]))
    err = _err(out, io["out" + suffix])
    print(f"estimator{suffix or '_offline'} max|diff| = {err:.3g}")
    assert err < EST_TOL


def test_streaming_chunk_mask_matches_golden():
    io = _load("estimator_io.pt")
    valid = io["mask_streaming"][:, 0] > 0
    assert torch.equal(chunk_attention_mask(valid, torch.tensor([50])), io["chunk_mask_streaming"])


def test_estimator_streaming_is_chunk_causal(estimator):
    g = torch.Generator().manual_seed(1)
    T = 70
    x, mu, cond = (torch.randn(1, 80, T, generator=g) for _ in range(3))
    args = (torch.ones(1, 1, T), mu, torch.rand(1, generator=g), torch.randn(1, 80, generator=g), cond)
    x2 = x.clone()
    x2[:, :, 50:] += 1.0
    with torch.inference_mode():
        a = estimator(x, *args, torch.tensor([50]))
        b = estimator(x2, *args, torch.tensor([50]))
        c = estimator(x2, *args, torch.tensor([0]))
    assert torch.allclose(a[..., :50], b[..., :50], atol=1e-6)  # the first chunk never sees the second
    assert not torch.allclose(a[..., :50], c[..., :50], atol=1e-3)  # offline does


# -- token encoder ----------------------------------------------------------------------------------

def test_encoder_offline_matches_golden(token_encoder):
    io = _load("flow_inference_io.pt")
    tokens = torch.cat([io["prompt_token"], io["token"]], dim=1).long()
    with torch.inference_mode():
        mu, spks = token_encoder(tokens, io["embedding"], torch.tensor([0]))
    assert mu.shape == io["decoder_mu"].shape
    e_mu, e_spks = _err(mu, io["decoder_mu"]), _err(spks, io["decoder_spks"])
    print(f"case A decoder_mu max|diff| = {e_mu:.3g}, decoder_spks = {e_spks:.3g}")
    assert e_mu < ENC_TOL and e_spks < ENC_TOL


def test_encoder_streaming_with_context_matches_golden(token_encoder):
    """Case B: prompt 3 + 27 tokens, streaming=True, finalize=False (last 3 tokens = look-ahead context)."""
    io = _load("flow_inference_io.pt")
    assert io["stream_streaming"] is True and io["stream_finalize"] is False
    tokens = torch.cat([io["stream_prompt_token"], io["stream_token"]], dim=1).long()  # [1, 30]
    ctx = torch.tensor([3])
    with torch.inference_mode():
        mu, spks = token_encoder(tokens, io["stream_embedding"], torch.tensor([25]), ctx)
    T = io["stream_decoder_mu"].shape[-1]  # 2 * (30 - 3) = 54
    assert mu.shape == (1, 80, 60) and T == 54
    assert torch.equal(token_encoder.frame_valid(tokens, ctx), torch.arange(60).unsqueeze(0) < T)
    e_mu, e_spks = _err(mu[..., :T], io["stream_decoder_mu"]), _err(spks, io["stream_decoder_spks"])
    print(f"case B stream_decoder_mu max|diff| = {e_mu:.3g}, stream_decoder_spks = {e_spks:.3g}")
    assert e_mu < ENC_TOL and e_spks < ENC_TOL
    assert mu[..., T:].abs().max() == 0  # context frames are zeroed
    # without the context handling the result differs (the look-ahead tokens would be attended to)
    with torch.inference_mode():
        mu_all, _ = token_encoder(tokens, io["stream_embedding"], torch.tensor([25]))
    assert _err(mu_all[..., :T], io["stream_decoder_mu"]) > 1e-3


def test_encoder_padding_is_masked(token_encoder):
    g = torch.Generator().manual_seed(2)
    long_row = torch.randint(0, 100, (1, 40), generator=g)
    short_row = torch.randint(0, 100, (1, 31), generator=g)
    batch = torch.full((2, 40), -1, dtype=torch.int64)
    batch[0], batch[1, :31] = long_row[0], short_row[0]
    emb = torch.randn(2, 192, generator=g)
    for chunk, ctx in ((0, None), (25, None), (25, torch.tensor([3]))):
        with torch.inference_mode():
            mu_b, spks_b = token_encoder(batch, emb, torch.tensor([chunk]), ctx)
            mu_s, spks_s = token_encoder(short_row, emb[1:], torch.tensor([chunk]), ctx)
            mu_l, _ = token_encoder(long_row, emb[:1], torch.tensor([chunk]), ctx)
        n = 2 * (31 - (3 if ctx is not None else 0))
        assert _err(mu_b[1:, :, :n], mu_s[..., :n]) < 1e-5
        assert mu_b[1:, :, n:].abs().max() == 0
        assert _err(mu_b[:1], mu_l) < 1e-5
        assert _err(spks_b[1:], spks_s) < 1e-6


def test_encoder_streaming_is_chunk_causal(token_encoder):
    """Frames of the first 25-token chunk see at most 3 look-ahead tokens beyond it."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 100, (1, 40), generator=g)
    tokens2 = tokens.clone()
    tokens2[:, 28:] = (tokens2[:, 28:] + 1) % 100
    emb = torch.randn(1, 192, generator=g)
    with torch.inference_mode():
        a, _ = token_encoder(tokens, emb, torch.tensor([25]))
        b, _ = token_encoder(tokens2, emb, torch.tensor([25]))
    assert torch.allclose(a[..., :50], b[..., :50], atol=1e-6)
    assert not torch.allclose(a[..., 50:], b[..., 50:], atol=1e-3)


def test_rel_position_table_and_shift_for_long_inputs():
    # upstream EspnetRelPositionalEncoding table for max_len positions, centre slice for length T
    def upstream(d, max_len):
        position = torch.arange(0, max_len, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
        pos, neg = torch.zeros(max_len, d), torch.zeros(max_len, d)
        pos[:, 0::2], pos[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        neg[:, 0::2], neg[:, 1::2] = torch.sin(-1 * position * div), torch.cos(-1 * position * div)
        return torch.cat([torch.flip(pos, [0]).unsqueeze(0), neg[1:].unsqueeze(0)], dim=1)

    table = upstream(32, 6000)
    centre = table.shape[1] // 2
    for T in (1, 7, 54, 5500):  # beyond upstream's default 5000-position table
        assert torch.equal(rel_position_table(T, 32), table[:, centre - T + 1: centre + T])
    for T in (1, 2, 9):
        x = torch.randn(2, 3, T, 2 * T - 1)
        i, j = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
        assert torch.equal(rel_shift(x), x[:, :, i, T - 1 - i + j])


# -- export -----------------------------------------------------------------------------------------

def test_estimator_exports_with_dynamic_length(estimator):
    b, t = Dim("B", min=1, max=8), Dim("T", min=2, max=4096)

    def feed(B, T, chunk, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(B, 1, T)
        mask[-1, :, T - T // 3:] = 0  # one padded row
        return (torch.randn(B, 80, T, generator=g), mask, torch.randn(B, 80, T, generator=g),
                torch.rand(B, generator=g), torch.randn(B, 80, generator=g), torch.randn(B, 80, T, generator=g),
                torch.tensor([chunk]))

    dyn = ({0: b, 2: t}, {0: b, 2: t}, {0: b, 2: t}, {0: b}, {0: b}, {0: b, 2: t}, None)
    ep = export(estimator, feed(2, 37, 50, 0), dynamic_shapes=dyn)
    exported = ep.module()
    with torch.inference_mode():
        for B, T, chunk in ((2, 73, 50), (2, 120, 0), (1, 2, 50)):
            args = feed(B, T, chunk, T)
            assert _err(exported(*args), estimator(*args)) < 1e-5


def test_token_encoder_exports_with_dynamic_length(token_encoder):
    b, n = Dim("B", min=1, max=8), Dim("N", min=2, max=2048)

    def feed(B, N, chunk, ctx, seed):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 100, (B, N), generator=g)
        if B > 1:
            tokens[-1, N - N // 4:] = -1
        return tokens, torch.randn(B, 192, generator=g), torch.tensor([chunk]), torch.tensor([ctx])

    ep = export(token_encoder, feed(2, 30, 25, 3, 0), dynamic_shapes=({0: b, 1: n}, {0: b}, None, None))
    exported = ep.module()
    with torch.inference_mode():
        for B, N, chunk, ctx in ((2, 57, 25, 3), (2, 13, 0, 0), (1, 2, 25, 0), (1, 64, 25, 0)):
            args = feed(B, N, chunk, ctx, N)
            for got, want in zip(exported(*args), token_encoder(*args)):
                assert got.shape == want.shape
                assert _err(got, want) < 1e-5
    # the three-input form (no context) equals context 0
    tokens, emb, chunk, _ = feed(2, 20, 25, 0, 5)
    with torch.inference_mode():
        assert torch.equal(token_encoder(tokens, emb, chunk)[0], token_encoder(tokens, emb, chunk, torch.tensor([0]))[0])


# -- mutation probes: a wrong chunk mask must fail the golden comparisons at the tolerances above ------

@pytest.mark.parametrize("mutant", list(CHUNK_MASK_MUTANTS.values()), ids=list(CHUNK_MASK_MUTANTS))
def test_wrong_chunk_mask_fails_golden(estimator, token_encoder, monkeypatch, mutant):
    """Upstream's static-chunk masks (estimator: 50 frames, encoder: 25 tokens, no left limit). With a
    wrong mask the streaming golden comparisons fail (measured: estimator next-frame 0.29, no-left-chunks
    2.1; encoder 5.5e-3 and 0.11) while the offline ones still pass."""
    io = _load("estimator_io.pt")
    monkeypatch.setattr(models.unet, "chunk_attention_mask", mutant)
    with torch.inference_mode():
        off = estimator(*[io[k] for k in ("x", "mask", "mu", "t", "spks", "cond")], torch.tensor([0]))
        on = estimator(*[io[k + "_streaming"] for k in ("x", "mask", "mu", "t", "spks", "cond")], torch.tensor([50]))
    assert _err(off, io["out"]) < EST_TOL
    assert _err(on, io["out_streaming"]) > EST_TOL

    io = _load("flow_inference_io.pt")
    monkeypatch.setattr(models.conformer, "chunk_attention_mask", mutant)
    with torch.inference_mode():
        mu, _ = token_encoder(torch.cat([io["prompt_token"], io["token"]], dim=1).long(), io["embedding"], torch.tensor([0]))
        mu_s, _ = token_encoder(torch.cat([io["stream_prompt_token"], io["stream_token"]], dim=1).long(),
                                io["stream_embedding"], torch.tensor([25]), torch.tensor([3]))
    assert _err(mu, io["decoder_mu"]) < ENC_TOL
    assert _err(mu_s[..., :54], io["stream_decoder_mu"]) > ENC_TOL
