"""Orpheus: a Llama-3.2 speech LM whose audio tokens are SNAC codes, and the SNAC 24 kHz decoder.

Two stages (`llm`, `vocoder`); no flow. The prompt format, sampling defaults and stop token follow
canopyai/Orpheus-TTS: [start-of-human] + tokenizer("{voice}: {text}") + [eot, end-of-human,
start-of-ai, start-of-speech], temperature 0.6, top-p 0.8, repetition penalty 1.3, stop at
end-of-speech (128258), at most 1200 new tokens. Audio token id = 128266 + (i mod 7) * 4096 + code.
"""

from __future__ import annotations

import os
from functools import cached_property

import torch

from models.errors import UserError
from models.family import SpeechLM, TTSModel, Utterance, require_text
from models.sampling import FrameGrammar, OrpheusSampler, OrpheusSampling, Sampler, device_generator
from models.snac import (AUDIO_TOKEN_BASE, FRAME_TOKENS, ORPHEUS_CODEBOOK, SNAC_24KHZ, SNACConfig, SNACDecoder,
                         FrameNoise, codes_to_tokens, graph_spec, load_snac, tokens_to_codes)
from models.speech_lm import ORPHEUS_STOP_TOKEN_ID, OrpheusLM, llm_graph_spec, load_orpheus_lm, read_hf_config
from models.text import ByteTokenizer, HFTokenizer, normalize_text, split_sentences
from models.transformer_lm import DecoderConfig

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
START_OF_HUMAN = 128259
END_OF_TEXT = 128009  # <|eot_id|>
PROMPT_TAIL = (END_OF_TEXT, 128260, 128261, 128257)  # end-of-human, start-of-ai, start-of-speech
BEGIN_OF_TEXT = 128000
VOICES = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
DEFAULT_VOICE = "tara"
MAX_NEW_TOKENS = 1200  # Orpheus' default max_tokens (~7 s of audio)
# frames of context on each side when a long decode is split at the vocoder graph's limit: at least
# the SNAC decoder's receptive radius (measured: a frame's codes move the audio of the 2.3 frames
# before it and 3.3 after; tests/test_snac.py checks that split == unsplit)
SNAC_CONTEXT_FRAMES = 6
GRAMMAR = FrameGrammar(AUDIO_TOKEN_BASE, FRAME_TOKENS, ORPHEUS_CODEBOOK)


class Orpheus(TTSModel):
    family = "orpheus"
    stages = ("llm", "vocoder")

    def __init__(self, name: str, source: str, llm_cfg: DecoderConfig, snac_cfg: SNACConfig, tokenizer,
                 folders: dict | None, max_frames: tuple[int, int], seed: int = 0, device: str = "cpu",
                 llm_limits: tuple[int, int, int, int] = (8, 1024, 4096, 256), vocoder_batch: int = 64):
        super().__init__(name, source, random_weights=folders is None)
        self.llm_cfg = llm_cfg
        self.snac_cfg = snac_cfg
        self.tokenizer = tokenizer
        self.folders = folders
        self.max_frames = max_frames  # (opt, max) SNAC frames per vocoder call
        self.seed = seed
        self.build_device = torch.device(device)
        self.llm_limits = llm_limits  # (max batch, max new tokens per call, max cached, typical cached)
        self.vocoder_batch = vocoder_batch  # SNAC windows per vocoder call (a serving engine packs streams)
        self.sample_rate = snac_cfg.sampling_rate
        if llm_cfg.vocab_size <= AUDIO_TOKEN_BASE + FRAME_TOKENS * ORPHEUS_CODEBOOK - 1:
            raise UserError(f"the LLM vocabulary ({llm_cfg.vocab_size}) does not hold Orpheus' audio tokens.",
                            "use an Orpheus checkpoint (vocab >= 156938)")

    # -- graphs -----------------------------------------------------------------------------------
    @cached_property
    def _specs(self):
        c = self.llm_cfg
        return {"llm": llm_graph_spec(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.vocab_size,
                                      *self.llm_limits),
                "vocoder": graph_spec(self.snac_cfg, frames=(1, self.max_frames[0], self.max_frames[1]),
                                      batch=(1, 1, self.vocoder_batch))}

    def graph_specs(self):
        return self._specs

    def graph_module(self, name: str) -> torch.nn.Module:
        if name == "llm":
            return self._lm
        if name == "vocoder":
            return self._snac
        raise KeyError(f"{self.name} has no graph {name!r}; it has {', '.join(self.graph_specs())}")

    @cached_property
    def _lm(self) -> OrpheusLM:
        if self.folders is None:
            return self.seeded_build(lambda: OrpheusLM(self.llm_cfg), 1).eval()
        return load_orpheus_lm(self.folders["llm"]).eval()

    @cached_property
    def _snac(self) -> SNACDecoder:
        if self.folders is None:
            return self.seeded_build(lambda: SNACDecoder(self.snac_cfg), 2).eval()
        return load_snac(self.folders["vocoder"]).eval()

    def describe(self) -> dict:
        return {**super().describe(), "max_frames": self.max_frames[1]}

    def stage_sources(self, stage: str) -> tuple[dict[str, str], object]:
        # the LLM reads config.json and its safetensors (one file or the shards), SNAC its own folder
        config = {"llm": self.llm_cfg, "vocoder": self.snac_cfg}[stage]
        if self.folders is None:
            return {}, config
        from models.speech_lm import _orpheus_files

        root, snac = self.folders["llm"], self.folders["vocoder"]
        if stage == "llm":
            paths = [os.path.join(root, "config.json"), *_orpheus_files(root)]
        else:
            # the weights file load_snac reads: the first of these that exists
            weights = [os.path.join(snac, n) for n in ("pytorch_model.bin", "model.safetensors")
                       if os.path.isfile(os.path.join(snac, n))]
            paths = [os.path.join(snac, "config.json"), *weights[:1]]
        return {os.path.relpath(p, root): p for p in paths}, config

    # -- front end --------------------------------------------------------------------------------
    def split_text(self, text: str, speaker: dict | None = None) -> list[str]:
        # the voice name and the prompt's specials share one LM prompt with the text (a named voice:
        # the speaker adds no more than the 32 kept for them)
        utts = split_sentences(normalize_text(require_text(text)), self.tokenizer.encode,
                               hard_max=max(self.llm_limits[1] - 32, 16))
        if not utts:
            raise UserError("the text has nothing to speak (only punctuation or symbols).", "pass some words with --text")
        return utts

    def named_voices(self) -> tuple[str, ...]:
        return VOICES

    def make_speaker(self, prompt_wav, prompt_text, voice=None) -> dict:
        if prompt_wav is not None or prompt_text is not None:
            raise UserError("Orpheus has no zero-shot cloning from a prompt recording here.",
                            f"choose a voice with --voice ({', '.join(VOICES)})")
        voice = voice or DEFAULT_VOICE
        if voice not in VOICES:
            raise UserError(f"unknown Orpheus voice {voice!r}.", f"choose one of {', '.join(VOICES)}")
        return {"voice": voice}

    def make_utterance(self, text: str, speaker: dict) -> Utterance:
        text_ids = self.tokenizer.encode(f"{speaker['voice']}: {text}")
        ids = [START_OF_HUMAN, *text_ids, *PROMPT_TAIL]
        max_batch, max_new, max_past, _ = self.llm_limits
        if len(ids) > max_new:
            raise UserError(f"the LLM prompt of a sentence is {len(ids)} tokens; this model takes {max_new} per call.",
                            "use shorter sentences")
        limit = max_past - len(ids)  # the LM's cache; long audio is decoded in windows (token2wav)
        return Utterance(text, ids, len(text_ids), 0, min(MAX_NEW_TOKENS, limit), speaker, token_limit=limit)

    # -- LLM --------------------------------------------------------------------------------------
    @cached_property
    def lm(self) -> SpeechLM:
        c = self.llm_cfg
        # logits cover the whole Llama vocabulary, so a sampled id is fed back as itself
        return SpeechLM("llm", c.num_layers, c.num_kv_heads, c.head_dim, token_offset=0,
                        stop_tokens=range(ORPHEUS_STOP_TOKEN_ID, ORPHEUS_STOP_TOKEN_ID + 1))

    def make_sampler(self, utt, generator, fixed_tokens) -> Sampler:
        # random-weight presets follow the frame grammar so their tokens always decode
        return OrpheusSampler(OrpheusSampling(stop_token_id=ORPHEUS_STOP_TOKEN_ID), utt.prompt_ids, generator,
                              grammar=GRAMMAR if self.random_weights else None, fixed=fixed_tokens is not None)

    # -- benchmark inputs ---------------------------------------------------------------------------
    def synthetic_tokens(self, n: int, generator: torch.Generator) -> list[int]:
        f = max(n // FRAME_TOKENS, 1)
        codes = [torch.randint(0, ORPHEUS_CODEBOOK, (k * f,), generator=generator) for k in (1, 2, 4)]
        return codes_to_tokens(*codes)

    def graph_sizes(self, graph: str, tokens: int, batch: int = 1) -> dict[str, int]:
        spec = self.graph_specs()[graph]
        want = {"B": batch * spec.rows_per_request, "S": 1, "P": tokens, "F": max(tokens // FRAME_TOKENS, 1)}
        return {d.name: want[d.name] for d in spec.dims}

    def token_rate(self) -> float:
        return FRAME_TOKENS * self.sample_rate / self.snac_cfg.samples_per_frame  # ~82 tokens per second

    # -- tokens -> audio ----------------------------------------------------------------------------
    def stream_decoder(self, utt, run, generator, device):
        from models.streaming import OrpheusStream

        return OrpheusStream(self, utt, run, generator, device)

    def token2wav(self, tokens, utt, run, generator, device, streaming: bool = False) -> torch.Tensor:
        c0, c1, c2, report = tokens_to_codes(tokens)
        if not report.ok:
            utt.warnings.append(f"Orpheus tokens not decoded: {report.summary()}")
        frames = c0.shape[1]
        if frames == 0:
            utt.warnings.append("no complete SNAC frame was generated, so this sentence is silent")
            return torch.zeros(0, device=device)
        noise = FrameNoise(self.snac_cfg, device_generator(generator, device), device)
        limit = self.graph_specs()["vocoder"].dim("F").max
        if frames <= limit:
            return self.decode_frames((c0, c1, c2), 0, frames, noise, run, device)
        # longer than the graph takes: windows with SNAC_CONTEXT_FRAMES of context on each side,
        # each keeping its middle (equal to one decode: the context covers the receptive field)
        ctx, spf = SNAC_CONTEXT_FRAMES, self.snac_cfg.samples_per_frame
        step = limit - 2 * ctx
        out = []
        for s in range(0, frames, step):
            e = min(s + step, frames)
            a, b = max(0, s - ctx), min(frames, e + ctx)
            audio = self.decode_frames((c0, c1, c2), a, b, noise, run, device)
            out.append(audio[(s - a) * spf:(e - a) * spf])
        return torch.cat(out)

    def decode_frames(self, codes, start: int, end: int, noise: FrameNoise, run, device) -> torch.Tensor:
        """Audio of frames [start, end) decoded on their own (codes: the utterance's three code rows)."""
        feed = {f"codes_{i}": c[:, k * start:k * end].to(device)
                for i, (c, k) in enumerate(zip(codes, self.snac_cfg.code_factors()))}
        feed.update({f"noise_{i}": n for i, n in enumerate(noise.window(start, end))})
        return run("vocoder", feed)["audio"][0]


# -- construction ------------------------------------------------------------------------------------
PRESETS = {"orpheus-tiny": ("orpheus", "tiny"), "orpheus-random": ("orpheus", "random")}


def detect(folder: str) -> str | None:
    """"orpheus" for a Hugging Face snapshot of a Llama model (the Orpheus LLM), else None."""
    import json

    cfg = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            arch = json.load(f).get("architectures") or []
    except (ValueError, OSError, AttributeError):
        return None
    return "orpheus" if any("Llama" in a for a in arch) else None


def _tiny_llm() -> DecoderConfig:
    # the real id layout (audio tokens from 128266) on a tiny body, so all token handling is the real one
    return DecoderConfig.from_hf_config({
        "model_type": "llama", "hidden_act": "silu", "vocab_size": 156940, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}})


def from_preset(name: str, family: str, size: str, device: str = "cpu", seed: int = 0) -> Orpheus:
    tokenizer = ByteTokenizer()  # text bytes land on ids 0..255 of the Llama vocabulary
    if size == "tiny":
        snac = SNACConfig(sampling_rate=24000, encoder_dim=16, encoder_rates=(2, 4, 8, 8), decoder_dim=64,
                          decoder_rates=(8, 8, 4, 2), attn_window_size=None, codebook_size=4096, codebook_dim=8,
                          vq_strides=(4, 2, 1), noise=True, depthwise=True)
        return Orpheus(name, f"preset:{name}", _tiny_llm(), snac, tokenizer, None, (16, 120), seed, device,
                       llm_limits=(2, 256, 1536, 64), vocoder_batch=8)
    llm = DecoderConfig.from_hf_config(read_hf_config(os.path.join(CONFIG_DIR, "orpheus-3b.json")))
    return Orpheus(name, f"preset:{name}", llm, SNAC_24KHZ, tokenizer, None, (64, 600), seed, device)


def from_folder(folder: str, family: str, device: str = "cpu") -> Orpheus:
    """A Hugging Face snapshot of the Orpheus LLM (config.json, *.safetensors, tokenizer.json) with
    the SNAC 24 kHz folder (config.json, pytorch_model.bin) inside it as snac/ or snac_24khz/."""
    snac_dir = next((os.path.join(folder, d) for d in ("snac", "snac_24khz") if os.path.isdir(os.path.join(folder, d))), None)
    if snac_dir is None:
        raise UserError(f"Orpheus folder {folder} has no snac/ subfolder with the SNAC 24 kHz decoder.",
                        "copy the hubertsiuzdak/snac_24khz snapshot (config.json, pytorch_model.bin) to <folder>/snac")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise UserError(f"Orpheus folder {folder} lacks tokenizer.json.", "download the complete Hugging Face snapshot")
    import json

    with open(os.path.join(snac_dir, "config.json")) as f:
        snac_cfg = SNACConfig.from_json(json.load(f))
    llm_cfg = DecoderConfig.from_hf_config(read_hf_config(folder))
    tokenizer = HFTokenizer(folder, add_bos=True)
    return Orpheus(os.path.basename(os.path.normpath(folder)), os.path.abspath(folder), llm_cfg, snac_cfg, tokenizer,
                   {"llm": folder, "vocoder": snac_dir}, (64, 600), device=device)
