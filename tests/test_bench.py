"""`python -m runtime.bench` as a user runs it, on the tiny preset: what it measures, prints and writes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from models.registry import load_model
from runtime.bench import main as bench_main


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _check_timing(t: dict, reps: int) -> None:
    assert t["reps"] == reps
    assert 0 < t["median_ms"] <= t["p95_ms"] and t["first_ms"] > 0


def test_bench_cli_measures_every_graph_and_writes_json(tmp_path):
    """torch measured (every graph at the sizes each length gives, the flow estimator too although the
    solver layout does not call it; token2wav; LLM decode; end-to-end RTF computed from those), ort
    without artifacts listed as skipped with the reason, exit 0, and the JSON holds what the table shows."""
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench_main, ["--model", "cosyvoice3-tiny", "--backends", "torch,ort", "--lengths", "4,9",
                                          "--reps", "2", "--warmup", "1", "--engines-dir", str(tmp_path / "none"),
                                          "--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["model"] == "cosyvoice3-tiny" and meta["device"] == "cpu" and meta["random_weights"] is True
    assert meta["command"].startswith("python -m runtime.bench")
    measured, skipped = data["results"]
    assert skipped["backend"] == "ort" and "no exported artifacts in" in skipped["skipped"]
    assert measured["backend"] == "torch" and "skipped" not in measured

    model = load_model("cosyvoice3-tiny")
    lengths = ("4", "9")  # JSON keys
    assert set(measured["graphs"]) == set(model.graph_specs()) - {model.lm.graph}
    for graph, per_length in measured["graphs"].items():
        assert set(per_length) == set(lengths), graph
        for t in per_length.values():
            _check_timing(t, 2)
    for n in lengths:
        t2w, llm, e2e = measured["token2wav"][n], measured["llm_step"][n], measured["e2e"][n]
        _check_timing(t2w, 5)  # max(reps // 2, 5)
        assert llm["ms_per_token"] == pytest.approx(llm["total_ms"] / int(n))
        assert e2e["audio_s"] == pytest.approx(int(n) / model.token_rate())
        assert e2e["ms"] == pytest.approx(llm["total_ms"] + t2w["median_ms"])
        assert e2e["rtf"] == pytest.approx(e2e["ms"] / 1e3 / e2e["audio_s"])
    # the printed table: one line per measured quantity, the skip with its reason
    table = res.output[res.output.index("backend "):]
    assert "torch           e2e RTF" in table and "ort             skipped: no exported artifacts in" in table
    rtf_row = next(line for line in table.splitlines() if line.startswith("torch           e2e RTF"))
    assert [float(x) for x in rtf_row.split()[3:]] == pytest.approx([measured["e2e"][n]["rtf"] for n in lengths], rel=1e-3, abs=1e-3)
    assert f"wrote {out}" in res.output


def test_backend_lists_split_on_commas_or_bars():
    from runtime.bench import backend_choices

    assert backend_choices("torch,ort:fp16") == ["torch", "ort:fp16"]
    assert backend_choices("torch|ort") == ["torch", "ort"]  # once refused as the backend 'torch|ort'
    assert backend_choices("torch|llm=ort,flow=ort:fp16,vocoder=ort") == ["torch", "llm=ort,flow=ort:fp16,vocoder=ort"]
    assert backend_choices(" torch , ") == ["torch"]
    # a graph named beside its stage (its own precision) stays in its row
    assert backend_choices("torch|flow=ort:int8,flow_encoder=ort:fp16") == ["torch", "flow=ort:int8,flow_encoder=ort:fp16"]
