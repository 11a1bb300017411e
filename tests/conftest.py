"""Shared fixtures: upstream-format model folders built from the golden checkpoints."""

import errno
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


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny graphs: faster than many, immune to a busy machine's OpenMP
    contention, and (for the engine's worker threads) results that do not depend on how many run at once."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def write_fake_frontend_onnx(folder: str, version: str = "v3") -> None:
    """Stand-ins for upstream's campplus.onnx and speech_tokenizer_<version>.onnx with the same
    inputs and outputs: fbank [1, T, 80] -> embedding [1, 192]; whisper log-mel [1, 128, T] and its
    length -> 25 Hz tokens [1, T // 4] (argmax over bins of every 4th frame)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((80, 192)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["fbank", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["embedding"])],
        "campplus", [helper.make_tensor_value_info("fbank", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 192])],
        [w, numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
              os.path.join(folder, "campplus.onnx"))
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
              for n, v in (("start", [0]), ("end", [1 << 30]), ("axis", [2]), ("step", [4]))]
    g = helper.make_graph(
        [helper.make_node("Slice", ["feats", "start", "end", "axis", "step"], ["s"]),
         helper.make_node("ArgMax", ["s"], ["idx"], axis=1, keepdims=0),
         helper.make_node("Cast", ["idx"], ["tokens"], to=TensorProto.INT32),
         helper.make_node("Identity", ["feats_length"], ["unused"])],
        "tokenizer", [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
                      helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("tokens", TensorProto.INT32, [1, "N"]),
         helper.make_tensor_value_info("unused", TensorProto.INT32, [1])], consts)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
              os.path.join(folder, f"speech_tokenizer_{version}.onnx"))


def make_orpheus_folder(root) -> str:
    """A Hugging Face style Orpheus snapshot at tiny size (random weights, real token layout) with a
    tiny SNAC folder inside, as the loader expects."""
    import snac
    from safetensors.torch import save_file

    from models.orpheus import _tiny_llm
    from models.speech_lm import OrpheusLM

    folder = os.path.join(str(root), "orpheus-hf")
    os.makedirs(os.path.join(folder, "snac"), exist_ok=True)
    torch.manual_seed(0)
    cfg = _tiny_llm()
    lm = OrpheusLM(cfg)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"},
              os.path.join(folder, "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
          "tie_word_embeddings": True, "max_position_embeddings": 131072}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    _tiny_tokenizer(folder)
    kw = dict(sampling_rate=24000, encoder_dim=16, encoder_rates=[2, 4, 8, 8], decoder_dim=64, decoder_rates=[8, 8, 4, 2],
              attn_window_size=None, codebook_size=4096, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True)
    model = snac.SNAC(**kw)
    torch.save(model.state_dict(), os.path.join(folder, "snac", "pytorch_model.bin"))
    with open(os.path.join(folder, "snac", "config.json"), "w") as f:
        json.dump(kw, f)
    return folder


def deny_writes(monkeypatch, folder, code=errno.EACCES):
    """os.open refuses to create anything inside `folder` with `code` (EACCES: no permission, EROFS:
    a read-only mount), as the kernel would for a non-root user."""
    real_open = os.open
    folder = os.path.abspath(folder)

    def guarded(path, flags, *args, **kwargs):
        if os.path.abspath(path).startswith(folder + os.sep) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


TINY_PRESETS = ["cosyvoice3-tiny", "cosyvoice2-tiny", "orpheus-tiny"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Each tiny preset exported once (fp32 ONNX), through the CLI a user runs. Without the exporter's
    ONNX optimizer: its rewriter spends minutes on the unrolled flow solvers (test_export checks the
    optimizer path on its own)."""
    from click.testing import CliRunner

    from export.cli import main as export_main

    root = tmp_path_factory.mktemp("engines")
    dirs = {}
    for name in TINY_PRESETS:
        out = str(root / name)
        res = CliRunner().invoke(export_main, ["onnx", "--model", name, "--out-dir", out, "--no-optimize"],
                                catch_exceptions=False)
        assert res.exit_code == 0, res.output
        dirs[name] = out
    return dirs
