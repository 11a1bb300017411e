"""python -m runtime.synthesize --model cosyvoice3-tiny --text "Hello." --out out.wav

Writes 24 kHz audio (.wav, .flac or .ogg by the extension of --out; "--out -": a WAV on stdout) and
prints, per stage, time and share, then audio seconds and the real-time factor. Every argument is
checked before the model is loaded; the output appears only when complete (models/files.py).
"""

from __future__ import annotations

import contextlib
import sys
import time

import click
import torch

from models.errors import UserError, exit_on_user_error
from runtime.pipeline import PipelineObserver

# presets draw their random weights from seed * 1000 + stage, which torch.manual_seed takes up to 2**64 - 1
SEED_MAX = 2**32 - 1


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}.", "use --device cpu or --device cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible to PyTorch.",
                        "run with --device cpu, or on a machine with a GPU and a CUDA build of torch")
    return device


def check_seed(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed {seed} is outside 0..{SEED_MAX}.", f"pass a seed from 0 to {SEED_MAX}")
    return seed


def check_utf8(value: str | None, option: str) -> None:
    """Bytes that are not UTF-8 reach us from argv as lone surrogates (surrogateescape); the tokenizer
    would fail on them deep inside the first request."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(value[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"code point U+{ch:04X}"
        raise UserError(f"{option} is not valid UTF-8 ({what} at character {e.start}).",
                        f"pass {option} as UTF-8 text (use a UTF-8 locale, or convert it with iconv -t UTF-8)") from None


@click.command()
@click.option("--model", "model_name", default="cosyvoice3-tiny", show_default=True,
              help="Preset name (cosyvoice3-tiny, cosyvoice3-random, ...) or an upstream model folder.")
@click.option("--text", required=True, help="Text to speak; long text is split into sentences.")
@click.option("--out", "out_path", default="out.wav", show_default=True,
              help="Output file: .wav (16-bit PCM), .flac (16-bit) or .ogg (Vorbis), by extension; written beside "
                   "the target and renamed into place when complete. '-': a 16-bit WAV on stdout (with --stream its "
                   "header has an open length, 0xFFFFFFFF), and every other line goes to stderr.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", default=0, show_default=True, help=f"Seed for sampling and noise (0 to {SEED_MAX}).")
@click.option("--tokens", "fixed_tokens", type=int, default=None,
              help="Generate exactly this many speech tokens per sentence (benchmarks; ignores stop tokens).")
@click.option("--backend", "backends", default="torch", show_default=True,
              help="One backend for all stages (compile:bf16), or per stage: llm=compile:bf16,flow=ort:fp16,vocoder=ort; "
                   "kind/kind tries several in order (flow=trt:fp16/compile:bf16/torch) and says which one runs.")
@click.option("--engines-dir", default=None, help="Folder with exported artifacts (default engines/<model>).")
@click.option("--precision", default="fp32", show_default=True, help="Artifact precision for ort/trt backends.")
@click.option("--prompt-wav", default=None, help="Prompt recording for zero-shot voice cloning.")
@click.option("--prompt-text", default=None, help="Transcript of the prompt recording.")
@click.option("--voice", default=None, help="Named voice (Orpheus: tara, leah, jess, leo, dan, mia, zac, zoe).")
@click.option("--warmup", default=0, show_default=True, help="Untimed runs before the timed one (GPU kernels, caches).")
@click.option("--stream", is_flag=True,
              help="Write audio as it is produced (to stdout at once with --out -) and report the first-chunk latency.")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps"]),
              help="CosyVoice flow: the 10-step solve as one graph (solver, default) or one estimator call per step.")
@exit_on_user_error
def main(model_name, text, out_path, device, seed, fixed_tokens, backends, engines_dir, precision, prompt_wav, prompt_text,
         voice, warmup, stream, flow_mode):
    from models.audio import STDOUT, check_prompt_wav, check_writable
    from models.family import require_text

    # every argument is checked before the model is loaded: a mistake costs no minutes of loading
    require_text(text)
    check_utf8(text, "--text")
    check_utf8(prompt_text, "--prompt-text")
    check_utf8(voice, "--voice")
    check_seed(seed)
    if fixed_tokens is not None and fixed_tokens < 1:
        raise UserError(f"--tokens {fixed_tokens} is not a positive count.", "pass --tokens 1 or more, or leave it out")
    if warmup < 0:
        raise UserError(f"--warmup {warmup} is negative.", "pass --warmup 0 or more")
    check_writable(out_path)
    audio_out = None
    if out_path == STDOUT:
        audio_out = sys.stdout.buffer  # before the redirect below; a test runner's stdout has one too
        if audio_out.isatty():
            raise UserError("--out - writes binary audio to stdout, which is a terminal.",
                            "pipe it into a player (... --out - | aplay) or a file, or pass --out out.wav")
    device = check_device(device)
    if prompt_wav is not None:
        check_prompt_wav(prompt_wav)
    # with --out - stdout carries the audio alone: every line (ours, a library's print) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if audio_out is not None else contextlib.nullcontext():
        _synthesize(model_name, text, out_path, audio_out, device, seed, fixed_tokens, backends, engines_dir, precision,
                    prompt_wav, prompt_text, voice, warmup, stream, flow_mode)


def _synthesize(model_name, text, out_path, audio_out, device, seed, fixed_tokens, backends, engines_dir, precision,
                prompt_wav, prompt_text, voice, warmup, stream, flow_mode):
    from models.audio import AudioWriter, save_wav
    from models.registry import load_model
    from runtime.pipeline import Pipeline

    model = load_model(model_name, device=device, seed=seed)
    options = model.resolve_options({"flow_mode": flow_mode})  # an option the family lacks fails here
    sentences = model.split_text(text)  # the tokenizer only: text with nothing to speak fails before the weights load
    if model.random_weights:
        click.echo(f"NOTE: {model.name} has RANDOM weights: its audio is noise; use it for speed, not for listening.", err=True)
    progress = SentenceProgress(len(sentences))
    pipe = Pipeline(model, backends, device=device, engines_dir=engines_dir, precision=precision, options=options,
                    observer=progress)
    t0 = time.perf_counter()
    pipe.activate()  # load / build every backend first: the RTF below is the steady-state cost
    click.echo(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s ({pipe.describe_backends()})", err=True)
    request = dict(prompt_wav=prompt_wav, prompt_text=prompt_text, voice=voice, seed=seed, fixed_tokens=fixed_tokens)
    for _ in range(warmup):
        pipe.synthesize(text, **request)
    compiled_before = pipe.compile_seconds()
    with progress:
        if stream:
            # the writer takes each chunk as it arrives; the target appears only once the last is in
            with AudioWriter(out_path, pipe.model.sample_rate, stdout=audio_out) as writer:
                chunks = pipe.stream(text, **request)
                for chunk in chunks:
                    writer.write(chunk)
                result = chunks.result
                _check_audio(result)
        else:
            result = pipe.synthesize(text, **request)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if not stream:
        _check_audio(result)
        save_wav(out_path, result.audio, result.sample_rate, stdout=audio_out)
    target = "stdout" if audio_out is not None else out_path
    click.echo(f"{model.name} on {device} ({pipe.describe_backends()}): {len(result.utterances)} sentence(s) -> {target}")
    click.echo(result.summary())
    compiling = pipe.compile_seconds() - compiled_before
    if compiling > 0.05:  # torch.compile / CUDA-graph capture of new shapes happened inside the timed run
        steady = max(result.wall_seconds - compiling, 1e-9)
        click.echo(f"  of the wall time, {compiling * 1000:.1f} ms compiled and captured graphs for new shapes "
                   f"(once per shape); without it RTF {steady / max(result.audio_seconds, 1e-9):.4f}. "
                   f"Pass --warmup 1 to time a warm run.")


def _check_audio(result) -> None:
    if result.audio.numel() == 0:
        raise UserError("the model produced no speech tokens, so there is no audio.",
                        "check the text, or pass --tokens N to force a length")


class SentenceProgress(PipelineObserver):
    """Progress per sentence on stderr (runtime/progress.py) while the timed request runs, when the
    text has several sentences; warm-up runs outside the `with` block are not shown."""

    def __init__(self, count: int):
        self.count, self.bar = count, None

    def __enter__(self):
        if self.count > 1:
            from runtime.progress import Progress

            self.bar = Progress("synthesize", self.count).__enter__()
        return self

    def __exit__(self, *exc):
        bar, self.bar = self.bar, None
        return bar.__exit__(*exc) if bar is not None else False

    def sentence(self, index: int, total: int) -> None:
        if self.bar is not None:
            self.bar.step("sentences")


if __name__ == "__main__":
    main()
