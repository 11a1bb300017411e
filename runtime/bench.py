"""python -m runtime.bench: every backend against the torch eager baseline, in one process.

    python -m runtime.bench --model cosyvoice3-random --device cuda \\
        --backends torch,compile,ort:fp32,ort:fp16,ort:int8 --lengths 50,500 --json bench.json

Measured per backend (all in the same run, so ratios are against the eager baseline measured here):
- every graph at the sizes a request of N speech tokens produces (flow, vocoder; the LLM prefill),
- the LLM decode step (ms per token over a generation of N tokens),
- token2wav (flow + vocoder for N tokens) and the end-to-end RTF with the LLM included.
Warm-up (first call: compilation, graph capture, ORT session init) is timed separately and
excluded from the steady-state numbers; those are the median and p95 of `--reps` calls.
A backend that is missing (no artifact, no provider, no GPU) is listed as skipped with the reason.
The timing helpers here (time_call, summarize, peak_memory, environment) also serve runtime.report.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import click
import torch

from models.errors import UserError, exit_on_user_error


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict:
    """Median and p95 (nearest rank) of durations given in seconds, in ms."""
    samples = sorted(seconds)
    p95 = samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]
    return {"median_ms": statistics.median(samples) * 1e3, "p95_ms": p95 * 1e3}


def time_call(fn, device: torch.device, warmup: int = 3, reps: int = 20, results: list | None = None) -> dict:
    """First-call time, then the median / p95 of `reps` calls after `warmup` more. `results`, when
    given, collects the return value of every timed call (e.g. a synthesis result with stage times)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
        if results is not None:
            results.append(out)
    return {"first_ms": first * 1e3, **summarize(samples), "reps": reps}


def graph_sizes(model, graph: str, tokens: int, batch: int = 1) -> dict:
    """Dim sizes of `graph` for a request of `tokens` speech tokens (the family's rule, clipped to
    the spec's range)."""
    spec = model.graph_specs()[graph]
    want = model.graph_sizes(graph, tokens, batch)
    return {d.name: max(d.min, min(d.max, want[d.name])) for d in spec.dims}


def peak_memory(device: torch.device) -> float | None:
    """Device memory in use (GB) by everything in this process: torch, ONNX Runtime and TensorRT."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 1e9


def backend_choices(backends: str) -> list[str]:
    """`--backends` -> one choice per measured pipeline: a comma list of whole-pipeline choices
    (torch,ort:fp16), or a |-separated list: needed when per-stage mixes are given (they contain commas),
    accepted for whole-pipeline choices too (torch|ort)."""
    return [c.strip() for c in (backends.split("|") if "=" in backends or "|" in backends else backends.split(","))
            if c.strip()]


def cpu_name() -> str:
    """The CPU model (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What produced the numbers: device name and library versions (None for what is not installed)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, OSError):  # not installed, or its native libraries are missing
            versions[name] = None
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(), **versions}


def bench_backend(model, choice: str, device: torch.device, lengths: list[int], engines_dir: str | None,
                  reps: int, warmup: int, log, options: dict | None = None) -> dict:
    from runtime.backends import create_backend
    from runtime.pipeline import Pipeline

    out = {"backend": choice, "graphs": {}, "token2wav": {}, "llm_step": {}, "e2e": {}}
    t0 = time.perf_counter()
    pipe = Pipeline(model, choice, device=str(device), engines_dir=engines_dir, options=options)
    pipe.activate()
    out["load_seconds"] = time.perf_counter() - t0
    specs = model.graph_specs()
    runners = dict(pipe.runners)
    # graphs the pipeline does not call with its options (the flow estimator in solver mode) are
    # timed too: the per-step layout and the estimator are what users compare against upstream
    for graph, spec in specs.items():
        if graph not in runners:
            try:
                runners[graph] = create_backend(pipe.choice.first(spec.stage, graph), model, spec, device, engines_dir)
            except UserError as e:  # an optional extra graph without an artifact is skipped alone
                out.setdefault("skipped_graphs", {})[graph] = str(e)
    lm = model.lm
    for n in lengths:
        for graph, runner in runners.items():
            if graph == lm.graph:
                continue
            spec = specs[graph]
            feed = {k: v.to(device) for k, v in spec.sample_feed(graph_sizes(model, graph, n), seed=n).items()}
            out["graphs"].setdefault(graph, {})[n] = time_call(lambda: runner.infer(feed, check=False), device, warmup, reps)
        # token2wav: flow + vocoder for n tokens, through the family's own wiring
        speaker = model.make_speaker(None, None)
        utt = model.make_utterance("Benchmark sentence.", speaker)
        tokens = model.synthetic_tokens(n, torch.Generator().manual_seed(n))
        gen = torch.Generator().manual_seed(0)
        calls = pipe.run

        def t2w():
            model.token2wav(tokens, utt, calls, gen, device)

        out["token2wav"][n] = time_call(t2w, device, warmup, max(reps // 2, 5))
        # LLM: prefill + n decode steps, ms per token
        prompt = torch.tensor([utt.prompt_ids], dtype=torch.int64, device=device)
        step_ids = torch.tensor([[lm.next_input_id(tokens[0])]], dtype=torch.int64, device=device)

        def generate():
            dec = pipe.runners[lm.graph].decoder(*lm.cache_shape, batch=1, max_len=prompt.shape[1] + n + 1)
            dec.prefill(prompt)
            for _ in range(n):
                dec.step(step_ids)

        r = time_call(generate, device, 1, max(reps // 10, 2))
        out["llm_step"][n] = {"ms_per_token": r["median_ms"] / n, "first_ms": r["first_ms"], "total_ms": r["median_ms"]}
        # end to end at a fixed token rate: RTF = (LLM for n tokens + token2wav) / audio seconds
        audio_s = n / model.token_rate()
        e2e_ms = r["median_ms"] + out["token2wav"][n]["median_ms"]
        out["e2e"][n] = {"ms": e2e_ms, "audio_s": audio_s, "rtf": e2e_ms / 1e3 / audio_s}
        log(f"  {choice:<14} {n:>5} tokens: token2wav {out['token2wav'][n]['median_ms']:8.2f} ms, "
            f"LLM {out['llm_step'][n]['ms_per_token']:7.3f} ms/token, RTF {out['e2e'][n]['rtf']:.4f}")
    out["memory_gb"] = peak_memory(device)
    out["backends"] = {g: r.metadata() for g, r in runners.items()}
    return out


def print_table(results: list[dict], lengths: list[int], log) -> None:
    base = next((r for r in results if r.get("backend") == "torch" and "skipped" not in r), None)
    log("")
    log(f"{'backend':<16}{'what':<22}" + "".join(f"{n:>10}{'':>9}" for n in lengths))
    rows = []
    for r in results:
        if "skipped" in r:
            log(f"{r['backend']:<16}skipped: {r['skipped']}")
            continue
        for graph, per in sorted(r["graphs"].items()):
            rows.append((r["backend"], graph, {n: per[n]["median_ms"] for n in lengths if n in per},
                         {n: base["graphs"][graph][n]["median_ms"] for n in lengths} if base and graph in base["graphs"] else {}))
        rows.append((r["backend"], "token2wav", {n: r["token2wav"][n]["median_ms"] for n in lengths},
                     {n: base["token2wav"][n]["median_ms"] for n in lengths} if base else {}))
        rows.append((r["backend"], "llm ms/token", {n: r["llm_step"][n]["ms_per_token"] for n in lengths},
                     {n: base["llm_step"][n]["ms_per_token"] for n in lengths} if base else {}))
        rows.append((r["backend"], "e2e RTF", {n: r["e2e"][n]["rtf"] for n in lengths},
                     {n: base["e2e"][n]["rtf"] for n in lengths} if base else {}))
    for backend, what, vals, ref in rows:
        cells = []
        for n in lengths:
            v = vals.get(n)
            x = f"x{ref[n] / v:.1f}" if v and ref.get(n) and backend != "torch" else ""
            cells.append(f"{v:10.3f}{x:>9}" if v is not None else f"{'-':>10}{'':>9}")
        log(f"{backend:<16}{what:<22}" + "".join(cells))
    log("(ms unless stated; xN = speed-up over torch eager measured in this run)")


@click.command()
@click.option("--model", "model_name", default="cosyvoice3-tiny", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--backends", default="torch,ort", show_default=True,
              help="Comma list of backend choices (each for all stages, e.g. ort:fp16); with per-stage mixes separate choices by |.")
@click.option("--lengths", default="50,500", show_default=True, help="Speech-token counts per request.")
@click.option("--reps", default=20, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--engines-dir", default=None)
@click.option("--json", "json_path", default=None, help="Write all numbers here (replaced only when complete).")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps", "prefix"]))
@exit_on_user_error
def main(model_name, device, backends, lengths, reps, warmup, engines_dir, json_path, flow_mode):
    """Every backend against the torch eager baseline; exits 2 when every backend was skipped."""
    from models.files import check_folder_writable, write_text
    from models.registry import load_model
    from runtime.report import parse_counts
    from runtime.synthesize import check_device

    # every argument is checked before the model is loaded
    ns = parse_counts(lengths, "--lengths")
    if reps < 1 or warmup < 1:
        raise UserError(f"--reps {reps} / --warmup {warmup}: both must be at least 1.", "pass --reps 1 --warmup 1 or more")
    if json_path is not None:
        if os.path.isdir(json_path):
            raise UserError(f"--json {json_path} is a directory.", "pass a file name such as bench.json")
        check_folder_writable(os.path.dirname(os.path.abspath(json_path)), json_path, "--json", create=True)
    choices = backend_choices(backends)
    if not choices:
        raise UserError(f"--backends {backends!r} names no backend.", "pass e.g. --backends torch,ort")
    device = torch.device(check_device(device))
    model = load_model(model_name, device=str(device))
    options = model.resolve_options({"flow_mode": flow_mode})  # a model without that option: one-line error
    results = []
    for choice in choices:
        click.echo(f"{choice}:")
        try:
            results.append(bench_backend(model, choice, device, ns, engines_dir, reps, warmup, click.echo, options))
        except UserError as e:
            click.echo(f"  skipped: {e}")
            results.append({"backend": choice, "skipped": str(e)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(results, ns, click.echo)
    env = environment(device)
    meta = {"model": model_name, "device": str(device), "gpu": env["gpu"] or env["cpu"], "torch": torch.__version__,
            "python": platform.python_version(), "onnxruntime": env["onnxruntime"], "when": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python -m runtime.bench " + " ".join(sys.argv[1:]), "random_weights": model.random_weights}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        write_text(json_path, json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        click.echo(f"wrote {json_path}")
    if all("skipped" in r for r in results):  # a table of skips is not a benchmark
        problem, _, fix = results[0]["skipped"].partition(" Fix: ")
        raise UserError(f"nothing was measured: every backend was skipped, first {results[0]['backend']}: "
                        f"{problem.rstrip('.')}.", fix or "pass --backends with at least one backend that loads")


if __name__ == "__main__":
    main()
