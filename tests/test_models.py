"""Families: loading upstream folders and presets, wiring of the stages, bad input."""

import os

import pytest
import torch

from models.errors import UserError
from models.family import Utterance
from models.registry import PRESETS, load_model
from runtime.pipeline import Pipeline
from tests.conftest import golden, make_upstream_folder


class _Recording:
    """A graph runner that keeps every graph's last feed and outputs (the pipeline's, passed through)."""

    def __init__(self, inner):
        self.inner, self.options, self.seen = inner, inner.options, {}

    def __call__(self, graph, feed):
        out = self.inner(graph, feed)
        self.seen[graph] = (feed, out)
        return out


@pytest.mark.parametrize("family", ["cosyvoice3", "cosyvoice2"])
def test_folder_token2wav_reproduces_golden_flow(tmp_path, family):
    """The family's own token -> mel wiring (encoder graph, fixed noise, solver graph) gives
    upstream's flow.inference output on an upstream-format folder."""
    model = load_model(make_upstream_folder(tmp_path, family))
    assert model.family == family and not model.random_weights
    io = golden(family, "flow_inference_io.pt")
    run = _Recording(Pipeline(model, "torch").run)
    speaker = model.make_speaker(None, None)
    speaker["embedding"] = io["embedding"]
    utt = Utterance("x", [0], 1, 0, 10, speaker)
    audio = model.token2wav(io["token"][0].tolist(), utt, run, torch.Generator().manual_seed(0), torch.device("cpu"))
    seen = run.seen
    mel = seen["flow_solver"][1]["mel"]
    # measured 0 for both families (test_flow_cv2 / test_flow_cv3 give the derivation of the tolerances)
    assert (seen["flow_encoder"][1]["mu"] - io["decoder_mu"]).abs().max() < 1e-5
    assert torch.equal(seen["flow_solver"][0]["z"], io["z"])
    assert (mel - io["mel"]).abs().max() < 2e-5
    assert audio.shape == (io["mel"].shape[2] * 480,) and torch.isfinite(audio).all()


@pytest.mark.parametrize("style", ["old_weight_norm", "generator_prefix"])
def test_upstream_hift_key_styles_load_identically(tmp_path, style):
    ref = load_model(make_upstream_folder(tmp_path / "a", "cosyvoice3")).graph_module("vocoder")
    other = load_model(make_upstream_folder(tmp_path / "b", "cosyvoice3", **{style: True})).graph_module("vocoder")
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, other.state_dict()[k], atol=1e-6), k


def test_folder_synthesis_end_to_end(cv3_folder, tmp_path):
    model = load_model(cv3_folder)
    # the tokenizer comes from the folder, with upstream's special tokens appended
    assert model.tokenizer.token_id("<|endofprompt|>") is not None
    res = Pipeline(model, "torch").synthesize("hello world. this is a test!", seed=3, fixed_tokens=12)
    assert len(res.tokens) == 1 and len(res.tokens[0]) == 12
    assert res.audio.shape == (12 * 2 * 480,) and torch.isfinite(res.audio).all()


# -- bad folders and checkpoints -----------------------------------------------------------------------
def test_folder_missing_file(cv3_folder):
    os.remove(os.path.join(cv3_folder, "flow.pt"))
    with pytest.raises(UserError, match=r"lacks flow\.pt.*download the complete cosyvoice3 model folder"):
        load_model(cv3_folder)


def test_checkpoint_missing_key(cv3_folder):
    sd = torch.load(os.path.join(cv3_folder, "llm.pt"), weights_only=True)
    sd.pop("llm_decoder.weight")
    torch.save(sd, os.path.join(cv3_folder, "llm.pt"))
    with pytest.raises(UserError, match=r"does not fit the model config: 1 missing keys \(e\.g\. llm_decoder\.weight\)"):
        load_model(cv3_folder).graph_module("llm")


def test_checkpoint_unexpected_key_and_wrong_shape(cv3_folder, cv2_folder):
    sd = torch.load(os.path.join(cv3_folder, "flow.pt"), weights_only=True)
    sd["decoder.estimator.extra"] = torch.zeros(1)
    torch.save(sd, os.path.join(cv3_folder, "flow.pt"))
    with pytest.raises(UserError, match=r"1 unexpected keys \(e\.g\. decoder\.estimator\.extra\)"):
        load_model(cv3_folder).graph_module("flow_solver")
    # a CosyVoice3 vocoder in a CosyVoice2 folder: same keys, other kernel sizes
    import shutil
    shutil.copy(os.path.join(cv3_folder, "hift.pt"), os.path.join(cv2_folder, "hift.pt"))
    with pytest.raises(UserError, match="keys with wrong shapes"):
        load_model(cv2_folder).graph_module("vocoder")


def test_corrupt_checkpoint(cv3_folder):
    with open(os.path.join(cv3_folder, "hift.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError, match=r"hift\.pt is truncated or not a PyTorch checkpoint"):
        load_model(cv3_folder).graph_module("vocoder")


def test_yaml_for_another_family(cv3_folder):
    path = os.path.join(cv3_folder, "cosyvoice3.yaml")
    text = open(path).read().replace("cosyvoice.llm.llm.CosyVoice3LM", "cosyvoice.llm.llm.Qwen2LM")
    open(path, "w").write(text)
    with pytest.raises(UserError, match=r"describes a Qwen2LM model \(cosyvoice2\), not cosyvoice3"):
        load_model(cv3_folder)


def test_unknown_model_and_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match=r"unknown model 'cosyvoice9-tiny': not a preset and not a folder"):
        load_model("cosyvoice9-tiny")
    with pytest.raises(UserError, match="is not a model folder this tool knows"):
        load_model(str(tmp_path))


def test_prompt_wav_needs_frontend_models(tmp_path):
    model = load_model("cosyvoice3-tiny")
    with pytest.raises(UserError, match="zero-shot cloning needs campplus.onnx and speech_tokenizer_v3.onnx"):
        model.make_speaker(str(tmp_path / "p.wav"), "hi")
    with pytest.raises(UserError, match="--prompt-text was given without --prompt-wav"):
        model.make_speaker(None, "hi")
    with pytest.raises(UserError, match="has no named voices"):
        model.make_speaker(None, None, voice="tara")


# -- presets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [p for p in PRESETS if p.endswith("tiny")])
def test_tiny_presets_are_seeded_and_deterministic(name):
    a = Pipeline(load_model(name, seed=1), "torch").synthesize("Hello there.", seed=5, fixed_tokens=21)
    b = Pipeline(load_model(name, seed=1), "torch").synthesize("Hello there.", seed=5, fixed_tokens=21)
    c = Pipeline(load_model(name, seed=1), "torch").synthesize("Hello there.", seed=6, fixed_tokens=21)
    assert a.tokens == b.tokens and torch.equal(a.audio, b.audio)
    assert a.tokens != c.tokens
    assert len(a.tokens[0]) == 21 and a.audio.numel() > 0 and torch.isfinite(a.audio).all()
    assert a.audio.abs().max() <= 1.0


def test_long_text_is_split_into_sentences():
    model = load_model("cosyvoice3-tiny")
    text = " ".join(["This sentence is here to make the paragraph long enough to split."] * 4)
    utts = model.split_text(text)
    assert len(utts) >= 2 and "".join(utts).replace(" ", "") == text.replace(" ", "")
    with pytest.raises(UserError, match="the text to synthesize is empty"):
        model.split_text("  \n ")
    with pytest.raises(UserError, match="nothing to speak"):
        model.split_text("?!")


def test_min_length_rule_holds_without_fixed_tokens():
    model = load_model("cosyvoice3-tiny")
    res = Pipeline(model, "torch").synthesize("Hi there.", seed=0)
    n_text = len(model.tokenizer.encode("Hi there."))
    assert 2 * n_text <= len(res.tokens[0]) <= 20 * n_text


def test_orpheus_tokens_map_to_frames():
    model = load_model("orpheus-tiny")
    res = Pipeline(model, "torch").synthesize("Hello.", seed=0, fixed_tokens=7 * 6 + 3)
    assert res.audio.shape == (6 * 2048,)
    assert res.warnings and "trailing partial frame of 3" in res.warnings[0]
    with pytest.raises(UserError, match="unknown Orpheus voice"):
        model.make_speaker(None, None, voice="nobody")


# -- zero-shot front end (stand-in ONNX models with upstream's interfaces) ------------------------------
def test_zero_shot_prompt_conditions_llm_and_flow(cv3_folder, tmp_path):
    import math

    import soundfile as sf

    from tests.conftest import write_fake_frontend_onnx

    write_fake_frontend_onnx(cv3_folder, "v3")
    sr = 44100
    t = torch.arange(int(2.0 * sr)) / sr
    wav = 0.3 * torch.sin(2 * math.pi * 220 * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))
    sf.write(tmp_path / "prompt.wav", wav.numpy(), sr)
    model = load_model(cv3_folder)
    spk = model.make_speaker(str(tmp_path / "prompt.wav"), "hello world.")
    n = len(spk["prompt_tokens"])
    assert n == 50  # 2 s -> 200 log-mel frames -> 50 tokens; 100 mel frames at 24 kHz -> 50 token pairs
    assert spk["prompt_mel"].shape == (1, 2 * n, 80) and spk["embedding"].shape == (1, 192)
    assert spk["llm_prompt_tokens"] == spk["prompt_tokens"]  # zero-shot: the LLM continues the prompt
    # cross-lingual (no transcript): the flow keeps the prompt, the LLM does not get it
    cross = model.make_speaker(str(tmp_path / "prompt.wav"), None)
    assert cross["llm_prompt_tokens"] == [] and cross["prompt_tokens"] == spk["prompt_tokens"]
    utt = model.make_utterance("this is a test.", spk)
    text_ids = model.tokenizer.encode("this is a test.")
    assert utt.prompt_ids[-n:] == [model.lm.next_input_id(x) for x in spk["prompt_tokens"]]
    assert (utt.min_tokens, utt.max_tokens) == (2 * len(text_ids), 20 * len(text_ids))
    res = Pipeline(model, "torch").synthesize("this is a test.", prompt_wav=str(tmp_path / "prompt.wav"),
                                              prompt_text="hello world.", fixed_tokens=10)
    assert res.audio.shape == (10 * 2 * 480,)  # prompt frames are cut from the output


def test_orpheus_folder_loads_and_synthesizes(tmp_path):
    from tests.conftest import make_orpheus_folder

    folder = make_orpheus_folder(tmp_path)
    model = load_model(folder)
    assert model.family == "orpheus" and not model.random_weights
    res = Pipeline(model, "torch").synthesize("hello world.", fixed_tokens=28, voice="leo")
    assert len(res.tokens[0]) == 28 and torch.isfinite(res.audio).all()
    # a real checkpoint samples freely: whatever did not form whole SNAC frames is reported
    from models.snac import tokens_to_codes
    c0, _, _, report = tokens_to_codes(res.tokens[0])
    assert res.audio.numel() == c0.shape[1] * 2048
    assert report.ok or any("not decoded" in w for w in res.warnings)
    os.rename(os.path.join(folder, "snac"), os.path.join(folder, "codec"))
    with pytest.raises(UserError, match="has no snac/ subfolder"):
        load_model(folder)


@pytest.mark.parametrize("name", ["cosyvoice3-tiny", "cosyvoice2-tiny"])
def test_batched_flow_rows_equal_single_requests(name):
    """Padded, masked batching of requests with different lengths changes no row."""
    model = load_model(name)
    pipe = Pipeline(model, "torch")
    spk = model.make_speaker(None, None)
    spk2 = dict(spk, embedding=torch.randn(1, 192, generator=torch.Generator().manual_seed(3)))
    lists = [list(range(7, 47)), list(range(100, 117))]
    batch = model.token2mel_batch(lists, [spk, spk2], pipe.run, torch.device("cpu"), streaming=False, finalize=True)
    for toks, s, got in zip(lists, [spk, spk2], batch):
        want = model.token2mel(toks, s, pipe.run, torch.device("cpu"), streaming=False, finalize=True)
        assert got.shape == want.shape == (1, 80, 2 * len(toks))
        assert (got - want).abs().max() < 1e-4
    if model.family == "cosyvoice3":  # fixed vocoder noise: whole audio rows are comparable too
        utts = [model.make_utterance("x", s) for s in (spk, spk2)]
        audio = model.token2wav_batch(lists, utts, pipe.run, torch.Generator(), torch.device("cpu"))
        for toks, u, a in zip(lists, utts, audio):
            assert (a - model.token2wav(toks, u, pipe.run, torch.Generator(), torch.device("cpu"))).abs().max() < 1e-4


def test_synthesize_batch_serves_several_requests():
    for name in ("cosyvoice3-tiny", "orpheus-tiny"):
        pipe = Pipeline(load_model(name), "torch")
        res = pipe.synthesize_batch(["Hello there.", "A longer, second request.", "Third."], seed=1, fixed_tokens=28)
        assert len(res.audios) == 3 and all(a.numel() > 0 and torch.isfinite(a).all() for a in res.audios)
        assert [len(t[0]) for t in res.tokens] == [28, 28, 28]
        assert res.rtf > 0 and set(res.stage_seconds) == set(pipe.model.stages)


def test_preset_weights_are_drawn_on_the_cpu_whatever_the_device():
    """CUDA's generator draws other numbers for the same seed: a preset built on the GPU would not
    be the model its CPU-exported artifacts (same name, seed and fingerprint) were made from."""
    model = load_model("cosyvoice2-tiny")
    drawn_on = []

    def build():
        drawn_on.append(torch.empty(0).device.type)
        return torch.nn.Linear(3, 3)

    on_cpu = model.seeded_build(build, 7)
    model.build_device = torch.device("meta")  # any other device: the draw stays on the CPU
    elsewhere = model.seeded_build(build, 7)
    assert drawn_on == ["cpu", "cpu"]
    assert elsewhere.weight.device.type == "meta" and on_cpu.weight.device.type == "cpu"
    again = load_model("cosyvoice2-tiny").seeded_build(build, 7)
    assert torch.equal(on_cpu.weight, again.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["cosyvoice2-tiny", "orpheus-tiny"])
def test_a_preset_loaded_for_the_gpu_has_the_cpu_presets_weights(name):
    cpu, gpu = load_model(name), load_model(name, device="cuda")
    for graph in cpu.graph_specs():
        a, b = cpu.graph_module(graph).state_dict(), gpu.graph_module(graph).state_dict()
        assert all(torch.equal(a[k], b[k].cpu()) for k in a), graph
