"""Speech-token language models: CosyVoice2 / CosyVoice3 (Qwen2 + speech heads) and Orpheus (Llama-3.2).

Every model has ONE input id space, so a single graph `input_ids -> logits` serves both the prefill
(prompt) and the decode steps:

    forward(input_ids [B,S] int64, attention_mask [B,P+S] int64 (1 = real, 0 = left padding),
            past_keys [L,B,KVH,P,HD], past_values [L,B,KVH,P,HD])
        -> logits [B,V] float32 of the LAST position, present_keys, present_values [L,B,KVH,P+S,HD]

CosyVoice id space (`Vt` = text vocab of the Qwen2 body, `Vs` = speech_embedding rows =
speech_token_size + 3 (CV2) or + 200 (CV3)):

    input id i in [0, Vt)                 -> llm.model.model.embed_tokens[i]        (text token i)
    input id Vt + s, s in [0, Vs)         -> speech_embedding[s]                     (speech token / special row s)
    input id Vt + Vs + r, r in {0, 1}     -> llm_embedding[r]    (CosyVoice2 only: r = 0 sos, r = 1 task_id)

Logits index the speech vocabulary (llm_decoder rows, size Vs): a generated logit index s is fed
back as input id `Vt + s` (`speech_id`). Every index >= speech_token_size is a stop token (CV2:
speech_token_size + {0: eos, 1, 2: fill}; CV3: speech_token_size + i for i < 200, with
+0 sos, +1 eos, +2 task_id, +3 fill). The prompt is built as upstream's `inference()`:
[sos, prompt_text..., text..., task_id, prompt_speech...] (`prompt_ids`).

Orpheus: the input ids are the Llama token ids; logits cover the whole Llama vocab (lm_head tied to
the embedding). Generation stops at `ORPHEUS_STOP_TOKEN_ID` (128258).

Loading builds the module on the meta device and assigns the checkpoint tensors (no random init, no
second copy of the weights); key / shape problems raise `UserError` through `models.checkpoint`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_strict, read_state_dict
from models.errors import UserError
from models.transformer_lm import DecoderBody, DecoderConfig
from models.spec import Dim, GraphSpec, TensorSpec, const, integers, normal

VARIANTS = ("cosyvoice2", "cosyvoice3")
COSYVOICE3_END_OF_PROMPT = 151646  # <|endofprompt|>: upstream CosyVoice3 inference asserts it is in the text (frontend's job)
ORPHEUS_STOP_TOKEN_ID = 128258  # end of speech (canopyai/Orpheus-TTS stop_token_ids)


def read_hf_config(path: str) -> dict:
    """Read a HF config.json (a file or a folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"model config {path} does not exist.", "point to the model folder that holds config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"model config {path} cannot be read ({str(e).splitlines()[0][:160]}).",
                        "re-download config.json") from None
    if not isinstance(d, dict):
        raise UserError(f"model config {path} is not a JSON object.", "re-download config.json")
    return d


class _SpeechLMBase(nn.Module):
    """Shared graph logic: subclasses provide `body`, `embed(input_ids)` and `head(hidden)`."""

    body: DecoderBody

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_keys: torch.Tensor,
                past_values: torch.Tensor):
        """The exported graph (see the module docstring)."""
        hidden, keys, values = self.body(self.embed(input_ids), attention_mask, past_keys, past_values)
        return self.head(hidden[:, -1]).float(), keys, values

    @torch.no_grad()
    def forward_all(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None):
        """Not a graph: (hidden [B,S,D] after the final norm, logits [B,S,V] float32) for every
        position of a cache-free forward (tests, debugging)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        hidden, _, _ = self.body(inputs_embeds, attention_mask)
        return hidden, self.head(hidden).float()

    def empty_cache(self, batch: int, dtype=None, device=None):
        return self.body.empty_cache(batch, dtype, device)

    def example_inputs(self, batch: int = 2, seq: int = 4, past: int = 3, seed: int = 0) -> tuple:
        """(input_ids, attention_mask, past_keys, past_values) with valid ids and random caches."""
        g = torch.Generator().manual_seed(seed)
        c = self.body.config
        w = self.body.embed_tokens.weight
        ids = torch.randint(0, self.input_vocab_size, (batch, seq), generator=g).to(w.device)
        mask = torch.ones(batch, past + seq, dtype=torch.int64, device=w.device)
        shape = (c.num_layers, batch, c.num_kv_heads, past, c.head_dim)
        pk = torch.randn(shape, generator=g).to(device=w.device, dtype=w.dtype)
        pv = torch.randn(shape, generator=g).to(device=w.device, dtype=w.dtype)
        return ids, mask, pk, pv

    @property
    def input_vocab_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


# -------------------------------------------------------------------------------------------------
# CosyVoice2 / CosyVoice3
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CosyVoiceLMConfig:
    decoder: DecoderConfig
    speech_token_size: int  # 6561 for the released models
    variant: str  # 'cosyvoice2' (Qwen2LM) | 'cosyvoice3' (CosyVoice3LM)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(f"unknown CosyVoice LM variant {self.variant!r}.", f"use one of {list(VARIANTS)}")

    @property
    def text_vocab(self) -> int:
        return self.decoder.vocab_size

    @property
    def speech_rows(self) -> int:
        """Rows of speech_embedding = outputs of llm_decoder."""
        return self.speech_token_size + (3 if self.variant == "cosyvoice2" else 200)

    @property
    def extra_rows(self) -> int:
        """Rows of llm_embedding (CosyVoice2 sos / task_id)."""
        return 2 if self.variant == "cosyvoice2" else 0

    @property
    def input_vocab(self) -> int:
        return self.text_vocab + self.speech_rows + self.extra_rows

    @property
    def sos_id(self) -> int:
        """Input id of sos (CV2: llm_embedding row 0; CV3: speech_embedding row speech_token_size)."""
        c = self
        if c.variant == "cosyvoice2":
            return c.text_vocab + c.speech_rows + 0
        return c.text_vocab + c.speech_token_size + 0

    @property
    def task_id(self) -> int:
        """Input id of task_id (CV2: llm_embedding row 1; CV3: speech_embedding row speech_token_size + 2)."""
        c = self
        if c.variant == "cosyvoice2":
            return c.text_vocab + c.speech_rows + 1
        return c.text_vocab + c.speech_token_size + 2

    @property
    def eos_token(self) -> int:
        """Logit index of eos (CV2: speech_token_size; CV3: speech_token_size + 1)."""
        return self.speech_token_size + (0 if self.variant == "cosyvoice2" else 1)

    @property
    def fill_token(self) -> int:
        """Logit index of the bistream fill token (CV2: speech_token_size + 2; CV3: + 3)."""
        return self.speech_token_size + (2 if self.variant == "cosyvoice2" else 3)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Logit indices that end generation: every index >= speech_token_size (CV2: 3 of them, CV3: 200)."""
        n = 3 if self.variant == "cosyvoice2" else 200
        return tuple(self.speech_token_size + i for i in range(n))

    def is_stop(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean tensor: which logit indices are stop tokens."""
        return token_ids >= self.speech_token_size

    def speech_id(self, token):
        """Input id of a speech-table row (a generated logit index or a prompt speech token)."""
        return token + self.text_vocab

    def prompt_ids(self, text, prompt_text=None, prompt_speech=None) -> torch.Tensor:
        """[1, L] int64 input ids exactly as upstream inference builds lm_input:
        [sos, prompt_text..., text..., task_id, prompt_speech...].

        `text` / `prompt_text`: text token ids (tensor or list, any shape with one row);
        `prompt_speech`: speech tokens in [0, speech_token_size). For CosyVoice3 upstream also requires
        <|endofprompt|> (COSYVOICE3_END_OF_PROMPT) in the text; the frontend is responsible for it."""
        c = self

        def as_list(x, what, hi):
            if x is None:
                return []
            vals = torch.as_tensor(x).reshape(-1).tolist()
            bad = [v for v in vals if not 0 <= int(v) < hi]
            if bad:
                raise UserError(f"{what} id {bad[0]} is outside [0, {hi}).",
                                "use the tokenizer / speech tokenizer that belongs to this model")
            return [int(v) for v in vals]

        t = as_list(prompt_text, "prompt text token", c.text_vocab) + as_list(text, "text token", c.text_vocab)
        s = as_list(prompt_speech, "prompt speech token", c.speech_token_size)
        ids = [self.sos_id] + t + [self.task_id] + [c.text_vocab + v for v in s]
        return torch.tensor([ids], dtype=torch.int64)

    @staticmethod
    def length_limits(num_text_tokens: int, min_token_text_ratio: float = 2.0, max_token_text_ratio: float = 20.0) -> tuple[int, int]:
        """Upstream (min_len, max_len) of generated speech tokens: ratio x the number of text tokens
        to synthesise (prompt text excluded). Eos is suppressed for the first min_len steps."""
        return int(num_text_tokens * min_token_text_ratio), int(num_text_tokens * max_token_text_ratio)

    @classmethod
    def from_hf_config(cls, hf_config: dict, speech_token_size: int, variant: str) -> "CosyVoiceLMConfig":
        return cls(DecoderConfig.from_hf_config(hf_config), int(speech_token_size), variant)

    @classmethod
    def infer(cls, hf_config: dict, state_dict: dict) -> "CosyVoiceLMConfig":
        """Variant and speech_token_size read off an upstream llm.pt state_dict (llm_embedding present
        -> CosyVoice2, speech_embedding rows = speech_token_size + 3 / + 200)."""
        if "speech_embedding.weight" not in state_dict:
            raise UserError("checkpoint has no speech_embedding.weight; it is not a CosyVoice llm.pt.",
                            "pass the llm.pt of a CosyVoice2 / CosyVoice3 model")
        rows = state_dict["speech_embedding.weight"].shape[0]
        variant = "cosyvoice2" if "llm_embedding.weight" in state_dict else "cosyvoice3"
        size = rows - (3 if variant == "cosyvoice2" else 200)
        if size <= 0:
            raise UserError(f"speech_embedding has {rows} rows, too few for {variant}.", "pass an upstream CosyVoice llm.pt")
        return cls.from_hf_config(hf_config, size, variant)


_CONFIG_ID_API = ("sos_id", "task_id", "eos_token", "fill_token", "stop_token_ids", "is_stop", "speech_id",
                   "prompt_ids", "length_limits")


class _TiedHead(nn.Module):
    """HF's tied `lm_head`: holds the embedding's Parameter itself (no second copy). Unused by
    CosyVoice; present so that state_dict keys equal upstream llm.pt."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class _CausalLM(nn.Module):
    """Key layout of HF Qwen2ForCausalLM: `.model` (the body) and `.lm_head`."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.model = DecoderBody(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = _TiedHead(self.model.embed_tokens.weight)


class _Qwen2Encoder(nn.Module):
    """Key layout of upstream Qwen2Encoder: `.model` = Qwen2ForCausalLM."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.model = _CausalLM(cfg)


class CosyVoiceLM(_SpeechLMBase):
    """Upstream Qwen2LM (CosyVoice2) / CosyVoice3LM with a unified input id space.

    state_dict keys = upstream llm.pt: `llm.model.model.*` (Qwen2 body), `llm.model.lm_head.weight`
    (tied to embed_tokens, same Parameter; only if the Qwen2 config ties, which released models do),
    `speech_embedding.weight`, `llm_decoder.weight` (+ `.bias` for CosyVoice2), `llm_embedding.weight`
    (CosyVoice2 only)."""

    def __init__(self, config: CosyVoiceLMConfig):
        super().__init__()
        self.config = config
        d = config.decoder.hidden_size
        cv2 = config.variant == "cosyvoice2"
        if cv2:
            self.llm_embedding = nn.Embedding(2, d)
        else:
            self.llm_embedding = None
        self.llm = _Qwen2Encoder(config.decoder)
        self.llm_decoder = nn.Linear(d, config.speech_rows, bias=cv2)
        self.speech_embedding = nn.Embedding(config.speech_rows, d)

    # -- ids ---------------------------------------------------------------------------------------
    @property
    def body(self) -> DecoderBody:
        return self.llm.model.model

    @property
    def input_vocab_size(self) -> int:
        return self.config.input_vocab

    @property
    def speech_token_size(self) -> int:
        return self.config.speech_token_size

    # ids are a property of the config (so the front end needs no weights); the module forwards them
    def __getattr__(self, name):
        if name in _CONFIG_ID_API:
            return getattr(self.config, name)
        return super().__getattr__(name)

    # -- graph pieces ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unified ids [B,S] -> embeddings [B,S,D] (one gather per table + select; no host sync).
        Out-of-range ids are clamped into the nearest table (ids are validated on the host)."""
        c = self.config
        vt, vs = c.text_vocab, c.speech_rows
        text = self.body.embed_tokens(input_ids.clamp(0, vt - 1))
        rel = input_ids - vt
        speech = self.speech_embedding(rel.clamp(0, vs - 1))
        out = torch.where((input_ids < vt).unsqueeze(-1), text, speech)
        if self.llm_embedding is not None:
            extra = self.llm_embedding((rel - vs).clamp(0, c.extra_rows - 1))
            out = torch.where((rel >= vs).unsqueeze(-1), extra, out)
        return out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm_decoder(hidden)


def build_cosyvoice_lm(config: CosyVoiceLMConfig, sd: dict, source: str, dtype: torch.dtype | None = None) -> CosyVoiceLM:
    """A CosyVoiceLM holding the tensors of `sd` (an upstream llm.pt state_dict)."""
    sd = dict(sd)
    ignore: tuple[str, ...] = ()
    tied = config.decoder.tie_word_embeddings
    head_key, emb_key = "llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"
    if tied and head_key not in sd and emb_key in sd:
        sd[head_key] = sd[emb_key]  # a file saved without the tied head is fine too
    if tied and head_key in sd and emb_key in sd:
        h, e = sd[head_key], sd[emb_key]
        same = h.data_ptr() == e.data_ptr() and h.shape == e.shape
        if not same and (h.shape != e.shape or not torch.equal(h, e)):
            raise UserError(f"checkpoint {source}: llm.model.lm_head.weight differs from embed_tokens although the "
                            "Qwen2 config ties them.", "use the config.json that belongs to this llm.pt")
    if not tied:
        ignore = ("llm.model.lm_head.",)  # unused by CosyVoice: not kept in memory
    with torch.device("meta"):
        model = CosyVoiceLM(config)
    _assign(model, sd, source, ignore)
    if tied:
        model.llm.model.lm_head.weight = model.body.embed_tokens.weight  # re-tie (assign made two Parameters)
    return _finish(model, dtype)


def load_cosyvoice_lm(path: str, config: CosyVoiceLMConfig, dtype: torch.dtype | None = None) -> CosyVoiceLM:
    """Load an upstream llm.pt (weights_only) into a CosyVoiceLM with strict keys."""
    return build_cosyvoice_lm(config, read_state_dict(path), path, dtype)


# -------------------------------------------------------------------------------------------------
# Orpheus (Llama-3.2)
# -------------------------------------------------------------------------------------------------
class OrpheusLM(_SpeechLMBase):
    """HF LlamaForCausalLM equivalent: `model.*` body, `lm_head.weight` only when not tied
    (Llama-3.2 ties it, and HF snapshots then omit it)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def body(self) -> DecoderBody:
        return self.model

    @property
    def input_vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (ORPHEUS_STOP_TOKEN_ID,)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, w)


def _orpheus_files(folder: str) -> list[str]:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"shard index {index} cannot be read ({type(e).__name__}).", "re-download model.safetensors.index.json") from None
        return [os.path.join(folder, n) for n in names]
    raise UserError(f"model folder {folder} has neither model.safetensors nor model.safetensors.index.json.",
                    "download the HF snapshot (safetensors weights) into that folder")


def load_orpheus_lm(folder: str, dtype: torch.dtype | None = None) -> OrpheusLM:
    """Load an Orpheus / Llama-3.2 HF folder (config.json + model.safetensors or sharded
    model-*.safetensors with model.safetensors.index.json) with strict keys."""
    config = DecoderConfig.from_hf_config(read_hf_config(folder))
    sd: dict[str, torch.Tensor] = {}
    for path in _orpheus_files(folder):
        sd.update(read_state_dict(path))
    # very old Llama exports carry the RoPE buffer; it is recomputed from the config
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings and "lm_head.weight" in sd:
        h = sd.pop("lm_head.weight")
        e = sd.get("model.embed_tokens.weight")
        if e is not None and (h.shape != e.shape or not torch.equal(h, e)):
            raise UserError(f"checkpoint {folder}: lm_head.weight differs from model.embed_tokens.weight although "
                            "config.json ties them.", "use the config.json that belongs to these weights")
    with torch.device("meta"):
        model = OrpheusLM(config)
    _assign(model, sd, folder)
    return _finish(model, dtype)


# -------------------------------------------------------------------------------------------------
def _assign(model: nn.Module, sd: dict, source: str, ignore: tuple[str, ...] = ()) -> None:
    """Strict key/shape check (one-line UserError) on a meta-device model, then adopt the tensors."""
    if ignore:
        sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op; we assign below
        load_strict(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)


def _finish(model: _SpeechLMBase, dtype: torch.dtype | None):
    model.body.reset_rope(model.body.embed_tokens.weight.device)
    if dtype is not None:
        model.to(dtype)
    model.requires_grad_(False)
    return model.eval()


def llm_graph_spec(layers: int, heads: int, kv_heads: int, head_dim: int, input_vocab: int, logits: int,
                   max_batch: int, max_new: int, max_past: int, opt_past: int) -> GraphSpec:
    """The `llm` graph of every family: input ids + explicit KV cache in, last-position logits +
    grown cache out. S = 1 is a decode step, P = 0 a prefill; one graph serves both."""
    cache = (layers, "B", kv_heads, "P", head_dim)
    grown = (layers, "B", kv_heads, "P+S", head_dim)
    return GraphSpec(
        "llm", "llm",
        (TensorSpec("input_ids", "int64", ("B", "S"), integers(0, input_vocab)),
         TensorSpec("attention_mask", "int64", ("B", "P+S"), const(1), doc="1 = token, 0 = left padding"),
         TensorSpec("past_keys", "float32", cache, normal(1.0)),
         TensorSpec("past_values", "float32", cache, normal(1.0))),
        (TensorSpec("logits", "float32", ("B", logits)),
         TensorSpec("present_keys", "float32", grown),
         TensorSpec("present_values", "float32", grown)),
        (Dim("B", 1, 1, max_batch, "batch"), Dim("S", 1, 1, max_new, "new tokens per LLM call"),
         Dim("P", 0, opt_past, max_past, "cached tokens")), autoregressive=True,
        largest=f"B*{heads}*S*(P+S)")
