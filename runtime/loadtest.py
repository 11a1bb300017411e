"""python -m runtime.loadtest: how many listeners one engine serves, at a first-audio target.

    python -m runtime.loadtest --model cosyvoice3-random --device cuda --backend compile:bf16 \\
        --concurrency 1,8,32,64,128 --requests 64 --tokens 125 --json loadtest.json

Closed loop (`--concurrency`): at each level C, C clients each send a request, read its audio as it
streams, and send the next when it ends, until `--requests` requests are done. Open loop
(`--rate R`): requests arrive as a Poisson process of R per second. Requests have a fixed number of
speech tokens (`--tokens`; random weights rarely stop on their own), one sentence each, a seed each.

`--url http://host:port` drives a running speech server (python -m runtime.serve) instead of an
in-process engine: each client streams `POST /v1/audio/speech` (raw 16-bit PCM) with httpx and the
times are taken on the client side (first audio: request sent to the first audio bytes received;
underruns from the arrival of each received piece), so they include HTTP and the network. The
sequential-pipeline baseline needs the model in this process and is left out with --url.

Per level: audio seconds per wall second, first-audio latency p50/p95/p99 (submit to first chunk),
underruns (a chunk that arrives after the audio before it has finished playing, playback starting at
the first chunk; counted per stream), requests completed and failed. Capacity at the SLO: the largest
level with p99 first audio <= --slo-ms and no underrun. The baseline, measured in the same run: the
single-request Pipeline with the same backends, one request at a time (its streaming first audio and
audio seconds per second). `--runs N` repeats every level N times and reports the median run (the lower middle one for an even N).
`--json` writes every number, `--plot` a PNG of throughput and latency against the level.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import click
import torch

from models.errors import UserError, exit_on_user_error

TEXT = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize_level(records: list[dict], wall: float, level: dict) -> dict:
    ok = [r for r in records if r["error"] is None]
    ttfa = [r["ttfa_s"] * 1e3 for r in ok if r["ttfa_s"] is not None]
    audio = sum(r["audio_s"] for r in ok)
    return {**level, "requests": len(ok), "failed": len(records) - len(ok), "wall_s": wall,
            "audio_s_per_s": audio / wall if wall > 0 else 0.0,
            "ttfa_ms": {"p50": percentile(ttfa, 50), "p95": percentile(ttfa, 95), "p99": percentile(ttfa, 99)},
            "underruns": sum(r["underruns"] for r in ok),
            "streams_with_underrun": sum(1 for r in ok if r["underruns"]),
            "errors": sorted({r["error"] for r in records if r["error"]})[:5]}


def count_underruns(times: list[float], seconds: list[float]) -> int:
    """Pieces that arrived after the audio before them had finished playing (playback starts with the
    first piece; `times` are arrival times, `seconds` the audio in each)."""
    played, late = 0.0, 0
    for t, s in zip(times, seconds):
        late += t > times[0] + played + 1e-3
        played += s
    return late


class HttpTarget:
    """Requests to a speech server over HTTP, streamed with httpx; every time is the client's."""

    def __init__(self, url: str, api_key: str | None = None, voice: str = "default", timeout: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.voice = voice
        # one pool for every client thread (httpx.Client is thread-safe), as many connections as clients
        self.client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=1024,
                                                                          max_keepalive_connections=1024))
        self.model = self._model()

    def _model(self) -> str:
        import httpx

        try:
            r = self.client.get(self.url + "/v1/models", headers=self.headers)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach the speech server at {self.url} ({type(e).__name__}: {e}).",
                            "start it with python -m runtime.serve, or fix --url") from None
        if r.status_code == 401:
            raise UserError(f"the speech server at {self.url} wants an API key.", "pass --api-key (or set TTS_API_KEY)")
        if r.status_code != 200:
            raise UserError(f"{self.url}/v1/models answered HTTP {r.status_code}; is this a speech server?",
                            "point --url at python -m runtime.serve")
        return r.json()["data"][0]["id"]

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.perf_counter() + timeout
        while True:
            try:
                if self.client.get(self.url + "/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise UserError(f"the speech server at {self.url} was not ready within {timeout:.0f} s.",
                                "look at its log (GET /ready says what it is doing)")
            time.sleep(0.5)

    def diagnostics(self) -> dict:
        """The server's own view (GET /diagnostics): engine occupancy, backends, GPU."""
        import httpx

        try:
            r = self.client.get(self.url + "/diagnostics", headers=self.headers)
            return r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def stats(self) -> dict:
        return self.diagnostics().get("engine", {})

    def request(self, text: str, seed: int, tokens: int) -> dict:
        import httpx

        body = {"model": self.model, "input": text, "voice": self.voice, "response_format": "pcm", "seed": seed,
                "tokens": tokens}
        t0 = time.perf_counter()
        times, secs = [], []
        try:
            with self.client.stream("POST", self.url + "/v1/audio/speech", json=body, headers=self.headers) as r:
                if r.status_code != 200:
                    r.read()
                    try:
                        msg = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = r.text[:200]
                    return {"error": f"HTTP {r.status_code}: {msg}", "ttfa_s": None, "audio_s": 0.0, "underruns": 0,
                            "latency_s": time.perf_counter() - t0}
                rate = int(r.headers.get("x-sample-rate", "24000"))
                for piece in r.iter_bytes():
                    if piece:
                        times.append(time.perf_counter() - t0)
                        secs.append(len(piece) / 2 / rate)
        except httpx.HTTPError as e:
            return {"error": f"{type(e).__name__}: {str(e)[:200]}", "ttfa_s": None, "audio_s": 0.0, "underruns": 0,
                    "latency_s": time.perf_counter() - t0}
        return {"error": None, "ttfa_s": times[0] if times else None, "audio_s": sum(secs),
                "underruns": count_underruns(times, secs) if times else 0, "latency_s": time.perf_counter() - t0}


class EngineTarget:
    """Requests through an in-process engine."""

    def __init__(self, engine):
        self.engine = engine

    def stats(self) -> dict:
        return self.engine.stats()

    def request(self, text: str, seed: int, tokens: int) -> dict:
        t0 = time.perf_counter()
        try:
            handle = self.engine.submit(text, seed=seed, fixed_tokens=tokens)
            for _ in handle:
                pass
        except UserError as e:
            return {"error": e.problem, "ttfa_s": None, "audio_s": 0.0, "underruns": 0,
                    "latency_s": time.perf_counter() - t0}
        s = handle.stats
        return {"error": None, "ttfa_s": s.first_audio, "audio_s": s.audio_seconds, "underruns": s.underruns(),
                "latency_s": s.finished}


def _level_counters(after: dict, before: dict) -> dict:
    """What the engine did during one level: LM steps and their mean batch, seconds per stage, and
    per graph the calls, rows and seconds the batcher ran (the difference of its counters)."""
    if not all(k in d for d in (after, before) for k in ("lm_steps", "stage_seconds")):
        return {}  # a server's diagnostics carry other facts
    steps = after["lm_steps"] - before["lm_steps"]
    rows = after.get("lm_rows_total", 0) - before.get("lm_rows_total", 0)
    out = {"lm_steps": steps, "lm_batch_mean": round(rows / steps, 2) if steps else 0.0,
           "stage_seconds": {k: round(v - before["stage_seconds"].get(k, 0.0), 4)
                             for k, v in after["stage_seconds"].items()}, "graph_calls": {}}
    if "lm_timing" in after and "lm_timing" in before:
        # ms per LM step of each part of its time (prefill: ms per prefill call)
        dt = {k: v - before["lm_timing"].get(k, 0.0) for k, v in after["lm_timing"].items()}
        prefills = after["lm_prefills"] - before["lm_prefills"]
        out["lm_step_ms"] = {k: round(1e3 * v / steps, 3) if steps else 0.0 for k, v in dt.items() if k != "prefill"}
        out["lm_prefill_ms"] = round(1e3 * dt["prefill"] / prefills, 3) if prefills else 0.0
        out["lm_prefills"] = prefills
    for g, now in after.get("graph_calls", {}).items():
        was = before.get("graph_calls", {}).get(g, {"calls": 0, "rows": 0, "seconds": 0.0})
        calls = now["calls"] - was["calls"]
        out["graph_calls"][g] = {"calls": calls, "rows_per_call": round((now["rows"] - was["rows"]) / calls, 2) if calls else 0,
                                 "ms_per_call": round(1e3 * (now["seconds"] - was["seconds"]) / calls, 2) if calls else 0}
    return out


def closed_loop(target, concurrency: int, requests: int, tokens: int, text: str, seed0: int) -> dict:
    counter = iter(range(requests))
    lock = threading.Lock()
    records = []

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            rec = target.request(text, seed0 + i, tokens)
            with lock:
                records.append(rec)

    t0 = time.perf_counter()
    # daemon: an interrupted test (Ctrl-C, a time limit) exits instead of waiting for its clients
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize_level(records, time.perf_counter() - t0, {"concurrency": concurrency})


def open_loop(target, rate: float, requests: int, tokens: int, text: str, seed0: int) -> dict:
    rng = random.Random(seed0)
    records, lock = [], threading.Lock()

    def one(i):
        rec = target.request(text, seed0 + i, tokens)
        with lock:
            records.append(rec)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(requests, 1024)) as pool:
        at = 0.0
        for i in range(requests):
            at += rng.expovariate(rate)
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    return summarize_level(records, time.perf_counter() - t0, {"rate": rate})


def baseline(pipe, requests: int, tokens: int, text: str, seed0: int) -> dict:
    """The single-request pipeline, one streamed request at a time."""
    records = []
    t0 = time.perf_counter()
    for i in range(requests):
        start = time.perf_counter()
        first, times, secs = None, [], []
        stream = pipe.stream(text, seed=seed0 + i, fixed_tokens=tokens)
        for chunk in stream:
            now = time.perf_counter() - start
            first = now if first is None else first
            times.append(now)
            secs.append(chunk.numel() / pipe.model.sample_rate)
        records.append({"error": None, "ttfa_s": first, "audio_s": sum(secs), "underruns": count_underruns(times, secs),
                        "latency_s": time.perf_counter() - start})
    return summarize_level(records, time.perf_counter() - t0, {"concurrency": 1, "what": "sequential Pipeline"})


def capacity(levels: list[dict], slo_ms: float) -> dict:
    good = [lv for lv in levels if lv["failed"] == 0 and lv["requests"] and lv["underruns"] == 0
            and lv["ttfa_ms"]["p99"] is not None and lv["ttfa_ms"]["p99"] <= slo_ms]
    if not good:
        return {"concurrency": None, "audio_s_per_s": None, "slo_ms": slo_ms,
                "note": "no level met the SLO (p99 first audio and no underrun)"}
    best = max(good, key=lambda lv: lv["audio_s_per_s"])
    return {"concurrency": best.get("concurrency"), "rate": best.get("rate"), "audio_s_per_s": best["audio_s_per_s"],
            "ttfa_p99_ms": best["ttfa_ms"]["p99"], "slo_ms": slo_ms}


def median_run(runs: list[dict]) -> dict:
    """The run with the median audio seconds per second (all of them kept in `runs`); for an even
    count the lower of the two middle runs: one real run's numbers (its latencies belong to its
    throughput), and two runs never report the better one as their median."""
    ordered = sorted(runs, key=lambda r: r["audio_s_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [{"audio_s_per_s": r["audio_s_per_s"], "ttfa_ms": r["ttfa_ms"],
                                                    "underruns": r["underruns"]} for r in runs]}


def write_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in result["levels"] if lv.get("concurrency")]
    if not levels:
        return
    x = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [lv["audio_s_per_s"] for lv in levels], "o-", label="engine")
    if result["baseline"]:
        a.axhline(result["baseline"]["audio_s_per_s"], color="gray", ls="--", label="sequential pipeline")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent streams")
    a.set_ylabel("audio seconds per second")
    a.legend()
    for q in ("p50", "p99"):
        b.plot(x, [lv["ttfa_ms"][q] for lv in levels], "o-", label=f"first audio {q}")
    b.axhline(result["slo_ms"], color="red", ls=":", label="SLO")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent streams")
    b.set_ylabel("ms")
    b.legend()
    fig.suptitle(f"{result['meta']['model']} ({result['meta']['backend']}, {result['meta']['device_name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _counts(value: str, what: str) -> list[int]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or not all(v.isdigit() and int(v) > 0 for v in items):
        raise UserError(f"{what} {value!r} is not a comma list of positive counts.", f"write e.g. {what} 1,8,32")
    return [int(v) for v in items]


@click.command()
@click.option("--model", "model_name", default="cosyvoice3-tiny", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", "backends", default="torch", show_default=True, help="As for runtime.synthesize.")
@click.option("--concurrency", default="1,2,4", show_default=True, help="Closed-loop levels.")
@click.option("--rate", default=None, type=float, help="Open loop: Poisson arrivals per second (instead of levels).")
@click.option("--requests", default=16, show_default=True, help="Requests per level.")
@click.option("--tokens", default=50, show_default=True, help="Speech tokens per request.")
@click.option("--runs", default=1, show_default=True, help="Repeat every level; the median run is reported.")
@click.option("--slo-ms", default=300.0, show_default=True, help="First-audio target (p99) for the capacity.")
@click.option("--max-streams", default=None, type=int, help="Engine rows (default: from memory).")
@click.option("--max-len", default=None, type=int, help="Engine KV cache columns per row (prompt + tokens).")
@click.option("--baseline/--no-baseline", "with_baseline", default=True, show_default=True, help="Measure the sequential pipeline too.")
@click.option("--baseline-requests", default=8, show_default=True, help="Requests of the sequential baseline.")
@click.option("--json", "json_path", default=None)
@click.option("--plot", "plot_path", default=None)
@click.option("--seed", default=0, show_default=True)
@click.option("--lm-buckets", default=None,
              help="Batch sizes of the LM's captured steps, e.g. 1,16,64,128 (the largest: the engine's rows); "
                   "default: powers of 2 (eager step) or of 4 (compiled step).")
@click.option("--switch-interval-ms", default=0.0, show_default=True,
              help="The engine's Python thread switch interval (0: leave CPython's 5 ms).")
@click.option("--batcher-policy", type=click.Choice(["call", "round", "urgent"]), default="round", show_default=True,
              help="round: the token2wav batcher runs every batch of a round before new calls (measured best); "
                   "call: the most urgent batch, then it looks again (a first chunk waits for one call at most); "
                   "urgent: rounds, but calls due earlier than the next batch (first chunks) go first.")
@click.option("--lm-priority", type=click.Choice(["normal", "high"]), default="normal", show_default=True,
              help="CUDA stream priority of the LM's decode steps against the token2wav calls (GPU only).")
@click.option("--lm-reserved-sms", default=0, show_default=True,
              help="Run flow and vocoder calls on a CUDA green context that leaves this many SMs to the LM (0: off).")
@click.option("--prefill", "prefill", type=click.Choice(["graph", "eager"]), default="graph", show_default=True,
              help="The LM's prefills on CUDA: captured graphs per (rows, width) bucket, or eager.")
@click.option("--warmup", "warmup", type=click.Choice(["shapes", "levels"]), default="shapes", show_default=True,
              help="In process: after one round of requests at every level (levels), also call each compiled or "
              "captured graph at every (batch, length) bucket up to what that round met (shapes), so no measured "
              "request waits on a capture.")
@click.option("--new-shapes", type=click.Choice(["capture", "defer"]), default="capture", show_default=True,
              help="A flow / vocoder shape no warm-up met, in service: capture (or compile) it in the call, or defer: run "
              "it uncompiled now and capture it when the batcher is idle (or at its third call).")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps", "prefix"]),
              help="CosyVoice flow: one-graph solver (default), per-step estimator calls, or prefix: each chunk solves "
              "its new frames only against what the stream kept (CosyVoice3, flow=torch; chunks of many streams share a call).")
@click.option("--stream-state-gb", default=None, type=float,
              help="With --flow-mode prefix: GiB the streams may keep in all (default: half the device memory free at the first request).")
@click.option("--url", default=None, help="Drive a running speech server (python -m runtime.serve) at this URL "
              "instead of an in-process engine; --model, --device, --backend and the engine options are then its own.")
@click.option("--api-key", envvar="TTS_API_KEY", default=None, help="The server's API key (with --url).")
@click.option("--voice", default="default", show_default=True, help="Voice of every request (with --url).")
@exit_on_user_error
def main(model_name, device, backends, concurrency, rate, requests, tokens, runs, slo_ms, max_streams, max_len,
         with_baseline, baseline_requests, json_path, plot_path, seed, lm_buckets, switch_interval_ms, batcher_policy,
         lm_priority, lm_reserved_sms, prefill, warmup, new_shapes, flow_mode, stream_state_gb, url, api_key, voice):
    from models.files import write_text
    from models.registry import load_model
    from runtime.bench import environment
    from runtime.engine import Engine
    from runtime.pipeline import Pipeline
    from runtime.synthesize import check_device

    levels_in = _counts(concurrency, "--concurrency")
    if requests < 1 or tokens < 1 or runs < 1:
        raise UserError("--requests, --tokens and --runs must be at least 1.", "pass positive counts")
    if rate is not None and rate <= 0:
        raise UserError(f"--rate {rate} is not a positive rate.", "pass requests per second, e.g. --rate 10")
    log = lambda m: click.echo(m, err=True)  # noqa: E731 - the table goes to stdout
    t0 = time.perf_counter()
    engine = None
    if url:
        target = HttpTarget(url, api_key, voice)
        target.wait_ready()
        facts = target.diagnostics()
        gpu = facts.get("gpu") or {}
        meta = {"model": target.model, "random_weights": (facts.get("model") or {}).get("random_weights"),
                "backend": facts.get("backends"), "device": facts.get("device"), "url": url,
                "device_name": gpu.get("name") or facts.get("device") or "unknown",
                "max_streams": (facts.get("engine") or {}).get("max_streams")}
        warm = max(levels_in) if rate is None else min(requests, 32)
        log(f"server {url} ready: {target.model}, {meta['max_streams']} streams")
    else:
        dev = torch.device(check_device(device))
        model = load_model(model_name, device=str(dev), seed=seed)
        engine = Engine(model, backends, device=str(dev), max_streams=max_streams, max_len=max_len,
                        switch_interval=switch_interval_ms / 1e3 if switch_interval_ms > 0 else None,
                        lm_buckets=_counts(lm_buckets, "--lm-buckets") if lm_buckets else None,
                        batcher_policy=batcher_policy, lm_priority=lm_priority,
                        lm_reserved_sms=lm_reserved_sms, lm_prefill_graphs=prefill == "graph",
                        new_shapes=new_shapes, options={"flow_mode": flow_mode} if flow_mode else None,
                        stream_state_gb=stream_state_gb).start()
        log(f"engine ready in {time.perf_counter() - t0:.1f} s: {engine.max_streams} streams, "
            f"{engine.decoder.metadata()}")
        target = EngineTarget(engine)
        env = environment(dev)
        meta = {"model": model.name, "random_weights": model.random_weights, "backend": backends, "device": str(dev),
                "device_name": env["gpu"] or env["cpu"], "max_streams": engine.max_streams,
                "switch_interval_ms": switch_interval_ms, "lm_buckets": engine.decoder.buckets,
                "batcher_policy": batcher_policy, "lm_priority": lm_priority, "lm_reserved_sms": lm_reserved_sms,
                "prefill": prefill, "new_shapes": new_shapes, "flow_mode": engine.options.get("flow_mode"),
                "stream_state_gb": stream_state_gb}
        warm = min(max(levels_in) if rate is None else min(requests, 32), engine.max_streams)
    # one round at every measured level first: backends that capture or compile per (batch, length)
    # bucket (cudagraph, compile) meet each level's batch sizes here, not in a measured request
    cap = engine.max_streams if engine is not None else warm
    for c in sorted({min(c, cap) for c in levels_in} | {warm}) if rate is None else [warm]:
        closed_loop(target, c, c, tokens, TEXT, 10**6)
    if engine is not None and warmup == "shapes":
        # the round above meets only the (rows, length) keys its timing happened to form; a key first
        # met in a measured level costs a capture and a device-wide wait while every stream stands still
        t1 = time.perf_counter()
        meta["warm_graph_calls"] = engine.warm_graphs(streams=warm, seen_only=True)
        log(f"called every graph at {meta['warm_graph_calls']} (batch, length) buckets up to the lengths "
            f"met ({time.perf_counter() - t1:.1f} s)")
    meta["warmup"] = warmup if engine is not None else "server"
    log(f"warmed up ({time.perf_counter() - t0:.1f} s since start)")
    levels = []
    plan = [("rate", rate)] if rate is not None else [("concurrency", c) for c in levels_in]
    for kind, value in plan:
        before = target.stats()
        results = []
        for r in range(runs):
            if kind == "rate":
                results.append(open_loop(target, value, requests, tokens, TEXT, seed + 1000 * r))
            else:
                results.append(closed_loop(target, value, max(requests, value), tokens, TEXT, seed + 1000 * r))
        lv = median_run(results)
        lv["engine"] = target.stats()
        lv["engine_during_level"] = _level_counters(lv["engine"], before)
        levels.append(lv)
        p50, p99 = lv["ttfa_ms"]["p50"], lv["ttfa_ms"]["p99"]
        log(f"{kind} {value}: {lv['audio_s_per_s']:.1f} audio-s/s, first audio p50 {p50 or 0:.1f} / "
            f"p99 {p99 or 0:.1f} ms, underruns {lv['underruns']}, failed {lv['failed']}"
            + (f" ({lv['errors'][0]})" if lv["errors"] else ""))
        split = lv["engine_during_level"].get("lm_step_ms")
        if split:
            d = lv["engine_during_level"]
            log(f"  LM step at a mean batch of {d['lm_batch_mean']}: launch {split['launch']:.2f} + wait "
                f"{split['wait']:.2f} (device {split['device']:.2f}) + deliver {split['deliver']:.2f} + between "
                f"{split['between']:.2f} ms; {d['lm_prefills']} prefills of {d['lm_prefill_ms']:.1f} ms")
    base = None
    if engine is not None:
        engine.stop()
        if with_baseline:
            pipe = Pipeline(model, backends, device=str(dev)).activate()
            baseline(pipe, 1, tokens, TEXT, 10**6)  # warm-up
            base = baseline(pipe, max(1, min(requests, baseline_requests)), tokens, TEXT, seed)
            log(f"baseline (sequential pipeline): {base['audio_s_per_s']:.1f} audio-s/s, first audio p50 "
                f"{base['ttfa_ms']['p50']:.1f} ms")
    elif with_baseline:
        log("no sequential baseline with --url (it runs the model in this process)")
    result = {"meta": {**meta, "tokens": tokens, "requests_per_level": requests, "runs": runs,
                       "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                       "command": "python -m runtime.loadtest " + " ".join(sys.argv[1:])},
              "slo_ms": slo_ms, "levels": levels, "capacity": capacity(levels, slo_ms), "baseline": base}
    click.echo(f"{'level':>10} {'audio-s/s':>10} {'ttfa p50':>9} {'p95':>8} {'p99':>8} {'underruns':>9} {'done':>5}")
    for lv in levels:
        name = lv.get("concurrency") or f"{lv.get('rate')}/s"
        t = lv["ttfa_ms"]
        click.echo(f"{name!s:>10} {lv['audio_s_per_s']:10.1f} {t['p50'] or 0:9.1f} {t['p95'] or 0:8.1f} "
                   f"{t['p99'] or 0:8.1f} {lv['underruns']:9d} {lv['requests']:5d}")
    if base:
        click.echo(f"{'baseline':>10} {base['audio_s_per_s']:10.1f} {base['ttfa_ms']['p50']:9.1f}")
    cap = result["capacity"]
    click.echo(f"capacity at p99 first audio <= {slo_ms:.0f} ms and no underrun: "
               + (f"{cap['audio_s_per_s']:.1f} audio-s/s at concurrency {cap['concurrency']}" if cap["audio_s_per_s"]
                  else cap["note"]))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
        write_text(json_path, json.dumps(result, indent=1, default=str))
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        write_plot(result, plot_path)
    failed = sum(lv["failed"] for lv in levels)
    if levels and all(lv["requests"] == 0 for lv in levels):
        raise UserError(f"every request failed ({failed}); first: {levels[0]['errors'][:1]}", "see the errors above")


if __name__ == "__main__":
    main()
