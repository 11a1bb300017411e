"""`python -m runtime.report` and `compare` as a user runs them, on cosyvoice3-tiny (CPU, torch + ort):
the folder's files, the tables' rows and columns, finite positive numbers, skips with reasons, and a
comparison that lines up."""

import json
import math
import os
import re
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from export.cli import main as export_main
from runtime.artifacts import Manifest
from runtime.report import PLOTS
from runtime.report import main as report_main

MODEL = "cosyvoice3-tiny"
# ort with the per-step flow layout: these four graphs export in ~20 s, the one-graph solver alone
# takes ~50 s (the session-wide `exported` fixture exports every graph of all three presets, ~3 min)
GRAPHS = "llm,flow_encoder,flow_estimator,vocoder"
# 300 tokens is past the 200 the tiny flow graphs once took (it was skipped then): every length a
# report asks for fits the graphs now, and a batch beyond the graphs' limit (4 > 2) runs as two calls
LENGTHS = "short,40,300"
MEASURED = {(b, n) for b in ("torch", "ort") for n in ("short", "40 tokens", "300 tokens")}


def _report(*args):
    return CliRunner().invoke(report_main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("engines") / MODEL)
    res = CliRunner().invoke(export_main, ["onnx", "--model", MODEL, "--graphs", GRAPHS, "--out-dir", out],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def run_dir(engines, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reports") / "run")
    res = _report("--model", MODEL, "--backends", "torch,ort,ort:int8,warp", "--flow-mode", "steps",
                  "--lengths", LENGTHS, "--batches", "1,2,4", "--reps", "2", "--warmup", "1",
                  "--engines-dir", engines, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def _json(folder, name="report.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _tables(markdown: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every Markdown table: (the `## ` heading above it, header cells, row cells)."""
    cells = lambda s: [c.strip() for c in re.split(r"(?<!\\)\|", s.strip())[1:-1]]
    out, heading, lines = [], None, markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append(cells(row))
            out.append((heading, cells(line), body))
    return out


def _report_tables(folder) -> dict[str, tuple[list[str], list[list[str]]]]:
    with open(os.path.join(folder, "report.md")) as f:
        return {heading: (header, rows) for heading, header, rows in _tables(f.read()) if heading}


def test_folder_holds_report_json_and_valid_plots(run_dir):
    assert sorted(os.listdir(run_dir)) == sorted(["report.md", "report.json", *PLOTS])
    for name in PLOTS:
        with Image.open(os.path.join(run_dir, name)) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200


def test_tables_have_the_expected_rows_and_columns(run_dir):
    with open(os.path.join(run_dir, "report.md")) as f:
        md = f.read()
    for heading, header, rows in _tables(md):
        assert all(len(r) == len(header) for r in rows), heading
    tables = _report_tables(run_dir)
    assert list(tables) == ["Lengths", "End to end", "Per stage", "Batch", "Concurrency", "Backends", "Skipped",
                            "Artifacts"]
    header, rows = tables["End to end"]
    assert header == ["backend", "length", "audio s", "first call ms", "median ms", "p95 ms", "RTF", "first chunk ms",
                      "first chunk p95 ms"]
    assert {(r[0], r[1]) for r in rows} == MEASURED
    header, rows = tables["Per stage"]
    assert header == ["backend", "length", "llm ms", "flow ms", "vocoder ms"]
    assert {(r[0], r[1]) for r in rows} == MEASURED
    header, rows = tables["Batch"]
    assert header == ["backend", "B", "median ms", "requests/s", "audio s/s"]
    assert {(r[0], r[1]) for r in rows} == {(b, n) for b in ("torch", "ort") for n in ("1", "2", "4")}
    header, rows = tables["Concurrency"]
    assert header == ["backend", "C", "requests/s", "audio s/s", "first chunk ms", "first chunk p95 ms", "latency ms"]
    assert {(r[0], r[1]) for r in rows} == {(b, n) for b in ("torch", "ort") for n in ("1", "2", "4")}
    assert [r[0] for r in tables["Backends"][1]] == ["torch", "ort"]
    for heading in ("End to end", "Per stage", "Batch", "Concurrency"):
        for row in tables[heading][1]:
            assert all(float(x) > 0 for x in row[2:]), (heading, row)
    assert "python -m runtime.report --model cosyvoice3-tiny" in md and "onnxruntime" in md
    for plot in PLOTS:
        assert f"]({plot})" in md


def test_skipped_entries_carry_their_reasons(run_dir):
    header, rows = _report_tables(run_dir)["Skipped"]
    assert header == ["backend", "what", "reason"]
    reasons = {(r[0], r[1]): r[2] for r in rows}
    assert set(reasons) == {("ort:int8", "backend"), ("warp", "backend")}
    assert "no int8 onnx artifact" in reasons[("ort:int8", "backend")] and "Fix: run python -m export build" in reasons[("ort:int8", "backend")]
    assert reasons[("warp", "backend")].startswith("unknown backend 'warp'")


def test_a_compiler_crash_is_recorded_not_fatal():
    """An Inductor crash (seen on the H200 for Orpheus) becomes the entry's skip reason; the report
    goes on with the next backend."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    from runtime.report import guarded

    def crash():
        raise inductor_exc.InductorError(TypeError("list indices must be integers or slices, not NoneType"), None)

    assert guarded(crash) == {"skipped": "torch.compile failed (InductorError): TypeError: list indices must be "
                                         "integers or slices, not NoneType"}
    other = dynamo_exc.BackendCompilerFailed(lambda: None, RuntimeError("no kernel\nfor this"), None)
    assert guarded(lambda: (_ for _ in ()).throw(other))["skipped"].endswith("RuntimeError: no kernel")


def test_json_numbers_are_finite_and_positive(run_dir, engines):
    report = _json(run_dir)
    meta = report["meta"]
    assert meta["command"].startswith("python -m runtime.report --model cosyvoice3-tiny --device cpu")
    assert {n: x["tokens"] for n, x in meta["lengths"].items()} == {"short": 25, "40 tokens": 40, "300 tokens": 300}
    assert meta["environment"]["torch"] and meta["environment"]["onnxruntime"] and meta["environment"]["gpu"] is None
    by_name = {b["backend"]: b for b in report["backends"]}
    assert by_name["warp"]["skipped"] and by_name["ort:int8"]["skipped"]

    def positive(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                if k != "skipped":
                    positive(v, f"{where}.{k}")
        else:
            assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, where

    for name in ("torch", "ort"):
        b = by_name[name]
        for section in ("lengths", "batch", "concurrency"):
            positive(b[section], f"{name}.{section}")
        assert b["load_s"] > 0 and b["memory_gb"] is None  # no device memory on the CPU
        short = b["lengths"]["short"]
        assert short["audio_s"] == pytest.approx(1.0)  # 25 tokens at 25 tokens/s
        assert short["rtf"] == pytest.approx(short["latency_median_ms"] / 1e3 / short["audio_s"])
        assert b["lengths"]["300 tokens"]["audio_s"] == pytest.approx(12.0)  # past the old flow limit
        assert b["batch"]["4"]["requests_per_s"] > 0  # past the graphs' batch limit
        assert b["batch"]["2"]["requests_per_s"] == pytest.approx(2e3 / b["batch"]["2"]["latency_median_ms"])
    manifest = Manifest.load(engines)
    arts = by_name["ort"]["artifacts"]
    assert sorted(a["graph"] for a in arts) == sorted(GRAPHS.split(","))
    for a in arts:
        assert manifest.get(a["graph"], "fp32", "onnx").sha256.startswith(a["sha256"]) and len(a["sha256"]) == 12
        assert os.path.isfile(a["path"])


def test_compare_lines_up_both_runs(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    report = _json(other)
    report["backends"] = [b for b in report["backends"] if b["backend"] != "ort"]  # B lacks ort
    torch_b = next(b for b in report["backends"] if b["backend"] == "torch")
    torch_b["lengths"]["short"]["latency_median_ms"] *= 2
    with open(other / "report.json", "w") as f:
        json.dump(report, f)
    out = tmp_path / "cmp"
    res = _report("compare", run_dir, str(other), "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = _json(out, "compare.json")["rows"]
    row = {(r["section"], r["backend"], r["point"], r["metric"]): r for r in rows}
    r = row[("e2e", "torch", "short", "latency_median_ms")]
    assert r["ratio"] == pytest.approx(2.0) and r["better"] == "A" and r["note"] == ""
    assert row[("batch", "torch", "B=1", "requests_per_s")]["better"] == "same"
    assert all(r["note"].endswith("missing in B") and r["b"] is None for r in rows if r["backend"] == "ort")
    assert any(r["backend"] == "ort" and r["section"] == "concurrency" for r in rows)
    assert "unknown backend 'warp'" in row[("backend", "warp", "-", "-")]["note"]
    with open(out / "compare.md") as f:
        md = f.read()
    (_, facts, _), (_, header, body) = _tables(md)
    assert facts == ["", "A", "B"]
    assert header == ["section", "backend", "point", "metric", "A", "B", "B/A", "better", "note"]
    assert len(body) == len(rows) and all(len(r) == len(header) for r in body)
    assert [(r[0], r[1], r[2], r[3]) for r in body] == list(row)


@pytest.mark.parametrize("args,message", [
    (["--model", "nope"], "error: unknown model 'nope': not a preset and not a folder."),
    (["--lengths", "short,huge"], "error: unknown length 'huge'."),
    (["--batches", "1,0"], "error: --batches '1,0' is not a comma list of positive counts."),
    (["compare", "/nonexistent-a", "/nonexistent-b"], "error: /nonexistent-a has no report.json."),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    res = _report(*args, *([] if args[0] == "compare" else ["--out", str(tmp_path / "r")]))
    assert res.exit_code == 2
    assert res.output.startswith(message) and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_interrupted_report_keeps_what_it_measured(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (a GPU call's time limit) in the middle of a backend: the folder is written with
    every finished measurement, the cut entry marked, and the command still exits as interrupted."""
    import runtime.report as report_module

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "measure_concurrency", interrupt)
    out = str(tmp_path / "cut")
    res = CliRunner().invoke(report_main, ["--model", MODEL, "--backends", "torch", "--lengths", "short",
                                           "--batches", "1,2", "--reps", "1", "--warmup", "1", "--out", out])
    assert res.exit_code == 130
    assert f"error: interrupted (Ctrl-C); the partial report is in {out}." in res.output
    report = _json(out)
    assert report["meta"]["interrupted"] is True
    (entry,) = report["backends"]
    assert entry["interrupted"] is True and entry["concurrency"] == {}
    assert entry["lengths"]["short"]["latency_median_ms"] > 0 and set(entry["batch"]) == {"1", "2"}
    with open(os.path.join(out, "report.md")) as f:
        assert "**Interrupted** (Ctrl-C or SIGTERM): this report holds what was measured before; torch stopped " \
               "part-way." in f.read()


def test_a_killed_report_keeps_the_backends_measured_before(tmp_path):
    """SIGKILL (a forced kill no handler sees) during the second backend: the folder already holds
    the first backend's measurements and says it is incomplete."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.report", "--model", MODEL, "--backends", "torch,torch:bf16",
                             "--lengths", "short", "--batches", "1,2", "--reps", "2", "--warmup", "1", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "report.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the report ended before writing its first backend"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    report = _json(str(out))
    assert report["meta"]["in_progress"] == {"backends_done": 1, "backends": 2}
    (entry,) = report["backends"]
    assert entry["backend"] == "torch" and entry["lengths"]["short"]["latency_median_ms"] > 0
    with open(out / "report.md") as f:
        assert "**Incomplete**: written after 1 of 2 backends while the run went on" in f.read()


def test_validate_hears_a_folder_without_the_solver_in_steps_mode(engines, tmp_path):
    """A folder exported with the per-step estimator only (as real-size exports are: the one-graph
    solver takes minutes) still gets its whole-pipeline audio check, run in the layout its graphs
    serve, and the report says which layout that was."""
    copy = str(tmp_path / "steps-only")
    shutil.copytree(engines, copy)
    res = CliRunner().invoke(export_main, ["validate", "--model", MODEL, "--graphs", "flow_encoder,flow_estimator",
                                           "--points", "opt", "--seeds", "1", "--out-dir", copy],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "audio ort-fp32 (flow, flow_mode=steps): SNR" in res.output
    (audio,) = _json(copy, "validation.json")["audio"]
    assert audio["options"] == {"flow_mode": "steps"}
    assert audio["backends"] == {"llm": "torch:fp32", "flow": "ort:fp32", "vocoder": "torch:fp32"}
    assert audio["samples"] == audio["candidate_samples"]
    assert audio["snr_db"] > 60 and audio["passed"]
    with open(os.path.join(copy, "validation.md")) as f:
        assert "| llm=torch:fp32,flow=ort:fp32,vocoder=torch:fp32 (flow_mode steps) | fp32 |" in f.read()
