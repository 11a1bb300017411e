"""CosyVoice3 flow stage (models/dit.py, models/flow.py) against the golden upstream data.

Golden: tests/data/golden/cosyvoice3/ (see tests/data/golden/README.md). Our modules reproduce the
golden tensors bit for bit on this CPU (measured max|diff| 0 for estimator, encoder, solver and
inference). The tolerances are about 10x what upstream itself moves under a legitimate change (golden
README probes, fp64 recompute: estimator 8.4e-7 / 1.0e-6, mel after 10 Euler steps 1.2e-6 / 1.5e-6),
so another CPU's float32 rounding passes, while the mutation probes at the end of this file (CFG rate,
time schedule, chunk mask) move the same comparisons by >= 1e-2 and must fail.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.export import Dim, export

import models.dit
from models.checkpoint import fold_weight_norm, load_strict
from models.dit import DiT, DiTConfig
from models.errors import UserError
from models.flow import (CV3TokenEncoder, Flow, FlowConfig, FlowSolver, SolverConfig, TokenEncoder,
                         build_cosyvoice3_flow, euler_schedule)
from models.layers import chunk_attention_mask
from tests.mutants import CHUNK_MASK_MUTANTS

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", "cosyvoice3")
EST_TOL = 1e-5  # estimator velocity (|v| <= 2.3): measured 0, upstream fp64 probe 1.0e-6
MEL_TOL = 2e-5  # mel after the 10-step solve (|mel| <= 5): measured 0, upstream fp64 probe 1.5e-6
CASES = ("", "stream_")  # case A (no prompt, offline, finalize) and case B (prompt, streaming, not finalize)


def _load(name):
    return torch.load(os.path.join(GOLDEN, name), map_location="cpu", weights_only=True)


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(GOLDEN, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def flow_sd():
    return _load("flow.pt")


@pytest.fixture(scope="module")
def flow(config, flow_sd):
    f = build_cosyvoice3_flow(FlowConfig.from_upstream(config))
    load_strict(f, fold_weight_norm(flow_sd), "flow.pt")
    return f.eval()


@pytest.fixture(scope="module")
def est_io():
    return _load("estimator_io.pt")


@pytest.fixture(scope="module")
def inf_io():
    return _load("flow_inference_io.pt")


def _cond(io, p):
    """The cond upstream passes to the decoder: prompt mel on the first frames, zeros after."""
    mu = io[p + "decoder_mu"]
    cond = torch.zeros_like(mu)
    pf = io[p + "prompt_feat"]
    cond[:, :, : pf.shape[1]] = pf.transpose(1, 2)
    return cond


def _solver_args(io, p):
    chunk = torch.tensor([50 if io[p + "streaming"] else 0])
    return (io[p + "z"], io[p + "decoder_mask"], io[p + "decoder_mu"], io[p + "decoder_spks"], _cond(io, p), chunk)


# ------------------------------------------------------------------------------------------------
# config and checkpoint


def test_config_from_upstream(config):
    cfg = FlowConfig.from_upstream(config)
    assert cfg.estimator == DiTConfig(dim=64, depth=2, heads=2, dim_head=32, ff_mult=2, mel_dim=80, mu_dim=80,
                                      spk_dim=80, out_channels=80, static_chunk_size=50, num_decoding_left_chunks=-1)
    assert (cfg.vocab_size, cfg.input_size, cfg.output_size, cfg.spk_embed_dim) == (100, 80, 80, 192)
    assert (cfg.token_mel_ratio, cfg.pre_lookahead_len, cfg.pre_lookahead_channels) == (2, 3, 64)
    assert (cfg.n_timesteps, cfg.inference_cfg_rate, cfg.t_scheduler) == (10, 0.7, "cosine")
    # the resolved kwargs (with training-only dropout / long_skip_connection=False) are accepted too
    assert DiTConfig.from_upstream(config["resolved_kwargs"]["flow.decoder.estimator"]) == cfg.estimator
    with pytest.raises(UserError):
        DiTConfig.from_upstream({**config["flow.decoder.estimator"]["kwargs"], "long_skip_connection": True})
    with pytest.raises(UserError):
        SolverConfig(t_scheduler="exp")


def test_state_dict_keys_match_upstream(flow, flow_sd):
    assert isinstance(flow.token_encoder, CV3TokenEncoder) and isinstance(flow.decoder.estimator, DiT)
    assert set(flow.state_dict()) == set(flow_sd)
    assert "decoder.estimator.rotary_embed.inv_freq" in flow.state_dict()
    assert "rand_noise" not in flow.state_dict()  # non-persistent, like upstream
    est_keys = {k[len("decoder.estimator."):] for k in flow_sd if k.startswith("decoder.estimator.")}
    assert set(flow.decoder.estimator.state_dict()) == est_keys
    for k, v in flow.state_dict().items():
        assert torch.equal(v, flow_sd[k]), k


def test_wrong_checkpoint_raises_user_error(config, flow_sd):
    kw = dict(config["flow.decoder.estimator"]["kwargs"], dim=32)
    small = build_cosyvoice3_flow(FlowConfig.from_upstream({**config, "flow.decoder.estimator": kw}))
    with pytest.raises(UserError, match="wrong shapes"):
        load_strict(small, fold_weight_norm(flow_sd), "flow.pt")
    deeper = build_cosyvoice3_flow(FlowConfig.from_upstream(
        {**config, "flow.decoder.estimator": dict(config["flow.decoder.estimator"]["kwargs"], depth=3)}))
    with pytest.raises(UserError, match="missing keys"):
        load_strict(deeper, fold_weight_norm(flow_sd), "flow.pt")


# ------------------------------------------------------------------------------------------------
# estimator


def test_estimator_matches_golden(flow, est_io):
    est = flow.decoder.estimator
    io = est_io
    with torch.inference_mode():
        out = est(io["x"], io["mask"], io["mu"], io["t"], io["spks"], io["cond"], torch.tensor([0]))
        out_s = est(io["x_streaming"], io["mask_streaming"], io["mu_streaming"], io["t_streaming"],
                    io["spks_streaming"], io["cond_streaming"], torch.tensor([50]))
    assert _maxdiff(out, io["out"]) < EST_TOL
    assert _maxdiff(out_s, io["out_streaming"]) < EST_TOL
    # the chunk input really switches the attention (first chunk no longer sees frames 50..55) ...
    with torch.inference_mode():
        full = est(io["x_streaming"], io["mask_streaming"], io["mu_streaming"], io["t_streaming"],
                   io["spks_streaming"], io["cond_streaming"], torch.tensor([0]))
    assert _maxdiff(full[:, :, :50], io["out_streaming"][:, :, :50]) > 1e-3
    # ... and the mask it builds is upstream's
    valid = io["mask_streaming"][:, 0] != 0
    assert torch.equal(chunk_attention_mask(valid, torch.tensor([50])), io["chunk_mask_streaming"])


def test_estimator_masks_invalid_frames(flow, est_io):
    """Padded frames: attention ignores them and the attention output there is zeroed, as upstream."""
    est = flow.decoder.estimator
    io = est_io
    mask = io["mask"].clone()
    mask[0, :, 12:] = 0
    args = (io["x"], mask, io["mu"], io["t"], io["spks"], io["cond"], torch.tensor([0]))
    with torch.inference_mode():
        out = est(*args)
        # frames < 12 never see the padded ones (causal convs, masked keys): equal to a run on the prefix
        short = est(*(a[:1, ..., :12] if a.dim() == 3 else a[:1] for a in args[:6]), torch.tensor([0]))
    assert _maxdiff(out[:1, :, :12], short) < 1e-5


# ------------------------------------------------------------------------------------------------
# encoder, noise, solver, inference


def test_fixed_noise_equals_golden(flow, inf_io):
    assert flow.rand_noise.shape == (1, 80, 15000)
    assert torch.equal(flow.rand_noise[:, :, :20], inf_io["z"])
    assert torch.equal(flow.rand_noise[:, :, :54], inf_io["stream_z"])


@pytest.mark.parametrize("p", CASES)
def test_encoder_matches_golden(flow, inf_io, p):
    io = inf_io
    tokens = torch.cat([io[p + "prompt_token"], io[p + "token"]], dim=1).long()
    with torch.inference_mode():
        mu, spks = flow.token_encoder.encode(tokens, io[p + "embedding"], io[p + "streaming"], io[p + "finalize"])
    # measured 0 (embedding, two convs, a linear); upstream fp64 probe of its cv2 sibling 9.3e-7
    assert _maxdiff(mu, io[p + "decoder_mu"]) < 1e-5
    assert _maxdiff(spks, io[p + "decoder_spks"]) < 1e-5


def test_padding_tokens_embed_to_zero(flow, inf_io):
    enc = flow.token_encoder
    tok = inf_io["stream_token"].long()[:, :8]
    padded = torch.cat([tok, torch.cat([tok[:, :5], torch.full((1, 3), -1)], dim=1)], dim=0)
    emb = inf_io["embedding"].expand(2, -1)
    seen = []

    def grab(module, inputs):  # the embedded tokens entering the pre-lookahead conv
        seen.append(inputs[0].clone())

    hook = enc.pre_lookahead_layer.register_forward_pre_hook(grab)
    try:
        with torch.inference_mode():
            mu, spks = enc(padded, emb)
            mu_short, _ = enc(tok[:, :5], emb[:1])
    finally:
        hook.remove()
    assert mu.shape == (2, 80, 16) and spks.shape == (2, 80)
    assert torch.count_nonzero(seen[0][1, 5:]) == 0
    assert torch.count_nonzero(seen[0][1, :5]) > 0
    # zero embeddings equal the conv's zero padding: the valid frames match an unpadded run
    assert _maxdiff(mu[1:, :, :10], mu_short) < 1e-6


@pytest.mark.parametrize("p", CASES)
def test_solver_matches_golden(flow, inf_io, p):
    args = _solver_args(inf_io, p)
    with torch.inference_mode():
        mel = flow.decoder(*args)
    prompt = inf_io[p + "prompt_feat"].shape[1]
    assert _maxdiff(mel[:, :, prompt:], inf_io[p + "mel"]) < MEL_TOL


@pytest.mark.parametrize("p", CASES)
def test_inference_matches_golden(flow, inf_io, p):
    io = inf_io
    mel = flow.inference(io[p + "token"], io[p + "prompt_token"], io[p + "prompt_feat"], io[p + "embedding"],
                         streaming=io[p + "streaming"], finalize=io[p + "finalize"])
    assert mel.dtype == torch.float32
    assert _maxdiff(mel, io[p + "mel"]) < MEL_TOL


def test_euler_schedule():
    t, dt = euler_schedule(SolverConfig())
    span = 1 - torch.cos(torch.linspace(0, 1, 11) * 0.5 * torch.pi)
    assert t[0] == 0 and len(t) == len(dt) == 10
    torch.testing.assert_close(t, span[:-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(t + dt, span[1:], rtol=0, atol=1e-6)


class _ToyEstimator(nn.Module):
    """Velocity mu + spks: zero on the unconditional half of the CFG batch."""

    def forward(self, x, mask, mu, t, spks, cond, chunk_frames):
        return (mu + spks[:, :, None] + cond) * mask


def test_solver_takes_any_estimator():
    solver = FlowSolver(_ToyEstimator(), SolverConfig(n_timesteps=4, inference_cfg_rate=0.5, t_scheduler="linear"))
    g = torch.Generator().manual_seed(1)
    z, mu, cond = (torch.randn(3, 80, 7, generator=g) for _ in range(3))
    spks = torch.randn(3, 80, generator=g)
    mel = solver(z, torch.ones(3, 1, 7), mu, spks, cond, torch.tensor([0]))
    torch.testing.assert_close(mel, z + 1.5 * (mu + spks[:, :, None] + cond), rtol=0, atol=1e-5)


def test_flow_accepts_any_token_encoder():
    class Enc(TokenEncoder):
        def __init__(self):
            super().__init__()
            self.input_embedding = nn.Embedding(10, 80)
            self.encoder_proj = nn.Linear(80, 80)

        def forward(self, tokens, embedding):
            h = self.encoder_proj(self.input_embedding(tokens.clamp(min=0)))
            return h.repeat_interleave(2, dim=1).transpose(1, 2), embedding[:, :80]

    f = Flow(Enc(), FlowSolver(_ToyEstimator(), SolverConfig(n_timesteps=2)), static_chunk_size=50)
    assert {k.split(".")[0] for k in f.state_dict()} == {"input_embedding", "encoder_proj"}
    mel = f.inference(torch.tensor([[1, 2, 3, 4]]), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80),
                      torch.randn(1, 192), streaming=True, finalize=False)
    assert mel.shape == (1, 80, 2)

    # an encoder that is not a TokenEncoder (other graph inputs) plugs in through encode_fn
    class Plain(nn.Module):
        pre_lookahead_len = 3

        def __init__(self):
            super().__init__()
            self.input_embedding = nn.Embedding(10, 80)

        def forward(self, tokens, embedding, chunk_tokens, context_tokens):
            return self.input_embedding(tokens).repeat_interleave(2, dim=1).transpose(1, 2), embedding[:, :80]

    plain = Plain()
    calls = []

    def encode(tokens, embedding, streaming, finalize):
        calls.append((streaming, finalize))
        ctx = 0 if finalize else plain.pre_lookahead_len
        mu, spks = plain(tokens, embedding, torch.tensor([25 if streaming else 0]), torch.tensor([ctx]))
        return mu[:, :, : 2 * (tokens.shape[1] - ctx)], spks

    f = Flow(plain, FlowSolver(_ToyEstimator(), SolverConfig(n_timesteps=2)), encode_fn=encode)
    mel = f.inference(torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[1]]), torch.zeros(1, 2, 80),
                      torch.randn(1, 192), streaming=False, finalize=False)
    assert mel.shape == (1, 80, 4) and calls == [(False, False)]
    with pytest.raises(ValueError):
        Flow(Plain(), FlowSolver(_ToyEstimator()))


# ------------------------------------------------------------------------------------------------
# export


def test_export_dit_dynamic(flow, est_io):
    est = flow.decoder.estimator
    io = est_io
    B, T = Dim("B", min=1, max=64), Dim("T", min=2, max=4096)
    args = (io["x"], io["mask"], io["mu"], io["t"], io["spks"], io["cond"], torch.tensor([0]))
    ep = export(est, args, dynamic_shapes=({0: B, 2: T}, {0: B, 2: T}, {0: B, 2: T}, {0: B}, {0: B}, {0: B, 2: T}, None))
    m = ep.module()
    stream = (io["x_streaming"], io["mask_streaming"], io["mu_streaming"], io["t_streaming"], io["spks_streaming"],
              io["cond_streaming"], torch.tensor([50]))
    one = tuple(a[:1] for a in stream[:6]) + (torch.tensor([50]),)
    with torch.inference_mode():
        for a in (args, stream, one):
            assert _maxdiff(m(*a), est(*a)) < 1e-6
        assert _maxdiff(m(*stream), io["out_streaming"]) < EST_TOL


def test_export_solver_dynamic(flow, inf_io):
    T = Dim("T", min=2, max=4096)
    args = _solver_args(inf_io, "stream_")
    ep = export(flow.decoder, args, dynamic_shapes=({2: T}, {2: T}, {2: T}, None, {2: T}, None))
    m = ep.module()
    other = _solver_args(inf_io, "")
    with torch.inference_mode():
        for a in (args, other):
            assert _maxdiff(m(*a), flow.decoder(*a)) < 1e-6
        assert _maxdiff(m(*other), inf_io["mel"]) < MEL_TOL


# ------------------------------------------------------------------------------------------------
# mutation probes: a wrong constant must fail the golden comparison at the tolerances above


def _flow_with(config, flow_sd, **inference):
    """The golden flow built from config.json with `inference` settings changed, as a yaml that says so
    would build it (FlowConfig.from_upstream reads them from the inference entry before cfm_params)."""
    f = build_cosyvoice3_flow(FlowConfig.from_upstream({**config, "inference": {**config["inference"], **inference}}))
    load_strict(f, fold_weight_norm(flow_sd), "flow.pt")
    return f.eval()


@pytest.mark.parametrize("change", [{}, {"inference_cfg_rate": 0.69}, {"inference_cfg_rate": 0.5},
                                    {"t_scheduler": "linear"}, {"n_timesteps": 9}],
                         ids=["upstream", "cfg-0.69", "cfg-0.5", "linear-schedule", "9-steps"])
def test_wrong_solver_constant_fails_golden(config, flow_sd, inf_io, change):
    """CFG rate (upstream 0.7; 0.69 moves the mel by 1.3e-2, 0.5 by 0.27), cosine time schedule (linear:
    3.9e-2), 10 Euler steps (9: 4.8e-2): each wrong value fails both golden inference cases at MEL_TOL; the
    upstream values pass through the same path."""
    f = _flow_with(config, flow_sd, **change)
    for p in CASES:
        io = inf_io
        mel = f.inference(io[p + "token"], io[p + "prompt_token"], io[p + "prompt_feat"], io[p + "embedding"],
                          streaming=io[p + "streaming"], finalize=io[p + "finalize"])
        err = _maxdiff(mel, io[p + "mel"])
        assert (err < MEL_TOL) if not change else (err > MEL_TOL), (p, err)


@pytest.mark.parametrize("mutant", list(CHUNK_MASK_MUTANTS.values()), ids=list(CHUNK_MASK_MUTANTS))
def test_wrong_chunk_mask_fails_golden(flow, est_io, monkeypatch, mutant):
    """The DiT's streaming attention mask: a wrong one fails the streaming golden call (56 frames, chunk
    50) at EST_TOL (measured: next-frame 1.0e-2, no-left-chunks 0.11) and leaves the offline call as it is."""
    io = est_io
    monkeypatch.setattr(models.dit, "chunk_attention_mask", mutant)
    with torch.inference_mode():
        out = flow.decoder.estimator(io["x"], io["mask"], io["mu"], io["t"], io["spks"], io["cond"], torch.tensor([0]))
        out_s = flow.decoder.estimator(io["x_streaming"], io["mask_streaming"], io["mu_streaming"], io["t_streaming"],
                                       io["spks_streaming"], io["cond_streaming"], torch.tensor([50]))
    assert _maxdiff(out, io["out"]) < EST_TOL
    assert _maxdiff(out_s, io["out_streaming"]) > EST_TOL


@pytest.mark.parametrize("chunk,pieces", [(50, (50, 4)), (10, (20, 10, 10, 14)), (10, (10, 30, 14))])
def test_solver_after_prefix_equals_the_whole_solve(flow, inf_io, chunk, pieces):
    """Streaming's repeated prefix kept instead of recomputed: the streaming case's frames solved in
    pieces of whole chunks, each against the keys / values the DiT kept of the pieces before (one
    prefix per Euler step), equal the solve over all frames at once (upstream's golden mel at its
    chunk of 50 frames; our whole solve at a chunk of 10, where the pieces cross more boundaries)."""
    from models.dit import DiTPrefix
    from models.flow import solve_euler_cfg_after_prefix

    z, mask, mu, spks, cond, _ = _solver_args(inf_io, "stream_")
    assert sum(pieces) == z.shape[2] and mask.all()
    solver = flow.decoder
    with torch.inference_mode():
        whole = solver(z, mask, mu, spks, cond, torch.tensor([chunk]))
        prefixes = [DiTPrefix.empty(solver.estimator, 2, z.device, z.dtype) for _ in range(solver.cfg.n_timesteps)]
        mels, start = [], 0
        for n in pieces:
            part = slice(start, start + n)
            mel, prefixes = solve_euler_cfg_after_prefix(solver.estimator, solver.cfg, solver.t_steps, solver.dt_steps,
                                                         z[:, :, part], mu[:, :, part], spks, cond[:, :, part],
                                                         prefixes, chunk)
            mels.append(mel)
            start += n
    assert prefixes[0].frames == z.shape[2] and len(prefixes) == 10
    pieced = torch.cat(mels, dim=2)
    assert _maxdiff(pieced, whole) < MEL_TOL
    if chunk == 50:
        prompt = inf_io["stream_prompt_feat"].shape[1]
        assert _maxdiff(pieced[:, :, prompt:], inf_io["stream_mel"]) < MEL_TOL
    # a prefix that ends inside a chunk would have seen frames that come after it: refused
    with pytest.raises(ValueError, match="a prefix of 4 frames is not whole chunks of 10"):
        partial = DiTPrefix.empty(solver.estimator, 2, z.device, z.dtype)
        _, partial = models.dit.dit_forward_after_prefix(solver.estimator, z[:, :, :4].repeat(2, 1, 1),
                                                         mu[:, :, :4].repeat(2, 1, 1), torch.zeros(2),
                                                         spks.repeat(2, 1), cond[:, :, :4].repeat(2, 1, 1), partial, 10)
        models.dit.dit_forward_after_prefix(solver.estimator, z[:, :, 4:8].repeat(2, 1, 1), mu[:, :, 4:8].repeat(2, 1, 1),
                                            torch.zeros(2), spks.repeat(2, 1), cond[:, :, 4:8].repeat(2, 1, 1), partial, 10)


def test_streams_solved_through_a_captured_forward_equal_the_eager_solve(flow, inf_io, monkeypatch):
    """The cudagraph backend's form of the prefix forward (`CapturedFunction`: one graph per padded
    call signature, static inputs from one shared arena; graph bookkeeping emulated on the CPU): three
    streams at different places (0, 10 and 20 kept frames; 14, 10 and 4 new) are padded to 4 streams,
    kept and new frames to the bucket sizes, and give the eager solve's mel and extended prefixes; a
    second round of other sizes in the same buckets replays the graph (no capture); a call too large
    for the arena runs as it is, with the same result."""
    from models.dit import DiTPrefix, dit_forward_rows_into
    from models.flow import solve_euler_cfg_streams
    from runtime.backends.compiled import bucket_size
    from runtime.backends.cuda_graphs import CapturedFunction

    z, _, mu, spks, cond, _ = _solver_args(inf_io, "stream_")
    solver = flow.decoder
    dit, steps = solver.estimator, solver.cfg.n_timesteps
    chunk = 10

    def prefixes_after(frames: int):  # what a stream keeps after solving its first `frames` frames
        empty = [DiTPrefix.empty(dit, 2, z.device, z.dtype) for _ in range(steps)]
        if not frames:
            return empty
        _, kept = solve_euler_cfg_streams(dit, solver.cfg, solver.t_steps, solver.dt_steps, z[:, :, :frames],
                                          mu[:, :, :frames], spks, cond[:, :, :frames], [empty], [frames], chunk)
        return kept[0]

    def round_of(starts, lengths, forward):
        N = max(lengths)
        take = lambda a, s, n: torch.nn.functional.pad(a[0, :, s: s + n], (0, N - n))  # noqa: E731
        args = [torch.stack([take(a, s, n) for s, n in zip(starts, lengths)]) for a in (z, mu, cond)]
        return solve_euler_cfg_streams(dit, solver.cfg, solver.t_steps, solver.dt_steps, args[0], args[1],
                                       spks.repeat(len(starts), 1), args[2], [prefixes_after(s) for s in starts],
                                       lengths, chunk, forward=forward)

    captured = CapturedFunction(dit_forward_rows_into, torch.device("cpu"), "emulate", bucket_size, arena_bytes=64 << 20)
    with torch.inference_mode():
        for starts, lengths in (((0, 10, 20), (14, 10, 4)), ((10, 0, 20), (4, 12, 3))):
            want_mel, want_kept = round_of(starts, lengths, None)
            mel, kept = round_of(starts, lengths, captured)
            for b, n in enumerate(lengths):
                assert _maxdiff(mel[b, :, :n], want_mel[b, :, :n]) < 1e-5
                assert kept[b][0].frames == starts[b] + n and len(kept[b]) == steps
                for got, want in zip(kept[b], want_kept[b]):
                    assert _maxdiff(got.kv, want.kv) < 1e-5 and _maxdiff(got.conv_in, want.conv_in) < 1e-5
                    assert _maxdiff(got.conv_mid, want.conv_mid) < 1e-5
        # one signature for both rounds: 4 streams (8 CFG rows), 20 kept + 16 new frames -> buckets of 16 and 20
        assert captured.stats()["captures"] == 1 and captured.stats()["replays"] == 2 * steps - 1
        small = CapturedFunction(dit_forward_rows_into, torch.device("cpu"), "emulate", bucket_size, arena_bytes=1024)
        mel, _ = round_of((0, 10, 20), (14, 10, 4), small)
        assert small.stats()["captures"] == 0 and small.stats()["uncaptured_calls"] == steps
        want_mel, _ = round_of((0, 10, 20), (14, 10, 4), None)
        assert all(_maxdiff(mel[b, :, :n], want_mel[b, :, :n]) < 1e-5 for b, n in enumerate((14, 10, 4)))
        # a capture that fails is said once and kept; the calls go on uncaptured, with the same result
        broken = CapturedFunction(dit_forward_rows_into, torch.device("cpu"), "emulate", bucket_size)
        with monkeypatch.context() as m:
            m.setattr("runtime.backends.cuda_graphs.capture", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no\nmore")))
            with pytest.warns(RuntimeWarning, match=r"could not be captured as a CUDA graph \(RuntimeError: no\); it runs "
                                                    r"uncaptured from now on"):
                mel, _ = round_of((0, 10, 20), (14, 10, 4), broken)
        assert broken.stats()["failed"] == "RuntimeError: no" and broken.stats()["uncaptured_calls"] == steps
        assert all(_maxdiff(mel[b, :, :n], want_mel[b, :, :n]) < 1e-5 for b, n in enumerate((14, 10, 4)))


def test_rotary_angles_stay_float32_when_the_dit_is_cast(flow):
    """A bf16 cast (Module.to, the runtime's cast_module) keeps the rotary table in float32 and the
    angles exact: in bf16, position 257 reads as 256 and an angle of ~300 rad is off by a radian,
    which is what the DiT computed in bf16 before (frames past 256 are 5 s of speech)."""
    import copy

    est = copy.deepcopy(flow.decoder.estimator)
    h = torch.zeros(1, 600, 1)
    ref = est.rotary_embed(h)
    assert ref.dtype == torch.float32 and ref[0, 257, 0] == 257.0
    est.to(torch.bfloat16)
    assert est.rotary_embed.inv_freq.dtype == torch.float32
    assert torch.equal(est.rotary_embed(h.bfloat16()), ref)
    assert torch.equal(est.rotary_embed.inv_freq, flow.decoder.estimator.rotary_embed.inv_freq)  # the checkpoint's
    lost = (torch.arange(600).bfloat16()[:, None] * flow.decoder.estimator.rotary_embed.inv_freq.bfloat16()).float()
    assert (lost - ref[0, :, ::2]).abs().max() > 1.0  # what bf16 angles were off by
    # the bf16 DiT's cos / sin are the float32 ones rounded once: a forward at 600 frames stays near fp32
    x, mu, cond = (torch.randn(2, 80, 600, generator=torch.Generator().manual_seed(i)) for i in range(3))
    args = (x, torch.ones(2, 1, 600), mu, torch.tensor([0.4, 0.4]), torch.randn(2, 80), cond)
    with torch.inference_mode():
        want = flow.decoder.estimator(*args, torch.tensor([50]))
        got = est(*[a.bfloat16() for a in args], torch.tensor([50])).float()
    assert (got - want).norm() / want.norm() < 0.02
    est.to(torch.float32)  # and back: still the exact table
    assert torch.equal(est.rotary_embed.inv_freq, flow.decoder.estimator.rotary_embed.inv_freq)


def test_a_bf16_dit_embeds_the_flow_time_from_float32(flow):
    """The solver hands t to the estimator in float32 (FlowSolver), and the time embedding takes
    its `1000 t` sinusoids before any cast: t rounded to bf16 first (steps of 0.004 past t = 0.5)
    moves the velocity several times more at the late Euler steps."""
    import copy

    est = copy.deepcopy(flow.decoder.estimator).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(2, 80, 120, generator=g) for _ in range(3))
    mask, spks, chunk = torch.ones(2, 1, 120), torch.randn(2, 80, generator=g), torch.tensor([50])
    low = lambda a: a.bfloat16()  # noqa: E731
    errors = {}
    with torch.inference_mode():
        for tv in (0.93, 0.99):
            t = torch.tensor([tv, tv])
            want = flow.decoder.estimator(x, mask, mu, t, spks, cond, chunk)
            for name, t_in in (("float32", t), ("rounded", low(t))):
                got = est(low(x), low(mask), low(mu), t_in, low(spks), low(cond), chunk).float()
                errors[name, tv] = ((got - want).norm() / want.norm()).item()
    # measured: 0.61 % vs 0.76 % at t = 0.93, 0.63 % vs 1.77 % at t = 0.99
    assert errors["float32", 0.93] < errors["rounded", 0.93] and errors["float32", 0.99] < 0.5 * errors["rounded", 0.99]
    # and the solver's Euler loop hands it t in float32 whatever the estimator's dtype
    from models.flow import solve_euler_cfg

    seen = []

    def estimate(x_in, mask_in, mu_in, t_in, spks_in, cond_in, chunk_frames):
        seen.append((t_in.dtype, x_in.dtype))
        return torch.zeros_like(x_in)

    solver = flow.decoder
    solve_euler_cfg(estimate, solver.cfg, solver.t_steps, solver.dt_steps, x[:1], mask[:1], low(mu[:1]), low(spks[:1]),
                    low(cond[:1]), chunk)
    assert seen == [(torch.float32, torch.bfloat16)] * solver.cfg.n_timesteps
