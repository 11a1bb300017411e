"""python -m runtime.synthesize --model cosyvoice3-tiny --text "Hello." --out out.wav

Writes a 24 kHz WAV and prints, per stage, time and share, then audio seconds and the real-time factor.
"""

from __future__ import annotations

import sys
import time

import click
import torch

from models.errors import UserError, exit_on_user_error


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}.", "use --device cpu or --device cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible to PyTorch.",
                        "run with --device cpu, or on a machine with a GPU and a CUDA build of torch")
    return device


@click.command()
@click.option("--model", "model_name", default="cosyvoice3-tiny", show_default=True,
              help="Preset name (cosyvoice3-tiny, cosyvoice3-random, ...) or an upstream model folder.")
@click.option("--text", required=True, help="Text to speak; long text is split into sentences.")
@click.option("--out", "out_path", default="out.wav", show_default=True, help="Output WAV path.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling and noise.")
@click.option("--tokens", "fixed_tokens", type=int, default=None,
              help="Generate exactly this many speech tokens per sentence (benchmarks; ignores stop tokens).")
@click.option("--backend", "backends", default="torch", show_default=True,
              help="One backend for all stages, or per stage: llm=torch,flow=ort,vocoder=ort.")
@click.option("--engines-dir", default=None, help="Folder with exported artifacts (default engines/<model>).")
@click.option("--precision", default="fp32", show_default=True, help="Artifact precision for ort/trt backends.")
@click.option("--prompt-wav", default=None, help="Prompt recording for zero-shot voice cloning.")
@click.option("--prompt-text", default=None, help="Transcript of the prompt recording.")
@click.option("--voice", default=None, help="Named voice (Orpheus: tara, leah, jess, leo, dan, mia, zac, zoe).")
@click.option("--warmup", default=0, show_default=True, help="Untimed runs before the timed one (GPU kernels, caches).")
@click.option("--stream", is_flag=True, help="Write audio as it is produced and report the first-chunk latency.")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps"]),
              help="CosyVoice flow: the 10-step solve as one graph (solver, default) or one estimator call per step.")
@exit_on_user_error
def main(model_name, text, out_path, device, seed, fixed_tokens, backends, engines_dir, precision, prompt_wav, prompt_text,
         voice, warmup, stream, flow_mode):
    from models.audio import check_writable, save_wav
    from models.family import require_text
    from models.registry import load_model
    from runtime.pipeline import Pipeline

    require_text(text)
    check_writable(out_path)
    device = check_device(device)
    if fixed_tokens is not None and fixed_tokens < 1:
        raise UserError(f"--tokens {fixed_tokens} is not a positive count.", "pass --tokens 1 or more, or leave it out")
    model = load_model(model_name, device=device, seed=seed)
    if flow_mode is not None:
        if not hasattr(model, "set_flow_mode"):
            raise UserError(f"{model.family} has no flow stage.", "leave out --flow-mode")
        model.set_flow_mode(flow_mode)
    if model.random_weights:
        click.echo(f"NOTE: {model.name} has RANDOM weights: its audio is noise; use it for speed, not for listening.", err=True)
    pipe = Pipeline(model, backends, device=device, engines_dir=engines_dir, precision=precision)
    t0 = time.perf_counter()
    pipe.activate()  # load / build every backend first: the RTF below is the steady-state cost
    click.echo(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s", err=True)
    for _ in range(warmup):
        pipe.synthesize(text, prompt_wav=prompt_wav, prompt_text=prompt_text, voice=voice, seed=seed, fixed_tokens=fixed_tokens)
    if stream:
        result = _stream_to_file(pipe, out_path, text, prompt_wav, prompt_text, voice, seed, fixed_tokens)
    else:
        result = pipe.synthesize(text, prompt_wav=prompt_wav, prompt_text=prompt_text, voice=voice, seed=seed,
                                 fixed_tokens=fixed_tokens)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if result.audio.numel() == 0:
        raise UserError("the model produced no speech tokens, so there is no audio.",
                        "check the text, or pass --tokens N to force a length")
    if not stream:
        save_wav(out_path, result.audio, result.sample_rate)
    backend_line = ", ".join(f"{s}={k}" for s, k in pipe.choice.items())
    click.echo(f"{model.name} on {device} ({backend_line}): {len(result.utterances)} sentence(s) -> {out_path}")
    click.echo(result.summary())


def _stream_to_file(pipe, out_path, text, prompt_wav, prompt_text, voice, seed, fixed_tokens):
    """Append each chunk to the WAV as it arrives (a reader can follow the file while it grows)."""
    import soundfile as sf

    with sf.SoundFile(out_path, "w", samplerate=pipe.model.sample_rate, channels=1, subtype="PCM_16") as f:
        for chunk in pipe.stream(text, prompt_wav=prompt_wav, prompt_text=prompt_text, voice=voice, seed=seed,
                                 fixed_tokens=fixed_tokens):
            f.write(chunk.numpy())
            f.flush()
    return pipe.last_result


if __name__ == "__main__":
    main()
