"""Benchmark the decode-attention implementations of runtime.backends.decode_attention.

For each (model, batch, cache columns) point and each implementation, the attention of one decode
step is compiled (torch.compile fullgraph, dynamic=False) and captured in ONE CUDA graph that runs it
once per layer, each layer on its own cache tensors as in the real step (so a layer's K/V come from
HBM, not from an L2 still warm from the previous call). The graph is replayed many times and timed
with CUDA events; the median replay / layers is the per-layer time. Two modes per implementation:
`full` attends over all T cache columns, `Tb` over the first Tb = next multiple of 256 >= max(length)
(runtime.backends.decode_attention.attend_first_columns).

Reported per row: per-layer time, time x layers, effective bandwidth = bytes of K/V in the filled
columns (sum of lengths x KVH x HD x 2 tensors x 2 bytes) / per-layer time, the bandwidth over all
the columns the mode attends (T or Tb per row), the max abs error of layer 0 against a float32
reference (status `wrong` above WRONG_ABOVE), and the kernel inductor generated (flex decoding vs
main kernel, SDPA backend) read from the generated code. An eager probe at the first point says
which SDPA backends accept the inputs, their eager time, and which kernels run by default.

Processes: compilation (5-12 s per graph on the H200 machine) would not fit the time box serially,
so --compile-workers processes (default 6) compile the tasks ahead, in task order, into inductor's
on-disk caches (one layer's tensors, single-threaded each), while one measuring process follows and
finds its graphs cached; it alone runs timed replays.

Robustness: a compile or capture error is reported with its first line and the worker goes on; a CUDA
error that poisons the context (illegal address), a crash or a hang (--task-timeout) ends that
worker: the failure is recorded, the implementation is skipped at later points, and a new worker
starts. Points run in order of importance and nothing new starts after --budget-s seconds (those
rows are `skipped`), so one run stays in its time box. --json is rewritten after every row.

  python scripts/bench_decode_attention.py --json decode_attention.json       # H200, ~4 min
  python scripts/bench_decode_attention.py --device cpu --quick               # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.backends.decode_attention import IMPLEMENTATIONS, attend_first_columns, bucket_columns  # noqa: E402

MODELS = {
    "llama-3.2-3b": dict(heads=24, kv_heads=8, head_dim=128, layers=28),
    "qwen2-0.5b": dict(heads=14, kv_heads=2, head_dim=64, layers=24),
    # --quick: the same head groupings (G = 3, 7) at toy sizes
    "tiny-g3": dict(heads=6, kv_heads=2, head_dim=32, layers=2),
    "tiny-g7": dict(heads=7, kv_heads=1, head_dim=16, layers=2),
}
# most important first: the time budget cuts from the end
POINTS = [("llama-3.2-3b", 128, 1024), ("qwen2-0.5b", 128, 1024), ("llama-3.2-3b", 256, 1024),
          ("llama-3.2-3b", 64, 1024), ("qwen2-0.5b", 32, 1024), ("llama-3.2-3b", 16, 1024),
          ("llama-3.2-3b", 1, 1024), ("qwen2-0.5b", 1, 1024), ("llama-3.2-3b", 128, 2048)]
QUICK_POINTS = [("tiny-g3", 4, 512), ("tiny-g7", 3, 512)]
# expected fastest first; `flex` last: on torch 2.11 + H200 its GQA path crashed (see its docstring)
DEFAULT_IMPLS = ["flex_grouped", "sdpa", "sdpa_grouped", "matmul_bf16", "reference_fp32", "flex"]
LENGTH_RANGE = (64, 600)
QUICK_LENGTH_RANGE = (16, 300)
# bf16 outputs of magnitude ~0.1-1: correct implementations stay below 1e-2
WRONG_ABOVE = 5e-2
# markers in inductor's generated code -> the kernel that runs
CODE_MARKERS = [("SPLIT_KV", "flex decoding (split-KV)"), ("_scaled_dot_product_flash_attention_for_cpu", "sdpa cpu flash"),
                ("_scaled_dot_product_efficient_attention", "sdpa efficient"),
                ("_scaled_dot_product_flash_attention", "sdpa flash"), ("_scaled_dot_product_cudnn_attention", "sdpa cudnn")]
RESULT = "RESULT "


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------------------
# worker side: allocation, compilation, capture, timing
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def collect_inductor_code(sink: list):
    """Appends the output code of every graph inductor lowers (or loads from its cache) inside the
    block. Private hook, the one torch._inductor.utils.run_and_get_code patches; if it moved,
    nothing is collected."""
    try:
        from torch._inductor.graph import GraphLowering
        original = GraphLowering.save_output_code
    except (ImportError, AttributeError):
        yield
        return

    def save_output_code(code):
        sink.append(code)
        if callable(original):
            original(code)

    GraphLowering.save_output_code = staticmethod(save_output_code)
    try:
        yield
    finally:
        GraphLowering.save_output_code = original


def kernel_from_code(name: str, codes: list, backend: str, device: torch.device) -> str:
    if backend != "inductor":
        return f"n/a ({backend})"
    if not codes:
        return "unknown (no code collected)"
    code = "\n".join(codes)
    found = [label for marker, label in CODE_MARKERS if marker in code]
    found = found[:1] if found and found[0] == "sdpa cpu flash" else found  # its name contains the CUDA one's
    if name.startswith("flex") and not found:
        found = ["flex main kernel" if device.type == "cuda" else f"flex {device.type} template"]
    if name.startswith("sdpa") and not found:
        found = ["sdpa math (decomposed)"]
    if not found:
        found = ["bmm/extern" if "extern_kernels.bmm" in code else "triton"]
    return ", ".join(found)


class Point:
    """One benchmark point's tensors: q, a K/V pair per layer, lengths (device and host)."""

    def __init__(self, model: str, batch: int, columns: int, device: torch.device, seed: int, length_range,
                 compile_only: bool = False):
        cfg = MODELS[model]
        # a compile worker needs the shapes only: one layer, no reference
        self.key, self.cfg = (model, batch, columns), cfg
        gen = torch.Generator().manual_seed(seed * 100003 + batch * 7 + columns)
        lo, hi = length_range
        self.host_lengths = torch.randint(lo, min(hi, columns) + 1, (batch,), generator=gen)
        shape = (batch, cfg["kv_heads"], columns, cfg["head_dim"])
        self.caches = [tuple(torch.empty(shape, dtype=torch.bfloat16, device=device).normal_() for _ in range(2))
                       for _ in range(1 if compile_only else cfg["layers"])]
        # the step's q is a transposed view of the projection output [B,1,H,HD]
        q = torch.randn(batch, 1, cfg["heads"], cfg["head_dim"], generator=gen)
        self.q = q.to(device, torch.bfloat16).transpose(1, 2)
        self.lengths = self.host_lengths.to(device)
        self.scale = cfg["head_dim"] ** -0.5
        self.bytes_per_column = cfg["kv_heads"] * cfg["head_dim"] * 2 * 2  # K and V, bf16
        self.needed_bytes = int(self.host_lengths.sum()) * self.bytes_per_column
        self.compile_only = compile_only
        if not compile_only:
            self.reference = reference_layer0(self.q, *self.caches[0], self.lengths, self.scale)

    def bucket(self, multiple: int) -> int:
        return bucket_columns(int(self.host_lengths.max()), self.key[2], multiple=multiple)


def reference_layer0(q, keys, values, lengths, scale):
    """float32 matmul reference over the valid columns (masked softmax), for the error column."""
    b, h, _, hd = q.shape
    kvh, t = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, kvh, h // kvh, hd).float()
    scores = qg @ keys.float().transpose(-1, -2) * scale
    valid = torch.arange(t, device=q.device)[None, :] < lengths.clamp(1, t)[:, None]
    p = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return (p @ values.float()).reshape(b, 1, h * hd)


def time_cuda_graph(graph, target_s: float = 0.15, min_reps: int = 20, max_reps: int = 300) -> tuple[float, int]:
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    estimate = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(estimate, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), reps


def compile_first_call(name: str, attend, point: Point, device: torch.device, backend: str):
    """torch.compile one layer's attention and run it once: (compiled fn, output, seconds, kernel)."""
    scale = point.scale

    def layer(q, k, v, lengths):
        return attend(q, k, v, lengths, scale)

    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)
    codes: list = []
    t0 = time.perf_counter()
    with collect_inductor_code(codes):
        first = compiled(point.q, *point.caches[0], point.lengths)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return compiled, first, time.perf_counter() - t0, kernel_from_code(name, codes, backend, device)


def measure(name: str, attend, point: Point, device: torch.device, backend: str) -> dict:
    q, lengths, caches = point.q, point.lengths, point.caches
    compiled, first, compile_s, kernel = compile_first_call(name, attend, point, device, backend)

    def all_layers():
        return [compiled(q, k, v, lengths) for k, v in caches]

    err = (first.float() - point.reference).abs().max().item()
    row = dict(compile_s=round(compile_s, 2), max_abs_err=err, kernel=kernel)
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                all_layers()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = all_layers()
        step_ms, reps = time_cuda_graph(graph)
        graph_err = (outs[0].float() - point.reference).abs().max().item()
        row["max_abs_err"] = max(err, graph_err)
        del graph, outs
    else:
        all_layers()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            all_layers()
            times.append((time.perf_counter() - t0) * 1e3)
        step_ms, reps = statistics.median(times), len(times)
    row.update(step_ms=step_ms, per_layer_us=step_ms * 1e3 / len(caches), reps=reps)
    return row


def probe_sdpa(point: Point) -> dict:
    """Eager, layer 0: which SDPA backends accept each sdpa implementation's inputs, how long one
    call takes with each (median of 20, CUDA events, mask building included), and which kernels run
    by default (profiler)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = (point.q, *point.caches[0], point.lengths, point.scale)
    backends = [getattr(SDPBackend, n) for n in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
                if hasattr(SDPBackend, n)]
    report = dict(point=":".join(map(str, point.key)))
    for name in ("sdpa", "sdpa_grouped"):
        attend = IMPLEMENTATIONS[name]
        entry = {}
        for backend in backends:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        attend(*args)
                        torch.cuda.synchronize()
                        times = []
                        for _ in range(20):
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            attend(*args)
                            end.record()
                            end.synchronize()
                            times.append(start.elapsed_time(end) * 1e3)
                    entry[backend.name] = f"ok, eager {statistics.median(times):.0f} us"
                except Exception as e:  # noqa: BLE001 - the probe reports every refusal
                    reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()][:4]
                    entry[backend.name] = "refused: " + first_line(e) + (" | " + " | ".join(reasons) if reasons else "")
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                attend(*args)
                torch.cuda.synchronize()
            names = [evt.key for evt in prof.key_averages() if evt.device_type.name == "CUDA"]
            entry["default_kernels"] = [n[:100] for n in names][:8]
        except Exception as e:  # noqa: BLE001
            entry["default_kernels"] = "profiler failed: " + first_line(e)
        report[name] = entry
    return report


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, python=sys.version.split()[0], device=str(device))
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def context_broken(device: torch.device) -> bool:
    """After an error: is the CUDA context unusable (sticky errors such as an illegal address)?"""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def run_task(task: dict, point: Point, device: torch.device, compile_only: bool) -> dict:
    if task["kind"] == "probe":
        return dict(probe=probe_sdpa(point))
    tb = point.bucket(task["bucket"])
    attend = IMPLEMENTATIONS[task["impl"]]
    if task["mode"] != "full":
        attend = attend_first_columns(attend, tb)
    if compile_only:
        _, _, compile_s, kernel = compile_first_call(task["impl"], attend, point, device, task["backend"])
        return dict(status="compiled", compile_s=round(compile_s, 2), kernel=kernel)
    row = measure(task["impl"], attend, point, device, task["backend"])
    seconds = row["per_layer_us"] * 1e-6
    columns = point.key[2] if task["mode"] == "full" else tb
    row.update(status="ok" if row["max_abs_err"] <= WRONG_ABOVE else "wrong", tb=None if task["mode"] == "full" else tb,
               needed_GBps=point.needed_bytes / seconds / 1e9,
               attended_GBps=point.key[1] * columns * point.bytes_per_column / seconds / 1e9,
               mean_length=float(point.host_lengths.float().mean()), max_length=int(point.host_lengths.max()),
               needed_bytes_per_layer=point.needed_bytes)
    return row


def worker(args) -> int:
    """Reads one task per stdin line and answers one RESULT line each; exits when the CUDA context
    breaks. With --compile-only it only compiles and runs once (filling inductor's caches)."""
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    reply = lambda payload: print(RESULT + json.dumps(payload), flush=True)  # noqa: E731
    reply(dict(environment=environment(device)))
    point = None
    for line in sys.stdin:
        task = json.loads(line)
        key = tuple(task["point"])
        try:
            if point is None or point.key != key:
                point = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                point = Point(*key, device, args.seed, tuple(task["length_range"]), compile_only=args.compile_only)
            row = run_task(task, point, device, args.compile_only)
        except Exception as e:  # noqa: BLE001 - reported, and the next task goes on
            row = dict(status="failed", error=first_line(e))
        finally:
            torch._dynamo.reset()
        broken = row.get("status") == "failed" and context_broken(device)
        reply(dict(row, context_broken=True) if broken else row)
        if broken:
            print("worker: CUDA context broken, exiting", file=sys.stderr, flush=True)
            return 3
    return 0


# ------------------------------------------------------------------------------------------------
# parent side: task order, budget, worker restarts, report
# ------------------------------------------------------------------------------------------------
class WorkerProcess:
    """A worker process (this script with --worker), one task at a time. Everything is
    non-blocking: `send` a task, then `poll` for its answer; the first answer is the worker's hello."""

    def __init__(self, argv: list, env: dict | None = None, label: str = "worker"):
        self.label = label
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.pending = b""
        self.ready = False  # hello received
        self.task = None  # what it is working on
        self.since = time.perf_counter()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, task) -> None:
        self.task, self.since = task, time.perf_counter()
        try:
            self.proc.stdin.write((json.dumps(task.message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # noticed by `alive`

    def poll(self):
        """The next RESULT payload if one has arrived, else None. Reads the pipe unbuffered: a
        buffered reader could hold a line that select() cannot see."""
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(RESULT):
                    return json.loads(text[len(RESULT):])
                print(f"[{self.label}] {text}", flush=True)
            if not select.select([self.fileno()], [], [], 0)[0]:
                return None
            chunk = os.read(self.fileno(), 1 << 16)
            if not chunk:
                return None
            self.pending += chunk

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()


class Task:
    """One (point, implementation, mode) measurement and the state of its compilation."""

    def __init__(self, point: tuple, impl: str, mode: str, common: dict):
        self.point, self.impl, self.mode = point, impl, mode
        self.message = dict(common, point=list(point), kind="measure", impl=impl, mode=mode)
        self.compiled = "pending"  # pending | compiling | done | failed
        self.compile_error = None

    def row(self) -> dict:
        model, batch, columns = self.point
        return dict(model=model, batch=batch, columns=columns, layers=MODELS[model]["layers"], impl=self.impl,
                    mode=self.mode)


class Probe:
    def __init__(self, point: tuple, common: dict):
        self.message = dict(common, point=list(point), kind="probe")


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def print_row(r: dict) -> None:
    mode = "full" if r["mode"] == "full" else f"Tb={r.get('tb', '?')}"
    head = f"{r['model']:<13} B={r['batch']:<4} T={r['columns']:<5} {r['impl']:<15} {mode:<8}"
    if r["status"] not in ("ok", "wrong"):
        print(f"{head} {r['status']}: {r.get('error', '')}", flush=True)
        return
    print(f"{head} {r['per_layer_us']:8.1f} us/layer {r['step_ms']:7.3f} ms x{r['layers']:<3}"
          f" {r['needed_GBps']:7.1f} GB/s filled {r['attended_GBps']:7.1f} GB/s attended"
          f"  err {r['max_abs_err']:.1e}{' WRONG' if r['status'] == 'wrong' else ''}"
          f"  compile {r['compile_s']:5.1f}s  {r['kernel']}", flush=True)


def print_table(results: list) -> None:
    print("\nper-layer us (step ms = x layers) [GB/s over the filled columns]")
    impls = list(dict.fromkeys(r["impl"] for r in results))
    keys = list(dict.fromkeys((r["model"], r["batch"], r["columns"], r["mode"]) for r in results))
    print(f"{'point':<34}" + "".join(f"{n:>26}" for n in impls))
    for model, batch, columns, mode in keys:
        cells = []
        for name in impls:
            r = next((r for r in results if (r["impl"], r["model"], r["batch"], r["columns"], r["mode"]) ==
                      (name, model, batch, columns, mode)), None)
            if r is None or r["status"] not in ("ok", "wrong"):
                cells.append(r["status"] if r else "-")
            else:
                flag = "!" if r["status"] == "wrong" else ""
                cells.append(f"{flag}{r['per_layer_us']:.0f} ({r['step_ms']:.2f}) [{r['needed_GBps']:.0f}]")
        print(f"{f'{model} B={batch} T={columns} {mode}':<34}" + "".join(f"{c:>26}" for c in cells))
    print("'!': output wrong (max abs err > %g)" % WRONG_ABOVE)


def orchestrate(args, ap) -> int:
    """Compile workers fill inductor's caches in task order while one measuring worker follows
    them, so compilation (most of the time) runs in parallel and the timed replays run alone."""
    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = [n for n in impls if n not in IMPLEMENTATIONS]
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.points:
        points = [(m, int(b), int(t)) for m, b, t in (p.split(":") for p in args.points.split(","))]
    else:
        points = QUICK_POINTS if args.quick else POINTS
    length_range = QUICK_LENGTH_RANGE if args.quick else LENGTH_RANGE
    bucket = args.bucket or (128 if args.quick else 256)
    n_compilers = args.compile_workers if args.compile_workers is not None else (6 if device.type == "cuda" else 0)
    worker_argv = ["--device", args.device, "--seed", str(args.seed)]
    compiler_env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")  # the workers are the parallelism

    common = dict(length_range=list(length_range), bucket=bucket, backend=backend)
    tasks = [Task(pt, impl, mode, common) for pt in points for impl in impls for mode in modes]
    payload = dict(compile_backend=backend, length_range=list(length_range), bucket_multiple=bucket,
                   budget_s=args.budget_s, compile_workers=n_compilers, environment=None, sdpa_probe=None, results=[])
    measurer = WorkerProcess(worker_argv, label="measure")
    compilers = [WorkerProcess(worker_argv + ["--compile-only"], compiler_env, f"compile{i}") for i in range(n_compilers)]
    probe = Probe(points[0], common) if device.type == "cuda" else None
    crashed: dict[str, str] = {}  # implementation -> where it killed a worker
    done = 0  # tasks before this index have a result row

    def record(task, **fields):
        row = dict(task.row(), **fields)
        payload["results"].append(row)
        print_row(row)
        write_json(args.json, payload)

    def replace(w: WorkerProcess) -> WorkerProcess:
        w.stop()
        argv = worker_argv + (["--compile-only"] if w.label != "measure" else [])
        return WorkerProcess(argv, compiler_env if w.label != "measure" else None, w.label)

    while done < len(tasks):
        over = elapsed() > args.budget_s
        # hand out compilations, in task order
        for w in compilers:
            if w.ready and w.task is None and w.alive() and not over:
                nxt = next((t for t in tasks[done:] if t.compiled == "pending" and t.impl not in crashed), None)
                if nxt is not None:
                    nxt.compiled = "compiling"
                    w.send(nxt)
        # the measuring worker takes the next task once no compile worker is on it
        if measurer.ready and measurer.task is None and measurer.alive():
            if probe is not None:
                measurer.send(probe)
            else:
                task = tasks[done]
                if over:
                    record(task, status="skipped", error="time budget")
                    done += 1
                    continue
                if task.compiled == "failed":
                    record(task, status="failed", error=task.compile_error)
                    done += 1
                    continue
                if task.impl in crashed:
                    record(task, status="skipped", error=f"crashed a worker at {crashed[task.impl]}")
                    done += 1
                    continue
                if task.compiled != "compiling":
                    task.compiled = "measuring"
                    measurer.send(task)
        select.select([w for w in [measurer, *compilers] if w.alive()], [], [], 0.5)
        # answers, deaths, timeouts
        for i, w in enumerate([measurer, *compilers]):
            answer = w.poll()
            waiting = w.task is not None or not w.ready  # an answer is due
            timeout = 300 if not w.ready else args.task_timeout
            dead = answer is None and waiting and (not w.alive() or time.perf_counter() - w.since > timeout)
            if answer is None and not dead:
                continue
            task = w.task
            if not w.ready:
                if dead:  # it never started: go on without it (the measurer is needed)
                    print(f"{w.label} did not start", flush=True)
                    if w is measurer:
                        payload["aborted"] = "the measuring worker did not start"
                        done = len(tasks)
                    w.stop()
                    compilers = [c for c in compilers if c is not w]
                    break
                w.ready = True
                payload["environment"] = payload["environment"] or answer.get("environment")
                if payload["environment"] and i == 0:
                    print(json.dumps(payload["environment"]), flush=True)
                continue
            w.task = None
            broken = dead or bool(answer.get("context_broken"))
            if isinstance(task, Probe):
                payload["sdpa_probe"] = answer.get("probe", answer) if answer else "the worker died during the probe"
                print("sdpa probe:", json.dumps(payload["sdpa_probe"], indent=1), flush=True)
                probe = None
            elif broken:
                crashed[task.impl] = f"{':'.join(map(str, task.point))} {task.mode}"
                how = ("broke its CUDA context" if not dead else "timed out" if w.alive()
                       else f"died (exit {w.proc.poll()})")
                error = f"{w.label} worker {how}" + (f": {answer.get('error')}" if answer else "")
                if w is measurer:
                    record(task, status="failed", error=error)
                    done += 1
                else:
                    task.compiled, task.compile_error = "failed", error
            elif w is measurer:
                record(task, **answer)
                done += 1
            else:
                task.compiled = "done" if answer.get("status") == "compiled" else "failed"
                task.compile_error = answer.get("error")
            if broken:
                replaced = replace(w)
                if w is measurer:
                    measurer = replaced
                else:
                    compilers = [replaced if c is w else c for c in compilers]
                break  # the lists changed: look again
    for w in [measurer, *compilers]:
        w.stop()
    write_json(args.json, payload)
    print_table(payload["results"])
    print(f"done in {elapsed():.0f} s", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test, e.g. on the CPU)")
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help="comma-separated, from: " + ", ".join(IMPLEMENTATIONS))
    ap.add_argument("--points", default=None, help="comma-separated model:batch:columns (default: the built-in list)")
    ap.add_argument("--modes", default="full,Tb", help="full, Tb or both")
    ap.add_argument("--bucket", type=int, default=None, help="Tb multiple (default 256; 128 with --quick)")
    ap.add_argument("--budget-s", type=float, default=210.0, help="start no measurement after this many seconds")
    ap.add_argument("--task-timeout", type=float, default=90.0, help="seconds one measurement may take")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--compile-workers", type=int, default=None,
                    help="processes that compile ahead into inductor's on-disk caches while one process measures"
                         " (default 6 on CUDA, 0 on CPU)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return worker(args) if args.worker else orchestrate(args, ap)


if __name__ == "__main__":
    sys.exit(main())
