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
