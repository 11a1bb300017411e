"""CosyVoice2 and CosyVoice3: configuration, presets, graphs, front end and tokens -> audio.

Both families run the same three stages (Qwen2 speech-token LM, conditional flow matching, HiFT
vocoder) and differ only in their modules, so one class serves both; the differences live in the
config (which encoder / estimator / vocoder variant) and in the graph specs (CosyVoice2's encoder
takes chunk and look-ahead inputs). An upstream model folder and the presets go through the same
path: upstream yaml hyper-parameters + a Hugging Face Qwen2 config -> module configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property

import torch

from models.checkpoint import sha256_file
from models.errors import UserError
from models.dit import DiT
from models.family import SpeechLM, TTSModel, Utterance, require_text
from models.flow import (Flow, FlowConfig, FlowSolver, SolverConfig, TokenEncoder, build_cosyvoice3_flow,
                         euler_schedule, solve_euler_cfg, upstream_noise)
from models.hift import HiFTConfig, HiFTGenerator, SourceNoise, load_hift
from models.hyperyaml import Tagged, load_hyperyaml
from models.sampling import RASSampler, Sampler, device_generator
from models.spec import Dim, GraphSpec, PadRule, TensorSpec, choice, const, integers, normal, uniform
from models.speech_lm import CosyVoiceLM, CosyVoiceLMConfig, llm_graph_spec, load_cosyvoice_lm
from models.text import COSYVOICE2_SPECIAL, COSYVOICE3_SPECIAL, ByteTokenizer, HFTokenizer, normalize_text, split_sentences

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# CosyVoice3's LM expects <|endofprompt|> after a system prompt; upstream's examples use this one
SYSTEM_PROMPT = "You are a helpful assistant.<|endofprompt|>"
END_OF_PROMPT = "<|endofprompt|>"
VOCODER_NOISE_SEED = 1986  # upstream yaml's seed; CosyVoice3's fixed source noise is drawn from it
PROMPT_MAX_SECONDS = 30
SOURCE_CACHE_FRAMES = 8  # CosyVoice2 streaming: mel / source overlap kept between chunks (upstream)


@dataclass(frozen=True)
class Limits:
    """Largest shapes the graphs accept (and engine profiles cover), with typical (opt) values."""

    max_batch: int
    llm_new: int  # tokens per LLM call (prompt prefill)
    llm_past: int  # cached tokens
    llm_past_opt: int
    flow_tokens: int  # prompt + generated speech tokens per flow call
    flow_tokens_opt: int


# the tiny graphs take 32 s of speech per sentence (800 tokens): every length the report and the
# load test ask for fits one call, as on the real sizes
TINY_LIMITS = Limits(max_batch=2, llm_new=256, llm_past=1024, llm_past_opt=64, flow_tokens=800, flow_tokens_opt=20)
# max_batch: rows per call of every graph: the serving engine packs up to this many streams' flow
# chunks into one solver call (the estimator's CFG batch is twice that)
REAL_LIMITS = Limits(max_batch=32, llm_new=512, llm_past=4096, llm_past_opt=256, flow_tokens=1500, flow_tokens_opt=100)


@dataclass(frozen=True)
class CosyVoiceConfig:
    family: str  # "cosyvoice2" | "cosyvoice3"
    lm: CosyVoiceLMConfig
    sampling: dict  # ras_sampling kwargs: top_p, top_k, win_size, tau_r
    flow: FlowConfig | tuple  # CosyVoice3: FlowConfig; CosyVoice2: (TokenEncoderConfig, UNetConfig, SolverConfig)
    hift: HiFTConfig
    limits: Limits
    sample_rate: int = 24000
    token_mel_ratio: int = 2

    @property
    def flow_frames_max(self) -> int:
        return self.limits.flow_tokens * self.token_mel_ratio


# -- config parsing ----------------------------------------------------------------------------------
def _kw(node) -> dict:
    """kwargs of a Tagged node without nested module nodes."""
    return {k: v for k, v in node.kwargs.items() if not isinstance(v, Tagged)}


def config_from_upstream(family: str, yaml_cfg: dict, qwen: dict, limits: Limits, source: str) -> CosyVoiceConfig:
    """Module configs from an upstream yaml (parsed by models.hyperyaml) and the Qwen2 HF config."""
    want_lm = {"cosyvoice2": "Qwen2LM", "cosyvoice3": "CosyVoice3LM"}[family]
    try:
        llm, flow, hift = yaml_cfg["llm"], yaml_cfg["flow"], yaml_cfg["hift"]
    except KeyError as e:
        raise UserError(f"config {source} has no {e.args[0]!r} entry.", "use the model's own upstream yaml") from None
    if not isinstance(llm, Tagged) or llm.class_name != want_lm:
        got = llm.class_name if isinstance(llm, Tagged) else type(llm).__name__
        other = "cosyvoice3" if got == "CosyVoice3LM" else "cosyvoice2" if got == "Qwen2LM" else "another model"
        raise UserError(f"config {source} describes a {got} model ({other}), not {family}.",
                        f"use the {family}.yaml that belongs to this model folder")
    sampling = llm.kwargs.get("sampling")
    sampling = dict(sampling.kwargs) if isinstance(sampling, Tagged) else {}
    lm = CosyVoiceLMConfig.from_hf_config(qwen, llm.kwargs["speech_token_size"], family)
    decoder = flow.kwargs["decoder"]
    cfm = decoder.kwargs.get("cfm_params")
    cfm = cfm.kwargs.get("content", cfm.kwargs) if isinstance(cfm, Tagged) else (cfm or {})
    estimator = decoder.kwargs["estimator"]
    if family == "cosyvoice3":
        flow_cfg = FlowConfig.from_upstream({
            "flow": _kw(flow), "flow.pre_lookahead_layer": _kw(flow.kwargs["pre_lookahead_layer"]),
            "flow.decoder": {**_kw(decoder), "cfm_params": cfm}, "flow.decoder.estimator": _kw(estimator)})
    else:
        from models.conformer import TokenEncoderConfig
        from models.unet import UNetConfig

        flow_cfg = (TokenEncoderConfig.from_upstream(_kw(flow), _kw(flow.kwargs["encoder"])),
                    UNetConfig.from_upstream(_kw(estimator)), SolverConfig.from_upstream(cfm))
    f0 = hift.kwargs["f0_predictor"]
    hift_cfg = HiFTConfig.from_upstream(_kw(hift), _kw(f0), causal=family == "cosyvoice3")
    return CosyVoiceConfig(family, lm, sampling, flow_cfg, hift_cfg, limits,
                           sample_rate=int(yaml_cfg.get("sample_rate", 24000)),
                           token_mel_ratio=int(yaml_cfg.get("token_mel_ratio", 2)))


def _tiny(cfg: dict, family: str) -> tuple[dict, dict]:
    """Shrink the upstream yaml + Qwen config to a model that runs in seconds on a CPU."""
    qwen = {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "tie_word_embeddings": True, "max_position_embeddings": 32768}
    speech_vocab = 512
    llm, flow, hift = cfg["llm"], cfg["flow"], cfg["hift"]
    llm.kwargs.update(llm_input_size=64, llm_output_size=64, speech_token_size=speech_vocab)
    flow.kwargs["vocab_size"] = speech_vocab
    est = flow.kwargs["decoder"].kwargs["estimator"].kwargs
    if family == "cosyvoice3":
        flow.kwargs["pre_lookahead_layer"].kwargs["channels"] = 64
        est.update(dim=64, depth=2, heads=2, dim_head=32)
    else:
        flow.kwargs["input_size"] = 32
        flow.kwargs["encoder"].kwargs.update(input_size=32, output_size=32, attention_heads=2, linear_units=64, num_blocks=2)
        est.update(channels=[16], attention_head_dim=16, n_blocks=1, num_mid_blocks=2, num_heads=2)
    hift.kwargs["base_channels"] = 32
    hift.kwargs["f0_predictor"].kwargs["cond_channels"] = 32
    return cfg, qwen


# -- the family ----------------------------------------------------------------------------------------
class CosyVoice(TTSModel):
    stages = ("llm", "flow", "vocoder")
    # flow_mode "solver": the whole 10-step CFG solve is one graph; "steps": the host runs the Euler
    # loop and calls the estimator graph once per step (upstream's layout, kept for comparison);
    # "prefix" (CosyVoice3, streaming, torch flow backend): each chunk solves its new frames only,
    # against the keys / values the DiT kept of the chunks before (models/dit.py DiTPrefix); offline
    # it is "solver"
    @property
    def options(self) -> dict:
        modes = ("solver", "steps", "prefix") if self.family == "cosyvoice3" else ("solver", "steps")
        return {"flow_mode": modes}

    def __init__(self, name: str, source: str, cfg: CosyVoiceConfig, files: dict[str, str] | None,
                 tokenizer, seed: int = 0, device: str = "cpu", folder: str | None = None):
        super().__init__(name, source, random_weights=files is None)
        self.family = cfg.family
        self.cfg = cfg
        self.files = files  # stage -> checkpoint path (None: seeded random weights)
        self.tokenizer = tokenizer
        self.seed = seed
        self.build_device = torch.device(device)
        self.folder = folder
        self.sample_rate = cfg.sample_rate
        self._noise_cache: dict = {}

    # -- graphs -----------------------------------------------------------------------------------
    def graph_specs(self) -> dict[str, GraphSpec]:
        return self._specs

    @cached_property
    def _specs(self) -> dict[str, GraphSpec]:
        c, lim = self.cfg, self.cfg.limits
        dec = c.lm.decoder
        specs = {"llm": llm_graph_spec(dec.num_layers, dec.num_heads, dec.num_kv_heads, dec.head_dim, c.lm.input_vocab,
                                       c.lm.speech_rows, lim.max_batch, lim.llm_new, lim.llm_past, lim.llm_past_opt)}
        r = c.token_mel_ratio
        B = Dim("B", 1, 1, lim.max_batch, "batch")
        N = Dim("N", 4, lim.flow_tokens_opt, lim.flow_tokens, "speech tokens per flow call (prompt included)")
        T = Dim("T", 4, lim.flow_tokens_opt * r, lim.flow_tokens * r, "mel frames")
        CB = Dim("B", 2, 2, 2 * lim.max_batch, "estimator batch (conditional + unconditional rows)")
        mel = lambda name, b="B": TensorSpec(name, "float32", (b, 80, "T"), normal(1.0))
        chunk = TensorSpec("chunk_frames", "int64", (1,), choice(0, 2 * self._chunk_tokens),
                           doc="0 = offline, else streaming chunk in mel frames")
        enc_inputs = [TensorSpec("tokens", "int64", ("B", "N"), integers(0, self._flow_vocab), doc="-1 = padding"),
                      TensorSpec("embedding", "float32", ("B", 192), normal(1.0))]
        if c.family == "cosyvoice2":
            enc_inputs += [TensorSpec("chunk_tokens", "int64", (1,), choice(0, self._chunk_tokens)),
                           TensorSpec("context_tokens", "int64", (1,), choice(0, 3), doc="look-ahead-only tail")]
        # Padding rules (the compile backend buckets these dims; tests/test_compiled.py checks each):
        # the token encoders treat -1 as padding (CosyVoice3's pre-lookahead conv sees zero
        # embeddings past the end either way; CosyVoice2's conformer masks padded tokens); the DiT
        # masks attention keys with `mask`, its position conv is causal, and the U-Net multiplies
        # every block by the mask with causal convs, so frames < T never see a padded frame.
        # The vocoders have none: zero-padded mel changes the last frame(s) of audio.
        encoder_sensitive = TokenEncoder.SENSITIVE_PARTS
        # attention scores per call (GraphSpec.largest): CosyVoice2's conformer attends over the
        # upsampled frames T = N*r, and its relative-position scores are padded to [B, H, T, 2T] before
        # the shift (conformer.rel_shift: twice the [B, H, T, T] scores; counting those alone let 29 rows
        # of 3000 frames into one call, 4.2e9 elements; the fp16 build then failed in ORT with an illegal
        # memory access); CosyVoice3's token encoder has no attention; the estimators attend over T (the
        # solver runs each request's conditional and unconditional rows together)
        if c.family == "cosyvoice3":
            enc_scores, est_heads = "", c.flow.estimator.heads
        else:
            enc_scores, est_heads = f"B*{c.flow[0].encoder.attention_heads}*(N*{r})*(2*N*{r})", c.flow[1].num_heads
        estimator_sensitive = DiT.SENSITIVE_PARTS if c.family == "cosyvoice3" else ()
        specs["flow_encoder"] = GraphSpec(
            "flow_encoder", "flow", tuple(enc_inputs),
            (TensorSpec("mu", "float32", ("B", 80, f"N*{r}")), TensorSpec("spks", "float32", ("B", 80))), (B, N),
            pad=PadRule("N", {"tokens": -1}), sensitive_scopes=encoder_sensitive, largest=enc_scores)
        specs["flow_estimator"] = GraphSpec(
            "flow_estimator", "flow",
            (mel("x"), TensorSpec("mask", "float32", ("B", 1, "T"), const(1)), mel("mu"),
             TensorSpec("t", "float32", ("B",), uniform(0, 1)), TensorSpec("spks", "float32", ("B", 80), normal(1.0)),
             mel("cond"), chunk),
            (TensorSpec("velocity", "float32", ("B", 80, "T")),), (CB, T),
            pad=PadRule("T", {"mask": 0.0}), sensitive_scopes=estimator_sensitive, rows_per_request=2,
            largest=f"B*{est_heads}*T*T")
        specs["flow_solver"] = GraphSpec(
            "flow_solver", "flow",
            (mel("z"), TensorSpec("mask", "float32", ("B", 1, "T"), const(1)), mel("mu"),
             TensorSpec("spks", "float32", ("B", 80), normal(1.0)), mel("cond"), chunk),
            (TensorSpec("mel", "float32", ("B", 80, "T")),), (B, T),
            pad=PadRule("T", {"mask": 0.0}), fp32_inputs=frozenset({"z"}), fp32_scopes=FlowSolver.FP32_PARTS,
            sensitive_scopes=estimator_sensitive, compiled_part="estimator", largest=f"2*B*{est_heads}*T*T")
        hop = c.hift.samples_per_frame
        noise_fill = uniform(0, 1) if c.hift.causal else normal(1.0)
        voc_in = [TensorSpec("mel", "float32", ("B", 80, "T"), normal(2.0, -6.0)),
                  TensorSpec("noise", "float32", ("B", f"T*{hop}", 9), noise_fill)]
        voc_out = [TensorSpec("audio", "float32", ("B", f"T*{hop}"))]
        # the vocoder runs any length (one frame too); the flow graphs' minimum comes from their
        # export and is met by padding (their pad rules)
        voc_dims = [B, Dim("T", 1, T.opt, T.max, T.doc)]
        if not c.hift.causal:  # CosyVoice2 streaming carries the NSF source across chunks
            voc_in.append(TensorSpec("source_prefix", "float32", ("B", 1, "C"), normal(0.1),
                                     doc="previous chunk's last source samples (0 offline)"))
            voc_out.append(TensorSpec("source", "float32", ("B", 1, f"T*{hop}")))
            voc_dims.append(Dim("C", 0, 0, SOURCE_CACHE_FRAMES * hop, "cached source samples"))
        # the f0 predictor reads the mel and the source reads the noise in float32 (HiFT's islands)
        specs["vocoder"] = GraphSpec("vocoder", "vocoder", tuple(voc_in), tuple(voc_out), tuple(voc_dims),
                                     fp32_inputs=frozenset(t.name for t in voc_in),
                                     fp32_scopes=HiFTGenerator.FP32_PARTS)
        return specs

    @property
    def solver_config(self) -> SolverConfig:
        return self.cfg.flow.solver if self.family == "cosyvoice3" else self.cfg.flow[2]

    def stage_graphs(self, options: dict | None = None) -> dict[str, list[str]]:
        flow = "flow_estimator" if self.resolve_options(options)["flow_mode"] == "steps" else "flow_solver"
        return {"llm": ["llm"], "flow": ["flow_encoder", flow], "vocoder": ["vocoder"]}

    def graph_module(self, name: str) -> torch.nn.Module:
        if name == "llm":
            return self._lm
        if name == "flow_encoder":
            return self._flow.token_encoder
        if name == "flow_solver":
            return self._flow.decoder
        if name == "flow_estimator":
            return self._flow.decoder.estimator
        if name == "vocoder":
            return self._hift if self.cfg.hift.causal else self._hift_with_source_cache
        raise KeyError(f"{self.name} has no graph {name!r}; it has {', '.join(self.graph_specs())}")

    @cached_property
    def _lm(self) -> CosyVoiceLM:
        if self.files is None:
            return self.seeded_build(lambda: CosyVoiceLM(self.cfg.lm), 1).eval()
        return load_cosyvoice_lm(self.files["llm"], self.cfg.lm).eval()

    @cached_property
    def _flow(self) -> Flow:
        def build():
            if self.family == "cosyvoice3":
                return build_cosyvoice3_flow(self.cfg.flow)
            return build_cosyvoice2_flow(*self.cfg.flow)

        flow = self.seeded_build(build, 2) if self.files is None else build()
        if self.files is not None:
            flow.load_checkpoint(self.files["flow"])
        return flow.eval()

    @cached_property
    def _hift_with_source_cache(self) -> "HiFTSourceCache":
        return HiFTSourceCache(self._hift).eval()

    @cached_property
    def _hift(self) -> HiFTGenerator:
        if self.files is None:
            return self.seeded_build(lambda: HiFTGenerator(self.cfg.hift), 3).eval()
        return load_hift(self.cfg.hift, self.files["vocoder"]).eval()

    def checkpoint_hashes(self) -> dict[str, str]:
        return {} if self.files is None else {k: sha256_file(p) for k, p in self.files.items()}

    def stage_sources(self, stage: str) -> tuple[dict[str, str], object]:
        # the stage's checkpoint and the yaml every stage's hyper-parameters come from (the LM also
        # reads the Qwen config); the token -> mel ratio shapes the flow graphs beyond FlowConfig
        config = {"llm": self.cfg.lm, "flow": (self.cfg.flow, self.cfg.token_mel_ratio), "vocoder": self.cfg.hift}[stage]
        if self.files is None:
            return {}, config
        names = {f"{self.family}.yaml": None, os.path.basename(self.files[stage]): self.files[stage]}
        if stage == "llm":
            names["CosyVoice-BlankEN/config.json"] = None
        return {n: p or os.path.join(self.folder, n) for n, p in names.items()}, config

    def describe(self) -> dict:
        d = super().describe()
        d.update(limits=self.cfg.limits.__dict__, speech_token_size=self.cfg.lm.speech_token_size)
        return d

    @property
    def _chunk_tokens(self) -> int:
        return 25  # upstream streaming chunk (tokens); the estimators' static chunk is 2x in frames

    @property
    def _flow_vocab(self) -> int:
        return self.cfg.flow.vocab_size if self.family == "cosyvoice3" else self.cfg.flow[0].vocab_size

    # -- front end --------------------------------------------------------------------------------
    MIN_SENTENCE_TOKENS = 16  # the shortest sentence room a speaker's prompt may leave

    def split_text(self, text: str, speaker: dict | None = None) -> list[str]:
        text = normalize_text(require_text(text))
        # a sentence's text must leave room in one LM prompt for the specials and the speaker's prompt
        # (a cloned voice's transcript and speech tokens: 25 per second of recording)
        utts = split_sentences(text, self.tokenizer.encode, hard_max=self.sentence_room(speaker))
        if not utts:
            raise UserError("the text has nothing to speak (only punctuation or symbols).", "pass some words with --text")
        return utts

    def sentence_room(self, speaker: dict | None = None) -> int:
        """Text tokens one sentence may have in the LM prompt beside `speaker`'s prompt (without a
        speaker: room for the specials and a short prompt transcript). UserError when a speaker's
        prompt leaves less than MIN_SENTENCE_TOKENS."""
        llm_new = self.cfg.limits.llm_new
        if speaker is None:
            return max(llm_new - 64, self.MIN_SENTENCE_TOKENS)
        taken = self.cfg.lm.prompt_ids([], speaker["prompt_text_ids"], speaker["llm_prompt_tokens"]).numel()
        room = llm_new - taken - 8  # 8: text pieces encoded apart can take a few tokens more than together
        if room < self.MIN_SENTENCE_TOKENS:
            raise UserError(f"the voice's prompt takes {taken} of the {llm_new} tokens of one LM prompt, leaving "
                            f"{max(room, 0)} for a sentence.", "use a shorter prompt recording or transcript")
        return min(room, max(llm_new - 64, self.MIN_SENTENCE_TOKENS))  # a short prompt splits as without one

    @property
    def zero_shot(self) -> bool:
        version = "v3" if self.family == "cosyvoice3" else "v2"
        return self.folder is not None and all(os.path.isfile(os.path.join(self.folder, f))
                                               for f in ("campplus.onnx", f"speech_tokenizer_{version}.onnx"))

    def make_speaker(self, prompt_wav: str | None, prompt_text: str | None, voice: str | None = None) -> dict:
        if voice is not None:
            raise UserError(f"{self.family} has no named voices.", "clone a voice with --prompt-wav (and --prompt-text) instead")
        speaker = {"embedding": torch.zeros(1, 192), "prompt_tokens": [], "llm_prompt_tokens": [],
                   "prompt_mel": torch.zeros(1, 0, 80), "prompt_text_ids": []}
        if prompt_wav is None:
            if prompt_text:
                raise UserError("--prompt-text was given without --prompt-wav.", "pass the recording with --prompt-wav")
        else:
            speaker.update(self._zero_shot(prompt_wav))
            if prompt_text:  # zero-shot: the LLM continues the prompt; without text: cross-lingual mode
                speaker["llm_prompt_tokens"] = speaker["prompt_tokens"]
        prefix = prompt_text or ""
        if self.family == "cosyvoice3" and self.tokenizer.token_id(END_OF_PROMPT) is not None and END_OF_PROMPT not in prefix:
            prefix = SYSTEM_PROMPT + prefix  # upstream CosyVoice3 refuses text without <|endofprompt|>
        speaker["prompt_text_ids"] = self.tokenizer.encode(prefix) if prefix else []
        return speaker

    def _zero_shot(self, prompt_wav: str) -> dict:
        import numpy as np

        from models.audio import cosyvoice_mel, kaldi_fbank, load_wav, whisper_log_mel

        version = "v3" if self.family == "cosyvoice3" else "v2"
        need = ["campplus.onnx", f"speech_tokenizer_{version}.onnx"]
        missing = [f for f in need if self.folder is None or not os.path.isfile(os.path.join(self.folder, f))]
        if missing:
            where = f"the model folder {self.folder}" if self.folder else f"the preset {self.name}"
            raise UserError(f"zero-shot cloning needs {' and '.join(missing)}, which {where} does not have.",
                            "use an upstream model folder that contains them, or leave out --prompt-wav")
        import onnxruntime as ort

        wav16 = load_wav(prompt_wav, 16000)
        if wav16.shape[1] > PROMPT_MAX_SECONDS * 16000:
            raise UserError(f"the prompt recording is {wav16.shape[1] / 16000:.1f} s long; at most {PROMPT_MAX_SECONDS} s are supported.",
                            "trim the prompt to a few seconds of clean speech")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        tok_sess = ort.InferenceSession(os.path.join(self.folder, need[1]), opts, providers=["CPUExecutionProvider"])
        feat = whisper_log_mel(wav16, 128).numpy()
        ins = tok_sess.get_inputs()
        tokens = tok_sess.run(None, {ins[0].name: feat, ins[1].name: np.array([feat.shape[2]], dtype=np.int32)})[0]
        tokens = [int(t) for t in tokens.reshape(-1)]
        spk_sess = ort.InferenceSession(os.path.join(self.folder, need[0]), opts, providers=["CPUExecutionProvider"])
        fbank = kaldi_fbank(wav16)
        fbank = fbank - fbank.mean(dim=0, keepdim=True)
        emb = spk_sess.run(None, {spk_sess.get_inputs()[0].name: fbank.unsqueeze(0).numpy()})[0]
        wav24 = load_wav(prompt_wav, self.sample_rate)
        mel = cosyvoice_mel(wav24, self.sample_rate, fmax=8000 if self.family == "cosyvoice2" else None)  # [1, 80, F]
        n = min(mel.shape[2] // self.cfg.token_mel_ratio, len(tokens))  # upstream: force frames = 2 x tokens
        return {"embedding": torch.from_numpy(emb.reshape(1, -1).astype(np.float32)), "prompt_tokens": tokens[:n],
                "prompt_mel": mel[:, :, : n * self.cfg.token_mel_ratio].transpose(1, 2).contiguous()}

    def make_utterance(self, text: str, speaker: dict) -> Utterance:
        text_ids = self.tokenizer.encode(text)
        ids = self.cfg.lm.prompt_ids(text_ids, speaker["prompt_text_ids"], speaker["llm_prompt_tokens"])
        lim = self.cfg.limits
        if ids.numel() > lim.llm_new:
            raise UserError(f"the LLM prompt of a sentence is {ids.numel()} tokens; this model takes {lim.llm_new} per "
                            f"call.", "use a shorter prompt transcript or recording, or shorter sentences")
        lo, hi = self.cfg.lm.length_limits(len(text_ids))
        # what the graphs take: the speech tokens of one flow call (prompt speech included) and the
        # LM's cache; the family's 20x-text rule is capped there (a cap reached is said as a warning)
        limit = min(lim.flow_tokens - len(speaker["prompt_tokens"]), lim.llm_past - ids.numel())
        if limit < 1:
            raise UserError(f"the prompt speech ({len(speaker['prompt_tokens'])} tokens) leaves no room in one flow "
                            f"call of {lim.flow_tokens} tokens.", "use a shorter prompt recording")
        return Utterance(text, ids.reshape(-1).tolist(), len(text_ids), min(lo, limit), min(hi, limit), speaker,
                         token_limit=limit)

    # -- LLM --------------------------------------------------------------------------------------
    @cached_property
    def lm(self) -> SpeechLM:
        d, lm = self.cfg.lm.decoder, self.cfg.lm
        # every logit index >= speech_token_size stops (eos, sos, task, fill ...); a sampled index s
        # is fed back as the speech-table input id text_vocab + s
        return SpeechLM("llm", d.num_layers, d.num_kv_heads, d.head_dim, token_offset=lm.speech_id(0),
                        stop_tokens=range(lm.speech_token_size, lm.speech_rows))

    def make_sampler(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None) -> Sampler:
        return RASSampler(self.cfg.lm.speech_token_size, self.cfg.sampling, utt.min_tokens, generator, fixed_tokens is not None)

    # -- benchmark inputs ---------------------------------------------------------------------------
    def synthetic_tokens(self, n: int, generator: torch.Generator) -> list[int]:
        return [int(x) for x in torch.randint(0, min(100, self._flow_vocab), (n,), generator=generator)]

    def graph_sizes(self, graph: str, tokens: int, batch: int = 1) -> dict[str, int]:
        spec = self.graph_specs()[graph]
        want = {"B": batch * spec.rows_per_request, "N": tokens, "T": tokens * self.cfg.token_mel_ratio,
                "S": 1, "P": tokens, "C": 0}
        return {d.name: want[d.name] for d in spec.dims}

    # -- tokens -> audio ----------------------------------------------------------------------------
    def _noises(self, device: torch.device):
        key = str(device)
        if key not in self._noise_cache:
            frames = self.cfg.flow_frames_max
            self._noise_cache[key] = (
                upstream_noise(80, 15000)[:, :, :frames].to(device),
                SourceNoise.for_config(self.cfg.hift, seed=VOCODER_NOISE_SEED,
                                       max_samples=frames * self.cfg.hift.samples_per_frame, device=device))
        return self._noise_cache[key]

    def feed(self, graph: str, **values) -> dict:
        """The inputs graph `graph` declares, picked from `values` (families share call sites)."""
        return {t.name: values[t.name] for t in self.graph_specs()[graph].inputs}

    def token2wav(self, tokens, utt, run, generator, device, streaming: bool = False) -> torch.Tensor:
        """Audio for all of `tokens`. `streaming` uses upstream's streaming attention (static chunks)
        so the result equals the concatenated chunks of `stream_decoder` (CosyVoice3; see it)."""
        mel = self.token2mel(tokens, utt.speaker, run, device, streaming=streaming, finalize=True)
        return self.vocode(mel, run, generator, device)[0]

    def token2wav_batch(self, token_lists, utts, run, generator, device) -> list[torch.Tensor]:
        """Several requests through one flow call (right-padded, masked: each row's frames equal its
        own batch-1 result) and vocoder calls shared by rows of equal length (padding would change the
        last frames of a vocoder row, so unequal rows are vocoded apart)."""
        mels = self.token2mel_batch(token_lists, [u.speaker for u in utts], run, device, streaming=False, finalize=True)
        audio: list = [None] * len(mels)
        by_length: dict[int, list[int]] = {}
        for i, m in enumerate(mels):
            by_length.setdefault(m.shape[2], []).append(i)
        for rows in by_length.values():
            batch = torch.cat([mels[i] for i in rows], dim=0)
            out = self.vocode(batch, run, generator, device)[0]
            for k, i in enumerate(rows):
                audio[i] = out[k] if out.dim() == 2 else out
        return audio

    def token2mel(self, tokens, spk: dict, run, device, streaming: bool, finalize: bool) -> torch.Tensor:
        """Upstream `flow.inference`: mel [1, 80, frames] for prompt + `tokens`, prompt frames removed.
        finalize=False: the last pre_lookahead_len tokens are look-ahead context only (no frames)."""
        return self.token2mel_batch([tokens], [spk], run, device, streaming, finalize)[0]

    def token2mel_batch(self, token_lists, speakers, run, device, streaming: bool, finalize: bool) -> list[torch.Tensor]:
        r = self.cfg.token_mel_ratio
        rows = [list(spk["prompt_tokens"]) + list(t) for spk, t in zip(speakers, token_lists)]
        width = max(len(x) for x in rows)
        ids = torch.tensor([x + [-1] * (width - len(x)) for x in rows], dtype=torch.int64, device=device)  # -1 = padding
        chunk = self._chunk_tokens if streaming else 0
        context = 0 if finalize else self.lookahead
        as_tensor = lambda v: torch.tensor([v], dtype=torch.int64, device=device)  # noqa: E731
        embedding = torch.cat([spk["embedding"] for spk in speakers]).to(device)
        enc = run("flow_encoder", self.feed("flow_encoder", tokens=ids, embedding=embedding,
                                            chunk_tokens=as_tensor(chunk), context_tokens=as_tensor(context)))
        lengths = [(len(x) - context) * r for x in rows]  # valid mel frames per row
        frames = max(lengths)
        mu, spks = enc["mu"][:, :, :frames].contiguous(), enc["spks"]
        z_table, _ = self._noises(device)
        if frames > z_table.shape[2]:
            raise UserError(f"{frames} mel frames exceed the {z_table.shape[2]} this model is set up for.",
                            "synthesize shorter sentences")
        B = len(rows)
        cond = torch.zeros(B, 80, frames, device=device)
        mask = torch.zeros(B, 1, frames, device=device)
        for i, (spk, n) in enumerate(zip(speakers, lengths)):
            cond[i, :, : spk["prompt_mel"].shape[1]] = spk["prompt_mel"][0].to(device).transpose(0, 1)
            mask[i, :, :n] = 1
        z = z_table[:, :, :frames].expand(B, -1, -1).contiguous()
        chunk_frames = as_tensor(chunk * r)
        if run.options["flow_mode"] != "steps":
            mel = run("flow_solver", self.feed("flow_solver", z=z, mask=mask, mu=mu, spks=spks, cond=cond,
                                               chunk_frames=chunk_frames))["mel"]
        else:
            t_steps, dt_steps = (x.to(device) for x in euler_schedule(self.solver_config))

            def estimate(x, mask, mu, t, spks, cond, chunk_frames):
                return run("flow_estimator", self.feed("flow_estimator", x=x, mask=mask, mu=mu, t=t, spks=spks,
                                                       cond=cond, chunk_frames=chunk_frames))["velocity"]

            mel = solve_euler_cfg(estimate, self.solver_config, t_steps, dt_steps, z, mask, mu, spks, cond, chunk_frames)
        return [mel[i:i + 1, :, spk["prompt_mel"].shape[1]:n].contiguous() for i, (spk, n) in enumerate(zip(speakers, lengths))]

    def token2mel_after_prefix(self, tokens, spk: dict, run, device, finalize: bool, state: dict) -> torch.Tensor:
        """Streaming's next mel frames (flow_mode "prefix"): the encoder on every token so far (a
        small graph), the solver on the frames after `state["frames"]` only, against the prefixes the
        DiT kept of those (`state["prefixes"]`, one per Euler step; both updated here). Equal to the
        matching frames of `token2mel(..., streaming=True)`; earlier calls must have ended on whole
        chunks (the streaming hops do). The solve goes through `run.batched`, so a serving engine
        solves many streams' chunks in one call (`solve_after_prefix`)."""
        solver = run.module("flow_solver")
        if solver is None:
            raise UserError("flow_mode prefix runs the flow's own module and keeps its state per stream; "
                            "this flow backend has none.", "use flow=torch, cudagraph or compile with flow_mode prefix")
        r = self.cfg.token_mel_ratio
        row = list(spk["prompt_tokens"]) + list(tokens)
        context = 0 if finalize else self.lookahead
        as_tensor = lambda v: torch.tensor([v], dtype=torch.int64, device=device)  # noqa: E731
        enc = run("flow_encoder", self.feed("flow_encoder", tokens=torch.tensor([row], dtype=torch.int64, device=device),
                                            embedding=spk["embedding"].to(device),
                                            chunk_tokens=as_tensor(self._chunk_tokens), context_tokens=as_tensor(context)))
        start, frames = state.get("frames", 0), (len(row) - context) * r
        z_table, _ = self._noises(device)
        if frames > z_table.shape[2]:
            raise UserError(f"{frames} mel frames exceed the {z_table.shape[2]} this model is set up for.",
                            "synthesize shorter sentences")
        prompt = spk["prompt_mel"][0].to(device).transpose(0, 1)  # [80, prompt frames]
        cond = torch.zeros(1, 80, frames - start, device=device)
        if start < prompt.shape[1]:
            cond[0, :, : prompt.shape[1] - start] = prompt[:, start:frames]
        from models.dit import _check_whole_chunks, dit_forward_rows_into

        # the DiT's forward as the flow's backend runs a function of its module (compiled by `compile`,
        # replayed as CUDA graphs per padded shape by `cudagraph`)
        forward = run.compiled("flow_solver", dit_forward_rows_into) if hasattr(run, "compiled") else dit_forward_rows_into
        # checked here, not in the shared solve: a stream's own mistake must not fail its round's others
        _check_whole_chunks(start, self._chunk_tokens * r)
        item = PrefixSolve(solver, forward, z_table[:, :, start:frames], enc["mu"][:, :, start:frames], enc["spks"],
                           cond, state, keep=not finalize)
        batched = getattr(run, "batched", None)
        if batched is not None:
            # grouped by new frames: the solve pads every row to the most new frames (its cost), and only
            # its attention reads the kept frames
            mel = batched("flow_solver", self.solve_after_prefix, item, frames - start)
        else:  # a GraphRunner of the family protocol's minimum: the stream alone
            with run.timed("flow_solver"):
                mel = self.solve_after_prefix([item])[0]
        state["frames"] = frames
        return mel[:, :, max(prompt.shape[1] - start, 0):].float()

    @staticmethod
    def prefix_bytes_per_frame(solver) -> int:
        """What flow_mode prefix keeps per mel frame of a stream, given the flow solver's eager module:
        keys and values of every DiT layer for both CFG rows at every Euler step (the convolution
        histories add a constant 60 frames' worth of one layer's input)."""
        dit = solver.estimator
        size = next(dit.parameters()).element_size()
        return solver.cfg.n_timesteps * len(dit.transformer_blocks) * 2 * 2 * dit.cfg.heads * dit.cfg.dim_head * size

    def solve_after_prefix(self, items: list["PrefixSolve"]) -> list[torch.Tensor]:
        """The new frames of several streams' chunks in one solve (models.flow.solve_euler_cfg_streams),
        each against its own kept prefix; every item's `state["prefixes"]` is replaced here by the
        extended ones (taken out first: the solve lets the old ones go step by step; after a failed
        solve the state holds none and the stream recomputes), or dropped for an item that keeps
        nothing (its last chunk). Items share one solver module (the same graph's)."""
        from models.dit import DiTPrefix
        from models.flow import solve_euler_cfg_streams

        solver = items[0].solver
        dit = solver.estimator
        dtype = next(dit.parameters()).dtype
        device = items[0].z.device
        lengths = [it.z.shape[2] for it in items]
        N = max(lengths)

        def padded(name, dtype=dtype):
            out = torch.zeros(len(items), 80, N, device=device, dtype=dtype)
            for b, it in enumerate(items):
                out[b, :, : lengths[b]] = getattr(it, name)[0]
            return out

        steps = solver.cfg.n_timesteps
        # the empty prefixes too in inference mode: like the kept ones, so a compiled forward sees one
        # kind of tensor (its guards on the dispatch keys would compile it twice)
        with torch.inference_mode():
            prefixes = [it.state.pop("prefixes", None) or [DiTPrefix.empty(dit, 2, device, dtype) for _ in range(steps)]
                        for it in items]
            mel, extended = solve_euler_cfg_streams(
                dit, solver.cfg, solver.t_steps, solver.dt_steps, padded("z", torch.float32), padded("mu"),
                torch.cat([it.spks for it in items]).to(dtype), padded("cond"), prefixes, lengths,
                self._chunk_tokens * self.cfg.token_mel_ratio, forward=items[0].forward, keep=[it.keep for it in items])
        for it, kept in zip(items, extended):
            if kept is not None:
                it.state["prefixes"] = kept
        return [mel[b: b + 1, :, : lengths[b]] for b in range(len(items))]

    def vocode(self, mel, run, generator, device, source_prefix: torch.Tensor | None = None):
        """(audio [samples], source [1, 1, samples] or None): the vocoder graph on `mel`. CosyVoice2's
        streaming overrides the start of the NSF source with the previous chunk's (`source_prefix`)."""
        _, source_noise = self._noises(device)
        B = mel.shape[0]
        noise = source_noise.draw(B, mel.shape[2] * self.cfg.hift.samples_per_frame,
                                  device_generator(generator, device)).to(device).contiguous()
        prefix = source_prefix if source_prefix is not None else torch.zeros(B, 1, 0, device=device)
        out = run("vocoder", self.feed("vocoder", mel=mel, noise=noise, source_prefix=prefix))
        return (out["audio"][0] if B == 1 else out["audio"]), out.get("source")

    @property
    def lookahead(self) -> int:
        return self.cfg.flow.pre_lookahead_len if self.family == "cosyvoice3" else self.cfg.flow[0].pre_lookahead_len

    def stream_decoder(self, utt, run, generator, device):
        from models.streaming import CosyVoiceStream

        return CosyVoiceStream(self, utt, run, generator, device)


@dataclass
class PrefixSolve:
    """One stream's chunk for `solve_after_prefix`: the solver module and the DiT forward to run
    (`models.dit.dit_forward_rows_into`, compiled, captured or as it is), its new frames' noise,
    encoder output and condition ([1, 80, n]), its speaker vector [1, 80], the state holding its kept prefixes, and
    whether to keep them extended (not after the stream's last chunk)."""

    solver: torch.nn.Module
    forward: object
    z: torch.Tensor
    mu: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    state: dict
    keep: bool = True


class HiFTSourceCache(torch.nn.Module):
    """CosyVoice2's vocoder graph: HiFT whose NSF source can start with the previous chunk's source
    (upstream `cache_source`, for phase continuity across streaming chunks) and that returns the source
    for the next chunk. `source_prefix` has 0 samples offline."""

    def __init__(self, hift: HiFTGenerator):
        super().__init__()
        self.hift = hift

    def forward(self, mel, noise, source_prefix):
        source = self.hift.source(self.hift.f0(mel), noise)
        n = source_prefix.shape[2]
        # tells the exporter the slice below cannot be empty-clamped: without it torch 2.11's
        # torch.export gives the cut source a data-dependent length and fails on the next conv
        torch._check(n <= source.shape[2])
        source = torch.cat([source_prefix.to(source.dtype), source[:, :, n:]], dim=2)
        return self.hift.decode(mel, source), source


def build_cosyvoice2_flow(enc_cfg, unet_cfg, solver_cfg) -> Flow:
    from models.conformer import CosyVoice2TokenEncoder
    from models.unet import CausalConditionalDecoder

    encoder = CosyVoice2TokenEncoder(enc_cfg)

    def encode(tokens, embedding, streaming, finalize):
        # upstream passes the last pre_lookahead_len tokens as look-ahead context when not finalizing
        context = 0 if finalize else enc_cfg.pre_lookahead_len
        chunk = enc_cfg.encoder.static_chunk_size if streaming else 0
        dev = tokens.device
        mu, spks = encoder(tokens, embedding, torch.tensor([chunk], device=dev), torch.tensor([context], device=dev))
        return mu[:, :, : mu.shape[2] - context * enc_cfg.token_mel_ratio], spks

    return Flow(encoder, FlowSolver(CausalConditionalDecoder(unet_cfg), solver_cfg), encode_fn=encode).eval()


# -- construction ------------------------------------------------------------------------------------
PRESETS = {"cosyvoice3-tiny": ("cosyvoice3", "tiny"), "cosyvoice3-random": ("cosyvoice3", "random"),
           "cosyvoice2-tiny": ("cosyvoice2", "tiny"), "cosyvoice2-random": ("cosyvoice2", "random")}


def detect(folder: str) -> str | None:
    """The CosyVoice version an upstream folder holds (by its yaml), or None."""
    for family in ("cosyvoice3", "cosyvoice2"):
        if os.path.isfile(os.path.join(folder, f"{family}.yaml")):
            return family
    if os.path.isfile(os.path.join(folder, "cosyvoice.yaml")):
        raise UserError(f"{folder} holds a CosyVoice (v1) model, which this tool does not support.",
                        "use a CosyVoice2 or CosyVoice3 model folder")
    return None


def _upstream_yaml(family: str) -> dict:
    return load_hyperyaml(os.path.join(CONFIG_DIR, f"{family}.yaml"))


def from_preset(name: str, family: str, size: str, device: str = "cpu", seed: int = 0) -> CosyVoice:
    yaml_cfg = _upstream_yaml(family)
    if size == "tiny":
        yaml_cfg, qwen = _tiny(yaml_cfg, family)
        limits = TINY_LIMITS
    else:
        with open(os.path.join(CONFIG_DIR, "qwen2-0.5b.json")) as f:
            qwen = json.load(f)
        limits = REAL_LIMITS
    cfg = config_from_upstream(family, yaml_cfg, qwen, limits, f"preset {name}")
    specials = COSYVOICE3_SPECIAL if family == "cosyvoice3" else COSYVOICE2_SPECIAL
    tokenizer = ByteTokenizer(specials[:20])  # the byte vocabulary fits the tiny 300-token text embedding
    return CosyVoice(name, f"preset:{name}", cfg, None, tokenizer, seed=seed, device=device)


def from_folder(folder: str, family: str, device: str = "cpu") -> CosyVoice:
    """An upstream model folder: <family>.yaml, llm.pt, flow.pt, hift.pt, CosyVoice-BlankEN/."""
    files = {"llm": "llm.pt", "flow": "flow.pt", "vocoder": "hift.pt"}
    need = [f"{family}.yaml", *files.values(), "CosyVoice-BlankEN/config.json"]
    missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"model folder {folder} lacks {', '.join(missing)}.",
                        f"download the complete {family} model folder (it must hold {', '.join(need)})")
    yaml_path = os.path.join(folder, f"{family}.yaml")
    with open(os.path.join(folder, "CosyVoice-BlankEN", "config.json")) as f:
        qwen = json.load(f)
    cfg = config_from_upstream(family, load_hyperyaml(yaml_path), qwen, REAL_LIMITS, yaml_path)
    specials = COSYVOICE3_SPECIAL if family == "cosyvoice3" else COSYVOICE2_SPECIAL
    tokenizer = HFTokenizer(os.path.join(folder, "CosyVoice-BlankEN"), specials)
    if tokenizer.vocab_size > cfg.lm.text_vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the LLM embeds only {cfg.lm.text_vocab}.",
                        "use the CosyVoice-BlankEN folder that belongs to this model")
    paths = {stage: os.path.join(folder, f) for stage, f in files.items()}
    return CosyVoice(os.path.basename(os.path.normpath(folder)), os.path.abspath(folder), cfg, paths, tokenizer,
                     device=device, folder=folder)
