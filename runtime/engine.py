"""The serving engine: many requests at once, each streaming its audio back.

    engine = Engine(load_model("cosyvoice3-tiny"), backends="compile:bf16", device="cuda").start()
    handle = engine.submit("Hello there.", seed=1)
    for chunk in handle:            # CPU float32 audio chunks as they are produced
        ...
    engine.stop()

Three kinds of threads share the work (one process, one GPU):

- the LM thread owns a `SlotDecoder` (runtime/backends/slot_decoder.py): requests' utterances join
  the running decode batch at any step (one batched prefill for the arrivals of a step), every step
  is one captured graph for all rows with sampling inside, the host reads the sampled ids once, and
  a finished or cancelled utterance frees its row at once (rows are compacted);
- one worker thread per active request runs the family's own stream decoder (models/streaming.py)
  or offline token2wav, exactly as a single-request pipeline does, except that its graph calls go
  to the batcher; it waits for its utterance's tokens without polling (the LM thread wakes it when
  the next chunk can be made) and puts the audio chunks on the request's handle;
- the batcher thread runs those graph calls batched: when every worker is waiting (or a few ms
  have passed), it groups the pending calls by graph and by the shapes that may not differ, pads
  the spec's bucketable dim where the family declared padding exact (`GraphSpec.pad`), runs each
  group in as few calls as the spec's batch limit allows, earliest playback deadline first, and
  hands every caller its own rows back. (A policy that runs one batch and then looks at the pending
  calls again, so a first chunk waits for one call instead of a round, exists as `policy="call"`;
  it measured worse on the H200.)

A request's audio does not depend on its neighbours: its tokens come from its own counter-based
random stream (models/sampling.py `counter_uniforms`), its noise from its own generator, and
batched rows are computed by the same graphs as single ones (within the float tolerance of the
backend's kernels at another batch size).

Admission: at most `max_streams` requests are active (one LM row each; the default follows from
the KV cache memory); up to `max_queue` more wait, and beyond that `submit` raises `EngineFull`
(with a retry hint) instead of growing without bound. A request that waits longer than
`queue_timeout` fails with `EngineFull` too; `handle.cancel()` (or a client that goes away) frees its
row at the next step.

Roles (a disaggregated placement, runtime/serve_ray.py): `role="full"` (the default) is all of the
above. `role="lm"` loads only the LM stage and runs only the LM thread: `tokens(...)` returns a
handle whose items are messages `(utterance index, new token ids, done)`, sent every `token_batch`
tokens and at the end of each utterance (the worker forwards tokens instead of decoding them).
`role="token2wav"` loads every stage but the LM and allocates no KV cache: a request's worker takes
its tokens from `token_source(request)` (request: {"text", "speaker", "seed", "fixed_tokens"},
plain data; the source returns an iterator of those messages, with `cancel()` if it can be
stopped), fed by a reader thread into the same per-utterance jobs the LM thread fills in a full
engine, so the stream decoders run exactly as there; `max_streams` then bounds token2wav streams.
Both sides split the text with the same `model.split_text` / `make_utterance`, the LM side samples
with the same per-utterance counter seeds and the token2wav side draws noise from the request seed,
so a request gives the full engine's tokens and audio. Cancelling a token2wav request cancels its
token source (the LM request, whose row is then freed).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from models.errors import UserError
from models.family import TTSModel
from runtime.backends import BackendChoice
from runtime.backends.cuda_graphs import capture_stream
from runtime.backends.slot_decoder import SlotDecoder, check_room
from runtime.pipeline import Pipeline, capped_warning


class EngineFull(UserError):
    """The engine cannot take the request now; `retry_after` seconds is a fair guess for later."""

    def __init__(self, problem: str, retry_after: float, fix: str | None = None):
        super().__init__(problem, fix or f"retry in about {retry_after:.0f} s, or start the engine with more --max-streams")
        self.retry_after = retry_after


def _shutting_down() -> EngineFull:
    return EngineFull("the engine is shutting down.", 5.0, "send the request again in a few seconds (to another "
                      "replica, or to this one once it has restarted)")


@dataclass
class RequestStats:
    """What one request did: times are seconds since it was submitted."""

    submitted: float
    admitted: float | None = None
    first_audio: float | None = None
    finished: float | None = None
    audio_seconds: float = 0.0
    tokens: list[list[int]] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk
    chunk_seconds: list[float] = field(default_factory=list)  # audio in each chunk
    warnings: list[str] = field(default_factory=list)

    def underruns(self) -> int:
        """Chunks that arrived after the audio before them had finished playing, playback starting
        with the first chunk."""
        if not self.chunk_times:
            return 0
        start, played, late = self.chunk_times[0], 0.0, 0
        for t, s in zip(self.chunk_times, self.chunk_seconds):
            if t > start + played + 1e-3:
                late += 1
            played += s
        return late


_END = object()


def request_failed(e: BaseException, where: str = "the engine") -> UserError:
    """A request's one-line error for an unexpected failure inside the engine."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return UserError(f"the request failed inside {where} ({type(e).__name__}: {first}).",
                     "report it with the request; the engine goes on serving")


class Handle:
    """One submitted request: iterate it for audio chunks (CPU float32 [n]); `stats` afterwards.
    Iteration raises the request's error (a UserError) if it failed."""

    def __init__(self, request_id: int, sample_rate: int):
        self.id = request_id
        self.sample_rate = sample_rate
        self.stats = RequestStats(time.perf_counter())
        self._chunks: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._abandoned = False  # its worker left with an error: its LM rows stop at the next step
        self.error: Exception | None = None

    def __iter__(self):
        while True:
            item = self._chunks.get()
            if item is _END:
                self._chunks.put(_END)  # a second audio() / get() sees the end too
                if self.error is not None:
                    raise self.error
                return
            yield item

    def get(self, timeout: float | None = None):
        """The next chunk, or None at the end (raises the request's error)."""
        item = self._chunks.get(timeout=timeout)
        if item is _END:
            self._chunks.put(_END)  # later calls see the end too
            if self.error is not None:
                raise self.error
            return None
        return item

    def cancel(self) -> None:
        self._cancelled.set()

    def _put_message(self, message: tuple) -> None:
        """An LM-role request's item: (utterance index, new token ids, done)."""
        self._chunks.put(message)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def audio(self) -> torch.Tensor:
        """Every chunk not read yet, concatenated (blocks until the request ends; once it has ended,
        returns at once: the chunks are read once)."""
        chunks = list(self)
        return torch.cat(chunks) if chunks else torch.zeros(0)

    # -- engine side -------------------------------------------------------------------------------------
    def _put(self, chunk: torch.Tensor) -> None:
        now = time.perf_counter() - self.stats.submitted
        if self.stats.first_audio is None:
            self.stats.first_audio = now
        seconds = chunk.numel() / self.sample_rate
        self.stats.chunk_times.append(now)
        self.stats.chunk_seconds.append(seconds)
        self.stats.audio_seconds += seconds
        self._chunks.put(chunk)

    def _end(self, error: Exception | None = None) -> None:
        self.error = error
        self.stats.finished = time.perf_counter() - self.stats.submitted
        self._chunks.put(_END)


@dataclass
class _Utterance:
    """One utterance's LM work, shared by its worker and the LM thread."""

    prompt: list[int]
    sampler: object  # None on the token2wav side (the LM side samples)
    seed: int
    max_new: int
    fixed: bool
    handle: Handle
    tokens: list[int] = field(default_factory=list)
    wake_at: int = 1  # the worker wants to run again once this many tokens exist
    done: bool = False
    error: UserError | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)


class _TokenFeed:
    """token2wav role: one request's tokens, read from the token source by a thread of its own and
    delivered to the request's utterance jobs as the LM thread delivers them in a full engine."""

    def __init__(self, token_source, request: dict, jobs: list[_Utterance], handle: Handle):
        self.jobs, self.handle = jobs, handle
        self._lock = threading.Lock()
        self._source = None
        self._closed = False
        self.finished = False  # the source ended (every message read, or an error)
        threading.Thread(target=self._read, args=(token_source, request), name=f"engine-tokens-{handle.id}",
                         daemon=True).start()

    def _read(self, token_source, request: dict) -> None:
        try:
            source = token_source(request)
            with self._lock:
                self._source, closed = source, self._closed
            if closed:
                _cancel_source(source)
                return
            for k, ids, done in source:
                job = self.jobs[k]
                with job.cond:
                    job.tokens += ids
                    job.done = job.done or bool(done)
                    if job.done or len(job.tokens) >= job.wake_at:
                        job.cond.notify_all()
            if not all(j.done for j in self.jobs) and not self.handle.cancelled:
                raise UserError("the token source ended before every sentence's tokens arrived.",
                                "see the LM replicas' log")
        except BaseException as e:  # noqa: BLE001 - the request fails with one line, the engine goes on
            if isinstance(e, UserError):
                error = e
            else:
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                error = UserError(f"the request's speech tokens did not arrive ({type(e).__name__}: {first}).",
                                  "see the LM replicas' log; other requests are not affected")
            for job in self.jobs:
                with job.cond:
                    if not job.done:
                        job.done, job.error = True, error
                        job.cond.notify_all()
        finally:
            self.finished = True

    def close(self) -> None:
        """Stop the source (a cancelled or failed request): the LM side frees the request's row."""
        with self._lock:
            self._closed = True
            source = self._source
        if source is not None and not self.finished:
            _cancel_source(source)


def _cancel_source(source) -> None:
    try:
        cancel = getattr(source, "cancel", None) or getattr(source, "close", None)
        if cancel is not None:
            cancel()
    except Exception:  # noqa: BLE001 - best effort: a source that cannot stop ends on its own
        pass


# -- the batcher ---------------------------------------------------------------------------------------
@dataclass
class _Call:
    graph: str
    feed: dict
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: BaseException | None = None
    # a family's batchable call (GraphRunner.batched): solve(items) -> results, one item per call
    solve: object = None
    item: object = None
    size: int = 0


class StateBudget:
    """The bytes an engine's streams may keep between their chunks (CosyVoice3's flow prefix: ~1.8 MiB
    per mel frame at the real size in bf16), shared by every stream. A stream charges its whole
    holding before each chunk; a charge that would pass the limit is refused and that stream lets its
    state go (it recomputes from then on), so the live streams' holdings never pass the limit and an
    ended or abandoned stream's charge is dropped with it (explicitly, or when it is collected).

    `limit_bytes` None: `measure()` gives it at the first charge, i.e. once the engine's graphs are
    captured and warmed (what they hold is not the streams' to take)."""

    def __init__(self, limit_bytes: int | None, measure=None):
        if limit_bytes is None and measure is None:
            raise ValueError("a StateBudget needs a limit or a way to measure one")
        self.limit = None if limit_bytes is None else int(limit_bytes)
        self._measure = measure
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()
        # owners collected: a finalizer may run inside any allocation, also on a thread that holds
        # _lock (a deadlock) or iterates _held; it only queues the key, drained under the lock
        self._collected: deque[int] = deque()
        self.peak = 0
        self.refused = 0

    def open(self, owner) -> None:
        weakref.finalize(owner, self._collected.append, id(owner))

    def charge(self, owner, total_bytes: int) -> bool:
        with self._lock:
            self._drain()
            if self.limit is None:
                self.limit = int(self._measure())
            key = id(owner)
            others = sum(self._held.values()) - self._held.get(key, 0)
            if others + total_bytes > self.limit:
                self.refused += 1
                return False
            self._held[key] = total_bytes
            self.peak = max(self.peak, others + total_bytes)
            return True

    def close(self, owner) -> None:
        with self._lock:
            self._drain()
            self._held.pop(id(owner), None)

    def _drain(self) -> None:
        while self._collected:
            self._held.pop(self._collected.popleft(), None)

    def stats(self) -> dict:
        with self._lock:
            self._drain()
            return {"limit_bytes": self.limit, "held_bytes": sum(self._held.values()), "streams": len(self._held),
                    "peak_bytes": self.peak, "refused": self.refused}


class GraphBatcher:
    """Runs the workers' graph calls batched (see the module docstring)."""

    POLICIES = ("call", "round", "urgent")

    def __init__(self, pipe: Pipeline, max_wait: float = 0.004, split_ratio: float = 1.5, policy: str = "round"):
        """max_wait: how long a round waits for workers still running host code to add their calls.
        split_ratio: calls padded into one batch differ in their padded dim by at most this factor
        (see `_by_length`). policy: "call" runs only the most urgent batch (earliest deadline) and
        then looks at the pending calls again, so a call that arrives mid-round (a new stream's
        first chunk) waits for at most one running call; "round" runs every batch formed from the
        calls pending at the start of the round before taking new ones. "round" is the default: on the
        H200 (CosyVoice3, same run, median of 3) it served 64.2 / 85.4 audio s/s at C=16 / 32 with no
        underrun against 40.1 / 79.5 for "call" (docs/serving.md, 2026-12-05). "urgent" runs rounds,
        but before each of the round's batches it runs the calls that arrived since with an earlier
        deadline than that batch's (a new stream's first chunk), so those wait for one call, not the
        round, while everything else keeps the round's order and pace."""
        if policy not in self.POLICIES:
            raise UserError(f"unknown batcher policy {policy!r}.", f"choose one of {', '.join(self.POLICIES)}")
        self.pipe = pipe
        self.max_wait = max_wait
        self.split_ratio = split_ratio
        self.policy = policy
        self.graph_calls: dict[str, list] = {}  # graph -> [calls executed, rows, seconds]
        self.cond = threading.Condition()
        self.pending: list[_Call] = []
        self._carried = False  # the pending list holds calls formed but not run in the last round
        self.busy = 0  # workers running host code (not waiting on a call or on tokens)
        self.running = False
        self.stopped = False  # the loop has returned: calls are refused
        self.stream = torch.cuda.Stream(pipe.device) if pipe.device.type == "cuda" else None
        # where this thread captures new graphs (None: a side stream of its own, never `stream`, on
        # which the request threads enqueue their inputs; a green context's second stream when
        # `stream` is a green one, so the graphs keep to its SMs)
        self.capture_stream = None
        self.stage_seconds: dict[str, float] = {s: 0.0 for s in pipe.model.stages}
        self.batch_sizes: deque = deque(maxlen=1000)  # rows per executed call
        # f(stage, rows, seconds) after every executed call (the server's metrics); set by the engine
        self.on_batch = None
        self.idle_captures = 0  # deferred shapes captured while no call was pending
        self.idle_capture_seconds = 0.0

    # worker side
    def call(self, graph: str, feed: dict, deadline: float) -> dict:
        # below the graph's smallest size on its bucketable dim: padded up to it (exact, the spec's pad
        # rule) and cut back, as Pipeline.call does (a sentence the LM ends after 3 tokens is ordinary)
        spec = self.pipe.runners[graph].spec
        feed, sizes = spec.pad_to_min(feed)
        out = self._wait(_Call(graph, feed, deadline))
        return out if sizes is None else spec.slice_outputs(out, sizes)

    def call_batched(self, graph: str, solve, item, size: int, deadline: float):
        """A family's own batchable call (GraphRunner.batched): pending items of the same `solve`
        run as one `solve(items)`, at most the graph's batch limit, grouped by `size` as padded
        graph calls are by their length, in `graph`'s stage."""
        return self._wait(_Call(graph, {}, deadline, solve=solve, item=item, size=size))

    def _wait(self, c: _Call):
        with self.cond:
            if self.stopped:
                raise UserError("the engine stopped while this request was running.", "send the request again")
            self.pending.append(c)
            self.busy -= 1
            self.cond.notify_all()
        c.done.wait()  # the batcher's exit fails every call still pending (run)
        with self.cond:
            self.busy += 1
        if c.error is not None:
            raise c.error
        return c.result

    def worker_started(self) -> None:
        with self.cond:
            self.busy += 1

    def worker_waiting(self, delta: int) -> None:
        """A worker stops (-1) or resumes (+1) running host code while it waits for tokens."""
        with self.cond:
            self.busy -= delta
            self.cond.notify_all()

    # batcher side
    def run(self) -> None:
        if self.stream is not None:
            torch.cuda.set_stream(self.stream)
        try:
            with capture_stream(self.capture_stream):
                self._loop()
        finally:  # stopped, or broken: no caller may wait for a call that will never run
            with self.cond:
                self.stopped = True
                left, self.pending = self.pending, []
            for c in left:
                c.error = UserError("the engine stopped while this request was running.", "send the request again")
                c.done.set()

    def _deferred_runners(self) -> list:
        return [r for r in self.pipe.runners.values() if r.deferred_shapes]

    def _loop(self) -> None:
        while True:
            idle_capture = []
            with self.cond:
                while self.running and not self.pending:
                    idle_capture = self._deferred_runners()
                    if idle_capture:
                        break
                    self.cond.wait(0.1)
                if not self.running and not self.pending:
                    return
            if idle_capture and not self.pending:
                # nothing to run: capture one shape that ran eagerly in service (defer_new_shapes);
                # calls that arrive meanwhile wait for this one capture, not for a round of them
                t0 = time.perf_counter()
                try:
                    idle_capture[0].capture_deferred(1)
                except Exception as e:  # noqa: BLE001 - the shape stays eager; a call meeting it again retries
                    warnings.warn(f"capturing a deferred shape of {idle_capture[0].spec.name} failed, it stays eager: {e}",
                                  RuntimeWarning, stacklevel=1)
                self.idle_captures += 1
                self.idle_capture_seconds += time.perf_counter() - t0
                continue
            with self.cond:
                if not self._carried:  # with calls left from the last round there is work now: no waiting
                    deadline = time.perf_counter() + self.max_wait
                    while self.busy > 0 and time.perf_counter() < deadline:  # let running workers add theirs
                        self.cond.wait(max(deadline - time.perf_counter(), 0))
                calls, self.pending = self.pending, []
            try:
                left = self._execute(calls, first_only=self.policy == "call")
            except Exception as e:  # noqa: BLE001 - a bug in the grouping fails this round's calls, not the engine
                failed = request_failed(e, "the batcher")
                for c in calls:
                    if not c.done.is_set():
                        c.error = failed
                        c.done.set()
                left = []
            with self.cond:
                self._carried = bool(left)
                self.pending = left + self.pending

    def _execute(self, calls: list[_Call], first_only: bool = False) -> list[_Call]:
        """Run the calls batched, earliest deadline first; with first_only, only the most urgent batch
        and return the calls not run (they go back to the pending list, in front)."""
        groups: dict = {}
        for c in calls:
            try:
                groups.setdefault(self._key(c) if c.solve is None else ("batched", c.graph, c.solve), []).append(c)
            except Exception as e:  # noqa: BLE001 - a malformed feed fails its own call only
                c.error = e
                c.done.set()
        runs = [part for group in groups.values() for part in self._by_length(group)]
        batches = []
        for group in sorted(runs, key=lambda g: min(c.deadline for c in g)):
            group = sorted(group, key=lambda c: c.deadline)
            spec = self.pipe.runners[group[0].graph].spec
            limit = spec.dim("B").max if "B" in {d.name for d in spec.dims} else 1
            batch: list[_Call] = []
            rows = 0
            for c in group:
                n = self._call_rows(spec, c)
                if batch and rows + n > limit:
                    batches.append((spec, batch))
                    batch, rows = [], 0
                batch.append(c)
                rows += n
            if batch:
                batches.append((spec, batch))
        if first_only and batches:
            # the group with the earliest deadline runs first; its first batch holds its most urgent calls
            spec, batch = batches[0]
            self._run_batch(spec, batch)
            return [c for _, b in batches[1:] for c in b]
        for spec, batch in batches:
            if self.policy == "urgent":
                urgent = self._take_pending_before(min(c.deadline for c in batch))
                if urgent:
                    self._execute(urgent)
            self._run_batch(spec, batch)
        return []

    def _take_pending_before(self, deadline: float) -> list[_Call]:
        """Remove and return the pending calls due before `deadline`."""
        with self.cond:
            due = [c for c in self.pending if c.deadline < deadline]
            if due:
                self.pending = [c for c in self.pending if c.deadline >= deadline]
        return due

    def _by_length(self, group: list[_Call]) -> list[list[_Call]]:
        """Split a group whose calls may be padded together into runs whose padded dim differs by at
        most `split_ratio`: a short call (a stream's first chunk) padded to a long one would pay for
        the long one's frames and wait for them; as its own smaller call it is cheaper and, having
        the earlier deadline, runs first."""
        spec = self.pipe.runners[group[0].graph].spec
        if len(group) == 1 or (spec.pad is None and group[0].solve is None):
            return [group]
        size = (lambda c: c.size) if group[0].solve is not None else (lambda c: spec.sizes_of(c.feed)[spec.pad.dim])  # noqa: E731
        runs: list[list[_Call]] = []
        for c in sorted(group, key=size):
            if runs and size(c) <= self.split_ratio * size(runs[-1][0]):
                runs[-1].append(c)
            else:
                runs.append([c])
        return runs

    def _call_rows(self, spec, c: _Call) -> int:
        return 1 if c.solve is not None else self._rows(spec, c.feed)

    @staticmethod
    def _rows(spec, feed) -> int:
        t = next((t for t in spec.inputs if t.shape and t.shape[0] == "B"), None)
        return int(feed[t.name].shape[0]) if t is not None else 1

    def _key(self, c: _Call) -> tuple:
        """Calls with equal keys may share one graph call: same graph, same sizes of every dim but
        the batch and the bucketable one, same values of the inputs without a batch dim."""
        spec = self.pipe.runners[c.graph].spec
        sizes = spec.check_feed(c.feed)
        pad = spec.pad.dim if spec.pad is not None else None
        fixed = tuple((d, n) for d, n in sorted(sizes.items()) if d not in ("B", pad))
        scalars = tuple((t.name, tuple(c.feed[t.name].reshape(-1).tolist())) for t in spec.inputs
                        if not (t.shape and t.shape[0] == "B"))
        return c.graph, fixed, scalars

    def _run_batch(self, spec, batch: list[_Call]) -> None:
        graph = batch[0].graph
        try:
            t0 = time.perf_counter()
            if batch[0].solve is not None:
                outs = batch[0].solve([c.item for c in batch])
            elif len(batch) == 1:
                outs = [self.pipe.call(graph, batch[0].feed)]
            else:
                outs = self._batched(spec, graph, batch)
            if self.stream is not None:
                self.stream.synchronize()  # results complete before a worker reads them on the host
            # timed here, after the sync, so that the stage time is device time and single calls count too
            self._record(spec.stage, graph, sum(self._call_rows(spec, c) for c in batch), time.perf_counter() - t0)
            for c, o in zip(batch, outs):
                c.result = o
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets the error
            for c in batch:
                c.error = e
        finally:
            for c in batch:
                c.done.set()

    def _batched(self, spec, graph: str, batch: list[_Call]) -> list[dict]:
        sizes = [spec.sizes_of(c.feed) for c in batch]
        rows = [self._rows(spec, c.feed) for c in batch]
        # backends with one graph per shape prefer a few batch sizes: pad with copies of the last call
        extra = self.pipe.runners[graph].preferred_rows(sum(rows)) - sum(rows)
        if extra > 0:
            batch = batch + [batch[-1]] * (extra // rows[-1]) if extra % rows[-1] == 0 else batch
            sizes, rows = [spec.sizes_of(c.feed) for c in batch], [self._rows(spec, c.feed) for c in batch]
        pad = spec.pad
        target = dict(sizes[0])
        if pad is not None:
            target[pad.dim] = max(s[pad.dim] for s in sizes)
        feed = {}
        for t in spec.inputs:
            if not (t.shape and t.shape[0] == "B"):
                feed[t.name] = batch[0].feed[t.name]
                continue
            parts = []
            for c, s in zip(batch, sizes):
                x = c.feed[t.name]
                want = spec.shape_of(t, {**s, **({pad.dim: target[pad.dim]} if pad else {}), "B": x.shape[0]})
                if tuple(x.shape) != want:
                    y = torch.full(want, pad.fill.get(t.name, 0), dtype=x.dtype, device=x.device)
                    y[tuple(slice(0, n) for n in x.shape)] = x
                    x = y
                parts.append(x)
            feed[t.name] = torch.cat(parts)
        out = self.pipe.call(graph, feed)
        results, start = [], 0
        for c, s, n in zip(batch, sizes, rows):  # padding copies at the end get no result (zip stops)
            mine = {}
            for t in spec.outputs:
                want = spec.shape_of(t, {**s, "B": n})
                o = out[t.name][start:start + n]
                mine[t.name] = o[tuple(slice(0, k) for k in want)]
            results.append(mine)
            start += n
        return results

    def _record(self, stage: str, graph: str, rows: int, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.batch_sizes.append(rows)
        kept = self.graph_calls.setdefault(graph, [0, 0, 0.0])
        kept[0] += 1
        kept[1] += rows
        kept[2] += seconds
        if self.on_batch is not None:
            self.on_batch(stage, rows, seconds)


class _Runner:
    """The GraphRunner one request's token2wav calls graphs through."""

    def __init__(self, batcher: GraphBatcher, options: dict, deadline, stream_state_budget: StateBudget | None = None):
        self.batcher, self.options, self.deadline = batcher, options, deadline
        self.stream_state_budget = stream_state_budget

    def __call__(self, graph: str, feed: dict) -> dict:
        return self.batcher.call(graph, feed, self.deadline())

    def batched(self, graph: str, solve, item, size: int):
        return self.batcher.call_batched(graph, solve, item, size, self.deadline())

    def module(self, graph: str):
        eager = getattr(self.batcher.pipe.runners.get(graph), "eager_module", None)
        return eager() if eager is not None else None

    def compiled(self, graph: str, fn):
        return self.batcher.pipe.runners[graph].compiled(fn)

    def timed(self, graph: str):
        return contextlib.nullcontext()  # the batcher times its calls per stage


# -- the engine ------------------------------------------------------------------------------------------
class Engine:
    """See the module docstring. `backends` as for the Pipeline; the LM stage runs with `torch` or
    `compile` (continuous batching needs the static slot cache; its step is one captured CUDA graph
    either way, `compile` also compiles it); flow and vocoder take any backend."""

    # CUDA stream priority of the LM's steps against the token2wav batcher's calls: "high" lets a step's
    # kernels take the SMs ahead of a long flow call's pending blocks (the step is every stream's
    # critical path; the flow call has the chunk's playback time as slack)
    LM_PRIORITIES = ("normal", "high")
    # a token2wav shape (batch, length bucket) met for the first time in service: "capture" compiles /
    # captures it in the call (the call, and every stream behind it in the batcher, waits: a capture
    # synchronizes the device, a compile takes seconds); "defer" runs it on the eager module now and
    # captures it when the batcher is idle or at its third call (runtime/backends/compiled.py)
    NEW_SHAPES = ("capture", "defer")
    ROLES = ("full", "lm", "token2wav")

    def __init__(self, model: TTSModel, backends: str | dict | BackendChoice = "torch", device: str = "cpu",
                 engines_dir: str | None = None, precision: str = "fp32", options: dict | None = None,
                 max_streams: int | None = None, max_queue: int | None = None, max_len: int | None = None,
                 queue_timeout: float = 30.0, first_audio_target: float = 0.3, attention: str | None = None,
                 prefill_limit: int = 16, switch_interval: float | None = None, lm_buckets: list[int] | None = None,
                 batcher_policy: str = "round", lm_priority: str = "normal", role: str = "full",
                 token_source=None, token_batch: int = 4, lm_reserved_sms: int = 0, lm_prefill_graphs: bool = True,
                 new_shapes: str = "capture", stream_state_gb: float | None = None, token_stall_s: float = 60.0):
        """role: full | lm | token2wav (the module docstring); token_source: the token2wav role's
        `token_source(request) -> iterator of (utterance index, new token ids, done)`; token_batch:
        the lm role sends a request's new tokens every this many tokens (and at each utterance's end);
        lm_reserved_sms: run the token2wav calls on a CUDA green context that leaves this many SMs to
        the LM alone (0: both share every SM; see `_green_stream`); lm_prefill_graphs: on CUDA, run
        prefills as captured graphs (runtime/backends/slot_decoder.py; every (rows, width) pair is captured
        at start, ~8 s on an H100). On by default: on an H100 it cut first audio at C=1 by 16 ms and gave
        +12 % audio s/s at C=64 (docs/serving.md, sixth round); False runs them eagerly.
        new_shapes: capture | defer (NEW_SHAPES); warm_up and warm_graphs always capture.
        stream_state_gb: with flow_mode prefix, what the streams may keep between chunks in all (GiB);
        default: half the device memory free at the first charge, after start and warm-up (CPU: 4 GiB). A stream that
        would pass it recomputes its frames from then on (`StateBudget`).
        token_stall_s: a request whose next speech token does not come for this long fails (a hung LM
        replica in the disaggregated placement would otherwise hold its stream, and the listener, for
        good); longer than any queue timeout, so a request still waiting for an LM row is not cut."""
        self.model = model
        if role not in self.ROLES:
            raise UserError(f"unknown engine role {role!r}.", f"choose one of {', '.join(self.ROLES)}")
        if (role == "token2wav") != (token_source is not None):
            raise UserError("a token2wav engine needs a token source, and only it takes one.",
                            "pass token_source with role='token2wav' only")
        if token_batch < 1:
            raise UserError(f"token_batch {token_batch} is not a positive count.", "pass 1 or more")
        self.role, self.token_source, self.token_batch = role, token_source, token_batch
        if not token_stall_s > 0:
            raise UserError(f"token_stall_s {token_stall_s} is not a positive number of seconds.", "pass more than 0 (default 60)")
        self.token_stall_s = token_stall_s
        if lm_priority not in self.LM_PRIORITIES:
            raise UserError(f"unknown LM stream priority {lm_priority!r}.", f"choose one of {', '.join(self.LM_PRIORITIES)}")
        self.lm_priority = lm_priority
        if new_shapes not in self.NEW_SHAPES:
            raise UserError(f"unknown new-shape policy {new_shapes!r}.", f"choose one of {', '.join(self.NEW_SHAPES)}")
        self.new_shapes = new_shapes
        self.device = torch.device(device)
        if lm_reserved_sms < 0 or (lm_reserved_sms and self.device.type != "cuda"):
            raise UserError(f"cannot reserve {lm_reserved_sms} SMs for the LM on {self.device.type}.",
                            "reserve SMs (a positive count) on a CUDA device only; 0 turns it off")
        self.lm_reserved_sms = lm_reserved_sms
        self._green = None  # the token2wav side's green context (kept alive while its stream is used)
        choice = BackendChoice.for_model(backends, model)
        lm_stage = model.graph_specs()[model.lm.graph].stage
        lm_options = choice.of(lm_stage, model.lm.graph)
        lm_option = lm_options[0].resolved(precision)
        self._lm_stage = lm_stage
        if role != "token2wav" and (lm_option.kind not in ("torch", "cudagraph", "compile") or len(lm_options) > 1):
            raise UserError(f"the engine runs the {lm_stage} stage with torch, cudagraph or compile (its continuous batching "
                            f"needs the static slot cache), not {'/'.join(map(str, lm_options))}.",
                            f"choose {lm_stage}=compile:bf16 (or torch); the other stages may use any backend")
        if stream_state_gb is not None and stream_state_gb < 0:
            raise UserError(f"stream_state_gb {stream_state_gb} is negative.", "pass 0 or more GiB (0: keep nothing)")
        self.stream_state_gb = stream_state_gb
        self.state_budget: StateBudget | None = None  # made at start (flow_mode prefix only)
        # the LM graph is driven by the slot decoder; the pipeline loads the other stages' backends (a
        # role loads its own stages only: the LM's backend casts the weights the slot decoder runs)
        stages = {"full": None, "lm": (lm_stage,), "token2wav": tuple(s for s in model.stages if s != lm_stage)}[role]
        one_lm = BackendChoice({**choice.stages, lm_stage: (lm_options[0],)},
                               {g: o for g, o in choice.graphs.items() if g != model.lm.graph})
        self.pipe = Pipeline(model, one_lm, device=device,
                             engines_dir=engines_dir, precision=precision, options=options, stages=stages)
        self.options = self.pipe.options
        if self.options.get("flow_mode") == "prefix" and role != "lm":
            runner = self.pipe.runners.get("flow_solver")
            if getattr(runner, "eager_module", None) is None:
                raise UserError("flow_mode prefix runs the flow's own module and keeps its state per stream; "
                                "this flow backend has none.", "use flow=torch, cudagraph or compile with flow_mode prefix")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[lm_option.precision]
        lm_spec = model.graph_specs()[model.lm.graph]
        self.max_len = max_len or min(lm_spec.dim("P").max, 2048)
        if attention is None and lm_option.kind == "compile" and self.device.type == "cuda":
            attention = "flex_grouped"
        if attention is not None and attention.startswith("flex"):
            self.max_len = -(-self.max_len // 128) * 128
        self.max_streams = max_streams or self._default_streams(dtype)
        self.max_queue = self.max_streams * 4 if max_queue is None else max_queue
        self.queue_timeout = queue_timeout
        self.first_audio_target = first_audio_target
        if prefill_limit < 1:
            raise UserError(f"prefill_limit {prefill_limit} is not a positive count.", "pass 1 or more (default 16)")
        self.prefill_limit = prefill_limit
        self.lm_prefill_graphs = lm_prefill_graphs
        self.switch_interval = switch_interval
        self._lm_spec = (lm_option, dtype, attention)
        self.decoder: SlotDecoder | None = None
        if lm_buckets is not None and (not lm_buckets or min(lm_buckets) < 1):
            raise UserError(f"LM batch buckets {lm_buckets} must be positive row counts.", "pass e.g. 1,16,64")
        # the largest bucket is always the engine's row count (every admitted stream fits a step)
        self.lm_buckets = None if lm_buckets is None else \
            sorted({b for b in lm_buckets if b < self.max_streams} | {self.max_streams})
        self.batcher = GraphBatcher(self.pipe, policy=batcher_policy)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: deque = deque()  # handles not yet running (admission queue)
        self._active: dict[int, threading.Thread] = {}
        self._lm_queue: deque[_Utterance] = deque()
        self._lm_cond = threading.Condition()
        self._rows: list[_Utterance] = []
        self._threads: list[threading.Thread] = []
        self.running = False
        self._stopping = False  # set by stop(): submit refuses from then on
        self.lm_steps = 0
        self.lm_rows_total = 0  # rows over all steps (a level's mean batch: its rows / its steps)
        self.lm_batch_sizes: deque = deque(maxlen=1000)
        self.lm_seconds = 0.0
        # where an LM step's time goes (seconds summed over steps): `launch` (the graph replay call),
        # `wait` (host read: waiting for the device), `device` (the step's own GPU time, CUDA events,
        # slowed by whatever shares the SMs), `deliver` (handing tokens to the workers), `between` (the
        # loop's other host time: locks, admission, the GIL), and prefills apart (`prefill`, `prefills`)
        self.lm_timing = dict.fromkeys(("launch", "wait", "device", "deliver", "between", "prefill"), 0.0)
        self.lm_prefills = 0

    def limit_streams(self, n: int) -> None:
        """Before start: at most `n` active streams (a batch job with fewer requests than the default
        rows needs no bigger KV cache or more captured buckets)."""
        if self.running:
            raise RuntimeError("limit_streams is for an engine that has not started")
        if n < self.max_streams:
            self.max_queue = self.max_queue * n // self.max_streams
            self.max_streams = n
            if self.lm_buckets is not None:
                self.lm_buckets = sorted({b for b in self.lm_buckets if b < n} | {n})

    def _default_streams(self, dtype: torch.dtype) -> int:
        """As many rows as a fifth of the free device memory holds in KV cache (at most 256); 8 on the CPU."""
        if self.device.type != "cuda":
            return 8
        layers, kvh, hd = self.model.lm.cache_shape
        per_row = layers * kvh * hd * 2 * self.max_len * torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        rows = max(1, min(256, int(free * 0.2 // per_row)))
        return 1 << (rows.bit_length() - 1)

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self, warm: bool = True) -> "Engine":
        if self.switch_interval is not None:
            # The LM thread releases the GIL while it waits for each step's host read; with tens of
            # worker threads running Python it may wait up to CPython's switch interval (5 ms) to take
            # it back, longer than a step. A shorter interval bounds that wait (process-wide). Off by
            # default: 0.5 ms gave no consistent gain on the H200 (docs/serving.md).
            sys.setswitchinterval(min(sys.getswitchinterval(), self.switch_interval))
        if self.lm_reserved_sms:
            self.batcher.stream = self._green_stream(self.lm_reserved_sms)
            self.batcher.capture_stream = self._green.Stream()
        if self.role == "token2wav":  # no LM here: no slot decoder, no KV cache
            self.pipe.activate()
        else:
            option, dtype, attention = self._lm_spec
            lm = self.model.graph_module(self.model.lm.graph)
            vocab = self.model.graph_specs()[self.model.lm.graph].outputs[0].shape[1]
            spk = self.model.make_speaker(None, None)
            probe = self.model.make_sampler(self.model.make_utterance("a", spk), torch.Generator(), None)
            compile_step = option.kind == "compile"
            self.pipe.activate()
            self.decoder = SlotDecoder(lm, probe.slots(self.max_streams, vocab, self.device), self.model.lm.token_offset,
                                       self.max_streams, self.max_len, self.device, dtype, compile=compile_step,
                                       attention=attention, buckets=self.lm_buckets,
                                       prefill_graphs=self.lm_prefill_graphs,
                                       prefill_rows=1 << (self.prefill_limit - 1).bit_length())
        self._defer_new_shapes(self.new_shapes == "defer")
        if self.options.get("flow_mode") == "prefix" and self.role != "lm":
            gb = self.stream_state_gb
            self.state_budget = StateBudget(None if gb is None else int(gb * (1 << 30)), self._default_state_limit)
        self.running = True
        self.batcher.running = True
        # a lower number is a higher priority; CUDA graphs replayed on the stream run at its priority
        lm_stream = torch.cuda.Stream(self.device, priority=-1 if self.lm_priority == "high" else 0) \
            if self.device.type == "cuda" else None
        first = threading.Thread(target=self._lm_loop, args=(lm_stream, warm), name="engine-lm", daemon=True) \
            if self.decoder is not None else threading.Thread(target=self._admission_loop, name="engine-admission",
                                                              daemon=True)
        self._threads = [first,
                         threading.Thread(target=self.batcher.run, name="engine-batcher", daemon=True)]
        self._ready = threading.Event()
        for t in self._threads:
            t.start()
        self._ready.wait()
        if self._start_error is not None:
            with self.batcher.cond:  # the batcher thread is running: it must not outlive a failed start
                self.batcher.running = False
                self.batcher.cond.notify_all()
            for t in self._threads:
                t.join(timeout=30)
            raise self._start_error
        return self

    _start_error: BaseException | None = None

    def _default_state_limit(self) -> int:
        """Half the device memory free at the first stream's first charge (CPU: 4 GiB): by then the LM's
        graphs are captured and a warmed engine's token2wav graphs too; the other half is the solves'
        own working memory (a round's padded keys and values) and the graphs still to come."""
        if self.device.type != "cuda":
            return 4 << 30
        return torch.cuda.mem_get_info(self.device)[0] // 2

    def _green_stream(self, reserved: int) -> torch.cuda.Stream:
        """A stream of a green context holding all SMs but `reserved`: the token2wav batcher's calls
        (flow, vocoder) run there, so the LM's steps, on an ordinary stream, always find `reserved`
        idle SMs. Measured under load, an LM step's device time grows 2-3x while flow calls share its
        SMs (docs/serving.md, "Where an LM step's time goes"), and a stream priority did not help."""
        from torch.cuda import green_contexts

        total = torch.cuda.get_device_properties(self.device).multi_processor_count
        if reserved >= total:
            raise UserError(f"cannot reserve {reserved} of the GPU's {total} SMs for the LM.",
                            f"reserve fewer than {total} (e.g. 16)")
        if not green_contexts.SUPPORTED or not hasattr(green_contexts.GreenContext, "Stream"):
            raise UserError(f"this torch ({torch.__version__}) has no CUDA green-context streams.",
                            "use a torch built with CUDA 12.8+ green contexts, or drop the SM reservation")
        try:
            self._green = green_contexts.GreenContext.create(num_sms=total - reserved,
                                                             device_id=self.device.index or 0)
            return self._green.Stream()
        except RuntimeError as e:  # the driver's SM split has granularity rules (e.g. multiples of 8)
            first = str(e).strip().splitlines()[0][:160]
            raise UserError(f"no green context of {total - reserved} SMs ({first}).",
                            "try another reserved count, e.g. a multiple of 8") from None

    def stop(self) -> None:
        """Finish: waiting requests fail, running ones are cancelled, threads end."""
        # one locked step: from here on submit refuses, so no request can be launched after the
        # snapshot of the active ones (it would never be cancelled nor served: a caller waiting forever)
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            active = list(self._active.values())
        for h, _ in waiting:
            h._end(_shutting_down())
        for _, h in active:
            h.cancel()
        deadline = time.monotonic() + 30  # one wait for all of them, not 30 s each
        for t, _ in active:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))
        self.running = False
        with self._lm_cond:
            self._lm_cond.notify_all()
        with self.batcher.cond:
            self.batcher.running = False
            self.batcher.cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- requests --------------------------------------------------------------------------------------------
    def submit(self, text: str, voice: str | None = None, speaker: dict | None = None, seed: int = 0,
               fixed_tokens: int | None = None, stream: bool = True, prompt_wav: str | None = None,
               prompt_text: str | None = None) -> Handle:
        """Queue a request; its audio arrives on the returned handle. Bad input raises UserError now
        (nothing is queued); a full engine raises EngineFull."""
        if self.role == "lm":
            raise UserError("this engine generates speech tokens only (role lm).",
                            "call Engine.tokens(), or start an engine of role full or token2wav")
        return self._submit(text, voice, speaker, seed, fixed_tokens, stream, prompt_wav, prompt_text, False)

    def tokens(self, text: str, voice: str | None = None, speaker: dict | None = None, seed: int = 0,
               fixed_tokens: int | None = None) -> Handle:
        """Queue a request for its speech tokens only: the handle's items are messages
        (utterance index, new token ids, done), every `token_batch` tokens and at each utterance's
        end; the same seed gives the tokens `submit` would. Admission as for `submit`."""
        if self.role == "token2wav":
            raise UserError("this engine has no LM (role token2wav).", "ask its token source, or an lm or full engine")
        return self._submit(text, voice, speaker, seed, fixed_tokens, True, None, None, True)

    def _submit(self, text, voice, speaker, seed, fixed_tokens, stream, prompt_wav, prompt_text,
                tokens_only: bool) -> Handle:
        if not self.running:
            raise UserError("the engine is not running.", "call Engine.start() first")
        if speaker is None:
            speaker = self.model.make_speaker(prompt_wav, prompt_text, voice)
        sentences = self.model.split_text(text, speaker)
        utts = [self.model.make_utterance(s, speaker) for s in sentences]
        for u in utts:
            u.check_fixed(fixed_tokens)
            check_room(len(u.prompt_ids), fixed_tokens or min(u.max_tokens, self.max_len - len(u.prompt_ids)),
                       self.max_len)
        handle = Handle(next(self._ids), self.model.sample_rate)
        job = (handle, dict(utts=utts, seed=seed, fixed_tokens=fixed_tokens, stream=stream, tokens_only=tokens_only))
        if self.role == "token2wav":  # what the LM side needs to make the same utterances: plain data
            job[1]["request"] = {"text": text, "speaker": speaker, "seed": seed, "fixed_tokens": fixed_tokens}
        with self._lock:
            if self._stopping:
                raise _shutting_down()
            self._drop_cancelled()
            if len(self._active) < self.max_streams:
                self._launch(job)
            elif len(self._waiting) < self.max_queue:
                self._waiting.append(job)
            else:
                raise EngineFull(f"the engine is full ({len(self._active)} streams running, {len(self._waiting)} "
                                 f"waiting).", self._retry_after())
        return handle

    def synthesize(self, text: str, **kwargs) -> tuple[torch.Tensor, RequestStats]:
        """One request, blocking: its whole audio and stats."""
        handle = self.submit(text, **kwargs)
        audio = handle.audio()
        return audio, handle.stats

    def _defer_new_shapes(self, on: bool) -> None:
        for graph, runner in self.pipe.runners.items():
            if graph != self.model.lm.graph:
                runner.defer_new_shapes = on

    @contextlib.contextmanager
    def _capturing(self):
        """Warm-ups capture every shape they meet, whatever `new_shapes` says: that is their purpose."""
        self._defer_new_shapes(False)
        try:
            yield
        finally:
            self._defer_new_shapes(self.new_shapes == "defer")

    def warm_up(self, tokens: int | None = None, levels: list[int] | None = None, text: str = "Warming up.") -> float:
        """Run bursts of synthetic requests (1, 2, 4, ... at once, up to `levels`) so the graphs a
        batch of that size calls exist before real traffic: compiled backends compile and capture
        their shapes here, not in a listener's first request. Returns the seconds it took."""
        with self._capturing():
            return self._warm_up(tokens, levels, text)

    def _warm_up(self, tokens, levels, text) -> float:
        t0 = time.perf_counter()
        tokens = tokens or max(8, int(round(2 * self.model.token_rate())))
        if levels is None:
            levels = [1 << i for i in range(max(min(self.max_streams, 64), 1).bit_length())]
        start = self.tokens if self.role == "lm" else self.submit
        for n in levels:
            handles = [start(text, seed=i, fixed_tokens=tokens) for i in range(min(n, self.max_streams))]
            for h in handles:
                list(h)
        return time.perf_counter() - t0

    def warm_graphs(self, streams: int | None = None, seen_only: bool = False, phase=lambda p: None) -> int:
        """Call every graph but the LM's once per shape its backend compiles or captures
        (`Backend.warm_points`: every (batch bucket, padded-length bucket) pair for the compile and
        cudagraph backends, nothing for eager and artifact ones), so no request meets a compile or a
        capture (and `torch.cuda.graph`'s device-wide wait) in service. streams: how many requests a
        call may batch (default max_streams). seen_only: only lengths up to the longest each graph has
        been called with (`Pipeline.longest`, e.g. after a round of the requests a load test sends),
        instead of every length up to the spec's max. Returns the number of calls."""
        with self._capturing():
            return self._warm_graphs(streams, seen_only, phase)

    def _warm_graphs(self, streams, seen_only, phase) -> int:
        streams = min(streams or self.max_streams, self.max_streams)
        stream = self.batcher.stream
        calls = 0
        for graph, runner in self.pipe.runners.items():
            if graph == self.model.lm.graph:
                continue
            spec = runner.spec
            points = runner.warm_points(streams * spec.rows_per_request)
            if points and seen_only and spec.pad is not None:
                longest = self.pipe.longest.get(graph)
                if longest is None:
                    continue  # never called by this workload (e.g. a graph of another mode)
                cap = runner.padded_sizes({spec.pad.dim: longest})[spec.pad.dim]
                points = [p for p in points if p.get(spec.pad.dim, 0) <= cap]
            for k, point in enumerate(points):
                phase(f"warming {graph}: shape {k + 1} of {len(points)}")
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    self.pipe.call(graph, spec.sample_feed(point, device=self.device))
                calls += 1
        if stream is not None:
            stream.synchronize()
        return calls

    def _retry_after(self) -> float:
        return max(1.0, 5.0 * (len(self._waiting) + 1) / max(self.max_streams, 1))

    def _launch(self, job) -> None:
        handle, spec = job
        handle.stats.admitted = time.perf_counter() - handle.stats.submitted
        target = self._serve_tokens if spec["tokens_only"] else self._serve
        t = threading.Thread(target=target, args=(handle, spec), name=f"engine-req-{handle.id}", daemon=True)
        self._active[handle.id] = (t, handle)
        self.batcher.worker_started()
        t.start()

    def _finished(self, handle: Handle) -> None:
        with self._lock:
            self._active.pop(handle.id, None)
            now = time.perf_counter()
            self._drop_cancelled()
            while self._waiting and len(self._active) < self.max_streams:
                job = self._waiting.popleft()
                if now - job[0].stats.submitted > self.queue_timeout:
                    job[0]._end(EngineFull(f"the request waited {self.queue_timeout:.0f} s for a free stream.",
                                           self._retry_after()))
                    continue
                self._launch(job)

    def _expire_waiting(self) -> None:
        """Fail waiting requests older than `queue_timeout` now, not when a stream next frees (the LM
        thread calls this about every 100 ms)."""
        now = time.perf_counter()
        with self._lock:
            if not self._waiting or now - self._waiting[0][0].stats.submitted <= self.queue_timeout:
                return  # the oldest is young enough: so are all (the queue is in arrival order)
            keep = deque()
            for job in self._waiting:
                if now - job[0].stats.submitted > self.queue_timeout:
                    job[0]._end(EngineFull(f"the request waited {self.queue_timeout:.0f} s for a free stream.",
                                           self._retry_after()))
                else:
                    keep.append(job)
            self._waiting = keep

    def _drop_cancelled(self) -> None:
        """Waiting requests cancelled before they started (a client that went away) give their queue
        place back now instead of when a stream frees (caller holds the lock)."""
        if any(h.cancelled for h, _ in self._waiting):
            for h, _ in self._waiting:
                if h.cancelled:
                    h._end(UserError("the request was cancelled."))
            self._waiting = deque(j for j in self._waiting if not j[0].cancelled)

    def stats(self) -> dict:
        # read from other threads while the LM thread, the batcher and the workers change these:
        # the request queues under their lock, the rest as C-level copies (no thread switch inside)
        with self._lock:
            active, queued = len(self._active), sum(1 for h, _ in self._waiting if not h.cancelled)
        graph_calls = dict(self.batcher.graph_calls)
        return {"active_streams": active, "queued": queued,
                "max_streams": self.max_streams,
                "lm_rows": len(self._rows), "lm_steps": self.lm_steps, "lm_rows_total": self.lm_rows_total,
                "lm_batch_mean": sum(self.lm_batch_sizes) / max(len(self.lm_batch_sizes), 1),
                "token2wav_batch_mean": sum(self.batcher.batch_sizes) / max(len(self.batcher.batch_sizes), 1),
                "stage_seconds": {**self.batcher.stage_seconds, self._lm_stage: self.lm_seconds},
                "lm_timing": dict(self.lm_timing), "lm_prefills": self.lm_prefills,
                "new_shapes": self.new_shape_stats(),
                **({"stream_state": self.state_budget.stats()} if self.state_budget is not None else {}),
                "graph_calls": {g: {"calls": n, "rows": r, "seconds": round(t, 4)}
                                for g, (n, r, t) in graph_calls.items()}}

    def new_shape_stats(self) -> dict:
        """What the `new_shapes` policy did: calls run eagerly, shape keys waiting for a capture, and
        the captures the idle batcher made."""
        runners = list(self.pipe.runners.values())
        return {"policy": self.new_shapes, "eager_calls": sum(getattr(r, "deferred_calls", 0) for r in runners),
                "waiting": sum(r.deferred_shapes for r in runners), "idle_captures": self.batcher.idle_captures,
                "idle_capture_seconds": round(self.batcher.idle_capture_seconds, 3)}

    # -- a request's worker ----------------------------------------------------------------------------------
    def _serve(self, handle: Handle, spec: dict) -> None:
        stream = self.batcher.stream
        if stream is not None:
            torch.cuda.set_stream(stream)
        feed = decoder = None
        end: Exception | None = request_failed(RuntimeError("the worker stopped early"))  # until it ends properly
        try:
            generator = torch.Generator().manual_seed(spec["seed"])
            runner = _Runner(self.batcher, self.options, lambda: self._deadline(handle), self.state_budget)
            if self.role == "token2wav":  # the tokens come from the token source, not from an LM thread here
                fixed = spec["fixed_tokens"]
                jobs = [_Utterance(u.prompt_ids, None, (spec["seed"] * 1_000_003 + k) & 0xFFFFFFFF,
                                   fixed if fixed is not None else min(u.max_tokens, self.max_len - len(u.prompt_ids)),
                                   fixed is not None, handle) for k, u in enumerate(spec["utts"])]
                feed = _TokenFeed(self.token_source, spec["request"], jobs, handle)
            for k, utt in enumerate(spec["utts"]):
                if handle.cancelled:
                    break
                fixed = spec["fixed_tokens"]
                max_new = fixed if fixed is not None else min(utt.max_tokens, self.max_len - len(utt.prompt_ids))
                if feed is None:
                    sampler = self.model.make_sampler(utt, torch.Generator(), fixed)
                    job = _Utterance(utt.prompt_ids, sampler, (spec["seed"] * 1_000_003 + k) & 0xFFFFFFFF, max_new,
                                     fixed is not None, handle)
                else:
                    job = feed.jobs[k]
                decoder = self.model.stream_decoder(utt, runner, generator, self.device) if spec["stream"] else None
                job.wake_at = decoder.tokens_for_next_chunk() if decoder is not None else max_new
                if feed is None:
                    with self._lm_cond:
                        self._lm_queue.append(job)
                        self._lm_cond.notify_all()
                tokens = self._consume(job, decoder, handle)
                handle.stats.tokens.append(tokens)
                if handle.cancelled:
                    break
                if decoder is not None:
                    chunks = decoder.finish(tokens) if tokens else []
                else:
                    chunks = [self.model.token2wav(tokens, utt, runner, generator, self.device)] if tokens else []
                for c in chunks:
                    if c.numel():
                        handle._put(c.float().cpu())
                capped_warning(utt, tokens, fixed)
                handle.stats.warnings += [f"sentence {k + 1}: {w}" for w in utt.warnings]
            end = None if not handle.cancelled else UserError("the request was cancelled.")
        except UserError as e:
            end = e
        except Exception as e:  # noqa: BLE001 - the request fails with one line, the engine goes on
            end = request_failed(e)
        finally:
            self._worker_done(handle, end, feed, decoder)

    def _serve_tokens(self, handle: Handle, spec: dict) -> None:
        """An LM-only request's worker: each utterance's new tokens go on the handle as messages
        (utterance index, new token ids, done), every `token_batch` tokens and at the utterance's end."""
        end: Exception | None = request_failed(RuntimeError("the worker stopped early"))
        try:
            for k, utt in enumerate(spec["utts"]):
                if handle.cancelled:
                    break
                fixed = spec["fixed_tokens"]
                max_new = fixed if fixed is not None else min(utt.max_tokens, self.max_len - len(utt.prompt_ids))
                sampler = self.model.make_sampler(utt, torch.Generator(), fixed)
                job = _Utterance(utt.prompt_ids, sampler, (spec["seed"] * 1_000_003 + k) & 0xFFFFFFFF, max_new,
                                 fixed is not None, handle)
                job.wake_at = self.token_batch
                with self._lm_cond:
                    self._lm_queue.append(job)
                    self._lm_cond.notify_all()
                sent = 0
                while True:
                    with job.cond:
                        self.batcher.worker_waiting(1)
                        while not job.done and len(job.tokens) < job.wake_at and not handle.cancelled:
                            job.cond.wait(0.5)
                        self.batcher.worker_waiting(-1)
                        tokens, done = list(job.tokens), job.done
                    if handle.cancelled:
                        break
                    if job.error is not None:
                        raise job.error
                    if len(tokens) > sent or done:
                        handle._put_message((k, tokens[sent:], done))
                        sent = len(tokens)
                    job.wake_at = len(tokens) + self.token_batch
                    if done:
                        break
                handle.stats.tokens.append(tokens)
                if handle.cancelled:
                    break
            end = None if not handle.cancelled else UserError("the request was cancelled.")
        except UserError as e:
            end = e
        except Exception as e:  # noqa: BLE001 - the request fails with one line, the engine goes on
            end = request_failed(e)
        finally:
            self._worker_done(handle, end)

    def _worker_done(self, handle: Handle, end: Exception | None, feed=None, decoder=None) -> None:
        """A request's worker is leaving: its LM rows stop (a failed request's utterance could
        otherwise decode to its token limit), its kept state and stream slot go, and only then does
        the handle end, so a client that sends its next request at once finds the slot free."""
        handle._abandoned = end is not None
        if feed is not None and (handle.cancelled or end is not None):
            feed.close()
        if decoder is not None and hasattr(decoder, "close"):  # a cancelled stream's kept state goes now
            decoder.close()
        with self.batcher.cond:
            self.batcher.busy -= 1
            self.batcher.cond.notify_all()
        try:
            self._finished(handle)
        finally:
            handle._end(end)

    def _consume(self, job: _Utterance, decoder, handle: Handle) -> list[int]:
        """Wait for the utterance's tokens, feeding the stream decoder whenever a chunk is due; fail the
        request when no token comes for `token_stall_s`."""
        seen, since = -1, time.monotonic()
        while True:
            with job.cond:
                self.batcher.worker_waiting(1)
                try:
                    while not job.done and len(job.tokens) < job.wake_at and not handle.cancelled:
                        if len(job.tokens) != seen:
                            seen, since = len(job.tokens), time.monotonic()
                        elif time.monotonic() - since > self.token_stall_s:
                            raise UserError(f"no speech token came for {self.token_stall_s:g} s (after {seen} of "
                                            f"this sentence's).", "see the LM's log (a replica may be hung); "
                                            "other requests are not affected")
                        job.cond.wait(min(0.5, self.token_stall_s))
                finally:
                    self.batcher.worker_waiting(-1)
                tokens, done = list(job.tokens), job.done
            if handle.cancelled:
                return tokens
            if job.error is not None:
                raise job.error
            if decoder is not None and tokens:
                for c in decoder.push(tokens):
                    if c.numel():
                        handle._put(c.float().cpu())
                job.wake_at = max(decoder.tokens_for_next_chunk(), len(tokens) + 1)
            if done:
                return tokens

    def _deadline(self, handle: Handle) -> float:
        """When the listener needs the next audio (perf_counter seconds): the first-audio target
        until the first chunk, then the end of the audio sent so far."""
        s = handle.stats
        if s.first_audio is None:
            return s.submitted + self.first_audio_target
        return s.submitted + s.chunk_times[0] + s.audio_seconds

    # -- the LM thread --------------------------------------------------------------------------------------
    def _admission_loop(self) -> None:
        """The token2wav role's stand-in for the LM thread: it only fails requests that waited too long."""
        self._ready.set()
        while self.running:
            self._expire_waiting()
            time.sleep(0.1)

    def _lm_loop(self, stream, warm: bool) -> None:
        if stream is not None:
            torch.cuda.set_stream(stream)
        try:
            if warm:
                self.decoder.capture_all()
        except BaseException as e:  # noqa: BLE001 - start() raises it in the caller's thread
            self._start_error = e
            self.running = False
        self._ready.set()
        dec = self.decoder
        timing = self.lm_timing
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if stream is not None else None
        expired_at = time.perf_counter()
        last_end = None  # when the previous step's tokens were delivered
        while self.running:
            if time.perf_counter() - expired_at > 0.1:
                self._expire_waiting()
                expired_at = time.perf_counter()
            with self._lm_cond:
                while self.running and not self._rows and not self._lm_queue:
                    last_end = None  # idle: the wait is not the loop's overhead
                    self._lm_cond.wait(0.1)
                    if time.perf_counter() - expired_at > 0.1:  # to the loop's top, where waiting requests
                        break  # time out: they do while the LM idles too (not under this lock)
                arrivals = []
                while self._lm_queue and len(self._rows) + len(arrivals) < dec.rows and len(arrivals) < self.prefill_limit:
                    job = self._lm_queue.popleft()
                    if job.handle.cancelled or job.handle._abandoned:  # gone before its prefill: no row for it
                        self._finish_utterance(job)
                    else:
                        arrivals.append(job)
            if not self.running:
                break
            t0 = time.perf_counter()
            prefill_s = 0.0
            if arrivals:
                start = len(self._rows)
                try:
                    first = dec.read(dec.prefill(start, [a.prompt for a in arrivals], [a.sampler for a in arrivals],
                                                 [a.seed for a in arrivals]))
                except Exception as e:  # noqa: BLE001 - these prompts fail; the rows already decoding go on
                    for a in arrivals:
                        self._finish_utterance(a, error=e if isinstance(e, UserError) else request_failed(e, "the LM's prefill"))
                    continue
                self._rows += arrivals
                self._deliver(first, range(start, start + len(arrivals)))
                prefill_s = time.perf_counter() - t0
                timing["prefill"] += prefill_s
                self.lm_prefills += 1
            n = len(self._rows)
            if n:
                t1 = time.perf_counter()
                if last_end is not None:
                    timing["between"] += t1 - last_end - prefill_s
                try:
                    if events is not None:
                        events[0].record()
                    tok = dec.step(n)
                    if events is not None:
                        events[1].record()
                    t2 = time.perf_counter()
                    ids = dec.read(tok)
                    t3 = time.perf_counter()
                    self.lm_steps += 1
                    self.lm_rows_total += n
                    self.lm_batch_sizes.append(n)
                    self._deliver(ids, range(n))
                except Exception as e:  # noqa: BLE001 - the rows' state is unknown now: they fail, the engine goes on
                    self._fail_rows(e)
                    last_end = None
                    continue
                last_end = time.perf_counter()
                timing["launch"] += t2 - t1
                timing["wait"] += t3 - t2
                timing["deliver"] += last_end - t3
                if events is not None:  # both recorded before the read's sync: complete now
                    timing["device"] += events[0].elapsed_time(events[1]) / 1e3
            dt = time.perf_counter() - t0
            self.lm_seconds += dt
            if n and self.batcher.on_batch is not None:
                try:
                    self.batcher.on_batch(self._lm_stage, n, dt)
                except Exception as e:  # noqa: BLE001 - a metrics callback must not stop the decoding
                    warnings.warn(f"the engine's on_batch callback failed: {e}", RuntimeWarning, stacklevel=1)

    def _fail_rows(self, e: BaseException) -> None:
        """A decode step failed: every decoding utterance fails with one line and its row is freed
        (what the cache holds is unknown now); the requests waiting and those to come are served."""
        error = e if isinstance(e, UserError) else request_failed(e, "the LM's decode step")
        rows, self._rows = self._rows, []
        for job in rows:
            self._finish_utterance(job, error=error)
        for row in reversed(range(len(rows))):
            try:
                self.decoder.free(row)
            except Exception:  # noqa: BLE001 - a broken device fails the next step again, for those rows only
                pass

    def _deliver(self, ids: list[int], rows) -> None:
        lm = self.model.lm
        finished = []
        for i, row in enumerate(rows):
            job = self._rows[row]
            t = ids[i]
            stop = (not job.fixed and lm.is_stop(t)) or job.handle.cancelled or job.handle._abandoned
            with job.cond:
                if not stop:
                    job.tokens.append(t)
                if stop or len(job.tokens) >= job.max_new:
                    job.done = True
                    finished.append(row)
                if job.done or len(job.tokens) >= job.wake_at:
                    job.cond.notify_all()
        for row in sorted(finished, reverse=True):  # compact: the last row moves into the hole
            last = len(self._rows) - 1
            if row != last:
                self.decoder.move(row, last)
                self._rows[row] = self._rows[last]
            self._rows.pop()
            self.decoder.free(last)

    def _finish_utterance(self, job: _Utterance, error: UserError | None = None) -> None:
        with job.cond:
            job.done, job.error = True, error
            job.cond.notify_all()
