"""python -m runtime.report: RTF comparison reports across backends, and side-by-side comparisons.

    python -m runtime.report --model cosyvoice3-random --device cuda --backends torch,compile:bf16,ort:fp16 \\
        --lengths short,medium,long --batches 1,4,16
    python -m runtime.report compare reports/<run A> reports/<run B> [--out reports/A-vs-B]

A report folder (default reports/<model>-<gpu or cpu>-<date>/) holds report.md (tables, the exact
command, library versions, the device, the artifacts used), report.json (every number) and three
plots. Requests have a fixed number of speech tokens per length (short 1 s, medium 10 s, long 30 s of
audio at the model's token rate), so random-weight models, which rarely stop on their own, are
comparable. Per backend choice (one backend for all stages, e.g. ort:fp16, or a per-stage mix):

- load_s: Pipeline construction + activate() (weights moved, ORT sessions created, plans deserialised).
- first_call_ms: the first request of a length after loading; it pays torch.compile, CUDA-graph
  capture and first-run allocations for new shapes. It is excluded from every other number.
- latency median / p95: wall time of Pipeline.synthesize (text in, whole audio on the CPU) over
  --reps calls after --warmup calls; rtf = median latency / seconds of audio produced.
- stage ms: median over the same calls of the pipeline's own per-stage times (device-synchronised;
  the llm stage includes sampling).
- first chunk median / p95: time from calling Pipeline.stream to its first audio chunk on the CPU,
  over --reps streamed requests after --warmup untimed ones (the first is reported on its own).
- batch B: Pipeline.synthesize_batch of B copies of the request; requests/s = B / median latency,
  audio-s/s = audio seconds produced / median latency. B beyond the graphs' batch limit runs as
  several calls of at most the limit each.
- concurrency C: C threads (the calling one and C - 1 others) stream one request each at the same
  moment through the same backends (backends that take one request at a time, compile and trt: C
  requests submitted together to the serving engine, runtime/engine.py, which batches them), max(2, ceil(reps / C)) rounds after --warmup untimed rounds;
  requests/s = C / median round wall time, audio-s/s = audio seconds of one round / median round
  wall time; first chunk and latency statistics over every request of every timed round.
- memory_gb: device memory in use (torch.cuda.mem_get_info: total - free, so ONNX Runtime and
  TensorRT count too), the largest of the samples taken after each measurement; memory_added_gb: that
  minus what was in use before the backend was loaded. None on the CPU.

Anything that cannot be measured (unknown backend, missing artifact, a length beyond the graphs'
limits, a batch beyond the spec's maximum) is listed as skipped with the reason instead of failing
the report; a report where nothing at all was measured is still written, and exits 2 with the first
reason.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import click
import torch

from models.errors import UserError, exit_on_user_error
from runtime.bench import backend_choices, environment, peak_memory, summarize, time_call
from runtime.synthesize import check_device, check_seed

# name -> (seconds of audio, text). One sentence each (no . ! ? ; :), so the pipeline makes one
# utterance and --tokens-style fixed counts apply to the whole request; the text grows with the
# length because the LLM prefill does.
LENGTHS = {
    "short": (1.0, "Hello there, how are you today"),
    "medium": (10.0, "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, "
                     "sipping his coffee and wondering whether the rain will come before the harvest is done"),
    "long": (30.0, "Once upon a time in a small village by the sea there lived an old fisherman who went out "
                   "every morning before sunrise, and while the other boats came back with nets full of silver "
                   "fish he often returned with nothing but stories about the strange lights he had seen far "
                   "out on the water, stories the children loved and the grown ups pretended not to believe, "
                   "until one evening the lights followed him all the way into the harbour"),
}
PLOTS = ("stage_times.png", "rtf_vs_length.png", "first_chunk_vs_concurrency.png")
# metrics where a larger value is better (everything else: smaller is better)
HIGHER_IS_BETTER = {"requests_per_s", "audio_s_per_s"}
# `compare` calls two values the same when they differ by at most this fraction (run-to-run noise)
SAME_WITHIN = 0.02


@dataclass(frozen=True)
class Request:
    name: str
    tokens: int
    text: str


def resolve_lengths(value: str, token_rate: float) -> list[Request]:
    """`short,medium,long` and/or explicit speech-token counts (`50,500`) -> requests."""
    out = []
    for item in (v.strip() for v in value.split(",")):
        if item in LENGTHS:
            seconds, text = LENGTHS[item]
            out.append(Request(item, max(1, round(seconds * token_rate)), text))
        elif item.isdigit() and int(item) > 0:
            n = int(item)
            # the text of the named length closest in audio seconds keeps the prefill proportionate
            nearest = min(LENGTHS.values(), key=lambda lt: abs(lt[0] - n / token_rate))
            out.append(Request(f"{n} tokens", n, nearest[1]))
        else:
            raise UserError(f"unknown length {item!r}.", f"use {', '.join(LENGTHS)} or a positive speech-token count")
    return out


def parse_counts(value: str, what: str) -> list[int]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or not all(v.isdigit() and int(v) > 0 for v in items):
        raise UserError(f"{what} {value!r} is not a comma list of positive counts.", f"write e.g. {what} 1,4,16")
    return sorted({int(v) for v in items})


# -- measuring ---------------------------------------------------------------------------------------
class MemoryPeak:
    """Largest device memory in use over the samples taken (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = peak_memory(device)
        self.peak = self.before

    def sample(self) -> None:
        now = peak_memory(self.device)
        if now is not None:
            self.peak = max(self.peak, now)

    def result(self) -> dict:
        added = None if self.peak is None else self.peak - self.before
        return {"memory_gb": self.peak, "memory_added_gb": added}


def stream_once(pipe, req: Request, seed: int) -> tuple[float, float, float]:
    """(seconds to the first chunk, seconds to the last, seconds of audio) of one streamed request."""
    t0 = time.perf_counter()
    first, samples = None, 0
    for chunk in pipe.stream(req.text, seed=seed, fixed_tokens=req.tokens):
        if first is None:
            first = time.perf_counter() - t0
        samples += chunk.numel()
    total = time.perf_counter() - t0
    if samples == 0:
        raise UserError(f"{req.tokens} speech tokens produced no audio.", "use a longer length")
    return first, total, samples / pipe.model.sample_rate


def measure_length(pipe, req: Request, device: torch.device, warmup: int, reps: int, seed: int) -> dict:
    results = []
    timing = time_call(lambda: pipe.synthesize(req.text, seed=seed, fixed_tokens=req.tokens), device, warmup, reps,
                       results=results)
    audio_s = results[0].audio_seconds
    if audio_s == 0:
        raise UserError(f"{req.tokens} speech tokens produced no audio.", "use a longer length")
    stage_ms = {s: summarize([r.stage_seconds[s] for r in results])["median_ms"] for s in pipe.model.stages}
    first_stream = stream_once(pipe, req, seed)[0]
    for _ in range(max(warmup - 1, 0)):
        stream_once(pipe, req, seed)
    firsts = summarize([stream_once(pipe, req, seed)[0] for _ in range(reps)])
    return {"tokens": req.tokens, "audio_s": audio_s, "first_call_ms": timing["first_ms"],
            "latency_median_ms": timing["median_ms"], "latency_p95_ms": timing["p95_ms"],
            "rtf": timing["median_ms"] / 1e3 / audio_s, "stage_ms": stage_ms,
            "first_chunk_first_call_ms": first_stream * 1e3, "first_chunk_median_ms": firsts["median_ms"],
            "first_chunk_p95_ms": firsts["p95_ms"]}


def measure_batch(pipe, req: Request, batch: int, device: torch.device, warmup: int, reps: int, seed: int) -> dict:
    results = []
    timing = time_call(lambda: pipe.synthesize_batch([req.text] * batch, seed=seed, fixed_tokens=req.tokens), device,
                       warmup, reps, results=results)
    seconds = timing["median_ms"] / 1e3
    return {"latency_median_ms": timing["median_ms"], "latency_p95_ms": timing["p95_ms"],
            "first_call_ms": timing["first_ms"], "requests_per_s": batch / seconds,
            "audio_s_per_s": results[0].audio_seconds / seconds}


def concurrent_round(pool: ThreadPoolExecutor, pipe, req: Request, level: int, seed: int):
    """`level` streamed requests started together, one on this thread and the others on the pool's:
    (round wall seconds, per-request (first chunk s, total s, audio s))."""
    barrier = threading.Barrier(level)

    def worker(i: int):
        barrier.wait()  # the pipeline keeps no per-request state: every thread streams through it
        start = time.perf_counter()
        return start, stream_once(pipe, req, seed + i)

    # the calling thread serves one request, so concurrency 1 is exactly a single stream (with torch's
    # OpenMP on the CPU, a request on another thread runs slower than on the thread that owns the pool)
    others = [pool.submit(worker, i) for i in range(1, level)]
    runs = [worker(0)] + [f.result() for f in others]
    wall = max(start + rec[1] for start, rec in runs) - min(start for start, _ in runs)
    return wall, [rec for _, rec in runs]


def measure_concurrency(pipe, req: Request, level: int, warmup: int, reps: int, seed: int) -> dict:
    # one pool for all rounds: a new OS thread pays for its own OpenMP / CUDA set-up on its first call,
    # which the warm-up round absorbs only if the same threads serve the timed rounds
    with ThreadPoolExecutor(max(level - 1, 1)) as pool:
        return timed_rounds(lambda k: concurrent_round(pool, pipe, req, level, seed), level, warmup, reps)


def timed_rounds(round_, level: int, warmup: int, reps: int) -> dict:
    """`warmup` untimed rounds, then at least two timed ones (enough for `reps` requests); a round of
    `level` requests returns (wall s, [(first audio s, finished s, audio s) per request])."""
    for k in range(warmup):
        round_(k)
    walls, recs = [], []
    for k in range(max(2, math.ceil(reps / level))):
        wall, rs = round_(warmup + k)
        walls.append(wall)
        recs += rs
    wall = summarize(walls)["median_ms"] / 1e3
    firsts, totals = summarize([r[0] for r in recs]), summarize([r[1] for r in recs])
    return {"requests_per_s": level / wall, "audio_s_per_s": sum(r[2] for r in recs[:level]) / wall,
            "first_chunk_median_ms": firsts["median_ms"], "first_chunk_p95_ms": firsts["p95_ms"],
            "latency_median_ms": totals["median_ms"], "latency_p95_ms": totals["p95_ms"], "requests": len(recs)}


def measure_engine_concurrency(engine, req: Request, level: int, warmup: int, reps: int, seed: int) -> dict:
    """Concurrency through the serving engine (backends that take one request at a time, such as
    compile, serve many this way): rounds of `level` requests submitted at once."""
    def round_(k):
        t0 = time.perf_counter()
        handles = [engine.submit(req.text, seed=seed + k * level + i, fixed_tokens=req.tokens) for i in range(level)]
        for h in handles:
            h.audio()
        return time.perf_counter() - t0, [(h.stats.first_audio, h.stats.finished, h.stats.audio_seconds) for h in handles]

    return {**timed_rounds(round_, level, warmup, reps), "via": "engine"}


def artifacts_used(pipe, model, engines_dir: str | None) -> list[dict]:
    """The manifest entries (path, sha256 prefix) behind every artifact-backed graph of `pipe`."""
    from runtime.artifacts import Manifest, default_dir
    from runtime.backends import KINDS

    root = engines_dir or default_dir(model.name)
    manifest = Manifest.load(root, required=False)
    rows = []
    for graph, loaded in pipe.loaded.items():
        artifact_kind = KINDS[loaded.option.kind].artifact
        if artifact_kind is None:
            continue
        precision = loaded.option.precision
        art = manifest.get(graph, precision, artifact_kind)
        rows.append({"graph": graph, "precision": precision, "kind": art.kind, "path": manifest.abspath(art),
                     "sha256": art.sha256[:12], "bytes": art.bytes})
    return rows


# failures that skip one entry of the report instead of ending it: what the user can act on, and
# running out of device memory (a larger batch or length than the GPU holds)
# A compiler crash (Inductor / a dynamo backend) is the toolchain's bug, not the report's: the entry
# records it and the report goes on to the next backend instead of losing what it measured so far.
SKIPPABLE = (UserError, torch.cuda.OutOfMemoryError, torch._dynamo.exc.BackendCompilerFailed)


def skip_reason(error: Exception) -> str:
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, torch._dynamo.exc.BackendCompilerFailed):
        inner = getattr(error, "inner_exception", None) or error
        first = (str(inner).strip().splitlines() or [""])[0]
        return f"torch.compile failed ({type(error).__name__}): {type(inner).__name__}: {first[:200]}"
    torch.cuda.empty_cache()  # what the failed call allocated, so the next entry starts clean
    return f"out of device memory: {str(error).splitlines()[0][:160]}"


def guarded(fn, *args) -> dict:
    """fn(*args), or {"skipped": reason}."""
    try:
        return fn(*args)
    except SKIPPABLE as e:
        return {"skipped": skip_reason(e)}


def measure_backend(model, choice: str, device: torch.device, requests: list[Request], throughput: Request,
                    batches: list[int], engines_dir: str | None, warmup: int, reps: int, seed: int, log,
                    options: dict | None = None, entry: dict | None = None) -> dict:
    """Measure one backend choice into `entry` (filled as it goes, so an interrupted run keeps what
    was measured: see run_report) and return it."""
    from runtime.pipeline import Pipeline

    entry = {"backend": choice} if entry is None else entry
    memory = MemoryPeak(device)
    t0 = time.perf_counter()
    try:
        pipe = Pipeline(model, choice, device=str(device), engines_dir=engines_dir, options=options)
        pipe.activate()
    except SKIPPABLE as e:
        reason = skip_reason(e)
        log(f"  skipped: {reason}")
        entry["skipped"] = reason
        return entry
    entry["load_s"] = time.perf_counter() - t0
    entry["stages"] = {pipe.stage_of[g]: str(x.option) for g, x in pipe.loaded.items()}
    entry["artifacts"] = artifacts_used(pipe, model, engines_dir)
    entry["memory_gb"] = entry["memory_added_gb"] = None
    entry["lengths"], entry["batch"], entry["concurrency"] = {}, {}, {}
    memory.sample()
    for req in requests:
        r = entry["lengths"][req.name] = guarded(measure_length, pipe, req, device, warmup, reps, seed)
        memory.sample()
        log(f"  {req.name:<10} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                                   f"{r['latency_median_ms']:9.1f} ms  RTF {r['rtf']:.4f}  first chunk "
                                   f"{r['first_chunk_median_ms']:.1f} ms"))
    for b in batches:  # a batch beyond the graphs' limit runs as several calls (synthesize_batch splits it)
        r = guarded(measure_batch, pipe, throughput, b, device, warmup, reps, seed)
        entry["batch"][str(b)] = r
        memory.sample()
        log(f"  batch {b:<4} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                                  f"{r['requests_per_s']:8.2f} req/s  {r['audio_s_per_s']:8.2f} audio-s/s"))
    # backends that take one request at a time (compile, trt) serve concurrent requests through the
    # engine, which batches them; the others are measured with threads on the pipeline itself
    engine = None
    for c in batches:
        if c == 1 or pipe.concurrent:
            r = guarded(measure_concurrency, pipe, throughput, c, warmup, reps, seed)
        else:
            if engine is None:
                engine = guarded(_start_engine, model, choice, device, engines_dir, options, max(batches))
            r = engine if isinstance(engine, dict) else \
                guarded(measure_engine_concurrency, engine, throughput, c, warmup, reps, seed)
        entry["concurrency"][str(c)] = r
        memory.sample()
        log(f"  threads {c:<2} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                                   f"{r['requests_per_s']:8.2f} req/s  first chunk {r['first_chunk_median_ms']:.1f} ms"))
    if engine is not None and not isinstance(engine, dict):
        engine.stop()
    entry.update(memory.result())
    entry["runners"] = {g: r.metadata() for g, r in pipe.runners.items()}
    return entry


def _start_engine(model, choice, device, engines_dir, options, streams):
    from runtime.engine import Engine

    return Engine(model, choice, device=str(device), engines_dir=engines_dir, options=options,
                  max_streams=streams).start()


def run_report(model, choices: list[str], device: torch.device, requests: list[Request], throughput: Request,
               batches: list[int], engines_dir: str | None, warmup: int, reps: int, seed: int, log,
               options: dict | None = None, on_backend_done=None) -> list[dict]:
    """One entry per choice, appended before it is measured: on Ctrl-C or SIGTERM (KeyboardInterrupt)
    the exception carries the entries so far as `e.partial_results` (the last one marked
    `interrupted`, or skipped if it had not loaded), so main can still write what was measured.
    `on_backend_done(results)` after each choice: main writes the folder then, so that a forced kill
    (SIGKILL, which no handler sees) leaves every backend measured before it."""
    results = []
    for choice in choices:
        log(f"{choice}:")
        entry = {"backend": choice}
        results.append(entry)
        try:
            measure_backend(model, choice, device, requests, throughput, batches, engines_dir, warmup,
                            reps, seed, log, options, entry)
        except KeyboardInterrupt as e:
            if "stages" in entry:
                entry["interrupted"] = True
            else:
                entry["skipped"] = "interrupted before it loaded"
            e.partial_results = results
            raise
        if on_backend_done is not None:
            on_backend_done(results)
        gc.collect()  # drop the pipeline's sessions and modules before the next backend's memory baseline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# -- flat view: the rows of the tables and of `compare` -------------------------------------------------
E2E_METRICS = ("latency_median_ms", "latency_p95_ms", "rtf", "first_call_ms", "first_chunk_median_ms",
               "first_chunk_p95_ms", "first_chunk_first_call_ms")
BATCH_METRICS = ("latency_median_ms", "requests_per_s", "audio_s_per_s")
CONCURRENCY_METRICS = ("requests_per_s", "audio_s_per_s", "first_chunk_median_ms", "first_chunk_p95_ms",
                       "latency_median_ms")


def flatten(report: dict) -> tuple[dict, dict]:
    """(values, skips): values maps (section, backend, point, metric) -> number; skips maps
    (section, backend, point) -> reason, with ("*", backend, "*") for a backend skipped whole."""
    values, skips = {}, {}
    for b in report["backends"]:
        name = b["backend"]
        if "skipped" in b:
            skips[("*", name, "*")] = b["skipped"]
            continue
        for metric in ("load_s", "memory_gb", "memory_added_gb"):
            if b.get(metric) is not None:
                values[("backend", name, "-", metric)] = b[metric]
        for length, r in b["lengths"].items():
            if "skipped" in r:
                skips[("e2e", name, length)] = skips[("stage", name, length)] = r["skipped"]
                continue
            for metric in E2E_METRICS:
                values[("e2e", name, length, metric)] = r[metric]
            for stage, ms in r["stage_ms"].items():
                values[("stage", name, length, f"{stage}_ms")] = ms
        for section, metrics, prefix in (("batch", BATCH_METRICS, "B"), ("concurrency", CONCURRENCY_METRICS, "C")):
            for n, r in b[section].items():
                point = f"{prefix}={n}"
                if "skipped" in r:
                    skips[(section, name, point)] = r["skipped"]
                    continue
                for metric in metrics:
                    values[(section, name, point, metric)] = r[metric]
    return values, skips


def skip_note(skips: dict, key: tuple) -> str | None:
    """Why `key` has no value in a report: its entry's skip, or its whole backend's."""
    return skips.get(key[:3]) or skips.get(("*", key[1], "*"))


def skipped_rows(report: dict) -> list[tuple[str, str, str]]:
    """(backend, what, reason) for every skipped entry, in report order."""
    _, skips = flatten(report)
    rows = []
    for (section, backend, point), reason in skips.items():
        if section == "stage":  # the same skip as its e2e row
            continue
        what = "backend" if section == "*" else f"length {point}" if section == "e2e" else f"{section} {point}"
        rows.append((backend, what, reason))
    return rows


# -- writing -----------------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.4f}" if a >= 1e-3 else f"{v:.2e}"


def md_table(headers: list[str], rows: list[list]) -> str:
    cell = lambda x: fmt(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def measured(report: dict):
    return [b for b in report["backends"] if "skipped" not in b]


def render_markdown(report: dict) -> str:
    meta, env = report["meta"], report["meta"]["environment"]
    stages = meta["stages"]
    tp = meta["settings"]["throughput_length"]
    out = [f"# {meta['model']} on {env['gpu'] or 'CPU (' + env['cpu'] + ')'}, {meta['date']}", ""]
    if meta["random_weights"]:
        out += ["**Random weights**: the audio is noise; the numbers are speed only.", ""]
    out += ["```", meta["command"], "```", ""]
    if meta.get("in_progress"):
        done = meta["in_progress"]
        out += [f"**Incomplete**: written after {done['backends_done']} of {done['backends']} backends while the run "
                "went on; a run that ends rewrites it, so this one was stopped (e.g. killed) before the rest.", ""]
    if meta.get("interrupted"):
        cut = [b["backend"] for b in report["backends"] if b.get("interrupted")]
        out += ["**Interrupted** (Ctrl-C or SIGTERM): this report holds what was measured before"
                + (f"; {', '.join(cut)} stopped part-way" if cut else "") + ".", ""]
    out += [md_table(["what", "value"], [
        ["model", f"{meta['model']} ({meta['family']}, {meta['model_source']})"], ["device", meta["device"]],
        ["GPU", env["gpu"] or "none"], ["CPU", env["cpu"]], ["torch threads", str(env["torch_threads"])],
        ["python", env["python"]], ["torch", env["torch"]], ["onnxruntime", env["onnxruntime"] or "not installed"],
        ["tensorrt", env["tensorrt"] or "not installed"],
        ["reps / warm-up", f"{meta['settings']['reps']} / {meta['settings']['warmup']}"],
        ["throughput at", f"{tp} ({meta['lengths'][tp]['tokens']} tokens)"]]), ""]
    out += ["## Lengths", "", md_table(["length", "speech tokens", "nominal audio s", "text characters"],
                                       [[n, str(x["tokens"]), x["nominal_audio_s"], str(len(x["text"]))]
                                        for n, x in meta["lengths"].items()]), ""]
    out += ["## End to end", "",
            "Latency: Pipeline.synthesize, request to whole audio on the CPU; RTF = median latency / audio "
            "seconds. First call: the first request of that length after loading (compile, capture, first-run "
            "allocation), excluded from the statistics. First chunk: Pipeline.stream to its first audio chunk (a "
            "request shorter than the family's first streaming hop has only one chunk).", "",
            md_table(["backend", "length", "audio s", "first call ms", "median ms", "p95 ms", "RTF",
                      "first chunk ms", "first chunk p95 ms"],
                     [[b["backend"], n, r["audio_s"], r["first_call_ms"], r["latency_median_ms"], r["latency_p95_ms"],
                       r["rtf"], r["first_chunk_median_ms"], r["first_chunk_p95_ms"]]
                      for b in measured(report) for n, r in b["lengths"].items() if "skipped" not in r]), ""]
    out += ["## Per stage", "", "Median ms per request over the same calls (llm includes sampling).", "",
            md_table(["backend", "length", *(f"{s} ms" for s in stages)],
                     [[b["backend"], n, *(r["stage_ms"][s] for s in stages)]
                      for b in measured(report) for n, r in b["lengths"].items() if "skipped" not in r]),
            "", "![per-stage time](stage_times.png) ![RTF vs length](rtf_vs_length.png)", ""]
    out += ["## Batch", "", f"Pipeline.synthesize_batch of B copies of the {tp} request.", "",
            md_table(["backend", "B", "median ms", "requests/s", "audio s/s"],
                     [[b["backend"], n, r["latency_median_ms"], r["requests_per_s"], r["audio_s_per_s"]]
                      for b in measured(report) for n, r in b["batch"].items() if "skipped" not in r]), ""]
    out += ["## Concurrency", "", f"C threads stream one {tp} request each at the same moment, sharing the backends.", "",
            md_table(["backend", "C", "requests/s", "audio s/s", "first chunk ms", "first chunk p95 ms", "latency ms"],
                     [[b["backend"], n, r["requests_per_s"], r["audio_s_per_s"], r["first_chunk_median_ms"],
                       r["first_chunk_p95_ms"], r["latency_median_ms"]]
                      for b in measured(report) for n, r in b["concurrency"].items() if "skipped" not in r]),
            "", "![first chunk vs concurrency](first_chunk_vs_concurrency.png)", ""]
    out += ["## Backends", "", "Device memory: in use on the device (all libraries), largest sample after each "
            "measurement; added: since before this backend was loaded. '-' on the CPU.", "",
            md_table(["backend", "stages", "load s", "device memory GB", "added GB"],
                     [[b["backend"], ", ".join(f"{s}={k}" for s, k in b["stages"].items()), b["load_s"],
                       b["memory_gb"], b["memory_added_gb"]] for b in measured(report)]), ""]
    skipped = skipped_rows(report)
    out += ["## Skipped", "", md_table(["backend", "what", "reason"], [list(r) for r in skipped]) if skipped
            else "Nothing was skipped.", ""]
    arts = [[b["backend"], a["graph"], a["precision"], a["kind"], a["path"], a["sha256"]]
            for b in measured(report) for a in b["artifacts"]]
    out += ["## Artifacts", "", md_table(["backend", "graph", "precision", "kind", "path", "sha256"], arts) if arts
            else "No artifact-backed backend (ort, trt, aoti) was measured.", ""]
    return "\n".join(out)


def write_plots(report: dict, folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    backends = measured(report)
    stages = report["meta"]["stages"]
    lengths = list(report["meta"]["lengths"])

    def finish(fig, empty_axes, name):
        for ax in empty_axes:  # the file exists either way; an empty plot says why it is empty
            ax.text(0.5, 0.5, "no data: skipped (see report.md)", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(lengths), figsize=(max(4.5, 0.9 * len(backends) + 2) * len(lengths), 4.5),
                             squeeze=False)
    empty = []
    for ax, length in zip(axes[0], lengths):
        rows = [(b["backend"], b["lengths"][length]["stage_ms"]) for b in backends
                if "skipped" not in b["lengths"][length]]
        bottom = [0.0] * len(rows)
        for stage in stages:
            heights = [ms[stage] for _, ms in rows]
            ax.bar(range(len(rows)), heights, bottom=bottom, label=stage)
            bottom = [a + h for a, h in zip(bottom, heights)]
        ax.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=30, ha="right")
        tokens = report["meta"]["lengths"][length]["tokens"]
        ax.set_title(length if length == f"{tokens} tokens" else f"{length} ({tokens} tokens)")
        ax.set_ylabel("median ms per request")
        if rows:
            ax.legend()
        else:
            empty.append(ax)
    finish(fig, empty, PLOTS[0])

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    has_data = False
    for b in backends:
        pts = sorted((r["audio_s"], r["rtf"]) for r in b["lengths"].values() if "skipped" not in r)
        if pts:
            has_data = True
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b["backend"])
    ax.set_xlabel("audio seconds")
    ax.set_ylabel("RTF (median latency / audio seconds)")
    ax.set_title("RTF vs audio length")
    if has_data:
        ax.legend()
    finish(fig, [] if has_data else [ax], PLOTS[1])

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    has_data = False
    for b in backends:
        pts = [(int(c), r["first_chunk_median_ms"]) for c, r in b["concurrency"].items() if "skipped" not in r]
        if pts:
            has_data = True
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b["backend"])
    levels = report["meta"]["settings"]["batches"]
    ax.set_xscale("log", base=2)  # levels grow geometrically (1, 4, 16)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("concurrent requests (threads)")
    ax.set_ylabel("first chunk, median ms")
    ax.set_title(f"first-chunk latency vs concurrency ({report['meta']['settings']['throughput_length']})")
    if has_data:
        ax.legend()
    finish(fig, [] if has_data else [ax], PLOTS[2])


def write_report(report: dict, folder: str, next_free: bool = False) -> str:
    """Write the report into a temporary folder beside `folder` and rename it to `folder` when complete
    (models/files.py): never over another run's report. `next_free`: take `folder`-2, -3, ... when
    `folder` is taken (the default name), else that is a UserError. Returns the folder written."""
    from models.files import AtomicFolder, write_text

    target = AtomicFolder(folder, next_free=next_free)
    with target as tmp:
        write_text(os.path.join(tmp, "report.json"), json.dumps(report, indent=1, default=str))
        write_text(os.path.join(tmp, "report.md"), render_markdown(report))
        write_plots(report, tmp)
    return target.path


def update_report(report: dict, folder: str) -> None:
    """Rewrite a report folder this run created (each file replaced whole, never half-written)."""
    from models.files import write_text

    write_text(os.path.join(folder, "report.json"), json.dumps(report, indent=1, default=str))
    write_text(os.path.join(folder, "report.md"), render_markdown(report))
    write_plots(report, folder)


def check_out_folder(out: str | None, option: str = "--out") -> None:
    """Refuse, before measuring, an output folder the report could not take: a file, a folder that
    already holds files (a report is never overwritten), or a place nothing can be written."""
    from models.files import check_folder_writable

    shown = out or "reports/"
    if out is not None and os.path.isfile(out):
        raise UserError(f"{option} {out} is a file, not a report folder.", f"pass a new folder with {option}")
    if out is not None and os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{option} {out} already exists and is not empty; a report never overwrites another.",
                        f"pass a new folder with {option} (or leave it out for a fresh reports/<name>), or delete {out}")
    # missing folders on the way are created: the nearest one that exists must take new entries
    check_folder_writable(os.path.dirname(os.path.abspath(out or os.path.join("reports", "x"))), shown, option,
                          create=True)


def check_measured(report: dict, folder: str) -> None:
    """A report where every backend, length, batch and concurrency level was skipped measured
    nothing: that is a failure (exit 2) with the first reason, though the folder lists them all."""
    values, _ = flatten(report)
    if any(key[0] != "backend" for key in values):
        return
    rows = skipped_rows(report)
    backend, what, reason = rows[0] if rows else ("-", "-", "no backend was given")
    problem, _, fix = reason.partition(" Fix: ")
    raise UserError(f"nothing was measured: every entry was skipped, first {backend} ({what}): "
                    f"{problem.rstrip('.')}; {folder}/report.md lists every reason.",
                    fix or f"see the Skipped table in {folder}/report.md")


def default_folder(model_name: str, env: dict) -> str:
    """reports/<model>-<gpu or cpu>-<date>, with -2, -3, ... when that run already exists (write_report
    moves on again if another run takes the name meanwhile)."""
    slug = re.sub(r"[^a-z0-9]+", "-", (env["gpu"] or "cpu").lower()).strip("-")
    base = os.path.join("reports", f"{model_name}-{slug}-{time.strftime('%Y%m%d')}")
    folder, n = base, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    return folder


# -- compare -----------------------------------------------------------------------------------------
def load_report(folder: str) -> dict:
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no report.json.", "pass a folder written by python -m runtime.report")
    try:
        with open(path) as f:
            report = json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}).",
                        "pass a folder written by python -m runtime.report") from None
    if not isinstance(report, dict) or not {"meta", "backends"} <= set(report):
        raise UserError(f"{path} is not a report (no meta and backends).", "pass a folder written by python -m runtime.report")
    return report


def compare_reports(a_dir: str, b_dir: str) -> dict:
    a, b = load_report(a_dir), load_report(b_dir)
    (va, sa), (vb, sb) = flatten(a), flatten(b)
    keys = list(va) + [k for k in vb if k not in va]
    # an entry skipped (or absent) in both runs has no value rows: one row carries its reasons
    with_values = {k[:3] for k in keys}
    for section, backend, point in [*sa, *sb]:
        if section == "*" and not any(k[1] == backend for k in keys):
            keys.append(("backend", backend, "-", "-"))
        elif section not in ("*", "stage") and (section, backend, point) not in with_values:
            keys.append((section, backend, point, "-"))
    keys = list(dict.fromkeys(keys))
    # rows grouped by backend, section, point (batch sizes and thread counts ascending) and metric;
    # otherwise in order of first appearance
    seen: dict = {}
    for k in keys:
        for part in (("backend", k[1]), ("point", k[0], k[2]), ("metric", k[0], k[3])):
            seen.setdefault(part, len(seen))
    sections = ("backend", "e2e", "stage", "batch", "concurrency")

    def position(k):
        point = int(k[2][2:]) if k[0] in ("batch", "concurrency") else seen[("point", k[0], k[2])]
        return seen[("backend", k[1])], sections.index(k[0]), point, seen[("metric", k[0], k[3])]

    keys.sort(key=position)
    rows = []
    for key in keys:
        x, y = va.get(key), vb.get(key)
        notes = []
        for side, v, skips in (("A", x, sa), ("B", y, sb)):
            if v is None:
                reason = skip_note(skips, key)
                notes.append(f"skipped in {side}: {reason}" if reason else f"missing in {side}")
        ratio = y / x if x and y is not None else None
        better = None
        if ratio is not None:
            higher = key[3] in HIGHER_IS_BETTER
            better = "same" if abs(ratio - 1) <= SAME_WITHIN else "B" if (ratio > 1) == higher else "A"
        rows.append({"section": key[0], "backend": key[1], "point": key[2], "metric": key[3], "a": x, "b": y,
                     "ratio": ratio, "better": better, "note": "; ".join(notes)})
    facts = lambda r: {"model": r["meta"]["model"], "device": r["meta"]["device"],
                       "gpu": r["meta"]["environment"]["gpu"] or r["meta"]["environment"]["cpu"],
                       "torch": r["meta"]["environment"]["torch"], "onnxruntime": r["meta"]["environment"]["onnxruntime"],
                       "date": r["meta"]["date"], "command": r["meta"]["command"],
                       "lengths": ", ".join(f"{n}={x['tokens']}" for n, x in r["meta"]["lengths"].items())}
    return {"a": os.path.abspath(a_dir), "b": os.path.abspath(b_dir), "meta": {"a": facts(a), "b": facts(b)}, "rows": rows}


def render_compare(cmp: dict) -> str:
    out = ["# Report comparison", "", f"A: `{cmp['a']}`", "", f"B: `{cmp['b']}`", "",
           md_table(["", "A", "B"], [[k, str(cmp["meta"]["a"][k]), str(cmp["meta"]["b"][k])] for k in cmp["meta"]["a"]]),
           "", "B/A is the ratio of the values; 'better' says which run is better for that metric "
           f"(requests/s and audio s/s: higher; everything else: lower), 'same' within {SAME_WITHIN:.0%}.", "",
           md_table(["section", "backend", "point", "metric", "A", "B", "B/A", "better", "note"],
                    [[r["section"], r["backend"], r["point"], r["metric"], r["a"], r["b"],
                      None if r["ratio"] is None else f"{r['ratio']:.3f}", r["better"], r["note"]] for r in cmp["rows"]]), ""]
    return "\n".join(out)


# -- command line ------------------------------------------------------------------------------------
def exact_command(ctx: click.Context) -> str:
    """The command with every option spelled out (defaults included), so it reproduces the run."""
    parts = ["python", "-m", "runtime.report"]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if value is not None:
            parts += [param.opts[0], str(value)]
    return " ".join(shlex.quote(p) for p in parts)


@click.group(invoke_without_command=True)
@click.option("--model", default="cosyvoice3-tiny", show_default=True, help="Preset name or upstream model folder.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--backends", default="torch,ort", show_default=True,
              help="Comma list of backend choices (each for all stages, e.g. ort:fp16); with per-stage mixes "
                   "separate the choices by |.")
@click.option("--lengths", default="short,medium,long", show_default=True,
              help="short (1 s), medium (10 s), long (30 s) of audio at the model's token rate, or speech-token counts.")
@click.option("--batches", default="1,4,16", show_default=True, help="Batch sizes and concurrency levels.")
@click.option("--throughput-length", default=None, help="Length for the batch and concurrency runs (default: the first of --lengths).")
@click.option("--reps", default=10, show_default=True, help="Timed calls per measurement.")
@click.option("--warmup", default=2, show_default=True, help="Untimed calls first (the first one is reported separately).")
@click.option("--engines-dir", default=None, help="Folder with exported artifacts (default engines/<model>).")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps", "prefix"]), help="CosyVoice flow layout.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, help="Report folder, new or empty (default reports/<model>-<gpu or cpu>-<date>, "
                                          "then -2, -3, ...: a report never overwrites another).")
@click.pass_context
@exit_on_user_error
def main(ctx, model, device, backends, lengths, batches, throughput_length, reps, warmup, engines_dir, flow_mode, seed, out):
    """Measure every backend choice on short, medium and long requests and write a report folder.
    `compare A B` puts two report folders side by side."""
    if ctx.invoked_subcommand is not None:
        return
    from models.registry import load_model

    try:
        import matplotlib  # noqa: F401  (checked before measuring, not after)
    except ImportError:
        raise UserError("matplotlib is not installed; the report's plots need it.", "pip install matplotlib==3.11.2") from None
    if reps < 1 or warmup < 1:
        raise UserError(f"--reps {reps} / --warmup {warmup}: both must be at least 1.", "pass --reps 1 --warmup 1 or more")
    check_seed(seed)
    check_out_folder(out)
    command = exact_command(ctx)
    dev = torch.device(check_device(device))
    tts = load_model(model, device=str(dev), seed=seed)
    options = tts.resolve_options({"flow_mode": flow_mode})
    requests = resolve_lengths(lengths, tts.token_rate())
    by_name = {r.name: r for r in requests}
    throughput_length = throughput_length or requests[0].name
    if throughput_length not in by_name:
        raise UserError(f"--throughput-length {throughput_length!r} is not one of --lengths.",
                        f"choose one of {', '.join(by_name)}")
    levels = parse_counts(batches, "--batches")
    choices = backend_choices(backends)
    env = environment(dev)
    interrupted = None

    def assemble(results: list[dict]) -> dict:
        return {"meta": {
            "model": tts.name, "model_source": tts.source, "family": tts.family, "random_weights": tts.random_weights,
            "stages": list(tts.stages), "device": str(dev), "date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
            "environment": env, "token_rate": tts.token_rate(),
            "settings": {"reps": reps, "warmup": warmup, "batches": levels, "throughput_length": throughput_length,
                         "seed": seed, "options": options, "engines_dir": engines_dir},
            "lengths": {r.name: {"tokens": r.tokens, "nominal_audio_s": r.tokens / tts.token_rate(), "text": r.text}
                        for r in requests}},
            "backends": results}

    written = []  # the folder, once the first backend's results are in it

    def save(report: dict) -> str:
        if written:
            update_report(report, written[0])
        else:
            written.append(write_report(report, out or default_folder(tts.name, env), next_free=out is None))
        return written[0]

    def checkpoint(results: list[dict]) -> None:
        if len(results) < len(choices) and any("stages" in b for b in results):
            report = assemble(results)
            report["meta"]["in_progress"] = {"backends_done": len(results), "backends": len(choices)}
            save(report)

    try:
        results = run_report(tts, choices, dev, requests, by_name[throughput_length], levels, engines_dir, warmup,
                             reps, seed, click.echo, options, on_backend_done=checkpoint)
    except KeyboardInterrupt as e:  # write what was measured, then exit as interrupted (130 / 143)
        results, interrupted = getattr(e, "partial_results", None), e
        if not results or not any("stages" in b for b in results):
            if written:  # the folder holds the backends measured before; it says it is incomplete
                interrupted.args = (f"the partial report is in {written[0]}",)
            raise
    report = assemble(results)
    if interrupted is not None:
        report["meta"]["interrupted"] = True
    folder = save(report)
    if interrupted is not None:
        interrupted.args = (f"the partial report is in {folder}",)
        raise interrupted
    click.echo(f"wrote {folder}/report.md, report.json, {', '.join(PLOTS)}")
    check_measured(report, folder)


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", default=None, help="New folder for compare.md and compare.json (default: print the Markdown only).")
@exit_on_user_error
def compare(a, b, out):
    """Two report folders side by side: both values and B/A per metric, backend and length."""
    from models.files import AtomicFolder, write_text

    if out:
        check_out_folder(out)
    cmp = compare_reports(a, b)
    text = render_compare(cmp)
    click.echo(text)
    if out:
        with AtomicFolder(out) as tmp:
            write_text(os.path.join(tmp, "compare.md"), text)
            write_text(os.path.join(tmp, "compare.json"), json.dumps(cmp, indent=1))
        click.echo(f"wrote {out}/compare.md, compare.json")


if __name__ == "__main__":
    main()
