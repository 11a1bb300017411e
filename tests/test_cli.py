"""`python -m runtime.synthesize` as a user runs it: outputs, exit codes, one-line errors."""

import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from models.errors import UserError
from runtime.synthesize import main
from tests.conftest import deny_writes


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("model", ["cosyvoice3-tiny", "cosyvoice2-tiny", "orpheus-tiny"])
def test_synthesize_writes_wav_and_reports_rtf(tmp_path, model):
    out = tmp_path / "out.wav"
    res = _run("--model", model, "--text", "Hello world. This is a test.", "--out", str(out), "--tokens", "30")
    assert res.exit_code == 0, res.output
    audio, sr = sf.read(out)
    assert sr == 24000 and len(audio) > 0
    assert "RTF" in res.output and "llm" in res.output and "vocoder" in res.output
    assert "RANDOM weights" in res.output  # stderr is mixed into output by CliRunner


@pytest.mark.parametrize("args,message", [
    (["--text", "   "], "error: the text to synthesize is empty. Fix: pass some words with --text"),
    (["--text", "hi", "--model", "nope"], "error: unknown model 'nope': not a preset and not a folder."),
    (["--text", "hi", "--out", "/nonexistent-dir/x.wav"], "error: output folder /nonexistent-dir does not exist."),
    (["--text", "hi", "--backend", "llm=warp"], "error: unknown backend 'warp' for stage llm."),
    (["--text", "hi", "--backend", "decoder=torch"], "error: this model has no stage named decoder."),
    (["--text", "hi", "--tokens", "0"], "error: --tokens 0 is not a positive count."),
    (["--text", "hi", "--device", "tpu"], "error: unknown device 'tpu'."),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "x.wav")]
    res = _run(*args)
    assert res.exit_code == 2
    lines = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), res.output
    assert "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_gpu(tmp_path):
    res = _run("--text", "hi", "--device", "cuda", "--out", str(tmp_path / "x.wav"))
    assert res.exit_code == 2
    assert "error: --device cuda was asked for but no CUDA GPU is visible" in res.output


def test_unwritable_output_is_refused_before_work(tmp_path, monkeypatch):
    # as root permission bits stop nothing, so the folder refuses new files the way the kernel would
    ro = tmp_path / "ro"
    ro.mkdir()
    deny_writes(monkeypatch, str(ro))
    monkeypatch.setattr("models.registry.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    res = _run("--text", "hi", "--out", str(ro / "x.wav"))
    assert res.exit_code == 2 and "is not writable (permission denied in" in res.output


def test_output_inside_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    res = _run("--text", "hi", "--out", str(blocker / "x.wav"))
    assert res.exit_code == 2 and "which is a file, not a folder" in res.output


def _line_audio(folder, line):
    audio, sr = sf.read(folder / f"{line:04d}.wav", dtype="float32")
    assert sr == 24000 and len(audio) > 0
    return torch.from_numpy(audio)


@pytest.mark.parametrize("model", ["cosyvoice3-tiny", "orpheus-tiny"])
def test_text_file_lines_run_together_and_sound_as_alone(tmp_path, model):
    """--text-file: every non-empty line is one engine request, its file named by its line number;
    a line's audio is the same whether it ran among the others or alone (same seed)."""
    lines = ["Hello there.", "", "A second line, a little longer than the first.", "And a third one!"]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    res = _run("--model", model, "--text-file", str(tmp_path / "lines.txt"), "--out-dir", str(tmp_path / "all"),
               "--tokens", "20", "--seed", "3")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["0001.wav", "0003.wav", "0004.wav"]
    assert "3 of 3 lines" in res.output and "audio s per s" in res.output and "3 lines at once" in res.output
    (tmp_path / "one.txt").write_text("\n\nA second line, a little longer than the first.\n")
    res = _run("--model", model, "--text-file", str(tmp_path / "one.txt"), "--out-dir", str(tmp_path / "alone"),
               "--tokens", "20", "--seed", "3")
    assert res.exit_code == 0, res.output
    together, alone = _line_audio(tmp_path / "all", 3), _line_audio(tmp_path / "alone", 3)
    assert together.shape == alone.shape
    assert (together - alone).abs().max().item() <= 2 / 32767  # one step of 16-bit rounding at most
    assert not torch.equal(_line_audio(tmp_path / "all", 1), _line_audio(tmp_path / "all", 4))


def test_a_failing_line_is_named_and_the_others_are_kept(tmp_path, monkeypatch):
    from runtime.engine import Engine

    submit = Engine.submit

    def picky(self, text, **kwargs):
        if text.startswith("Bad"):
            raise UserError("this line cannot be spoken.", "rewrite it")
        return submit(self, text, **kwargs)

    monkeypatch.setattr(Engine, "submit", picky)
    (tmp_path / "lines.txt").write_text("Good one.\nBad one.\nGood two.\n")
    res = CliRunner().invoke(main, ["--text-file", str(tmp_path / "lines.txt"), "--out-dir", str(tmp_path / "o"),
                                    "--tokens", "10"])
    assert res.exit_code == 2
    assert "error: --text-file line 2: this line cannot be spoken. (the other lines' files are written) Fix: rewrite it" \
        in res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0001.wav", "0003.wav"]


def test_an_interrupted_text_file_run_keeps_the_finished_lines(tmp_path, monkeypatch):
    """Ctrl-C after the second line is done: the process ends at once (lines not started never start,
    the running one is cancelled), the written files stay, and the message says how many there are."""
    import re

    from runtime.progress import Progress

    step = Progress.step

    def step_then_interrupt(self, item=""):
        step(self, item)
        if self.done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "step", step_then_interrupt)
    (tmp_path / "lines.txt").write_text("\n".join(f"Line number {i}." for i in range(1, 7)) + "\n")
    res = CliRunner().invoke(main, ["--text-file", str(tmp_path / "lines.txt"), "--out-dir", str(tmp_path / "o"),
                                    "--tokens", "10", "--concurrency", "1"])
    assert res.exit_code == 130, res.output
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    m = re.search(r"error: interrupted \(Ctrl-C\); (\d) of 6 lines were written to (\S+)\.", res.output)
    assert m and int(m.group(1)) == len(written) and m.group(2) == str(tmp_path / "o"), res.output
    assert written[:2] == ["0001.wav", "0002.wav"] and len(written) < 6
