"""The compile backend (torch.compile + CUDA graphs), the static-cache decoder and device sampling.

CPU tests run torch.compile without CUDA graphs: `aot_eager` for most graphs (inductor on a 2-core
CPU costs ~10-20 s per graph), the real inductor path for the decode step. GPU tests (marked `gpu`)
exercise capture / replay and compare with eager on the device.
"""

from __future__ import annotations


import pytest
import torch

from models.errors import UserError
from models.registry import load_model
from models.sampling import apply_repetition_penalty, nucleus_keep, top_p_top_k_mask
from runtime.backends.base import LLMDecoder
from models.orpheus import GRAMMAR as ORPHEUS_GRAMMAR
from models.sampling import DeviceOrpheusSampler, DeviceRASSampler, orpheus_select, ras_select
from runtime.backends.compiled import CompiledBackend, bucket_size
from runtime.backends.static_cache import StaticCacheDecoder
from runtime.backends.torch_eager import TorchBackend

PRESETS = ("cosyvoice3-tiny", "cosyvoice2-tiny", "orpheus-tiny")
FP32_TOL = 1e-4
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


_MODELS: dict = {}


def model(name: str, copy: str = "run"):
    """Two model objects per preset: "run" (the backend under test casts / moves it in place) and
    "ref" (eager reference). Seeded random weights, so both hold the same weights."""
    if (name, copy) not in _MODELS:
        _MODELS[name, copy] = load_model(name)
    return _MODELS[name, copy]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale max |b|."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def eager(name: str, graph: str, feed: dict, device="cpu") -> dict:
    spec = model(name, "ref").graph_specs()[graph]
    return TorchBackend(spec, device, lambda: model(name, "ref").graph_module(graph)).infer(feed)


def point(spec, graph: str) -> dict:
    """A small request whose bucketed dim is NOT a bucket, so padding is exercised."""
    dims = {d.name for d in spec.dims}
    if graph == "flow_encoder":
        return {"N": 19}  # -> 20
    if "T" in dims:
        return {"T": 37, **({"B": 2} if graph == "flow_estimator" else {})}  # -> 40
    return {"F": 3}


def pad_feed(spec, feed: dict, dim: str, n: int, fill: dict) -> dict:
    sizes = spec.check_feed(feed)
    out = {}
    for t in spec.inputs:
        x = feed[t.name]
        want = spec.shape_of(t, {**sizes, dim: n})
        if tuple(x.shape) != want:
            y = torch.full(want, fill.get(t.name, 0), dtype=x.dtype)
            y[tuple(slice(0, s) for s in x.shape)] = x
            x = y
        out[t.name] = x
    return out


def graph_cases():
    return [("cosyvoice3-tiny", g) for g in ("flow_encoder", "flow_estimator", "flow_solver", "vocoder")] + \
           [("cosyvoice2-tiny", g) for g in ("flow_encoder", "flow_estimator", "flow_solver", "vocoder")] + \
           [("orpheus-tiny", "vocoder")]


# -- buckets and the padding rule ------------------------------------------------------------------------
def test_bucket_size():
    assert [bucket_size(n) for n in (1, 16, 17, 37, 64, 65, 100, 1000, 1024, 1025)] == \
           [16, 16, 20, 40, 64, 80, 112, 1024, 1024, 1280]
    for n in range(17, 5000):
        b = bucket_size(n)
        assert n <= b <= 1.25 * n
    assert len({bucket_size(n) for n in range(4, 1201)}) <= 32  # few graphs over a whole profile


@pytest.mark.parametrize("name", ["cosyvoice3-tiny", "cosyvoice2-tiny"])
@pytest.mark.parametrize("graph", ["flow_encoder", "flow_estimator", "flow_solver"])
def test_padding_leaves_valid_region_unchanged(name, graph):
    """The rule behind bucketing: eager module on the exact shape == on the padded shape, sliced,
    offline and (estimator / solver) with static-chunk attention."""
    spec = model(name, "ref").graph_specs()[graph]
    mod = model(name, "ref").graph_module(graph)
    rule = spec.pad
    feed = spec.sample_feed(point(spec, graph), seed=5)
    n = spec.check_feed(feed)[rule.dim]
    chunks = [0, 4] if "chunk_frames" in feed else [None]
    for chunk in chunks:
        if chunk is not None:
            feed["chunk_frames"] = torch.tensor([chunk])
        padded = pad_feed(spec, feed, rule.dim, n + 11, rule.fill)
        with torch.inference_mode():
            exact = mod(*[feed[t.name] for t in spec.inputs])
            pad = mod(*[padded[t.name] for t in spec.inputs])
        exact = exact if isinstance(exact, tuple) else (exact,)
        pad = pad if isinstance(pad, tuple) else (pad,)
        for a, b in zip(exact, pad):
            assert rel_err(b[tuple(slice(0, s) for s in a.shape)], a) < 1e-5


@pytest.mark.parametrize("name", ["cosyvoice3-tiny", "cosyvoice2-tiny"])
def test_vocoder_is_not_pad_safe(name):
    """Why vocoders use exact shapes: zero-padding the mel changes the last frame(s) of audio, even
    for the causal CosyVoice3 HiFT (STFT / iSTFT edges); earlier frames of the causal one agree."""
    spec = model(name, "ref").graph_specs()["vocoder"]
    mod = model(name, "ref").graph_module("vocoder")
    feed = spec.sample_feed({"T": 24}, seed=5)
    padded = pad_feed(spec, feed, "T", 32, {})
    def audio(f):  # CosyVoice2's vocoder graph also takes / returns the streaming source cache
        out = mod(*[f[t.name] for t in spec.inputs])
        return out[0] if isinstance(out, tuple) else out

    with torch.inference_mode():
        a = audio(feed)
        b = audio(padded)[:, : a.shape[1]]
    hop = 480
    assert rel_err(b[:, -hop:], a[:, -hop:]) > 1e-3  # the last frame changes
    if name == "cosyvoice3-tiny":
        assert rel_err(b[:, :-hop], a[:, :-hop]) < 1e-5  # causal: only the last frame


# -- every graph vs eager (CPU, torch.compile without CUDA graphs) ----------------------------------------
@pytest.mark.parametrize("name,graph", graph_cases())
def test_graph_matches_eager(name, graph):
    spec = model(name).graph_specs()[graph]
    feed = spec.sample_feed(point(spec, graph), seed=3)
    cb = CompiledBackend(spec, "cpu", lambda: model(name).graph_module(graph), compile_backend="aot_eager")
    out = cb.infer(feed)
    ref = eager(name, graph, feed)
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype
        assert rel_err(out[k], ref[k]) < FP32_TOL, k
    meta = cb.metadata()
    assert meta["kind"] == "compile" and meta["compile_seconds"] > 0
    assert meta["shapes"] == ("exact" if graph == "vocoder" else f"bucketed {spec.pad.dim}")
    if graph != "vocoder":
        assert cb.padded_sizes(spec.check_feed(feed)) != spec.check_feed(feed)  # padding really happened


def test_bucketed_and_exact_agree_and_share_a_bucket():
    name, graph = "cosyvoice3-tiny", "flow_solver"
    spec = model(name).graph_specs()[graph]
    cb = CompiledBackend(spec, "cpu", lambda: model(name).graph_module(graph), compile_backend="aot_eager")
    exact = CompiledBackend(spec, "cpu", lambda: model(name).graph_module(graph), compile_backend=None, buckets=False)
    for t in (37, 39):  # both run in the 40-frame bucket
        feed = spec.sample_feed({"T": t}, seed=t)
        a, b = cb.infer(feed)["mel"], exact.infer(feed)["mel"]
        assert a.shape == (1, 80, t) and rel_err(a, b) < 1e-5
    assert exact.metadata()["shapes"] == "exact"


def test_emulated_graph_bookkeeping_static_buffers():
    """The CUDA-graph path's host logic on the CPU (cuda_graphs="emulate": replay re-runs the function
    into the captured outputs): one graph per bucket, the padded tail of the static inputs refilled when
    a shorter request follows a longer one, returned outputs are copies that later calls leave alone."""
    name, graph = "cosyvoice3-tiny", "flow_solver"
    spec = model(name).graph_specs()[graph]
    cb = CompiledBackend(spec, "cpu", lambda: model(name).graph_module(graph), compile_backend=None,
                         cuda_graphs="emulate")
    outs = []
    for t in (39, 33, 37):  # one 40-frame bucket; 33 after 39 needs the mask tail zeroed again
        feed = spec.sample_feed({"T": t}, seed=t)
        out = cb.infer(feed)["mel"]
        assert out.shape == (1, 80, t) and rel_err(out, eager(name, graph, feed)["mel"]) < 1e-5
        outs.append((out, out.clone()))
    assert all(torch.equal(a, b) for a, b in outs)
    assert cb.metadata()["graphs"] == 1 and cb.metadata()["cuda_graphs"] == "emulate"


def test_emulated_exact_shape_lru():
    spec = model("orpheus-tiny").graph_specs()["vocoder"]
    cb = CompiledBackend(spec, "cpu", lambda: model("orpheus-tiny").graph_module("vocoder"), compile_backend=None,
                         cuda_graphs="emulate", max_graphs=2)
    for f in (2, 3, 4, 2):
        feed = spec.sample_feed({"F": f}, seed=f)
        assert rel_err(cb.infer(feed)["audio"], eager("orpheus-tiny", "vocoder", feed)["audio"]) < 1e-5
    assert cb.metadata()["graphs"] == 2 and cb.metadata()["evictions"] == 2


def test_a_deferred_shape_runs_eagerly_until_it_is_captured():
    """defer_new_shapes (a warmed serving engine): a new shape key runs the eager module in the call
    (same values) and waits for `capture_deferred` (the batcher's idle time) or for its third call; a
    captured key replays; warm shapes are never deferred. Graph bookkeeping emulated on the CPU."""
    name, graph = "orpheus-tiny", "vocoder"
    spec = model(name).graph_specs()[graph]
    cb = CompiledBackend(spec, "cpu", lambda: model(name).graph_module(graph), compile_backend=None,
                         cuda_graphs="emulate")
    cb.infer(spec.sample_feed({"F": 2}, seed=0))  # warmed before serving: captured at once
    cb.defer_new_shapes = True
    feeds = {f: spec.sample_feed({"F": f}, seed=f) for f in (2, 3, 4)}
    want = {f: eager(name, graph, feed)["audio"] for f, feed in feeds.items()}
    for _ in range(2):
        assert rel_err(cb.infer(feeds[3])["audio"], want[3]) < 1e-6
    assert rel_err(cb.infer(feeds[2])["audio"], want[2]) < 1e-6
    meta = cb.metadata()
    assert (meta["graphs"], meta["deferred_shapes"], meta["deferred_calls"]) == (1, 1, 2)
    assert cb.capture_deferred() == 1 and cb.capture_deferred() == 0
    assert rel_err(cb.infer(feeds[3])["audio"], want[3]) < 1e-6
    meta = cb.metadata()
    assert (meta["graphs"], meta["deferred_shapes"], meta["deferred_calls"]) == (2, 0, 2)
    # a shape met often is worth its capture in the call: the third call captures it
    for k in range(3):
        assert rel_err(cb.infer(feeds[4])["audio"], want[4]) < 1e-6
        assert cb.metadata()["graphs"] == (2 if k < 2 else 3)
    assert cb.metadata()["deferred_calls"] == 4 and cb.deferred_shapes == 0


def test_a_deferred_signature_of_a_captured_function_waits_for_idle_time():
    """`--new-shapes defer` holds for the functions a family runs itself (CosyVoice3's prefix forward,
    replayed by `CapturedFunction`) as for the module's graphs: a new signature runs uncaptured (same
    values), a run of calls with it (a round's Euler steps) counts as one meeting, the engine's idle
    capture (`capture_deferred`) captures it from its shapes alone, and a third meeting captures it in
    the call. Graph bookkeeping emulated on the CPU."""
    name, graph = "orpheus-tiny", "vocoder"
    spec = model(name).graph_specs()[graph]
    cb = CompiledBackend(spec, "cpu", lambda: model(name).graph_module(graph), compile_backend=None,
                         cuda_graphs="emulate")
    cb.activate()

    def scaled_sum(x, y, k):  # writes into y, as the prefix forward writes its keys and values
        y.add_(x * k)
        return y.sum(dim=-1)

    f = cb.compiled(scaled_sum)
    x = {n: torch.arange(float(n * 3)).view(n, 3) for n in (2, 4, 8)}

    def call(n):
        y = torch.ones(n, 3)
        return f(x[n], y, 2.0).clone(), (torch.ones(n, 3) + 2.0 * x[n]).sum(-1)

    got, want = call(2)  # not serving yet: captured at once
    assert torch.equal(got, want) and f.stats()["captures"] == 1
    cb.defer_new_shapes = True
    for _ in range(5):  # one round of 5 steps at a new signature: one meeting, run uncaptured
        got, want = call(4)
        assert torch.equal(got, want)
    assert (f.stats()["captures"], f.stats()["deferred_calls"], f.stats()["uncaptured_calls"]) == (1, 5, 0)
    assert (cb.deferred_shapes, cb.metadata()["deferred_calls"], cb.metadata()["deferred_shapes"]) == (1, 5, 1)
    assert cb.capture_deferred() == 1 and cb.capture_deferred() == 0
    got, want = call(4)  # replayed: the real inputs copied over the zeros it was captured on
    assert torch.equal(got, want) and (f.stats()["captures"], f.stats()["replays"], cb.deferred_shapes) == (2, 1, 0)
    # met in three runs (another signature between them): the third captures it in the call
    for k in range(3):
        got, want = call(8)
        assert torch.equal(got, want) and f.stats()["captures"] == (2 if k < 2 else 3)
        call(2)
    assert f.stats()["deferred_calls"] == 7 and cb.deferred_calls == 7 and cb.deferred_shapes == 0

def test_copy_module_leaves_the_model_alone():
    fresh = load_model("cosyvoice3-tiny")
    spec = fresh.graph_specs()["flow_estimator"]
    cb = CompiledBackend(spec, "cpu", lambda: fresh.graph_module("flow_estimator"), dtype="bfloat16",
                         compile_backend=None, copy_module=True)
    cb.infer(spec.sample_feed(point(spec, "flow_estimator"), seed=0))
    assert cb.module is not fresh.graph_module("flow_estimator")
    assert all(p.dtype == torch.float32 for p in fresh.graph_module("flow_estimator").parameters())
    assert all(p.dtype == torch.bfloat16 for p in cb.module.parameters())


def test_bf16_error_report(capsys):
    """bf16 compute on the tiny presets (random weights): errors relative to the fp32 output scale.
    The fp32 islands (solver state, HiFT f0 / source / iSTFT) keep these at the 1e-2 level."""
    report = {}
    for name, graph in [("cosyvoice3-tiny", "flow_solver"), ("cosyvoice3-tiny", "vocoder"),
                        ("cosyvoice2-tiny", "flow_estimator"), ("orpheus-tiny", "vocoder")]:
        fresh = load_model(name)  # cast in place: keep the shared models fp32
        spec = fresh.graph_specs()[graph]
        feed = spec.sample_feed(point(spec, graph), seed=3)
        cb = CompiledBackend(spec, "cpu", lambda: fresh.graph_module(graph), dtype="bfloat16", compile_backend=None)
        out = cb.infer(feed)
        ref = eager(name, graph, feed)
        report[f"{name}/{graph}"] = max(rel_err(out[k], ref[k]) for k in ref)
        assert all(o.dtype == torch.float32 for o in out.values())  # spec dtypes at the boundary
    for name in ("cosyvoice3-tiny", "orpheus-tiny"):  # decode logits over prefill + 10 steps
        fresh = load_model(name)
        dec = StaticCacheDecoder(fresh.graph_module("llm"), 1, 32, "cpu", torch.bfloat16, compile=False)
        report[f"{name}/llm-decode"] = _run_decoders(name, dec, steps=10)
    with capsys.disabled():
        print("\nbf16 max rel error: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    assert max(report.values()) < 5e-2


# -- the static-cache decoder --------------------------------------------------------------------------------
def _run_decoders(name, fast, steps=20, batch=1, mask=None, seed=0):
    """Prefill + `steps` steps through `fast` and through the explicit-cache decoder; max rel error."""
    m = model(name, "ref")
    spec = m.graph_specs()["llm"]
    ref = LLMDecoder(TorchBackend(spec, "cpu", lambda: m.graph_module("llm")).activate().infer, torch.device("cpu"),
                     *m.lm.cache_shape, batch)
    g = torch.Generator().manual_seed(seed)
    vocab = int(spec.inputs[0].fill.b)
    ids = torch.randint(0, vocab, (batch, 9), generator=g)
    errs = [rel_err(fast.prefill(ids, mask), ref.prefill(ids, mask))]
    for _ in range(steps):
        nxt = torch.randint(0, vocab, (batch, 1), generator=g)
        errs.append(rel_err(fast.step(nxt), ref.step(nxt)))
    keys, values = fast.stacked_cache()
    errs.append(rel_err(keys, ref.keys))
    errs.append(rel_err(values, ref.values))
    return max(errs)


def test_inductor_decoder_matches_explicit():
    """The real inductor path: CompiledBackend.decoder() -> compiled static-cache step."""
    name = "cosyvoice3-tiny"
    m = model(name)
    cb = CompiledBackend(m.graph_specs()["llm"], "cpu", lambda: m.graph_module("llm"), compile_backend="inductor")
    dec = cb.decoder(*m.lm.cache_shape, batch=1, max_len=40)
    assert isinstance(dec, StaticCacheDecoder) and dec.max_len == 1024 and dec.compiled
    assert _run_decoders(name, dec) < FP32_TOL
    assert cb.decoder(*m.lm.cache_shape, batch=1, max_len=1000) is dec  # same bucket: reused, reset
    assert dec.length == 0
    assert cb.metadata()["compile_seconds"] > 0


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_static_decoder_matches_explicit(name, compiled):
    lm = model(name).graph_module("llm")
    dec = StaticCacheDecoder(lm, 1, 48, "cpu", compile=compiled, compile_backend="aot_eager")
    assert _run_decoders(name, dec) < FP32_TOL
    dec.reset()
    assert _run_decoders(name, dec, steps=5, seed=1) < FP32_TOL  # a second generation on the same buffers


@pytest.mark.parametrize("copy_logits", [True, False])
def test_static_decoder_emulated_graph(copy_logits):
    """The decode step through the graph path (static ids buffer, replay, static logits) on the CPU."""
    name = "cosyvoice2-tiny"
    dec = StaticCacheDecoder(model(name).graph_module("llm"), 1, 40, "cpu", compile=False, cuda_graphs="emulate",
                             copy_logits=copy_logits)
    assert dec.graph is not None and dec.metadata()["graph"] == "emulate"
    if copy_logits:
        assert _run_decoders(name, dec) < FP32_TOL
    else:
        dec.prefill(torch.zeros(1, 5, dtype=torch.int64))
        a = dec.step(torch.ones(1, 1, dtype=torch.int64))
        assert a is dec.logits_out  # the static buffer itself: the next step overwrites it


def test_fused_projections_share_memory():
    """fuse_projections re-points q/k/v and gate/up at one tensor each: same values, no extra copy."""
    from runtime.backends.static_cache import fuse_projections

    fresh = load_model("orpheus-tiny")
    lm = fresh.graph_module("llm")
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    fused = fuse_projections(lm)
    again = fuse_projections(lm)  # idempotent: the same memory, no new tensors
    assert again[0][0].data_ptr() == fused[0][0].data_ptr() and again[0][0].shape == fused[0][0].shape
    assert torch.equal(again[0][2], fused[0][2])
    after = lm.state_dict()
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    att = lm.body.layers[0].self_attn
    assert att.q_proj.weight.data_ptr() == fused[0][0].data_ptr()
    assert att.v_proj.weight.untyped_storage().data_ptr() == fused[0][0].untyped_storage().data_ptr()


def test_static_decoder_left_padded_batch():
    name = "orpheus-tiny"
    dec = StaticCacheDecoder(model(name).graph_module("llm"), 2, 40, "cpu", compile=False)
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0
    assert _run_decoders(name, dec, steps=8, batch=2, mask=mask) < FP32_TOL


def test_static_decoder_refuses_overflow_and_bad_shapes():
    dec = StaticCacheDecoder(model("cosyvoice3-tiny").graph_module("llm"), 1, 10, "cpu", compile=False)
    dec.prefill(torch.zeros(1, 9, dtype=torch.int64))
    dec.step(torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(UserError):
        dec.step(torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(ValueError):
        dec.reset().step(torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(UserError):
        dec.reset().prefill(torch.zeros(1, 11, dtype=torch.int64))


# -- device sampling -----------------------------------------------------------------------------------------
def _grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def test_ras_select_follows_the_nucleus_rule():
    """With u on a fine grid, selection frequencies equal the kept (top-p 0.8 / top-k 25) renormalised
    probabilities; stop masking and the repetition redraw follow upstream's rules."""
    v, n = 300, 20000
    logits = torch.randn(v, generator=torch.Generator().manual_seed(0))
    u = torch.stack([_grid(n), torch.full((n,), 0.5)], dim=1)
    ids = ras_select(logits.expand(n, v), torch.full((n, 10), -1), u)
    p = logits.softmax(-1)
    sp, si = p.sort(descending=True, stable=True)
    keep = nucleus_keep(sp[None], 0.8, 25)[0]
    want = torch.zeros(v)
    want[si[keep]] = sp[keep] / sp[keep].sum()
    assert keep.sum() > 5
    assert (torch.bincount(ids, minlength=v) / n - want).abs().max() < 2e-4
    # stop masking: nothing >= stop_from
    ids = ras_select(logits.expand(n, v), torch.full((n, 10), -1), u, stop_from=int(si[0]) + 0,
                     mask_stop=torch.tensor([True]))
    assert (ids < int(si[0])).all()
    # a token already in the window (10 * 0.1 = 1 occurrence) is redrawn from the rest
    top = ras_select(logits[None], torch.full((1, 10), -1), torch.tensor([[0.01, 0.5]]))
    window = torch.full((n, 10), -1)
    window[:, -1] = top
    u2 = torch.stack([torch.full((n,), 0.01), _grid(n)], dim=1)
    ids = ras_select(logits.expand(n, v), window, u2)
    want = p.clone()
    want[top] = 0
    want /= want.sum()
    assert (ids != top).all()
    assert (torch.bincount(ids, minlength=v) / n - want).abs().max() < 2e-4


def test_orpheus_select_follows_vllm_rules():
    v, n = 500, 20000
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(v, generator=g) * 2
    history = torch.randint(0, v, (40,), generator=g)
    seen = torch.zeros(n, v, dtype=torch.bool)
    seen[:, history] = True
    for top_k in (-1, 20):
        ids = orpheus_select(logits.expand(n, v), seen, _grid(n), 0.6, 0.8, 1.3, top_k)
        x = apply_repetition_penalty(logits[None], history.tolist(), 1.3)
        want = top_p_top_k_mask(x / 0.6, 0.8, top_k).softmax(-1)[0]
        assert (torch.bincount(ids, minlength=v) / n - want).abs().max() < 2e-4
    greedy = orpheus_select(logits[None], seen[:1], _grid(1), temperature=0.0)
    assert int(greedy) == int(apply_repetition_penalty(logits[None], history.tolist(), 1.3).argmax())


def test_device_ras_sampler_state():
    v = 300
    logits = torch.randn(v, generator=torch.Generator().manual_seed(2))
    logits[250:] += 5.0  # stop tokens likely, once allowed
    s = DeviceRASSampler(stop_from=250, vocab=v, min_len=6, device="cpu", seed=0)
    toks = [int(s(logits)) for _ in range(12)]
    assert all(t < 250 for t in toks[:6])
    assert any(t >= 250 for t in toks[6:])
    assert s.window[0].tolist() == toks[-10:] and int(s.count) == 12
    fixed = DeviceRASSampler(stop_from=250, vocab=v, fixed=True, device="cpu", seed=0)
    assert all(int(fixed(logits)) < 250 for _ in range(20))
    again = DeviceRASSampler(stop_from=250, vocab=v, min_len=6, device="cpu", seed=0)
    assert [int(again(logits)) for _ in range(12)] == toks  # the seed fixes the stream


def test_device_orpheus_sampler_grammar_and_penalty():
    from models.snac import AUDIO_TOKEN_BASE, FRAME_TOKENS, ORPHEUS_CODEBOOK
    from models.speech_lm import ORPHEUS_STOP_TOKEN_ID

    vocab = model("orpheus-tiny").llm_cfg.vocab_size
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    s = DeviceOrpheusSampler(vocab, [5, 6, 7], ORPHEUS_STOP_TOKEN_ID, grammar=ORPHEUS_GRAMMAR, fixed=True,
                             device="cpu", seed=0)
    assert s.seen[0, [5, 6, 7]].all() and int(s.seen.sum()) == 3
    toks = [int(s(logits)) for _ in range(2 * FRAME_TOKENS)]
    for i, t in enumerate(toks):
        lo = AUDIO_TOKEN_BASE + (i % FRAME_TOKENS) * ORPHEUS_CODEBOOK
        assert lo <= t < lo + ORPHEUS_CODEBOOK
    assert s.seen[0, toks].all() and int(s.audio_count) == 2 * FRAME_TOKENS
    free = DeviceOrpheusSampler(vocab, [], ORPHEUS_STOP_TOKEN_ID, fixed=True, device="cpu", seed=0)
    spiky = torch.full((vocab,), -10.0)
    spiky[ORPHEUS_STOP_TOKEN_ID] = 50.0
    spiky[9] = 5.0
    assert int(free(spiky)) == 9  # fixed: the stop token is never drawn
    assert bool(free.seen[0, 9]) and int(free.audio_count) == 0


@pytest.mark.parametrize("name", PRESETS)
def test_device_sampler_for_family_samplers(name):
    """sampler.to_device builds the device twin of make_sampler's host sampler; a generation loop
    with it (static decoder, ids fed back on the device, one int() per token) produces valid tokens."""
    from tests.token_reader import TokenReader

    m = model(name)
    utt = m.make_utterance("hello world.", m.make_speaker(None, None))
    host = m.make_sampler(utt, torch.Generator().manual_seed(0), fixed_tokens=None)
    vocab = m.graph_specs()["llm"].outputs[0].shape[1]
    ds = host.to_device(vocab, "cpu")
    assert ds is not None and ds.generator.device.type == "cpu"
    dec = StaticCacheDecoder(m.graph_module("llm"), 1, len(utt.prompt_ids) + 16, "cpu", compile=False)
    logits = dec.prefill(torch.tensor([utt.prompt_ids]))
    offset = m.lm.next_input_id(0)
    assert m.lm.next_input_id(5) == offset + 5  # feeding back is affine in every family
    reader = TokenReader(1, "cpu")
    tokens = []
    for step in range(12):
        tok = ds(logits)
        reader.start(tok)
        t = reader.wait()[0]
        if m.lm.is_stop(t):
            break
        tokens.append(t)
        logits = dec.step((tok + offset).view(1, 1))
    assert tokens and all(0 <= t < vocab for t in tokens)
    if name == "orpheus-tiny":  # random-weight preset: grammar on, so tokens follow the frame layout
        from models.snac import tokens_to_codes

        assert tokens_to_codes(tokens)[3].n_audio == len(tokens)


@pytest.mark.parametrize("name,flow_mode", [("cosyvoice3-tiny", "solver"), ("cosyvoice2-tiny", "steps"),
                                            ("orpheus-tiny", None)])
def test_pipeline_with_compile_backends_matches_torch(name, flow_mode):
    """Whole synthesis with every runner a CompiledBackend (graph bookkeeping emulated, eager modules
    to keep the CPU time low) vs the torch pipeline: same tokens, same audio. Uses the pipeline as it
    is today (host samplers on the static decoder's logits)."""
    from runtime.pipeline import Pipeline

    ref_model, run_model = load_model(name), load_model(name)
    options = {"flow_mode": flow_mode} if flow_mode else None
    ref = Pipeline(ref_model, "torch", options=options).synthesize("Hello there.", seed=1, fixed_tokens=21)
    pipe = Pipeline(run_model, "torch", options=options)
    specs = run_model.graph_specs()
    pipe.runners = {g: CompiledBackend(specs[g], "cpu", lambda g=g: run_model.graph_module(g), compile_backend=None,
                                       cuda_graphs="emulate") for g in pipe.runners}
    out = pipe.synthesize("Hello there.", seed=1, fixed_tokens=21)
    assert out.tokens == ref.tokens
    assert out.audio.shape == ref.audio.shape and rel_err(out.audio, ref.audio) < 1e-4



@pytest.mark.parametrize("name", PRESETS)
def test_cudagraph_backend_is_the_eager_module_captured(name):
    """`--backend cudagraph`: the compile backend with compilation off and one warm-up call before each
    capture; on the CPU nothing is captured, so a whole request equals the torch pipeline (the same
    tokens; audio within float rounding: the bucketed dim is padded, which changes matmul shapes)."""
    from runtime.backends.cuda_graphed import CudaGraphBackend
    from runtime.pipeline import Pipeline

    ref = Pipeline(load_model(name), "torch").synthesize("Hello there.", seed=3, fixed_tokens=12)
    pipe = Pipeline(load_model(name), "cudagraph")
    out = pipe.synthesize("Hello there.", seed=3, fixed_tokens=12)
    for runner in pipe.runners.values():
        assert isinstance(runner, CudaGraphBackend) and runner.warmup_calls == 1
        meta = runner.metadata()
        assert (meta["kind"], meta["compile_backend"], meta["cuda_graphs"]) == ("cudagraph", None, "off")
    assert out.tokens == ref.tokens and out.audio.shape == ref.audio.shape and rel_err(out.audio, ref.audio) < 1e-5
    spec = load_model(name).graph_specs()["vocoder"]
    emulated = CudaGraphBackend(spec, "cpu", lambda: load_model(name).graph_module("vocoder"), torch.float32,
                                cuda_graphs="emulate")
    feed = spec.sample_feed("opt", seed=2)
    want = eager(name, "vocoder", feed)
    got = emulated.infer(feed)
    assert all(rel_err(got[k], want[k]) < 1e-6 for k in want) and emulated.metadata()["graphs"] == 1


# -- GPU: CUDA-graph capture and replay ---------------------------------------------------------------------
# Cheap by design (the device time is shared): every graph is captured WITHOUT torch.compile (checks that
# each model's ops capture and that the static-buffer logic holds on the device); the inductor + capture
# combination runs on one graph per kind and on the decode step.
INDUCTOR_CASES = [("cosyvoice3-tiny", "flow_solver"), ("cosyvoice3-tiny", "vocoder"),
                  ("cosyvoice2-tiny", "flow_solver"), ("orpheus-tiny", "vocoder")]


def _gpu_capture_check(name, graph, compile_backend):
    fresh = load_model(name)
    spec = fresh.graph_specs()[graph]
    cb = CompiledBackend(spec, "cuda", lambda: fresh.graph_module(graph), compile_backend=compile_backend)
    assert cb.cuda_graphs
    p = point(spec, graph)
    feed = spec.sample_feed(p, seed=3, device="cuda")
    out = cb.infer(feed)
    kept = {k: v.clone() for k, v in out.items()}
    ref = eager(name, graph, feed, device="cuda")
    for k in ref:
        assert rel_err(out[k], ref[k]) < 1e-3, k  # TF32 convolutions / fused kernels on the GPU
    out2 = cb.infer(feed)  # same key: replay
    for k in ref:
        assert rel_err(out2[k], out[k]) < 1e-6
    if graph != "vocoder":  # a shorter request in the same bucket: the padded tail must be refilled
        dim = spec.pad.dim
        feed3 = spec.sample_feed({**p, dim: p[dim] - 1}, seed=4, device="cuda")
        out3, ref3 = cb.infer(feed3), eager(name, graph, feed3, device="cuda")
        for k in ref3:
            assert rel_err(out3[k], ref3[k]) < 1e-3
        assert cb.metadata()["graphs"] == 1  # one bucket, one graph
    for k in kept:  # returned tensors are copies: later replays left them alone
        assert torch.equal(out[k], kept[k])
    meta = cb.metadata()
    assert meta["cuda_graphs"] == "cuda" and meta["capture_seconds"] > 0
    return meta


@gpu
@needs_cuda
@pytest.mark.parametrize("name,graph", graph_cases())
def test_gpu_capture_eager_module(name, graph):
    _gpu_capture_check(name, graph, None)


@gpu
@needs_cuda
@pytest.mark.parametrize("name,graph", INDUCTOR_CASES)
def test_gpu_inductor_capture(name, graph, capsys):
    meta = _gpu_capture_check(name, graph, "inductor")
    with capsys.disabled():
        print(f"\n{name}/{graph}: compile {meta['compile_seconds']:.1f} s, capture {meta['capture_seconds']:.2f} s")


@gpu
@needs_cuda
def test_gpu_exact_shape_lru():
    """Exact-shape graphs with inductor: F=2 compiles static, F=3 recompiles with a dynamic F
    (torch.compile's automatic dynamic shapes), F=4 reuses it; two graphs kept, LRU evicted."""
    fresh = load_model("orpheus-tiny")
    spec = fresh.graph_specs()["vocoder"]
    cb = CompiledBackend(spec, "cuda", lambda: fresh.graph_module("vocoder"), max_graphs=2)
    for f in (2, 3, 4, 2):
        feed = spec.sample_feed({"F": f}, seed=f, device="cuda")
        assert rel_err(cb.infer(feed)["audio"], eager("orpheus-tiny", "vocoder", feed, "cuda")["audio"]) < 1e-3
    assert cb.metadata()["graphs"] == 2 and cb.metadata()["evictions"] == 2


@gpu
@needs_cuda
@pytest.mark.parametrize("name,compile_backend", [("cosyvoice3-tiny", "inductor"), ("orpheus-tiny", "inductor"),
                                                  ("cosyvoice2-tiny", None)])
def test_gpu_decoder_cuda_graph_matches_explicit_without_syncs(name, compile_backend):
    fresh = load_model(name)
    cb = CompiledBackend(fresh.graph_specs()["llm"], "cuda", lambda: fresh.graph_module("llm"),
                         compile_backend=compile_backend)
    dec = cb.decoder(*fresh.lm.cache_shape, batch=1, max_len=64)
    assert dec.graph is not None and dec.graph_mode == "cuda"
    spec = fresh.graph_specs()["llm"]
    ref = LLMDecoder(TorchBackend(spec, "cuda", lambda: load_model(name).graph_module("llm")).activate().infer,
                     torch.device("cuda"), *fresh.lm.cache_shape, 1)
    vocab = int(spec.inputs[0].fill.b)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 9), generator=g).cuda()
    errs = [rel_err(dec.prefill(ids), ref.prefill(ids))]
    steps = torch.randint(0, vocab, (20, 1, 1), generator=g).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside step() raises
    try:
        fast = [dec.step(steps[i]) for i in range(20)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i in range(20):
        errs.append(rel_err(fast[i], ref.step(steps[i])))
    assert max(errs) < 1e-3


@gpu
@needs_cuda
def test_gpu_device_samplers_run_without_syncs():
    from models.speech_lm import ORPHEUS_STOP_TOKEN_ID

    v = 6761
    logits = torch.randn(v, device="cuda")
    ras = DeviceRASSampler(stop_from=6561, vocab=v, min_len=2, device="cuda", seed=0)
    vocab = 156940
    orp = DeviceOrpheusSampler(vocab, [1, 2, 3], ORPHEUS_STOP_TOKEN_ID, grammar=ORPHEUS_GRAMMAR, fixed=True,
                               device="cuda", seed=0)
    big = torch.randn(vocab, device="cuda")
    first = [int(ras(logits)), int(orp(big))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = [ras(logits) for _ in range(10)]
        b = [orp(big) for _ in range(10)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first[0] < 6561 and int(a[0]) < 6561  # min_len 2: no stop token yet
    assert len({int(t) for t in b}) > 1 and int(ras.count) == 11 and int(orp.audio_count) == 11


@gpu
@needs_cuda
def test_gpu_bf16_error_report(capsys):
    report = {}
    for name, graph in INDUCTOR_CASES[:2]:
        fresh = load_model(name)
        spec = fresh.graph_specs()[graph]
        feed = spec.sample_feed(point(spec, graph), seed=3, device="cuda")
        cb = CompiledBackend(spec, "cuda", lambda: fresh.graph_module(graph), dtype="bfloat16")
        out, ref = cb.infer(feed), eager(name, graph, feed, "cuda")
        report[f"{name}/{graph}"] = max(rel_err(out[k], ref[k]) for k in ref)
    with capsys.disabled():
        print("\nGPU bf16 max rel error: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    assert max(report.values()) < 1e-1


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_graph_compiles_in_low_precision(name, dtype):
    """Every graph of every tiny preset through the compile backend in bf16 and fp16 (aot_eager on
    the CPU): finite, near fp32, and the spec's fp32 islands really stay fp32 inside the module (the
    CosyVoice2 vocoder, which wraps HiFT, crashed on the H200 when the island rule knew HiFT by type)."""
    fresh = load_model(name)
    tol = 0.1 if dtype == torch.bfloat16 else 0.01
    for graph, spec in fresh.graph_specs().items():
        feed = spec.sample_feed("min" if graph != "vocoder" else {"T": 6, "F": 2, "B": 1}, seed=1)
        cb = CompiledBackend(spec, "cpu", lambda g=graph: fresh.graph_module(g), dtype, compile_backend="aot_eager",
                             copy_module=True)
        out = cb.infer(feed)
        ref = eager(name, graph, feed)
        for k in ref:
            assert torch.isfinite(out[k]).all() and out[k].dtype == ref[k].dtype, (graph, k)
            assert rel_err(out[k], ref[k]) < tol, (graph, k)
        for pname, p in list(cb.module.named_parameters()) + list(cb.module.named_buffers()):
            if p.is_floating_point():
                # RoPE frequency tables keep float32 by their module's own rule (DecoderBody._apply,
                # the DiT's RotaryEmbedding._apply)
                rope = "rope" in pname or pname.endswith("rotary_embed.inv_freq")
                assert (p.dtype == torch.float32) == (spec.in_fp32_scope(pname) or rope), (graph, pname)


@gpu
@needs_cuda
def test_gpu_capture_while_other_threads_copy_onto_the_callers_stream():
    """The engine's request threads enqueue their input copies (pageable host memory) on the
    token2wav thread's stream while that thread captures a new graph: the capture must not happen
    on that stream (it did once, and every request in flight failed with 'operation not permitted
    when stream is capturing'); each captured graph still replays its function exactly."""
    import threading

    from runtime.backends.cuda_graphs import capture

    dev = torch.device("cuda")
    shared = torch.cuda.Stream(dev)
    stop, errors = threading.Event(), []

    def copier():
        torch.cuda.set_stream(shared)
        try:
            while not stop.is_set():
                (torch.randn(64, 64).to(dev) * 2).sum().item()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    t = threading.Thread(target=copier)
    t.start()
    try:
        torch.cuda.set_stream(shared)
        w = torch.randn(256, 256, device=dev)
        for i in range(20):
            x = torch.randn(8, 256, device=dev)
            graph, out, _, _ = capture(lambda a: torch.tanh(a @ w) + i, (x,), dev, "cuda")
            x.copy_(torch.randn(8, 256, device=dev))
            graph.replay()
            torch.testing.assert_close(out, torch.tanh(x @ w) + i)
    finally:
        stop.set()
        t.join()
        torch.cuda.set_stream(torch.cuda.default_stream(dev))
    assert errors == []
