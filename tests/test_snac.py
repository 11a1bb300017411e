"""SNAC decoder: parity with the `snac` package (random tiny weights), Orpheus token mapping,
streaming-window vs whole decode, export. CPU only, a few seconds."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

snac = pytest.importorskip("snac")

from models.checkpoint import fold_weight_norm  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.snac import (  # noqa: E402
    AUDIO_TOKEN_BASE,
    SNAC_24KHZ,
    SNACConfig,
    SNACDecoder,
    check_codes,
    codes_to_tokens,
    decode_streaming_windows,
    decode_whole,
    graph_spec,
    load_snac,
    make_noise,
    noise_shapes,
    tokens_to_codes,
)

# the 24 kHz layout (hop 512, rates [8,8,4,2], strides [4,2,1]) with small widths
SMALL = dict(sampling_rate=24000, encoder_dim=16, encoder_rates=[2, 4, 8, 8], decoder_dim=64,
             decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
             vq_strides=[4, 2, 1], noise=True, depthwise=True)


def package_model(**over):
    torch.manual_seed(0)
    m = snac.SNAC(**{**SMALL, **over}).eval()
    # perturb the snake alphas and biases so that every parameter matters in the comparison
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("alpha"):
                p.copy_(0.5 + torch.rand_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def pkg():
    return package_model()


@pytest.fixture(scope="module")
def ours(pkg):
    cfg = SNACConfig.from_json(SMALL)
    return SNACDecoder(cfg).load_upstream(pkg.state_dict(), "package").eval()


def rand_codes(cfg, B, F, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.codebook_size, (B, n), generator=g) for n in cfg.code_lengths(F)]


def package_decode(pkg, codes, noise, monkeypatch):
    """snac.SNAC.decode with its NoiseBlock torch.randn draws replaced, in order, by `noise`."""
    it = iter(noise)

    def fake_randn(shape, device=None, dtype=None, **kw):
        n = next(it)
        assert tuple(n.shape) == tuple(shape)
        return n.clone().to(dtype=dtype)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "randn", fake_randn)
        with torch.inference_mode():
            out = pkg.decode(codes)
    assert next(it, None) is None, "every noise tensor must be consumed"
    return out.squeeze(1)


# -- parity with the package ----------------------------------------------------------------------


def test_keys_are_the_packages_folded_keys(pkg, ours):
    sd = pkg.state_dict()
    assert any(k.endswith(".parametrizations.weight.original0") for k in sd)  # snac uses parametrizations
    folded = fold_weight_norm(sd)
    kept = {k for k in folded if not k.startswith(SNACDecoder.ignored_prefixes(ours.config))}
    assert kept == set(ours.state_dict())
    assert all(k.startswith(("quantizer.", "decoder.")) for k in kept)


def test_matches_package_with_same_noise(pkg, ours, monkeypatch):
    cfg = ours.config
    B, F = 2, 5
    codes = rand_codes(cfg, B, F)
    noise = make_noise(cfg, B, F, torch.Generator().manual_seed(2))
    assert [tuple(n.shape) for n in noise] == [(B, 1, 32 * F), (B, 1, 256 * F), (B, 1, 1024 * F), (B, 1, 2048 * F)]
    want = package_decode(pkg, codes, noise, monkeypatch)
    got = decode_whole(ours, codes, noise=noise)
    assert got.shape == (B, F * 2048) == want.shape
    err = (got - want).abs().max().item()
    print(f"\nmax |ours - package| with noise: {err:.3g}")
    assert err < 1e-5
    assert want.abs().max() > 0.05  # not a trivially small signal


def test_zero_noise_is_noise_disabled(pkg, ours, monkeypatch):
    cfg = ours.config
    codes = rand_codes(cfg, 1, 4, seed=3)
    got = decode_whole(ours, codes)  # no generator: zeros
    zeros = make_noise(cfg, 1, 4)
    assert all(not n.any() for n in zeros)
    want = package_decode(pkg, codes, zeros, monkeypatch)
    assert (got - want).abs().max() < 1e-5

    # the package model built with noise=False, carrying the same other weights
    plain = snac.SNAC(**{**SMALL, "noise": False}).eval()
    sd = {}
    for k, v in pkg.state_dict().items():
        m = re.match(r"(decoder\.model\.\d+\.block\.)(\d+)(\..*)", k)
        if m and not k.startswith("decoder.model.0."):
            j = int(m.group(2))
            if j == 2:
                continue  # the NoiseBlock
            k = f"{m.group(1)}{j - 1 if j > 2 else j}{m.group(3)}"
        sd[k] = v
    plain.load_state_dict(sd, strict=True)
    with torch.inference_mode():
        want_plain = plain.decode(codes).squeeze(1)
    assert (got - want_plain).abs().max() < 1e-5

    # and our own noise=False config loads that model strictly and takes no noise inputs
    ours_plain = SNACDecoder(SNACConfig.from_json({**SMALL, "noise": False})).load_upstream(plain.state_dict())
    assert ours_plain.config.noise_factors() == []
    assert (decode_whole(ours_plain.eval(), codes) - want_plain).abs().max() < 1e-5


def test_attention_config_matches_package(monkeypatch):
    """32/44 kHz-style models have a LocalMHA after the input convs."""
    over = dict(decoder_dim=128, attn_window_size=8)
    pkg = package_model(**over)
    cfg = SNACConfig.from_json({**SMALL, **over})
    ours = SNACDecoder(cfg).load_upstream(pkg.state_dict()).eval()
    assert "decoder.model.2.rel_pos.inv_freq" in ours.state_dict()
    codes = rand_codes(cfg, 2, 4, seed=4)  # T = 16 latent steps = 2 windows
    noise = make_noise(cfg, 2, 4, torch.Generator().manual_seed(5))
    want = package_decode(pkg, codes, noise, monkeypatch)
    assert (decode_whole(ours, codes, noise=noise) - want).abs().max() < 1e-5
    with pytest.raises(UserError, match="attention windows"):
        check_codes(cfg, rand_codes(cfg, 1, 3))
    # a bf16 cast keeps the rotary table float32 (the package's, exactly) and only cos / sin are rounded
    half = copy.deepcopy(ours).to(torch.bfloat16)
    assert half.state_dict()["decoder.model.2.rel_pos.inv_freq"].dtype == torch.float32
    assert torch.equal(half.state_dict()["decoder.model.2.rel_pos.inv_freq"], pkg.state_dict()["decoder.model.2.rel_pos.inv_freq"])


# -- loading --------------------------------------------------------------------------------------


def test_load_snac_folder(tmp_path, pkg, ours):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    torch.save(pkg.state_dict(), tmp_path / "pytorch_model.bin")
    m = load_snac(str(tmp_path))
    assert m.config == ours.config and not m.training
    codes = rand_codes(m.config, 1, 3)
    assert torch.equal(decode_whole(m, codes), decode_whole(ours, codes))

    with pytest.raises(UserError, match="does not exist"):
        load_snac(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "decoder_dim": 128}))
    with pytest.raises(UserError, match="does not fit"):
        load_snac(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "bogus": 1}))
    with pytest.raises(UserError, match="unknown keys"):
        load_snac(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_snac(str(tmp_path))


def test_real_size_config_builds():
    torch.manual_seed(0)
    pkg = snac.SNAC(**SNAC_24KHZ.to_json())
    assert SNAC_24KHZ.hop_length == 512 and SNAC_24KHZ.latent_dim == 768 and SNAC_24KHZ.samples_per_frame == 2048
    ours = SNACDecoder(SNAC_24KHZ).load_upstream(pkg.state_dict(), "snac_24khz")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_pkg = sum(p.numel() for p in pkg.parameters())
    print(f"\nsnac_24khz params: package {n_pkg:,} (with weight-norm g), our decoder {n_ours:,}")
    assert n_ours == 13_121_025
    assert 19.5e6 < n_pkg < 20e6  # the model card's 19.8 M
    assert noise_shapes(SNAC_24KHZ, 1, 4) == [(1, 1, 128), (1, 1, 1024), (1, 1, 4096), (1, 1, 8192)]


def test_graph_spec_and_check_codes(ours):
    cfg = ours.config
    spec = graph_spec(cfg)
    assert [t.name for t in spec.inputs] == cfg.input_names()
    feed = spec.sample_feed({"B": 2, "F": 3})
    assert spec.check_feed(feed) == {"B": 2, "F": 3}
    assert spec.output_shapes({"B": 2, "F": 3}) == {"audio": (2, 6144)}
    with torch.inference_mode():
        assert ours(*feed.values()).shape == (2, 6144)

    codes = rand_codes(cfg, 1, 2)
    assert check_codes(cfg, codes) == 2
    bad = [codes[0], codes[1], codes[2].clone()]
    bad[2][0, 3] = 4096
    with pytest.raises(UserError, match="outside"):
        decode_whole(ours, bad)
    with pytest.raises(UserError, match="shape"):
        check_codes(cfg, [codes[0], codes[1], codes[2][:, :-1]])
    with pytest.raises(UserError, match="int64"):
        check_codes(cfg, [c.int() for c in codes])


# -- Orpheus token mapping ------------------------------------------------------------------------


def test_tokens_to_codes_frame_layout():
    frame = [11, 21, 31, 32, 22, 33, 34]  # codes at positions 0..6
    tokens = [AUDIO_TOKEN_BASE + p * 4096 + c for p, c in enumerate(frame)]
    c0, c1, c2, rep = tokens_to_codes(tokens)
    assert c0.tolist() == [[11]] and c1.tolist() == [[21, 22]] and c2.tolist() == [[31, 32, 33, 34]]
    assert rep.ok and rep.frames == 1 and c0.dtype == torch.int64


def test_tokens_round_trip_and_report():
    cfg = SNACConfig.from_json(SMALL)
    codes = rand_codes(cfg, 1, 6, seed=7)
    codes[0][0, 0], codes[2][0, -1] = 0, 4095  # range edges
    tokens = codes_to_tokens(*codes)
    assert len(tokens) == 42
    stream = [128259, 128257] + tokens[:10] + [128009] + tokens[10:] + [128258]  # markers in between
    c0, c1, c2, rep = tokens_to_codes(stream)
    assert all(torch.equal(a, b) for a, b in zip((c0, c1, c2), codes))
    assert rep.ok and rep.non_audio == 4 and rep.n_audio == 42 and rep.frames == 6

    bad = list(tokens)
    bad[7 + 2] = AUDIO_TOKEN_BASE + 5 * 4096 + 1  # frame 1, position 2 holds a position-5 token
    bad[7 * 3 + 0] = AUDIO_TOKEN_BASE + 7 * 4096 + 3  # frame 3: beyond the audio vocabulary
    bad += tokens[:3]  # trailing partial frame
    c0, c1, c2, rep = tokens_to_codes(bad)
    assert not rep.ok
    assert (rep.offset_mismatch, rep.out_of_range, rep.dropped_frames, rep.partial_tail, rep.frames) == (1, 1, 2, 3, 4)
    assert rep.first_bad[0] == (9, AUDIO_TOKEN_BASE + 5 * 4096 + 1, 2)
    keep = [0, 2, 4, 5]
    assert c0[0].tolist() == codes[0][0, keep].tolist()
    assert c2.shape == (1, 16)
    assert "2 frames dropped" in rep.summary() and "partial frame of 3" in rep.summary()
    with pytest.raises(UserError, match="clean SNAC frames"):
        tokens_to_codes(bad, strict=True)

    # a lost token desynchronises every later frame: reported, never decoded
    c0, _, _, rep = tokens_to_codes(tokens[:20] + tokens[21:])
    assert rep.frames == 2 and rep.dropped_frames == 3 and rep.partial_tail == 6


# -- streaming windows vs whole decode ------------------------------------------------------------


def test_streaming_windows(ours):
    cfg = ours.config
    F = 10
    codes = rand_codes(cfg, 2, F, seed=8)
    whole = decode_whole(ours, codes)
    stream = decode_streaming_windows(ours, codes)
    assert stream.shape == (2, (F - 3) * 2048)
    assert decode_streaming_windows(ours, rand_codes(cfg, 1, 3)).shape == (1, 0)

    # window w = frames w..w+3 decoded on its own, samples 2048:4096 (Orpheus' convert_to_audio)
    for w in (0, F - 4):
        win = [c[:, w * k:(w + 4) * k] for c, k in zip(codes, cfg.code_factors())]
        assert torch.allclose(stream[:, w * 2048:(w + 1) * 2048], decode_whole(ours, win)[:, 2048:4096], atol=1e-6)
    assert torch.allclose(decode_streaming_windows(ours, codes, max_batch=3), stream, atol=1e-6)

    # stream sample j is whole-decode sample 2048 + j; they differ by the lost receptive-field context
    ref = whole[:, 2048:2048 + stream.shape[1]]
    diff = (stream - ref).abs()
    rms = ref.pow(2).mean().sqrt().item()
    by_pos = diff.reshape(2, F - 3, 2048).amax(dim=(0, 1))
    print(f"\nstream vs whole (tiny random model): max {diff.max():.3g}, mean {diff.mean():.3g}, "
          f"rms(whole) {rms:.3g}; max over frames at in-frame offsets 0-255 {by_pos[:256].max():.3g}, "
          f"768-1279 {by_pos[768:1280].max():.3g}, 1792-2047 {by_pos[1792:].max():.3g}")
    # measured: max 7.2e-3, mean 3.7e-4 (rms of the signal 0.099); worst at frame starts (1 frame of left
    # context), smallest at frame ends (2 frames of right context)
    assert diff.max() < 0.02 and diff.mean() < 1e-3
    assert by_pos[:256].max() > by_pos[1792:].max()
    assert diff.max() > 1e-6  # the modes really differ: windows lack context

    # with noise, every window draws its own (seeded) noise
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(decode_streaming_windows(ours, codes, g1), decode_streaming_windows(ours, codes, g2))


# -- export ---------------------------------------------------------------------------------------


def _dynamic_shapes(cfg, B, Fd):
    return (tuple({0: B, 1: Fd * k} for k in cfg.code_factors())
            + tuple({0: B, 2: Fd * k} for k in cfg.noise_factors()),)


def test_torch_export_dynamic_frames(ours):
    from torch.export import Dim, export

    cfg = ours.config
    args = tuple(rand_codes(cfg, 2, 4)) + tuple(make_noise(cfg, 2, 4, torch.Generator().manual_seed(0)))  # B=2: 1 would specialise
    ep = export(ours, args, dynamic_shapes=_dynamic_shapes(cfg, Dim("B", min=1, max=8), Dim("F", min=2, max=512)))
    names = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("rand" in str(t) or "item" in str(t) for t in names)
    for B, F in ((3, 7), (1, 2)):
        inp = tuple(rand_codes(cfg, B, F, seed=F)) + tuple(make_noise(cfg, B, F, torch.Generator().manual_seed(F)))
        with torch.inference_mode():
            want = ours(*inp)
            got = ep.module()(*inp)
        assert got.shape == (B, F * 2048)
        assert (got - want).abs().max() < 1e-5


def test_onnx_torchscript_export_dynamic_frames(ours, tmp_path):
    """The TorchScript exporter (where the package's scripted snake went wrong), run by ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    cfg = ours.config
    spec = graph_spec(cfg)
    path = str(tmp_path / "snac.onnx")
    args = tuple(spec.sample_feed({"B": 1, "F": 4}).values())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ours, args, path, input_names=cfg.input_names(), output_names=["audio"],
                          dynamic_axes=spec.dynamic_axes(), opset_version=17, dynamo=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for B, F in ((1, 3), (2, 9)):
        feed = spec.sample_feed({"B": B, "F": F}, seed=F)
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        with torch.inference_mode():
            want = ours(*feed.values()).numpy()
        assert got.shape == (B, F * 2048)
        assert abs(got - want).max() < 1e-5
