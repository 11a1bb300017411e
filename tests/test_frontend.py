import math

import numpy as np
import pytest
import soundfile as sf
import torch

from models.audio import check_writable, cosyvoice_mel, kaldi_fbank, load_wav, slaney_mel_filters, whisper_log_mel
from models.errors import UserError
from models.hyperyaml import load_hyperyaml
from models.text import COSYVOICE2_SPECIAL, ByteTokenizer, HFTokenizer, split_sentences

REF = "models/configs"


def test_split_sentences_follows_upstream_rules():
    count = lambda s: s.split()  # one "token" per word
    text = " ".join(f"Sentence number {i} has exactly seven words here." for i in range(30))
    utts = split_sentences(text, count)
    assert "".join(utts) == text  # nothing lost, nothing added (text ends with punctuation)
    assert all(len(count(u)) <= 80 + 7 for u in utts)  # never more than one piece past the cap
    assert all(len(count(u)) > 60 for u in utts[:-1])
    assert split_sentences("Hello world", count) == ["Hello world."]
    assert split_sentences("   ", count) == []
    assert split_sentences("你好。今天天气很好！", count) == ["你好。今天天气很好！"]
    # a short tail joins the previous utterance
    long = "A " * 70 + "end. " + "B " * 70 + "end. Ok."
    out = split_sentences(long, count)
    assert out[-1].endswith("Ok.") and len(out) == 2


def test_byte_tokenizer_roundtrip_with_specials():
    tok = ByteTokenizer(COSYVOICE2_SPECIAL)
    ids = tok.encode("héllo<|endofprompt|>x")
    assert ids[-2] == 256 + COSYVOICE2_SPECIAL.index("<|endofprompt|>")
    assert tok.decode(ids) == "héllo<|endofprompt|>x"
    assert tok.vocab_size == 256 + len(COSYVOICE2_SPECIAL)


def _tiny_bpe(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world", "hello there", "world peace"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_hf_tokenizer_appends_specials_like_upstream(tmp_path):
    base = _tiny_bpe(tmp_path)
    n = base.get_vocab_size()
    tok = HFTokenizer(str(tmp_path), COSYVOICE2_SPECIAL)
    # the three existing specials keep their ids; the next one is appended right after the vocabulary
    assert tok.token_id("<|im_end|>") == base.token_to_id("<|im_end|>")
    assert tok.token_id("<|endofprompt|>") == n
    assert tok.encode("hello<|endofprompt|>")[-1] == n
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_hf_tokenizer_missing_files(tmp_path):
    with pytest.raises(UserError, match="neither tokenizer.json nor vocab.json"):
        HFTokenizer(str(tmp_path))


def _kaldi_reference(w: np.ndarray) -> np.ndarray:
    """Kaldi fbank written from its definition (povey window, pre-emphasis, HTK mel, log power)."""
    fl, fs = 400, 160
    n = 1 + (len(w) - fl) // fs
    frames = np.stack([w[i * fs:i * fs + fl] for i in range(n)]).astype(np.float64)
    frames -= frames.mean(1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * 0.03, frames[:, 1:] - 0.97 * frames[:, :-1]], 1)
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(fl) / (fl - 1))) ** 0.85
    spec = np.abs(np.fft.rfft(frames, 512)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)
    pts = np.linspace(mel(20), mel(8000), 82)
    fm = mel(np.arange(257) * 16000 / 512)
    banks = np.stack([np.maximum(0, np.minimum((fm - pts[b]) / (pts[b + 1] - pts[b]), (pts[b + 2] - fm) / (pts[b + 2] - pts[b + 1])))
                      for b in range(80)])
    return np.log(np.maximum(spec @ banks.T, 1.1920929e-07))


def test_kaldi_fbank_matches_definition():
    w = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0)) * 0.1
    f = kaldi_fbank(w)
    assert f.shape == (48, 80)
    assert np.abs(f.numpy() - _kaldi_reference(w.numpy()[0])).max() < 5e-4


def test_mel_features_of_a_tone():
    sr = 24000
    t = torch.arange(sr) / sr
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t).unsqueeze(0)
    mel = cosyvoice_mel(tone)
    assert mel.shape == (1, 80, 50)
    peak_bin = mel[0, :, 25].argmax().item()
    filters = slaney_mel_filters(sr, 1920, 80)
    centre = filters.argmax(dim=1)[peak_bin].item() * sr / 1920
    assert abs(centre - 1000) < 150
    wm = whisper_log_mel(tone[:, :16000])
    assert wm.shape == (1, 128, 100) and wm.max() <= 1.5 and (wm.max() - wm.min()) <= 2.0 + 1e-6


# -- mel features against librosa (what Matcha-TTS and Whisper build their filters with) ---------------
@pytest.fixture(scope="module")
def librosa():
    return pytest.importorskip("librosa")  # requirements.txt pins it; without it only these tests skip


@pytest.mark.parametrize("sr,n_fft,n_mels,fmax", [(24000, 1920, 80, None), (24000, 1920, 80, 8000),
                                                  (16000, 400, 128, None), (22050, 1024, 80, 8000)])
def test_slaney_mel_filters_match_librosa(librosa, sr, n_fft, n_mels, fmax):
    """Matcha-TTS (CosyVoice's prompt mel) and Whisper (the speech tokenizer's input) both take
    librosa.filters.mel(htk=False, norm='slaney'). Measured: <= 4.4e-8 of the largest weight, the
    float32 rounding of the float64 filters; tolerance 5e-7."""
    ours = slaney_mel_filters(sr, n_fft, n_mels, 0.0, fmax).numpy().astype(np.float64)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=fmax, htk=False, norm="slaney",
                              dtype=np.float64)
    assert ours.shape == ref.shape == (n_mels, n_fft // 2 + 1)
    assert np.abs(ours - ref).max() < 5e-7 * ref.max()


def _test_signal(sr: int, seconds: float) -> np.ndarray:
    """A chirp (100 Hz up to 5.3 kHz) over white noise: energy in every mel band, silence in none."""
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * (100 * t + 2000 * t ** 2)) + 0.05 * noise).astype(np.float32)


@pytest.mark.parametrize("fmax", [None, 8000], ids=["cosyvoice3", "cosyvoice2"])
def test_cosyvoice_mel_matches_librosa(librosa, fmax):
    """Matcha-TTS mel_spectrogram(center=False): reflect-pad (n_fft - hop) / 2 on both sides, STFT with a
    periodic Hann window, sqrt(|X|^2 + 1e-9), Slaney mel, log of max(., 1e-5). librosa in float64 as the
    reference; measured 2.7e-6 on the log-mel (values -4..1.5), tolerance 3e-5."""
    x = _test_signal(24000, 1.3)
    ours = cosyvoice_mel(torch.from_numpy(x)[None], 24000, fmax=fmax).numpy()[0]
    pad = (1920 - 480) // 2
    spec = librosa.stft(np.pad(x.astype(np.float64), pad, mode="reflect"), n_fft=1920, hop_length=480, win_length=1920,
                        window="hann", center=False)
    fb = librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmax=fmax, htk=False, norm="slaney", dtype=np.float64)
    ref = np.log(np.maximum(fb @ np.sqrt(np.abs(spec) ** 2 + 1e-9), 1e-5))
    assert ours.shape == ref.shape == (80, len(x) // 480)  # 50 frames per second, none centred
    assert np.abs(ours - ref).max() < 3e-5


def test_whisper_log_mel_matches_librosa(librosa):
    """whisper.log_mel_spectrogram: centred STFT (reflect pad), n_fft 400, hop 160, power without the last
    frame, 128 Slaney mels, log10 of max(., 1e-10), floor 8 below the maximum, (x + 4) / 4. Measured
    4.7e-6 against librosa in float64, tolerance 5e-5."""
    x = _test_signal(16000, 1.0)
    ours = whisper_log_mel(torch.from_numpy(x)).numpy()[0]
    spec = librosa.stft(x.astype(np.float64), n_fft=400, hop_length=160, window="hann", center=True, pad_mode="reflect")
    power = np.abs(spec[:, :-1]) ** 2
    fb = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128, htk=False, norm="slaney", dtype=np.float64)
    log_spec = np.log10(np.maximum(fb @ power, 1e-10))
    ref = (np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
    assert ours.shape == ref.shape == (128, 100)
    assert np.abs(ours - ref).max() < 5e-5


def test_load_wav_resamples_and_mixes(tmp_path):
    p = tmp_path / "a.wav"
    stereo = np.stack([np.full(48000, 0.25), np.full(48000, -0.25 + 0.5)], 1).astype(np.float32)
    sf.write(p, stereo, 48000)
    x = load_wav(str(p), 24000)
    assert x.shape[0] == 1 and abs(x.shape[1] - 24000) <= 2
    assert abs(x[0, 1000:-1000].mean().item() - 0.25) < 1e-3
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000garbage")
    with pytest.raises(UserError, match="cannot be decoded"):
        load_wav(str(bad), 16000)
    with pytest.raises(UserError, match="does not exist"):
        load_wav(str(tmp_path / "none.wav"), 16000)


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "x.wav"))
    with pytest.raises(UserError, match="does not exist"):
        check_writable(str(tmp_path / "no" / "x.wav"))
    with pytest.raises(UserError, match="is a directory"):
        check_writable(str(tmp_path))


def test_hyperyaml_reads_upstream_configs():
    cv3 = load_hyperyaml(f"{REF}/cosyvoice3.yaml")
    assert cv3["llm"].class_name == "CosyVoice3LM"
    est = cv3["flow"].kwargs["decoder"].kwargs["estimator"].kwargs
    assert est["static_chunk_size"] == 50 and est["depth"] == 22  # `!ref <chunk_size> * <token_mel_ratio>`
    assert cv3["hift"].kwargs["f0_predictor"].kwargs["cond_channels"] == 512
    cv2 = load_hyperyaml(f"{REF}/cosyvoice2.yaml")
    assert cv2["flow"].class_name == "CausalMaskedDiffWithXvec"
    assert cv2["llm"].kwargs["llm_input_size"] == 896


# -- Orpheus prompt ids against Orpheus' own prompt format ------------------------------------------------
def _llama3_like_tokenizer(folder: str) -> None:
    """A word-level stand-in for the Llama-3 tokenizer of an Orpheus snapshot with the parts that shape
    the prompt: <|begin_of_text|> (128000) prepended by the tokenizer's own template, <|eot_id|> (128009)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "hello", "world", "this", "is", "a", "test", ".", "!", ":", "tara", "leah"]
    vocab = {**{w: i for i, w in enumerate(words)}, "<|begin_of_text|>": 128000, "<|eot_id|>": 128009}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 128000)])
    tok.save(f"{folder}/tokenizer.json")


def test_orpheus_prompt_ids_follow_orpheus_format(tmp_path):
    """canopyai/Orpheus-TTS builds the prompt of its 3B model (OrpheusModel._format_prompt) as: start of
    human (128259), then the HF tokenizer called on f"{voice}: {text}" (a plain call, so with the
    tokenizer's special tokens: Llama-3's <|begin_of_text|>), then end of text (128009), end of human
    (128260), start of AI (128261), start of speech (128257). Its default voice is tara."""
    from tokenizers import Tokenizer

    from models.registry import load_model
    from tests.conftest import make_orpheus_folder

    folder = make_orpheus_folder(tmp_path)
    _llama3_like_tokenizer(folder)
    reference = Tokenizer.from_file(f"{folder}/tokenizer.json")
    model = load_model(folder)

    def orpheus_prompt(voice: str, text: str) -> list[int]:
        return [128259] + reference.encode(f"{voice}: {text}").ids + [128009, 128260, 128261, 128257]

    for voice, text in (("tara", "hello world."), ("leah", "this is a test!")):
        utt = model.make_utterance(text, model.make_speaker(None, None, voice))
        assert utt.prompt_ids == orpheus_prompt(voice, text)
        assert utt.prompt_ids[1] == 128000  # the tokenizer's BOS sits inside the human turn
    assert model.make_utterance("hello world.", model.make_speaker(None, None)).prompt_ids == orpheus_prompt("tara", "hello world.")
