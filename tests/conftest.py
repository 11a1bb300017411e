"""Shared fixtures: upstream-format model folders built from the golden checkpoints."""

import json
import os
import re
import shutil

import pytest
import torch

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "configs")

# the golden modules' sizes, written into upstream's yaml (key: regex on the yaml text)
_SIZES = {
    "cosyvoice3": [("llm_input_size: 896", "llm_input_size: 64"), ("llm_output_size: 896", "llm_output_size: 64"),
                   ("speech_token_size: 6561", "speech_token_size: 50"), ("vocab_size: 6561", "vocab_size: 100"),
                   ("channels: 1024", "channels: 64"), ("dim: 1024", "dim: 64"), ("depth: 22", "depth: 2"),
                   ("heads: 16", "heads: 2"), ("dim_head: 64", "dim_head: 32"), ("base_channels: 512", "base_channels: 32"),
                   ("cond_channels: 512", "cond_channels: 32")],
    "cosyvoice2": [("llm_input_size: 896", "llm_input_size: 64"), ("llm_output_size: 896", "llm_output_size: 64"),
                   ("speech_token_size: 6561", "speech_token_size: 50"), ("vocab_size: 6561", "vocab_size: 100"),
                   ("input_size: 512", "input_size: 32"), ("output_size: 512", "output_size: 32"),
                   ("attention_heads: 8", "attention_heads: 2"), ("linear_units: 2048", "linear_units: 64"),
                   ("num_blocks: 6", "num_blocks: 2"), (r"channels: \[256\]", "channels: [16]"),
                   ("attention_head_dim: 64", "attention_head_dim: 16"), ("n_blocks: 4", "n_blocks: 1"),
                   ("num_mid_blocks: 12", "num_mid_blocks: 2"), ("num_heads: 8", "num_heads: 2"),
                   ("base_channels: 512", "base_channels: 32"), ("cond_channels: 512", "cond_channels: 32")],
}


def golden(*parts):
    return torch.load(os.path.join(GOLDEN, *parts), map_location="cpu", weights_only=True)


def _tiny_tokenizer(folder):
    """A word-level tokenizer small enough that upstream's extra special tokens still fit the
    golden LLM's 300-row text embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "hello", "world", "this", "is", "a", "test", "of", "the", "speech", ".", "!", "?", ","]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))


def make_upstream_folder(root, family: str, old_weight_norm: bool = False, generator_prefix: bool = False) -> str:
    """An upstream model folder (yaml, llm.pt, flow.pt, hift.pt, CosyVoice-BlankEN/) holding the
    golden tiny checkpoints, optionally with old-style weight-norm keys and a `generator.` prefix."""
    folder = os.path.join(str(root), f"{family}-golden")
    os.makedirs(os.path.join(folder, "CosyVoice-BlankEN"), exist_ok=True)
    with open(os.path.join(CONFIGS, f"{family}.yaml")) as f:
        text = f.read()
    for pat, rep in _SIZES[family]:
        text, n = re.subn(pat, rep, text)
        assert n, pat
    with open(os.path.join(folder, f"{family}.yaml"), "w") as f:
        f.write(text)
    cfg = json.load(open(os.path.join(GOLDEN, "llm", family, "config.json")))
    with open(os.path.join(folder, "CosyVoice-BlankEN", "config.json"), "w") as f:
        json.dump(cfg["llm.llm"]["hf_config_full"], f)
    _tiny_tokenizer(os.path.join(folder, "CosyVoice-BlankEN"))
    shutil.copy(os.path.join(GOLDEN, "llm", family, "llm.pt"), os.path.join(folder, "llm.pt"))
    shutil.copy(os.path.join(GOLDEN, family, "flow.pt"), os.path.join(folder, "flow.pt"))
    hift = golden(family, "hift.pt")
    if old_weight_norm:
        hift = _to_old_weight_norm(hift)
    if generator_prefix:
        hift = {f"generator.{k}": v for k, v in hift.items()}
    torch.save(hift, os.path.join(folder, "hift.pt"))
    return folder


def _to_old_weight_norm(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith(".parametrizations.weight.original0"):
            out[k.replace(".parametrizations.weight.original0", ".weight_g")] = v
        elif k.endswith(".parametrizations.weight.original1"):
            out[k.replace(".parametrizations.weight.original1", ".weight_v")] = v
        else:
            out[k] = v
    return out


@pytest.fixture
def cv3_folder(tmp_path):
    return make_upstream_folder(tmp_path, "cosyvoice3")


@pytest.fixture
def cv2_folder(tmp_path):
    return make_upstream_folder(tmp_path, "cosyvoice2")
