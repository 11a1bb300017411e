"""Calibration data for INT8: real graph inputs captured from the torch pipeline.

The pipeline speaks the calibration texts shipped with the project (varied lengths, several
languages) and every graph call is recorded; the LLM keeps its prefill and log-spaced decode steps.
The captures are cached per model and graph, keyed by the weights, the text set and the graph spec, so
a second `build` reuses them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import torch

from models.family import TTSModel
from runtime.pipeline import PipelineObserver

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


def capture_passes(model: TTSModel, graphs: list[str]) -> list[tuple[dict, set[str]]]:
    """Which pipelines capture() runs: (options, graphs recorded in that pass) for every combination
    of the family's options whose pipeline calls a wanted graph no earlier pass recorded (e.g. the
    flow estimator, called only by the per-step flow layout)."""
    passes, covered = [], set()
    names = list(model.options)
    for values in itertools.product(*(model.options[n] for n in names)):
        options = dict(zip(names, values))
        used = {g for gs in model.stage_graphs(options).values() for g in gs}
        new = (used & set(graphs)) - covered
        if new:
            passes.append((options, new))
            covered |= new
    return passes


class _Recorder(PipelineObserver):
    """Keeps CPU copies of the feeds of the graphs of one pass; of the LM graph only the prefill and
    the log-spaced decode steps of LLM_STEPS (counted per text: a text starts at its first sentence)."""

    def __init__(self, feeds: dict[str, list[dict]], record: set[str], lm_graph: str, progress):
        self.feeds, self.record, self.lm_graph, self.progress = feeds, record, lm_graph, progress
        self.lm_calls = 0

    def sentence(self, index: int, total: int) -> None:
        if index == 0:
            self.lm_calls = 0
            self.progress.step("texts")

    def graph_call(self, graph: str, feed: dict) -> None:
        if graph == self.lm_graph:
            keep = self.lm_calls in LLM_STEPS
            self.lm_calls += 1
            if not keep:
                return
        if graph in self.record:
            self.feeds[graph].append({k: v.detach().cpu().clone() for k, v in feed.items()})


def capture(model: TTSModel, graphs: list[str], device: str = "cpu", max_tokens: int = 120,
            texts: list[str] | None = None) -> dict[str, list[dict]]:
    """Run the torch pipeline over the calibration texts; return graph -> list of CPU feeds."""
    from runtime.pipeline import Pipeline
    from runtime.progress import Progress

    texts = texts or calibration_texts()
    feeds: dict[str, list[dict]] = {g: [] for g in graphs}
    passes = capture_passes(model, graphs)
    with Progress("calibration", len(texts) * len(passes)) as progress:
        for options, record in passes:
            observer = _Recorder(feeds, record, model.lm.graph, progress)
            pipe = Pipeline(model, "torch", device=device, options=options, observer=observer)
            speakers = torch.Generator().manual_seed(1234)
            for i, text in enumerate(texts):
                speaker = model.make_speaker(None, None)
                if "embedding" in speaker:  # a fixed default speaker (zeros) would calibrate on one point
                    speaker["embedding"] = torch.randn(speaker["embedding"].shape, generator=speakers)
                # a hard cap keeps random-weight models (which seldom stop) to a useful length
                fixed = min(max_tokens, 12 + 5 * i) if model.random_weights else None
                pipe.synthesize(text, seed=i, fixed_tokens=fixed, speaker=speaker)
    return feeds


def load_or_capture(model: TTSModel, graphs: list[str], cache_dir: str, device: str = "cpu",
                    max_tokens: int = 120, log=print, count: int | None = None,
                    capture_model=None) -> dict[str, list[dict]]:
    """Cached captures: `<cache_dir>/<graph>.pt` (+ .json key); recapture what is missing, stale or
    unreadable (a cache heals itself: a damaged file costs a recapture and a one-line note, not the build).
    `capture_model`, if given, makes the model that runs a capture (called only when one is needed):
    a copy on `device`, so that `model` (the one being exported) stays where it is."""
    from models.files import AtomicFile

    texts = calibration_texts()[:count]  # count: the first texts only (quick builds; tests)
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
        fresh = capture(capture_model() if capture_model else model, missing, device, max_tokens, texts)
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
