"""Calibration data for INT8: real graph inputs captured from the torch pipeline.

The pipeline speaks the calibration texts shipped with the project (varied lengths, several
languages) and every graph call is recorded; the LLM keeps its prefill and log-spaced decode steps.
The captures are cached per model and graph, keyed by the weights, the text set and the graph spec, so
a second `build` reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch

from models.family import TTSModel

TEXTS_FILE = os.path.join(os.path.dirname(__file__), "calibration_texts.txt")
LLM_STEPS = {0, 1, 2, 4, 8, 16, 32, 64, 128, 256}  # prefill and log-spaced decode steps


def calibration_texts() -> list[str]:
    with open(TEXTS_FILE, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _key(model: TTSModel, graph: str, texts: list[str], max_tokens: int) -> dict:
    h = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    weights = model.checkpoint_hashes() or {"random": f"{model.name}:seed={getattr(model, 'seed', 0)}"}
    spec = model.graph_specs()[graph].to_json()
    return {"model": model.name, "graph": graph, "weights": weights, "texts_sha256": h, "max_tokens": max_tokens,
            "spec_sha256": hashlib.sha256(spec.encode()).hexdigest()[:16]}


def capture(model: TTSModel, graphs: list[str], device: str = "cpu", max_tokens: int = 120,
            texts: list[str] | None = None) -> dict[str, list[dict]]:
    """Run the torch pipeline over the calibration texts; return graph -> list of CPU feeds."""
    from runtime.pipeline import Pipeline

    texts = texts or calibration_texts()
    feeds: dict[str, list[dict]] = {g: [] for g in graphs}
    modes = ["solver"] + (["steps"] if "flow_estimator" in graphs and hasattr(model, "set_flow_mode") else [])
    for mode in modes:
        if hasattr(model, "set_flow_mode"):
            model.set_flow_mode(mode)
        pipe = Pipeline(model, "torch", device=device)
        inner_run = pipe.run
        llm_calls = {"n": 0}

        def record(graph, feed, inner=inner_run):
            if graph in feeds and (mode == "solver" or graph == "flow_estimator"):
                feeds[graph].append({k: v.detach().cpu().clone() for k, v in feed.items()})
            return inner(graph, feed)

        pipe.run = record
        llm_backend = pipe.runners["llm"]
        inner_infer = llm_backend.infer

        def record_llm(feed, check=True, inner=inner_infer):
            if "llm" in feeds and mode == "solver" and llm_calls["n"] in LLM_STEPS:
                feeds["llm"].append({k: v.detach().cpu().clone() for k, v in feed.items()})
            llm_calls["n"] += 1
            return inner(feed, check)

        llm_backend.infer = record_llm
        default_speaker = model.make_speaker

        def varied_speaker(prompt_wav, prompt_text, voice=None, gen=torch.Generator().manual_seed(1234)):
            # a fixed default speaker (zeros) would calibrate the speaker projection on one point
            spk = default_speaker(prompt_wav, prompt_text, voice)
            if "embedding" in spk:
                spk["embedding"] = torch.randn(spk["embedding"].shape, generator=gen)
            return spk

        model.make_speaker = varied_speaker
        for i, text in enumerate(texts):
            llm_calls["n"] = 0
            # a hard cap keeps random-weight models (which seldom stop) to a useful length
            pipe.synthesize(text, seed=i, fixed_tokens=None if not model.random_weights else min(max_tokens, 12 + 5 * i))
        del model.make_speaker  # back to the class method
    if hasattr(model, "set_flow_mode"):
        model.set_flow_mode("solver")
    return feeds


def load_or_capture(model: TTSModel, graphs: list[str], cache_dir: str, device: str = "cpu",
                    max_tokens: int = 120, log=print) -> dict[str, list[dict]]:
    """Cached captures: `<cache_dir>/<graph>.pt` (+ .json key); recapture what is missing, stale or
    unreadable (a cache heals itself: a damaged file costs a recapture and a one-line note, not the build)."""
    from models.files import AtomicFile

    texts = calibration_texts()
    os.makedirs(cache_dir, exist_ok=True)
    out, missing = {}, []
    for g in graphs:
        key = _key(model, g, texts, max_tokens)
        data, meta = os.path.join(cache_dir, f"{g}.pt"), os.path.join(cache_dir, f"{g}.json")
        if os.path.isfile(data) and os.path.isfile(meta):
            cached = _read_cache(data, meta, key, log)
            if cached is not None:
                out[g] = cached
                continue
        missing.append(g)
    if missing:
        log(f"calibration: running the torch pipeline over {len(texts)} texts for {', '.join(missing)}")
        with _text_progress(model, len(texts) * _passes(model, missing)):
            fresh = capture(model, missing, device, max_tokens, texts)
        for g in missing:
            # the data first, its key last: a key is only ever next to the complete data it describes
            with AtomicFile(os.path.join(cache_dir, f"{g}.pt")) as f:
                torch.save(fresh[g], f)
            with AtomicFile(os.path.join(cache_dir, f"{g}.json")) as f:
                f.write(json.dumps(_key(model, g, texts, max_tokens)).encode())
            out[g] = fresh[g]
    else:
        log(f"calibration: cached captures reused from {cache_dir}")
    return out


def _read_cache(data: str, meta: str, key: dict, log) -> list[dict] | None:
    """The cached feeds when their key matches and they load as a list of tensor dicts; None (after a
    note when the files are damaged) otherwise."""
    try:
        with open(meta) as f:
            if json.load(f) != key:
                return None
        feeds = torch.load(data, weights_only=True)
        if isinstance(feeds, list) and all(isinstance(x, dict) and all(isinstance(v, torch.Tensor) for v in x.values())
                                           for x in feeds):
            return feeds
        problem = "does not hold a list of graph inputs"
    except Exception as e:  # any damage (truncation, garbage, a foreign pickle): the cache is rebuilt
        problem = f"is damaged ({(str(e).strip().splitlines() or [type(e).__name__])[0][:100]})"
    log(f"calibration: the cached {data} {problem}; capturing it again")
    return None


def _passes(model: TTSModel, graphs: list[str]) -> int:
    """How often capture() speaks every text: once, and once more per-step for the flow estimator."""
    return 2 if "flow_estimator" in graphs and hasattr(model, "set_flow_mode") else 1


@contextlib.contextmanager
def _text_progress(model: TTSModel, total: int):
    """Progress per calibration text on stderr (runtime/progress.py): capture() has the pipeline
    speak one text per split_text call, so that call is counted."""
    from runtime.progress import Progress

    inner = model.split_text
    with Progress("calibration", total) as progress:
        def counted(text):
            progress.step("texts")
            return inner(text)

        model.split_text = counted
        try:
            yield
        finally:
            del model.split_text  # back to the class's method
