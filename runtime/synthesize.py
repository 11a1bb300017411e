"""python -m runtime.synthesize --model cosyvoice3-tiny --text "Hello." --out out.wav
python -m runtime.synthesize --model cosyvoice3-tiny --text-file lines.txt --out-dir audio/

Writes 24 kHz audio (.wav, .flac or .ogg by the extension of --out; "--out -": a WAV on stdout) and
prints, per stage, time and share, then audio seconds and the real-time factor. Every argument is
checked before the model is loaded; the output appears only when complete (models/files.py).

With --text-file every non-empty line is one request, and the serving engine (runtime/engine.py)
runs them together: continuous batching of the LM, token2wav calls batched across lines. Line N's
audio goes to --out-dir as NNNN.wav (N counts every line of the file, so it points back to it) as
soon as that line is done; a line that fails is named at the end and the others are kept.
"""

from __future__ import annotations

import contextlib
import os
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
@click.option("--text", default=None, help="Text to speak; long text is split into sentences.")
@click.option("--text-file", default=None, help="A UTF-8 file of texts, one request per non-empty line, run together "
              "by the serving engine; each line's audio goes to --out-dir as NNNN.wav (NNNN: its line number).")
@click.option("--out-dir", default=None, help="Folder for the audio of --text-file (created; files already there are "
              "never overwritten).")
@click.option("--concurrency", default=None, type=int, help="With --text-file: lines in flight at once (engine rows; "
              "default: every line, up to what the device memory holds).")
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
                   "a graph named beside its stage overrides it (flow=ort:fp16,flow_estimator=ort:int8); "
                   "kind/kind tries several in order (flow=trt:fp16/compile:bf16/torch) and says which one runs.")
@click.option("--engines-dir", default=None, help="Folder with exported artifacts (default engines/<model>).")
@click.option("--precision", default="fp32", show_default=True, help="Artifact precision for ort/trt backends.")
@click.option("--prompt-wav", default=None, help="Prompt recording for zero-shot voice cloning.")
@click.option("--prompt-text", default=None, help="Transcript of the prompt recording.")
@click.option("--voice", default=None, help="Named voice (Orpheus: tara, leah, jess, leo, dan, mia, zac, zoe).")
@click.option("--warmup", default=0, show_default=True, help="Untimed runs before the timed one (GPU kernels, caches).")
@click.option("--stream", is_flag=True,
              help="Write audio as it is produced (to stdout at once with --out -) and report the first-chunk latency.")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps", "prefix"]),
              help="CosyVoice flow: the 10-step solve as one graph (solver, default), one estimator call per step "
                   "(steps), or, CosyVoice3 streaming with flow=torch, each chunk's new frames only (prefix).")
@exit_on_user_error
def main(model_name, text, text_file, out_dir, concurrency, out_path, device, seed, fixed_tokens, backends, engines_dir,
         precision, prompt_wav, prompt_text, voice, warmup, stream, flow_mode):
    from models.audio import STDOUT, check_prompt_wav, check_writable
    from models.family import require_text

    # every argument is checked before the model is loaded: a mistake costs no minutes of loading
    if text_file is not None:
        lines = _check_lines_options(text, text_file, out_dir, concurrency, stream)
    elif text is None:
        raise UserError("nothing to synthesize: pass --text, or --text-file with one text per line.",
                        'pass --text "Hello." (or --text-file lines.txt --out-dir audio/)')
    elif out_dir is not None or concurrency is not None:
        raise UserError(f"{'--out-dir' if out_dir is not None else '--concurrency'} goes with --text-file; one --text "
                        "writes the one file --out names.", "pass --out FILE, or put the texts in a file for --text-file")
    if text_file is None:
        require_text(text)
        check_utf8(text, "--text")
    check_utf8(prompt_text, "--prompt-text")
    check_utf8(voice, "--voice")
    check_seed(seed)
    if fixed_tokens is not None and fixed_tokens < 1:
        raise UserError(f"--tokens {fixed_tokens} is not a positive count.", "pass --tokens 1 or more, or leave it out")
    if warmup < 0:
        raise UserError(f"--warmup {warmup} is negative.", "pass --warmup 0 or more")
    if text_file is not None:
        device = check_device(device)
        if prompt_wav is not None:
            check_prompt_wav(prompt_wav)
        _synthesize_lines(model_name, lines, out_dir, concurrency, device, seed, fixed_tokens, backends, engines_dir,
                          precision, prompt_wav, prompt_text, voice, warmup, flow_mode)
        return
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


def _check_lines_options(text, text_file, out_dir, concurrency, stream) -> list[tuple[int, str]]:
    """--text-file's own checks (before the model loads); returns (line number, text) per non-empty line."""
    from models.family import require_text
    from models.files import check_folder_writable

    ctx = click.get_current_context()
    if text is not None:
        raise UserError("--text and --text-file both given.", "pass one text with --text, or a file of them with --text-file")
    if ctx.get_parameter_source("out_path") is not click.core.ParameterSource.DEFAULT:
        raise UserError("--out names one file; with --text-file each line gets its own file in --out-dir.",
                        "pass --out-dir FOLDER instead of --out")
    if out_dir is None:
        raise UserError("--text-file needs --out-dir, the folder its lines' audio goes to.", "pass --out-dir audio/")
    if stream:
        raise UserError("--stream writes one file as it is produced; with --text-file every line is its own file "
                        "(the engine streams internally).", "leave out --stream")
    if concurrency is not None and concurrency < 1:
        raise UserError(f"--concurrency {concurrency} is not a positive count.", "pass --concurrency 1 or more")
    try:
        with open(text_file, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"--text-file {text_file} does not exist.", "pass the path of a text file") from None
    except IsADirectoryError:
        raise UserError(f"--text-file {text_file} is a folder, not a text file.", "pass the path of a text file") from None
    except UnicodeDecodeError as e:
        line = raw_line_of(text_file, e.start)
        raise UserError(f"--text-file {text_file} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} on line {line}).",
                        "save it as UTF-8 (convert it with iconv -t UTF-8)") from None
    lines = [(i, t.strip()) for i, t in enumerate(raw, 1) if t.strip()]
    if not lines:
        raise UserError(f"--text-file {text_file} has no text (every line is empty).", "put one text per line in it")
    for i, t in lines:
        try:
            require_text(t)
        except UserError as e:
            raise UserError(f"--text-file {text_file} line {i}: {e.problem}", e.fix) from None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a folder.", "pass a new or existing folder with --out-dir")
    taken = [line_file(out_dir, i) for i, _ in lines if os.path.exists(line_file(out_dir, i))]
    if taken:
        raise UserError(f"--out-dir {out_dir} already holds {os.path.basename(taken[0])}"
                        f"{f' and {len(taken) - 1} more of the files to write' if len(taken) > 1 else ''}; "
                        "earlier audio is never overwritten.", "pass a new --out-dir, or delete those files")
    check_folder_writable(out_dir, out_dir, "--out-dir", create=True)
    return lines


def raw_line_of(path: str, offset: int) -> int:
    """1-based line number of byte `offset` in the file."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def line_file(out_dir: str, line: int) -> str:
    return os.path.join(out_dir, f"{line:04d}.wav")


def _synthesize_lines(model_name, lines, out_dir, concurrency, device, seed, fixed_tokens, backends, engines_dir,
                      precision, prompt_wav, prompt_text, voice, warmup, flow_mode):
    """Every line through one engine, `concurrency` at a time; each file written when its line is done."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from models.audio import save_wav
    from models.registry import load_model
    from runtime.engine import Engine
    from runtime.progress import Progress

    model = load_model(model_name, device=device, seed=seed)
    options = model.resolve_options({"flow_mode": flow_mode})
    for i, t in lines:  # the tokenizer only: a line with nothing to speak fails before the weights load
        try:
            model.split_text(t)
        except UserError as e:
            raise UserError(f"--text-file line {i}: {e.problem}", e.fix) from None
    if model.random_weights:
        click.echo(f"NOTE: {model.name} has RANDOM weights: its audio is noise; use it for speed, not for listening.", err=True)
    t0 = time.perf_counter()
    engine = Engine(model, backends, device=device, engines_dir=engines_dir, precision=precision, options=options,
                    max_streams=concurrency)
    engine.limit_streams(len(lines))  # no more rows (KV cache, captured buckets) than there are lines
    os.makedirs(out_dir, exist_ok=True)
    with engine:
        click.echo(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s ({engine.pipe.describe_backends()}), "
                   f"{engine.max_streams} lines at once", err=True)
        speaker = model.make_speaker(prompt_wav, prompt_text, voice)  # one prompt analysis for every line
        for _ in range(warmup):
            engine.warm_up(tokens=fixed_tokens, levels=[engine.max_streams])

        def one(line: int, text: str):
            handle = engine.submit(text, speaker=speaker, seed=seed, fixed_tokens=fixed_tokens)
            audio = handle.audio()
            if audio.numel() == 0:
                raise UserError("the model produced no speech tokens, so there is no audio.",
                                "check the text, or pass --tokens N to force a length")
            save_wav(line_file(out_dir, line), audio, model.sample_rate)
            written.append(line)
            return handle.stats

        written: list[int] = []  # lines whose file is in place (appended by the pool's threads)

        done, failed = [], []
        start = time.perf_counter()
        pool = ThreadPoolExecutor(engine.max_streams)
        try:
            with Progress("synthesize", len(lines)) as bar:
                futures = {pool.submit(one, i, t): i for i, t in lines}
                for f in as_completed(futures):
                    line = futures[f]
                    bar.step(f"line {line}")
                    try:
                        stats = f.result()
                    except UserError as e:
                        failed.append((line, e))
                        continue
                    done.append((line, stats))
        except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: lines not started never start, running ones are cancelled
            pool.shutdown(wait=False, cancel_futures=True)
            engine.stop()
            e.args = (f"{len(written)} of {len(lines)} lines were written to {out_dir}",)
            raise
        finally:
            pool.shutdown(wait=True)
        wall = time.perf_counter() - start
    audio_s = sum(s.audio_seconds for _, s in done)
    firsts = sorted(s.first_audio * 1000 for _, s in done if s.first_audio is not None)
    for line, s in sorted(done):
        click.echo(f"  line {line}: {s.audio_seconds:6.2f} s of audio, first audio {s.first_audio * 1000:7.1f} ms, "
                   f"done after {s.finished:6.2f} s -> {line_file(out_dir, line)}")
    if done:
        pct = lambda q: firsts[min(len(firsts) - 1, int(q * len(firsts)))]  # noqa: E731
        click.echo(f"{model.name} on {device} ({engine.pipe.describe_backends()}): {len(done)} of {len(lines)} lines, "
                   f"{audio_s:.2f} s of audio in {wall:.2f} s: {audio_s / max(wall, 1e-9):.2f} audio s per s "
                   f"(RTF {wall / max(audio_s, 1e-9):.4f}), first audio p50 {pct(0.5):.1f} ms, max {firsts[-1]:.1f} ms")
    if failed:
        line, e = min(failed, key=lambda x: x[0])
        more = f" ({len(failed)} lines failed; the other lines' files are written)" if len(failed) > 1 else \
            " (the other lines' files are written)"
        raise UserError(f"--text-file line {line}: {e.problem}{more}", e.fix)


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
