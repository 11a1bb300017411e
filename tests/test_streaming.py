"""Streaming token -> audio: upstream's streaming flow, chunk schedule, equality with offline."""

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
    model = load_model("cosyvoice2-tiny")
    pipe = Pipeline(model, "torch")
    stream = pipe.stream("Hello there.", seed=3, fixed_tokens=140)
    chunks = list(stream)
    res = stream.result
    total = sum(c.numel() for c in chunks)
    assert total == 2 * 140 * 480 == res.audio.numel()
    # first chunk after 25 + 3 tokens; the held-back 3840 samples come with the next chunk
    assert chunks[0].numel() == 2 * 25 * 480 - 8 * 480
    assert all(torch.isfinite(c).all() for c in chunks)
    assert res.first_chunk_seconds is not None and res.first_chunk_seconds < res.wall_seconds


def test_orpheus_stream_keeps_every_frame():
    model = load_model("orpheus-tiny")
    pipe = Pipeline(model, "torch")
    chunks = list(pipe.stream("Hello.", seed=0, fixed_tokens=7 * 9))
    assert [c.numel() for c in chunks] == [2 * 2048] + [2048] * 5 + [2 * 2048]
    offline = pipe.synthesize("Hello.", seed=0, fixed_tokens=7 * 9)
    assert sum(c.numel() for c in chunks) == offline.audio.numel() == 9 * 2048


def test_cli_stream_writes_what_it_streams(tmp_path):
    out = tmp_path / "s.wav"
    res = CliRunner().invoke(synthesize_main, ["--model", "cosyvoice3-tiny", "--text", "Hi there.", "--tokens", "80",
                                               "--stream", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "first audio after" in res.output
    audio, sr = sf.read(out)
    assert sr == 24000 and len(audio) == 80 * 2 * 480
