"""Bad input fails on one line, outputs are never lost or damaged, long work shows progress.

Every command line a user can get wrong exits 2 with one `error: problem. Fix: ...` line and no
traceback; where the mistake is in the arguments, before any model is loaded. Outputs appear only
when complete: a failing, interrupted or killed run keeps the earlier file byte for byte and leaves
no temporary file.

Tests run as root here, where permission bits stop no write, so an unwritable folder is simulated by
making os.open refuse paths inside it (`deny_writes`): the writability check and the writers both
create their files with os.open, so they see exactly what a read-only mount or a folder without
write permission would give them.
"""

import errno
import io
import json
import os
import re
import signal
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import models.registry
from export.calibration import _key, calibration_texts, load_or_capture
from export.cli import main as export_main
from models.audio import AudioWriter
from runtime.bench import main as bench_main
from runtime.pipeline import Pipeline
from runtime.progress import Progress
from runtime.report import main as report_main
from runtime.synthesize import main as synthesize_main
from tests.conftest import deny_writes, make_orpheus_folder, make_upstream_folder

from runtime.serve import main as serve_main

CLIS = {"synthesize": synthesize_main, "report": report_main, "bench": bench_main, "export": export_main,
        "serve": serve_main}
QUICK = ["--tokens", "5"]  # a tiny preset and 5 speech tokens (the flow takes 4 or more): a whole request in well under a second


def _run(cli, args):
    return CliRunner().invoke(CLIS[cli], args, catch_exceptions=False)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Bad files, made once: recordings, damaged checkpoints, an ONNX file that its manifest vouches for."""
    from models.checkpoint import sha256_file
    from runtime.artifacts import Artifact, Manifest

    root = tmp_path_factory.mktemp("bad")
    p = {"tmp": str(root)}
    tone = (0.1 * np.sin(np.arange(24000) / 10)).astype(np.float32)
    sf.write(root / "ms10.wav", tone[:240], 24000)
    nan = tone.copy()
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 24000, subtype="FLOAT")  # only a float WAV can hold a NaN
    (root / "garbage.wav").write_bytes(b"RIFF0000garbage")
    (root / "afile").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "report.md").write_text("an earlier report")
    (root / "adir.wav").mkdir()
    (root / "lines.txt").write_text("Hello there.\n\nA second line.\n")
    (root / "blank.txt").write_text("\n   \n\n")
    (root / "latin1.txt").write_bytes("one line\ncaf\u00e9\n".encode("latin-1"))
    (root / "taken").mkdir()
    (root / "taken" / "0003.wav").write_bytes(b"RIFF an earlier take")
    orpheus = make_orpheus_folder(root / "orpheus")
    with open(os.path.join(orpheus, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)  # a download cut short
    p["orpheus_cut"] = orpheus
    cut = make_upstream_folder(root / "cut", "cosyvoice3")
    with open(os.path.join(cut, "llm.pt"), "r+b") as f:
        f.truncate(3000)
    p["llm_cut"] = cut
    junk = make_upstream_folder(root / "junk", "cosyvoice3")
    with open(os.path.join(junk, "llm.pt"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    p["llm_junk"] = junk
    eng = root / "engines"
    (eng / "onnx" / "fp32").mkdir(parents=True)
    onnx = eng / "onnx" / "fp32" / "vocoder.onnx"
    onnx.write_bytes(b"not an ONNX model\n")
    manifest = Manifest(str(eng), "cosyvoice3-tiny", "cosyvoice3")
    manifest.add(Artifact("vocoder", "fp32", "onnx", "onnx/fp32/vocoder.onnx", sha256_file(str(onnx)), onnx.stat().st_size))
    manifest.save()
    p["engines"] = str(eng)
    for name in ("ro", "rofs"):
        (root / name).mkdir()
    return p


FIX = r" Fix: \S.*"
# (id, command, arguments, the error line (regex, whole line), whether it must fail before any model loads)
CASES = [
    # synthesize: text and numbers
    ("text-not-utf8", "synthesize", ["--text", "\udcffhello"], r"--text is not valid UTF-8 \(byte 0xff at character 0\)\." + FIX, True),
    ("prompt-text-not-utf8", "synthesize", ["--text", "hi", "--prompt-text", "a\udce9b"], r"--prompt-text is not valid UTF-8 \(byte 0xe9 at character 1\)\." + FIX, True),
    ("text-empty", "synthesize", ["--text", "  "], r"the text to synthesize is empty\." + FIX, True),
    ("seed-beyond-64-bits", "synthesize", ["--text", "hi", "--seed", str(2**64)], r"--seed 18446744073709551616 is outside 0\.\.4294967295\." + FIX, True),
    ("seed-beyond-32-bits", "synthesize", ["--text", "hi", "--seed", str(2**32)], r"--seed 4294967296 is outside 0\.\.4294967295\." + FIX, True),
    ("seed-negative", "synthesize", ["--text", "hi", "--seed", "-1"], r"--seed -1 is outside 0\.\.4294967295\." + FIX, True),
    ("tokens-zero", "synthesize", ["--text", "hi", "--tokens", "0"], r"--tokens 0 is not a positive count\." + FIX, True),
    ("tokens-negative", "synthesize", ["--text", "hi", "--tokens", "-3"], r"--tokens -3 is not a positive count\." + FIX, True),
    ("warmup-negative", "synthesize", ["--text", "hi", "--warmup", "-1"], r"--warmup -1 is negative\." + FIX, True),
    ("device-unknown", "synthesize", ["--text", "hi", "--device", "tpu"], r"unknown device 'tpu'\." + FIX, True),
    # synthesize --text-file: a file of lines through the engine, checked before any work
    ("no-text-at-all", "synthesize", [], r"nothing to synthesize: pass --text, or --text-file with one text per line\." + FIX, True),
    ("text-and-text-file", "synthesize", ["--text", "hi", "--text-file", "{tmp}/lines.txt", "--out-dir", "{tmp}/o1"], r"--text and --text-file both given\." + FIX, True),
    ("text-file-with-out", "synthesize", ["--text-file", "{tmp}/lines.txt", "--out", "{tmp}/x.wav"], r"--out names one file; with --text-file each line gets its own file in --out-dir\." + FIX, True),
    ("text-file-no-out-dir", "synthesize", ["--text-file", "{tmp}/lines.txt"], r"--text-file needs --out-dir, the folder its lines' audio goes to\." + FIX, True),
    ("text-file-stream", "synthesize", ["--text-file", "{tmp}/lines.txt", "--out-dir", "{tmp}/o2", "--stream"], r"--stream writes one file as it is produced; with --text-file every line is its own file \(the engine streams internally\)\." + FIX, True),
    ("text-file-missing", "synthesize", ["--text-file", "{tmp}/nope.txt", "--out-dir", "{tmp}/o3"], r"--text-file \S+/nope\.txt does not exist\." + FIX, True),
    ("text-file-folder", "synthesize", ["--text-file", "{tmp}/taken", "--out-dir", "{tmp}/o3"], r"--text-file \S+/taken is a folder, not a text file\." + FIX, True),
    ("text-file-blank", "synthesize", ["--text-file", "{tmp}/blank.txt", "--out-dir", "{tmp}/o4"], r"--text-file \S+/blank\.txt has no text \(every line is empty\)\." + FIX, True),
    ("text-file-not-utf8", "synthesize", ["--text-file", "{tmp}/latin1.txt", "--out-dir", "{tmp}/o5"], r"--text-file \S+/latin1\.txt is not valid UTF-8 \(byte 0xe9 on line 2\)\." + FIX, True),
    ("text-file-out-dir-taken", "synthesize", ["--text-file", "{tmp}/lines.txt", "--out-dir", "{tmp}/taken"], r"--out-dir \S+/taken already holds 0003\.wav; earlier audio is never overwritten\." + FIX, True),
    ("text-file-out-dir-is-a-file", "synthesize", ["--text-file", "{tmp}/lines.txt", "--out-dir", "{tmp}/afile"], r"--out-dir \S+/afile is a file, not a folder\." + FIX, True),
    ("text-file-concurrency-zero", "synthesize", ["--text-file", "{tmp}/lines.txt", "--out-dir", "{tmp}/o6", "--concurrency", "0"], r"--concurrency 0 is not a positive count\." + FIX, True),
    ("out-dir-without-text-file", "synthesize", ["--text", "hi", "--out-dir", "{tmp}/o7"], r"--out-dir goes with --text-file; one --text writes the one file --out names\." + FIX, True),
    ("text-file-llm-ort", "synthesize", ["--text-file", "{tmp}/lines.txt", "--out-dir", "{tmp}/o8", "--backend", "llm=ort"], r"the engine runs the llm stage with torch, cudagraph or compile \(its continuous batching needs the static slot cache\), not ort\." + FIX, False),
    # synthesize: the output, checked before any work
    ("out-mp3", "synthesize", ["--text", "hi", "--out", "{tmp}/x.mp3"], r"output path \S+/x\.mp3 has the extension \.mp3; audio is written as \.wav, \.flac, \.ogg \(by extension\)\." + FIX, True),
    ("out-no-extension", "synthesize", ["--text", "hi", "--out", "{tmp}/x"], r"output path \S+/x has no extension; audio is written as \.wav, \.flac, \.ogg \(by extension\)\." + FIX, True),
    ("out-directory", "synthesize", ["--text", "hi", "--out", "{tmp}/adir.wav"], r"output path \S+/adir\.wav is a directory\." + FIX, True),
    ("out-under-a-file", "synthesize", ["--text", "hi", "--out", "{tmp}/afile/x.wav"], r"output path \S+ is inside \S+/afile, which is a file, not a folder\." + FIX, True),
    ("out-folder-missing", "synthesize", ["--text", "hi", "--out", "{tmp}/nowhere/x.wav"], r"output folder \S+/nowhere does not exist\." + FIX, True),
    ("out-folder-no-permission", "synthesize", ["--text", "hi", "--out", "{tmp}/ro/x.wav"], r"output path \S+/ro/x\.wav is not writable \(permission denied in \S+/ro\)\." + FIX, True),
    ("out-folder-read-only-fs", "synthesize", ["--text", "hi", "--out", "{tmp}/rofs/x.wav"], r"output path \S+/rofs/x\.wav is not writable \(the file system is read-only in \S+/rofs\)\." + FIX, True),
    # synthesize: the prompt recording, checked before the model loads
    ("prompt-directory", "synthesize", ["--text", "hi", "--prompt-wav", "{tmp}"], r"audio file \S+ is a directory\." + FIX, True),
    ("prompt-missing", "synthesize", ["--text", "hi", "--prompt-wav", "{tmp}/none.wav"], r"audio file \S+/none\.wav does not exist\." + FIX, True),
    ("prompt-10ms", "synthesize", ["--text", "hi", "--prompt-wav", "{tmp}/ms10.wav"], r"the prompt recording \S+/ms10\.wav is 10 ms long; at least 0\.5 s are needed\." + FIX, True),
    ("prompt-nan", "synthesize", ["--text", "hi", "--prompt-wav", "{tmp}/nan.wav"], r"audio file \S+/nan\.wav holds 1 NaN or infinite sample\(s\)\." + FIX, True),
    ("prompt-not-audio", "synthesize", ["--text", "hi", "--prompt-wav", "{tmp}/garbage.wav"], r"audio file \S+/garbage\.wav cannot be decoded \(.*\)\." + FIX, True),
    # synthesize: damaged model files (reading them is the work, so these load the model)
    ("model-unknown", "synthesize", ["--text", "hi", "--model", "nope"], r"unknown model 'nope': not a preset and not a folder\." + FIX, False),
    ("safetensors-truncated", "synthesize", ["--text", "hello", "--model", "{orpheus_cut}", *QUICK], r"checkpoint \S+/model\.safetensors is truncated or damaged \(.*\)\. Fix: download the file again", False),
    ("llm-pt-truncated", "synthesize", ["--text", "hello", "--model", "{llm_cut}", *QUICK], r"checkpoint \S+/llm\.pt is truncated or not a PyTorch checkpoint\. Fix: download the file again", False),
    ("llm-pt-garbage", "synthesize", ["--text", "hello", "--model", "{llm_junk}", *QUICK], r"checkpoint \S+/llm\.pt is truncated or not a PyTorch checkpoint\. Fix: download the file again", False),
    ("onnx-unparseable-hash-ok", "synthesize", ["--text", "hello", "--backend", "llm=torch,flow=torch,vocoder=ort", "--engines-dir", "{engines}", *QUICK], r"\S+/vocoder\.onnx is not a readable ONNX model \(.*\)\." + FIX, False),
    # synthesize: backends and options (parsed against the model, so after it loads; before any request)
    ("backend-stage-twice", "synthesize", ["--text", "hi", "--backend", "llm=ort,llm=torch", *QUICK], r"the backend choice names stage llm twice\." + FIX, False),
    ("backend-unknown-stage", "synthesize", ["--text", "hi", "--backend", "flow=torch", "--model", "orpheus-tiny", *QUICK], r"this model has no stage named flow\." + FIX, False),
    ("backend-chain-none-loads", "synthesize", ["--text", "hi", "--backend", "vocoder=trt/ort", "--engines-dir", "{tmp}/none", *QUICK], r"no backend in the chain trt/ort loads for vocoder: trt:fp32: .*; ort:fp32: no exported artifacts in .*\." + FIX, False),
    ("flow-mode-without-flow", "synthesize", ["--text", "hi", "--model", "orpheus-tiny", "--flow-mode", "steps", *QUICK], r"orpheus-tiny \(orpheus\) has no option flow_mode; it has no options\." + FIX, False),
    ("tokens-beyond-the-graphs", "synthesize", ["--text", "hi", "--tokens", "900"], r"--tokens 900 is more than the 800 speech tokens this model takes for one sentence here \(the limit of its graphs\)\." + FIX, False),
    ("bench-flow-mode-without-flow", "bench", ["--model", "orpheus-tiny", "--flow-mode", "steps", "--lengths", "5"], r"orpheus-tiny \(orpheus\) has no option flow_mode; it has no options\." + FIX, False),
    # report
    # serve: Ray options (each refused before Ray or a model starts)
    ("serve-replicas-without-ray", "serve", ["--replicas", "2"], r"--replicas, --autoscale and --address are options of --ray\." + FIX, True),
    ("serve-ray-no-replicas", "serve", ["--ray", "--replicas", "0"], r"--replicas 0 is not a positive count\." + FIX, True),
    ("serve-ray-autoscale-not-a-range", "serve", ["--ray", "--autoscale", "4"], r"--autoscale '4' is not MIN,MAX\." + FIX, True),
    ("serve-ray-autoscale-upside-down", "serve", ["--ray", "--autoscale", "3,1"], r"--autoscale 3,1 needs 1 <= MIN <= MAX\." + FIX, True),
    ("serve-ray-negative-cpus", "serve", ["--ray", "--replica-cpus=-1"], r"--replica-cpus -1 is negative\." + FIX, True),
    ("serve-placement-without-ray", "serve", ["--placement", "disaggregated"], r"--placement and --lm-replicas are options of --ray\. Fix: add --ray, or leave them out", True),
    ("serve-lm-replicas-replicated", "serve", ["--ray", "--lm-replicas", "2"], r"--lm-replicas is an option of --placement disaggregated\. Fix: add --placement disaggregated, or leave it out", True),
    ("serve-disaggregated-autoscale", "serve", ["--ray", "--placement", "disaggregated", "--autoscale", "1,4"], r"--placement disaggregated takes fixed replica counts, not --autoscale\. Fix: pass --replicas and --lm-replicas, or use --placement replicated with --autoscale", True),
    ("serve-disaggregated-no-lm", "serve", ["--ray", "--placement", "disaggregated", "--lm-replicas", "0"], r"--lm-replicas 0 is not a positive count\. Fix: pass --lm-replicas 1 or more", True),
    ("serve-ray-nothing-at-address", "serve", ["--ray", "--address", "127.0.0.1:1"], r"no Ray cluster answers at 127\.0\.0\.1:1 \(Connection refused\)\." + FIX, True),
    ("serve-ray-address-not-host-port", "serve", ["--ray", "--address", "headnode"], r"--address 'headnode' is not HOST:PORT\." + FIX, True),
    ("serve-ray-both-counts", "serve", ["--ray", "--replicas", "2", "--autoscale", "1,2"], r"--replicas and --autoscale exclude each other\." + FIX, True),
    ("report-out-is-a-file", "report", ["--out", "{tmp}/afile"], r"--out \S+/afile is a file, not a report folder\." + FIX, True),
    ("report-out-not-empty", "report", ["--out", "{tmp}/full"], r"--out \S+/full already exists and is not empty; a report never overwrites another\." + FIX, True),
    ("report-out-under-a-file", "report", ["--out", "{tmp}/afile/r"], r"output path \S+/afile/r is inside \S+/afile, which is a file, not a folder\." + FIX, True),
    ("report-out-no-permission", "report", ["--out", "{tmp}/ro/r"], r"output path \S+/ro/r is not writable \(permission denied in \S+/ro\)\." + FIX, True),
    ("report-seed-negative", "report", ["--seed", "-5"], r"--seed -5 is outside 0\.\.4294967295\." + FIX, True),
    ("report-reps-zero", "report", ["--reps", "0"], r"--reps 0 / --warmup 2: both must be at least 1\." + FIX, True),
    ("report-compare-out-is-a-file", "report", ["compare", "{tmp}", "{tmp}", "--out", "{tmp}/afile"], r"--out \S+/afile is a file, not a report folder\." + FIX, True),
    ("report-nothing-measured", "report", ["--backends", "warp", "--lengths", "5", "--batches", "1", "--reps", "1", "--warmup", "1", "--out", "{tmp}/skipped"],
     r"nothing was measured: every entry was skipped, first warp \(backend\): unknown backend 'warp' for stage llm; \S+/skipped/report\.md lists every reason\." + FIX, False),
    # bench
    ("bench-lengths-abc", "bench", ["--lengths", "abc"], r"--lengths 'abc' is not a comma list of positive counts\." + FIX, True),
    ("bench-lengths-zero", "bench", ["--lengths", "0"], r"--lengths '0' is not a comma list of positive counts\." + FIX, True),
    ("bench-lengths-negative", "bench", ["--lengths=-5"], r"--lengths '-5' is not a comma list of positive counts\." + FIX, True),
    ("bench-reps-zero", "bench", ["--reps", "0"], r"--reps 0 / --warmup 3: both must be at least 1\." + FIX, True),
    ("bench-json-directory", "bench", ["--json", "{tmp}"], r"--json \S+ is a directory\." + FIX, True),
    ("bench-no-backends", "bench", ["--backends", ","], r"--backends ',' names no backend\." + FIX, True),
    ("bench-nothing-measured", "bench", ["--backends", "warp", "--lengths", "5", "--reps", "1", "--warmup", "1"],
     r"nothing was measured: every backend was skipped, first warp: unknown backend 'warp' for stage llm\." + FIX, False),
    # export
    ("export-out-dir-is-a-file", "export", ["onnx", "--model", "cosyvoice3-tiny", "--out-dir", "{tmp}/afile"], r"--out-dir \S+/afile is a file, not a folder\." + FIX, True),
    ("export-out-dir-read-only", "export", ["onnx", "--model", "cosyvoice3-tiny", "--out-dir", "{tmp}/rofs/engines"], r"output path \S+/rofs/engines is not writable \(the file system is read-only in \S+/rofs\)\." + FIX, True),
    ("build-out-dir-is-a-file", "export", ["build", "--model", "cosyvoice3-tiny", "--out-dir", "{tmp}/afile"], r"--out-dir \S+/afile is a file, not a folder\." + FIX, True),
    ("build-precision-unknown", "export", ["build", "--model", "cosyvoice3-tiny", "--precision", "fp64"], r"unknown precision fp64\." + FIX, True),
]


@pytest.mark.parametrize("cli,args,message,before_work", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(bad, tmp_path, monkeypatch, cli, args, message, before_work):
    args = [a.format(**bad) for a in args]
    if cli == "synthesize" and "--out" not in args and "--text-file" not in args:
        args += ["--out", str(tmp_path / "out.wav")]
    deny_writes(monkeypatch, os.path.join(bad["tmp"], "ro"))
    deny_writes(monkeypatch, os.path.join(bad["tmp"], "rofs"), errno.EROFS)
    if before_work:
        def no_model(*a, **k):
            pytest.fail("the model was loaded before the bad argument was refused")

        monkeypatch.setattr(models.registry, "load_model", no_model)
    res = _run(cli, args)
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert re.fullmatch(f"error: {message}", errors[0]), errors[0]
    if before_work:  # nothing else was printed: no model line, no progress
        assert res.output.strip() == errors[0]
    assert not [n for n in os.listdir(bad["tmp"]) if n.endswith(".part")]  # no probe or temporary file left


# -- outputs survive failures --------------------------------------------------------------------------
OLD = b"RIFF an earlier take the user wants to keep"


def _chunks_then(error):
    """A Pipeline.stream that yields one chunk of audio and then fails with `error` (a callable)."""
    def stream(self, text, **kwargs):
        yield torch.full((2400,), 0.25)
        error()
        yield torch.zeros(10)
    return stream


def _kill_myself():
    os.kill(os.getpid(), signal.SIGTERM)  # the handler installed by exit_on_user_error raises here
    time.sleep(5)


def _raise(e):
    def f():
        raise e
    return f


@pytest.mark.parametrize("error,code,line", [
    (_raise(KeyboardInterrupt()), 130, r"error: interrupted \(Ctrl-C\); \S+/out\.wav was left as it was\."),
    (_kill_myself, 143, r"error: interrupted \(SIGTERM\); \S+/out\.wav was left as it was\."),
    (_raise(OSError(errno.ENOSPC, "No space left on device")), 2,
     r"error: cannot write \S+/out\.wav: the disk is full\. \S+/out\.wav was left as it was\. Fix: free some disk space, or write to another disk"),
], ids=["ctrl-c", "sigterm", "disk-full"])
def test_failed_stream_keeps_the_old_file(tmp_path, monkeypatch, error, code, line):
    out = tmp_path / "out.wav"
    out.write_bytes(OLD)
    monkeypatch.setattr(Pipeline, "stream", _chunks_then(error))
    res = _run("synthesize", ["--text", "hi", "--stream", "--out", str(out), *QUICK])
    assert res.exit_code == code, res.output
    assert re.fullmatch(line, res.output.strip().splitlines()[-1]), res.output
    assert "Traceback" not in res.output
    assert out.read_bytes() == OLD and os.listdir(tmp_path) == ["out.wav"]


def test_disk_full_at_the_end_keeps_the_old_file(tmp_path, monkeypatch):
    """A full disk or quota can show only when the data reaches the disk (fsync), after every write
    succeeded: still one line, and the earlier file stays."""
    out = tmp_path / "out.wav"
    out.write_bytes(OLD)

    def full(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", full)
    res = _run("synthesize", ["--text", "hi", "--out", str(out), *QUICK])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (f"error: cannot write {out}: the disk quota is used up. {out} was left "
                                                   "as it was. Fix: free some space within your quota, or write to another disk")
    assert out.read_bytes() == OLD and os.listdir(tmp_path) == ["out.wav"]


def test_no_audio_leaves_no_file(tmp_path, monkeypatch):
    """A stream that ends without audio used to leave a 44-byte WAV."""
    def empty(self, text, **kwargs):
        from runtime.pipeline import SynthesisResult

        class NoAudio:
            result = SynthesisResult(torch.zeros(0), 24000, {}, 0.0)

            def __iter__(self):
                return iter(())

        return NoAudio()

    monkeypatch.setattr(Pipeline, "stream", empty)
    res = _run("synthesize", ["--text", "hi", "--stream", "--out", str(tmp_path / "out.wav"), *QUICK])
    assert res.exit_code == 2 and "there is no audio" in res.output and "out.wav was not written" in res.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg"])
def test_output_formats_and_modes(tmp_path, ext):
    out = tmp_path / f"out{ext}"
    out.write_bytes(OLD)
    res = _run("synthesize", ["--text", "hi", "--out", str(out), *QUICK, *(["--stream"] if ext == ".wav" else [])])
    assert res.exit_code == 0, res.output
    audio, sr = sf.read(out)
    assert sr == 24000 and len(audio) > 0 and os.listdir(tmp_path) == [out.name]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stdout_carries_the_wav_and_nothing_else(stream):
    res = _run("synthesize", ["--text", "hi", "--out", "-", *QUICK, *(["--stream"] if stream else [])])
    assert res.exit_code == 0, res.stderr
    data = res.stdout_bytes
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    # streamed: the length is not known when the header goes out (0xFFFFFFFF), whole: it is
    assert (data[40:44] == b"\xff\xff\xff\xff") == stream
    audio, sr = sf.read(io.BytesIO(data))
    assert sr == 24000 and len(audio) == (len(data) - 44) // 2 > 0
    assert "RTF" in res.stderr and "-> stdout" in res.stderr  # the report went to stderr


def test_two_writers_to_one_path_never_splice(tmp_path):
    """Two streams to one path (two processes with --stream): chunks interleaved in time, each writer
    has its own temporary file, the path holds one whole file at every moment, the last rename wins."""
    path = str(tmp_path / "out.wav")
    a, b = AudioWriter(path, 24000), AudioWriter(path, 24000)
    for _ in range(3):
        a.write(np.full(480, 0.5, np.float32))
        b.write(np.full(480, -0.5, np.float32))
    b.write(np.full(480, -0.5, np.float32))
    a.close()
    got, _ = sf.read(path)
    assert len(got) == 3 * 480 and np.allclose(got, 0.5, atol=1e-4)
    b.close()
    got, _ = sf.read(path)
    assert len(got) == 4 * 480 and np.allclose(got, -0.5, atol=1e-4)
    assert os.listdir(tmp_path) == ["out.wav"]


def test_report_default_folder_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--backends", "warp", "--lengths", "5", "--batches", "1", "--reps", "1", "--warmup", "1"]
    first = _run("report", args)
    assert first.exit_code == 2  # nothing measured, but the report with the reasons is written
    (name,) = os.listdir("reports")
    marker = os.path.join("reports", name, "report.md")
    before = open(marker).read()
    assert "unknown backend 'warp'" in before
    # another run takes the default name between the check and the rename: the report moves on
    import runtime.report
    monkeypatch.setattr(runtime.report, "default_folder", lambda model, env: os.path.join("reports", name))
    second = _run("report", args)
    assert second.exit_code == 2 and f"wrote reports/{name}-2/report.md" in second.output
    assert sorted(os.listdir("reports")) == [name, f"{name}-2"] and open(marker).read() == before


def test_corrupt_calibration_cache_heals_itself(tmp_path, monkeypatch):
    model = models.registry.load_model("cosyvoice3-tiny")
    texts = calibration_texts()
    cache = tmp_path / "calibration"
    cache.mkdir()
    (cache / "vocoder.pt").write_bytes(b"garbage, not a torch file")
    (cache / "vocoder.json").write_text(json.dumps(_key(model, "vocoder", texts, 120)))
    (cache / "flow_encoder.pt").write_bytes(b"x")
    (cache / "flow_encoder.json").write_text("{not json")
    fresh = {g: [{"x": torch.ones(2)}] for g in ("vocoder", "flow_encoder")}
    monkeypatch.setattr("export.calibration.capture", lambda model, graphs, *a: {g: fresh[g] for g in graphs})
    lines = []
    same = lambda feeds: {g: [{k: v.tolist() for k, v in x.items()} for x in f] for g, f in feeds.items()} == \
        {g: [{"x": [1.0, 1.0]}] for g in fresh}
    assert same(load_or_capture(model, ["vocoder", "flow_encoder"], str(cache), log=lines.append))
    notes = [line for line in lines if "capturing it again" in line]
    assert len(notes) == 2 and all("\n" not in n for n in notes), lines
    assert re.fullmatch(r"calibration: the cached \S+/vocoder\.pt is damaged \(.*\); capturing it again", notes[0])
    lines.clear()
    assert same(load_or_capture(model, ["vocoder", "flow_encoder"], str(cache), log=lines.append))
    assert lines == [f"calibration: cached captures reused from {cache}"]
    assert sorted(os.listdir(cache)) == ["flow_encoder.json", "flow_encoder.pt", "vocoder.json", "vocoder.pt"]


def test_calibration_copy_on_the_device_is_made_only_for_a_capture(tmp_path, monkeypatch):
    """`export build --device cuda` captures in a copy of the model on the GPU (the exported one stays on the
    CPU): the copy runs the capture and is made only when the cache lacks a graph."""
    model = models.registry.load_model("cosyvoice3-tiny")
    copy = models.registry.load_model("cosyvoice3-tiny")
    ran_in, made = [], []
    monkeypatch.setattr("export.calibration.capture",
                        lambda m, graphs, *a: ran_in.append(m) or {g: [{"x": torch.ones(1)}] for g in graphs})
    make = lambda: made.append(1) or copy
    load_or_capture(model, ["vocoder"], str(tmp_path), device="cuda", log=lambda _: None, capture_model=make)
    assert made == [1] and ran_in == [copy]
    load_or_capture(model, ["vocoder"], str(tmp_path), device="cuda", log=lambda _: None, capture_model=make)
    assert made == [1] and ran_in == [copy]  # cached: no copy, no capture


# -- progress --------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_in_logs_and_a_bar_on_a_terminal():
    log = io.StringIO()
    with Progress("export", 3, every=0, stream=log) as p:
        for g in ("llm", "flow", "vocoder"):
            p.step(g)
    assert log.getvalue().splitlines() == ["export: 1/3 llm (0:00)", "export: 2/3 flow (0:00)", "export: 3/3 vocoder (0:00)"]
    quiet = io.StringIO()
    with Progress("synthesize", 100, stream=quiet) as p:  # every 30 s by default: a quick run prints nothing
        for _ in range(100):
            p.step()
    assert quiet.getvalue() == ""
    tty = _Terminal()
    with Progress("calibration", 4, delay=0, stream=tty) as p:
        p.step("texts")
        time.sleep(0.11)  # the bar redraws at most 10 times a second
        p.step("texts")
    assert "\rcalibration [########----------------------] 2/4 texts (0:00)" in tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # the bar is gone when the work is done


def test_synthesize_counts_sentences(monkeypatch):
    import runtime.progress

    class Chatty(Progress):
        def __init__(self, label, total, **kw):
            super().__init__(label, total, every=0)

    monkeypatch.setattr(runtime.progress, "Progress", Chatty)
    text = ("The quick brown fox jumps over the lazy dog near the river bank today. A second sentence follows here "
            "with quite a lot of words in it as well. And the third sentence closes the paragraph with more words.")
    res = _run("synthesize", ["--text", text, "--out", "-", *QUICK])
    assert res.exit_code == 0, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("synthesize:")]
    assert all(re.fullmatch(r"synthesize: \d/3 sentences \(\d+:\d\d\)", l) for l in lines), lines
    # one line per sentence as it starts; on a slow machine the once-a-second tick repeats the last one
    steps = [l.split(" (")[0] for l in lines]
    assert [s for k, s in enumerate(steps) if k == 0 or s != steps[k - 1]] == \
        [f"synthesize: {i}/3 sentences" for i in (1, 2, 3)], lines
