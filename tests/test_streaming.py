"""Streaming token -> audio: upstream's streaming flow, chunk schedule, equality with offline."""

import numpy as np
import soundfile as sf
import torch
from click.testing import CliRunner

from models.registry import load_model
from runtime.pipeline import Pipeline
from runtime.synthesize import main as synthesize_main
from tests.conftest import golden, make_upstream_folder


def _speaker_from_golden(model, io):
    spk = model.make_speaker(None, None)
    spk.update(embedding=io["stream_embedding"], prompt_tokens=io["stream_prompt_token"][0].tolist(),
               prompt_mel=io["stream_prompt_feat"])
    return spk


def test_streaming_flow_reproduces_upstream(tmp_path):
    """Upstream flow.inference(streaming=True, finalize=False) with a prompt, both families."""
    for family in ("cosyvoice3", "cosyvoice2"):
        model = load_model(make_upstream_folder(tmp_path / family, family))
        io = golden(family, "flow_inference_io.pt")
        pipe = Pipeline(model, "torch")
        mel = model.token2mel(io["stream_token"][0].tolist(), _speaker_from_golden(model, io), pipe.run,
                              torch.device("cpu"), streaming=True, finalize=False)
        assert mel.shape == io["stream_mel"].shape
        # measured 0 (bit-exact) for both; upstream's fp64 recompute moves the cv3 stream mel by 1.5e-6
        assert (mel - io["stream_mel"]).abs().max() < 2e-5, family


def test_cosyvoice3_stream_equals_offline_streaming_mode(tmp_path):
    """Chunking changes only latency: with a 3-token prompt (first hop 22 + 25 tokens) the chunks
    concatenate to the offline result computed with the same streaming attention."""
    model = load_model(make_upstream_folder(tmp_path, "cosyvoice3"))
    io = golden("cosyvoice3", "flow_inference_io.pt")
    spk = _speaker_from_golden(model, io)
    pipe = Pipeline(model, "torch")
    utt = model.make_utterance("hello world.", spk)
    tokens = torch.randint(0, 50, (190,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = model.stream_decoder(utt, pipe.run, torch.Generator().manual_seed(1), torch.device("cpu"))
    chunks, sizes = [], []
    for n in range(1, len(tokens) + 1):
        for c in stream.push(tokens[:n]):
            chunks.append(c)
            sizes.append(n)
    chunks += stream.finish(tokens)
    # upstream's schedule: 22 (pad) + 25 tokens + 3 look-ahead, then hops of 50 and 100
    assert sizes == [50, 100]
    streamed = torch.cat(chunks)
    offline = model.token2wav(tokens, utt, pipe.run, torch.Generator().manual_seed(1), torch.device("cpu"), streaming=True)
    assert streamed.shape == offline.shape == (2 * len(tokens) * 480,)
    # same arithmetic on different total lengths: only kernel blocking (rounding) differs
    assert (streamed - offline).abs().max() < 5e-4 * offline.abs().max()


def test_cosyvoice2_stream_crossfades_chunks():
    """CosyVoice2Model.token2wav(stream=True) upstream: each chunk is vocoded with the previous vocoder
    input's last 8 mel frames in front and the previous NSF source's last 3840 samples as the start of
    its source; its first 3840 samples are cross-faded with the previous chunk's held-back last 3840
    (fade = chunk * w[:3840] + tail * w[3840:], w = np.hamming(7680)); every chunk but the last holds
    its own last 3840 back. Rebuilt here from the recorded vocoder calls, sample for sample."""
    model = load_model("cosyvoice2-tiny")
    pipe = Pipeline(model, "torch")
    calls = []
    real_call = pipe.call

    def recording_call(graph, feed):
        out = real_call(graph, feed)
        if graph == "vocoder":
            calls.append((feed, out))
        return out

    pipe.call = recording_call
    stream = pipe.stream("Hello there.", seed=3, fixed_tokens=140)
    chunks = list(stream)
    res = stream.result
    total = sum(c.numel() for c in chunks)
    assert total == 2 * 140 * 480 == res.audio.numel()
    # first chunk after 25 + 3 tokens; the held-back 3840 samples come with the next chunk
    assert chunks[0].numel() == 2 * 25 * 480 - 8 * 480
    assert all(torch.isfinite(c).all() for c in chunks)
    assert res.first_chunk_seconds is not None and res.first_chunk_seconds < res.wall_seconds
    overlap = 8 * 480
    window = torch.from_numpy(np.hamming(2 * overlap)).float()
    assert len(calls) == len(chunks) >= 3
    expected, tail = [], None
    for k, (feed, out) in enumerate(calls):
        audio, source = out["audio"][0], out["source"]
        if k == 0:
            assert feed["source_prefix"].shape[2] == 0
        else:
            prev_feed, prev_out = calls[k - 1]
            assert torch.equal(feed["mel"][:, :, :8], prev_feed["mel"][:, :, -8:])
            assert torch.equal(feed["source_prefix"], prev_out["source"][:, :, -overlap:])
            assert torch.equal(source[:, :, :overlap], feed["source_prefix"])  # the source starts with it
            audio = torch.cat([audio[:overlap] * window[:overlap] + tail * window[overlap:], audio[overlap:]])
        last = k == len(calls) - 1
        tail = audio[-overlap:]
        expected.append(audio if last else audio[:-overlap])
    for got, want in zip(chunks, expected):
        assert got.shape == want.shape
        # upstream's np.hamming and the float32 window in models/streaming.py differ by 1.8e-7 at most
        err = (got - want).abs().max().item()
        assert err < 1e-6, err
    # the fade is doing something: without it the first join would differ
    assert (chunks[1][:overlap] - calls[1][1]["audio"][0, :overlap]).abs().max() > 1e-3


def test_orpheus_stream_keeps_every_frame():
    model = load_model("orpheus-tiny")
    pipe = Pipeline(model, "torch")
    chunks = list(pipe.stream("Hello.", seed=0, fixed_tokens=7 * 9))
    assert [c.numel() for c in chunks] == [2 * 2048] + [2048] * 5 + [2 * 2048]
    offline = pipe.synthesize("Hello.", seed=0, fixed_tokens=7 * 9)
    assert sum(c.numel() for c in chunks) == offline.audio.numel() == 9 * 2048


def test_cli_stream_writes_what_it_streams(tmp_path, monkeypatch):
    """--stream hands every chunk to the writer as soon as the pipeline yields it (before the next one
    is made), and the file holds exactly those samples (16-bit PCM: rint(clip(x) * 32767)) under a
    header with the real length."""
    from models.audio import AudioWriter
    from runtime.pipeline import Stream

    events = []  # ("yield" | "write", chunk) in the order they happen
    real_iter, real_write = Stream.__iter__, AudioWriter.write

    def recording_iter(self):
        for chunk in real_iter(self):
            events.append(("yield", chunk.clone()))
            yield chunk

    def recording_write(self, chunk):
        events.append(("write", chunk.clone()))
        return real_write(self, chunk)

    monkeypatch.setattr(Stream, "__iter__", recording_iter)
    monkeypatch.setattr(AudioWriter, "write", recording_write)
    out = tmp_path / "s.wav"
    res = CliRunner().invoke(synthesize_main, ["--model", "cosyvoice3-tiny", "--text", "Hi there.", "--tokens", "80",
                                               "--stream", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "first audio after" in res.output
    kinds = [k for k, _ in events]
    assert len(kinds) >= 4 and kinds == ["yield", "write"] * (len(kinds) // 2)  # chunk by chunk, in step
    streamed = [c for k, c in events if k == "yield"]
    assert all(torch.equal(c, w) for c, (_, w) in zip(streamed, events[1::2]))
    audio, sr = sf.read(out, dtype="int16")
    assert sr == 24000 and len(audio) == 80 * 2 * 480
    pcm = np.rint(np.clip(torch.cat(streamed).numpy(), -1.0, 1.0) * 32767).astype(np.int16)
    assert np.array_equal(audio, pcm)
    assert np.abs(pcm).max() > 100  # not silence


def test_cosyvoice3_stream_with_the_flow_prefix_kept_equals_recomputing_it(tmp_path):
    """flow_mode prefix (each chunk's new frames solved against the DiT's kept keys / values of the
    chunks before) streams the same chunks as recomputing every frame at every chunk, with upstream's
    prompt and schedule (hops 22 + 25, 50, 100 tokens, then the rest); so does the same with the
    prefix forward compiled by the flow's compile backend (dynamic shapes, no graph break)."""
    import pytest

    from models.errors import UserError

    model = load_model(make_upstream_folder(tmp_path, "cosyvoice3"))
    io = golden("cosyvoice3", "flow_inference_io.pt")
    spk = _speaker_from_golden(model, io)
    tokens = torch.randint(0, 50, (240,), generator=torch.Generator().manual_seed(0)).tolist()
    streams = {}
    # prefix-compiled: the flow's compile backend compiles the prefix forward (inductor, dynamic shapes)
    for name, backends, mode in (("solver", "torch", "solver"), ("prefix", "torch", "prefix"),
                                 ("prefix-compiled", "llm=torch,flow=compile,vocoder=torch", "prefix")):
        pipe = Pipeline(model, backends, options={"flow_mode": mode}).activate()
        utt = model.make_utterance("hello world.", spk)
        stream = model.stream_decoder(utt, pipe.run, torch.Generator().manual_seed(1), torch.device("cpu"))
        chunks = []
        for n in range(1, len(tokens) + 1):
            chunks += stream.push(tokens[:n])
        if mode == "prefix":  # 47 + 50 + 100 tokens solved in pieces so far, the last 43 at the finish
            assert stream.flow_state["frames"] == 2 * (3 + 197) and len(stream.flow_state["prefixes"]) == 10
        streams[name] = chunks + stream.finish(tokens)
        if mode == "prefix":  # the finish released what the stream kept
            assert stream.flow_state["frames"] == 2 * (3 + len(tokens)) and "prefixes" not in stream.flow_state
        if name == "prefix-compiled":
            meta = pipe.runners["flow_solver"].metadata()
            assert meta["compiled_functions"] == ["dit_forward_rows_into"] and meta["graph_breaks"] == 0, meta
    assert [c.shape for c in streams["prefix"]] == [c.shape for c in streams["solver"]] and len(streams["solver"]) == 4
    for a, b in zip(streams["prefix"], streams["solver"]):  # measured 1.1e-4 of the peak: rounding (as above)
        assert (a - b).abs().max() < 5e-4 * b.abs().max()
    for a, b in zip(streams["prefix-compiled"], streams["prefix"]):
        assert a.shape == b.shape and (a - b).abs().max() < 5e-4 * b.abs().max()
    with pytest.raises(UserError, match="unknown flow_mode 'prefix'"):
        load_model("cosyvoice2-tiny").resolve_options({"flow_mode": "prefix"})


def test_cosyvoice3_prefix_in_bf16_keeps_the_euler_state_in_float32(tmp_path):
    """flow_mode prefix with a bf16 flow: the Euler state stays float32 as in the one-graph solver
    (rounding it to bf16 at each of the 10 steps doubled the error: measured 9.1e-3 of the peak
    against the bf16 solver, 1.8e-3 with it float32)."""
    model = load_model(make_upstream_folder(tmp_path, "cosyvoice3"))
    spk = _speaker_from_golden(model, golden("cosyvoice3", "flow_inference_io.pt"))
    tokens = torch.randint(0, 50, (240,), generator=torch.Generator().manual_seed(0)).tolist()
    cpu = torch.device("cpu")
    fp32 = model.token2mel(tokens, spk, Pipeline(model, "torch").activate().run, cpu, streaming=True, finalize=True)
    pipe = Pipeline(model, "llm=torch,flow=torch:bf16,vocoder=torch", options={"flow_mode": "prefix"}).activate()
    whole = model.token2mel(tokens, spk, pipe.run, cpu, streaming=True, finalize=True)
    state = {}
    pieces = torch.cat([model.token2mel_after_prefix(tokens[:n], spk, pipe.run, cpu, n == len(tokens), state)
                        for n in (50, 100, 200, 240)], dim=2)  # whole chunks of 50 frames, as streaming's hops
    assert pieces.shape == whole.shape == fp32.shape
    peak = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    assert peak(pieces, whole) < 4e-3
    assert peak(pieces, fp32) < 1.5 * peak(whole, fp32)  # no worse than the bf16 solver itself


def test_cosyvoice3_prefix_stream_recomputes_after_a_failed_solve_and_keeps_nothing_past_its_last_chunk(tmp_path, monkeypatch):
    """A solve that fails takes the stream's kept prefix with it (the solve lets it go step by step):
    the chunk fails, and the stream goes on recomputing every frame, with the recomputing stream's
    audio. The last chunk's extended prefix is never built (it is not charged to any budget)."""
    model = load_model(make_upstream_folder(tmp_path, "cosyvoice3"))
    spk = _speaker_from_golden(model, golden("cosyvoice3", "flow_inference_io.pt"))
    tokens = torch.randint(0, 50, (240,), generator=torch.Generator().manual_seed(0)).tolist()
    solve = type(model).solve_after_prefix
    kept_after = []

    def flaky(self, items):
        if len(kept_after) == 1:  # the second chunk's solve fails half way through its steps
            items[0].state.pop("prefixes", None)
            kept_after.append("failed")
            raise RuntimeError("CUDA out of memory (simulated)")
        out = solve(self, items)
        kept_after.append([("prefixes" in it.state) for it in items])
        return out

    streams = {}
    for mode in ("solver", "prefix"):
        pipe = Pipeline(model, "torch", options={"flow_mode": mode}).activate()
        stream = model.stream_decoder(model.make_utterance("hello world.", spk), pipe.run,
                                      torch.Generator().manual_seed(1), torch.device("cpu"))
        if mode == "prefix":
            monkeypatch.setattr(type(model), "solve_after_prefix", flaky)
        chunks = []
        for n in range(1, len(tokens) + 1):
            try:
                chunks += stream.push(tokens[:n])
            except RuntimeError as e:
                assert str(e) == "CUDA out of memory (simulated)"
        streams[mode] = chunks + stream.finish(tokens)
    assert kept_after == [[True], "failed"]  # then no prefix solve at all: the stream recomputes
    assert stream.flow_state is None
    assert len(streams["prefix"]) == len(streams["solver"]) == 4
    for a, b in zip(streams["prefix"], streams["solver"]):
        assert a.shape == b.shape and (a - b).abs().max() < 5e-4 * b.abs().max()
    # a stream's last chunk keeps nothing: solved alone, its state holds no prefixes afterwards
    monkeypatch.setattr(type(model), "solve_after_prefix", solve)
    pipe = Pipeline(model, "torch", options={"flow_mode": "prefix"}).activate()
    state = {}
    cpu = torch.device("cpu")
    model.token2mel_after_prefix(tokens[:50], spk, pipe.run, cpu, False, state)
    assert len(state["prefixes"]) == 10 and state["prefixes"][0].frames == 100
    model.token2mel_after_prefix(tokens, spk, pipe.run, cpu, True, state)
    assert "prefixes" not in state and state["frames"] == 2 * (3 + len(tokens))
