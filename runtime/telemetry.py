"""What the speech server measures: Prometheus metrics, GPU facts (NVML), the diagnostics summary
and its one-line verdict, and the on-demand torch profiler.

Metrics live in the app's own `CollectorRegistry` (two servers in one process do not collide).
Counters and histograms are updated as requests run; gauges (streams, queue, GPU) are read when
Prometheus scrapes. Stage times come from the engine's `on_batch` hook: every executed LM step and
every batched token2wav call, timed after the device synchronises, so on a GPU they are device time.

Diagnostics keep the last N requests (start, end, first audio, audio seconds) with the engine's
cumulative per-stage seconds when each started; the stage shares over "the last N requests" are the
differences of those counters over the window from the earliest of them to now (or to the last end
when the server is idle). The engine runs the LM in one thread and token2wav in another, so each is
judged by how busy its thread was: a thread busy nearly all of the window bounds throughput.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

# seconds; first audio is the latency users feel, so the buckets are fine below one second
TTFA_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# -- GPU facts ----------------------------------------------------------------------------------------------
class GPU:
    """NVML facts about the device the engine runs on; `available` False (with `reason`) on the CPU,
    without a driver, or without nvidia-ml-py. Every query that fails on a GPU (some boards do not
    report power or clocks) is left out instead of failing the request."""

    def __init__(self, device):
        import torch

        self.available, self.reason, self._nvml, self._handle = False, "", None, None
        device = torch.device(device)
        if device.type != "cuda":
            self.reason = "the engine runs on the CPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            try:  # CUDA_VISIBLE_DEVICES renumbers devices; the UUID names the same board in NVML
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except Exception:  # noqa: BLE001 - a torch without the uuid: NVML's own index
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self.available = True
        except Exception as e:  # noqa: BLE001 - NVML missing or failing is a fact to report, not an error
            self.reason = f"NVML is not available ({type(e).__name__}: {str(e)[:120]})"

    def _q(self, fn, *args):
        try:
            return getattr(self._nvml, fn)(self._handle, *args)
        except Exception:  # noqa: BLE001 - not supported on this board
            return None

    def facts(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        n = self._nvml
        name = self._q("nvmlDeviceGetName")
        util = self._q("nvmlDeviceGetUtilizationRates")
        mem = self._q("nvmlDeviceGetMemoryInfo")
        power = self._q("nvmlDeviceGetPowerUsage")
        limit = self._q("nvmlDeviceGetEnforcedPowerLimit")
        facts = {
            "available": True,
            "name": name.decode() if isinstance(name, bytes) else name,
            "clocks_mhz": {"sm": self._q("nvmlDeviceGetClockInfo", n.NVML_CLOCK_SM),
                           "memory": self._q("nvmlDeviceGetClockInfo", n.NVML_CLOCK_MEM),
                           "sm_max": self._q("nvmlDeviceGetMaxClockInfo", n.NVML_CLOCK_SM),
                           "memory_max": self._q("nvmlDeviceGetMaxClockInfo", n.NVML_CLOCK_MEM)},
            "temperature_c": self._q("nvmlDeviceGetTemperature", n.NVML_TEMPERATURE_GPU),
            "power_w": None if power is None else power / 1000,
            "power_limit_w": None if limit is None else limit / 1000,
            "utilization_percent": None if util is None else {"gpu": util.gpu, "memory": util.memory},
            "memory_bytes": None if mem is None else {"used": mem.used, "total": mem.total},
            "clock_limits": self._throttle(),
        }
        try:
            facts["driver"] = n.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001
            pass
        return facts

    def _throttle(self) -> list[str] | None:
        """Why the clocks are below their maximum now (power cap, heat, idle ...), by NVML's names."""
        n = self._nvml
        reasons = self._q("nvmlDeviceGetCurrentClocksEventReasons") if hasattr(n, "nvmlDeviceGetCurrentClocksEventReasons") \
            else self._q("nvmlDeviceGetCurrentClocksThrottleReasons")
        if reasons is None:
            return None
        names = {"GpuIdle": "idle", "ApplicationsClocksSetting": "application clocks", "SwPowerCap": "power cap",
                 "HwSlowdown": "hardware slowdown", "SyncBoost": "sync boost", "SwThermalSlowdown": "thermal (software)",
                 "HwThermalSlowdown": "thermal (hardware)", "HwPowerBrakeSlowdown": "power brake"}
        out = []
        for key, label in names.items():
            bit = getattr(n, f"nvmlClocksEventReason{key}", None) or getattr(n, f"nvmlClocksThrottleReason{key}", None)
            if bit and reasons & bit:
                out.append(label)
        return out


# -- metrics --------------------------------------------------------------------------------------------------
@dataclass
class _Done:
    start: float
    end: float
    stage_at_start: dict
    first_audio: float | None
    audio_seconds: float
    outcome: str


class Telemetry:
    """Metrics and diagnostics of one server (one engine)."""

    def __init__(self, engine, window: int = 50):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.gpu = GPU(engine.device)
        r = self.registry
        self.requests = Counter("tts_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.outcomes = Counter("tts_speech_outcomes", "Speech requests that started streaming, by how they ended "
                                "(completed, cancelled: the client went away, failed: the engine failed mid-stream)",
                                ["outcome"], registry=r)
        self.ttfa = Histogram("tts_time_to_first_audio_seconds", "Request received to first audio bytes sent "
                              "(streamed responses)", buckets=TTFA_BUCKETS, registry=r)
        self.rtf = Histogram("tts_real_time_factor", "Wall time of a completed request over the seconds of audio it "
                             "produced", buckets=RTF_BUCKETS, registry=r)
        self.audio = Counter("tts_audio_seconds", "Seconds of audio produced", registry=r)
        self.batch = Histogram("tts_batch_size", "Rows per executed call, per stage (LM: one decode step)", ["stage"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.stage_time = Counter("tts_stage_seconds", "Time spent in each stage's calls (measured after the device "
                                  "synchronises: device time on a GPU)", ["stage"], registry=r)
        r.register(_Gauges(self))
        self.ready = False
        self.window: deque[_Done] = deque(maxlen=window)
        self._active: dict[int, tuple[float, dict]] = {}
        self._lock = threading.Lock()
        engine.batcher.on_batch = self.on_batch

    # engine threads
    def on_batch(self, stage: str, rows: int, seconds: float) -> None:
        self.batch.labels(stage).observe(rows)
        self.stage_time.labels(stage).inc(seconds)

    # request side
    def _stage_seconds(self) -> dict:
        return dict(self.engine.stats()["stage_seconds"])

    def request_started(self, key: int) -> None:
        with self._lock:
            self._active[key] = (time.perf_counter(), self._stage_seconds())

    def request_ended(self, key: int, first_audio: float | None, audio_seconds: float, outcome: str,
                      streamed: bool) -> None:
        end = time.perf_counter()
        with self._lock:
            start, stages = self._active.pop(key, (end, self._stage_seconds()))
            self.window.append(_Done(start, end, stages, first_audio, audio_seconds, outcome))
        self.outcomes.labels(outcome).inc()
        if outcome == "completed" and audio_seconds > 0:
            self.audio.inc(audio_seconds)
            self.rtf.observe((end - start) / audio_seconds)
        if streamed and first_audio is not None:
            self.ttfa.observe(first_audio)

    # diagnostics
    def summary(self) -> dict:
        """Stage shares, thread busy fractions and latencies over the last N requests, with a verdict."""
        now = time.perf_counter()
        stats = self.engine.stats()
        with self._lock:
            done = list(self.window)
            active = list(self._active.values())
        out = {"engine": {k: stats[k] for k in ("active_streams", "queued", "max_streams", "lm_rows", "lm_steps",
                                                "lm_batch_mean", "token2wav_batch_mean")}}
        if not done and not active:
            out["window"] = {"requests": 0}
            out["verdict"] = "no requests yet: nothing to judge (send some, then look again)."
            return out
        starts = [d.start for d in done] + [a[0] for a in active]
        first = min(range(len(starts)), key=lambda i: starts[i])
        at_start = (done[first].stage_at_start if first < len(done) else active[first - len(done)][1])
        t0 = starts[first]
        t1 = now if active else max(d.end for d in done)
        wall = max(t1 - t0, 1e-9)
        cum = stats["stage_seconds"]
        stage = {s: max(cum.get(s, 0.0) - at_start.get(s, 0.0), 0.0) for s in cum}
        total = sum(stage.values()) or 1e-9
        lm = self.engine.model.graph_specs()[self.engine.model.lm.graph].stage
        t2w = {s: v for s, v in stage.items() if s != lm}
        ttfa = sorted(d.first_audio for d in done if d.first_audio is not None)
        rtf = sorted((d.end - d.start) / d.audio_seconds for d in done if d.outcome == "completed" and d.audio_seconds > 0)

        def pct(v, q):
            return None if not v else v[min(len(v) - 1, int(q / 100 * len(v)))]

        out["window"] = {
            "requests": len(done), "running": len(active), "seconds": round(wall, 3),
            "outcomes": {o: sum(1 for d in done if d.outcome == o) for o in sorted({d.outcome for d in done})},
            "stage_seconds": {s: round(v, 4) for s, v in stage.items()},
            "stage_share": {s: round(v / total, 4) for s, v in stage.items()},
            "thread_busy": {"lm": round(stage.get(lm, 0.0) / wall, 4), "token2wav": round(sum(t2w.values()) / wall, 4)},
            "first_audio_seconds": {"p50": pct(ttfa, 50), "p95": pct(ttfa, 95), "max": ttfa[-1] if ttfa else None},
            "real_time_factor": {"p50": pct(rtf, 50), "max": rtf[-1] if rtf else None},
            "audio_seconds_per_second": round(sum(d.audio_seconds for d in done) / wall, 3),
        }
        out["verdict"] = self._verdict(out["window"], stats, lm, t2w)
        return out

    @staticmethod
    def _verdict(w: dict, stats: dict, lm: str, t2w: dict) -> str:
        busy_lm, busy_t2w = w["thread_busy"]["lm"], w["thread_busy"]["token2wav"]
        top = max(t2w, key=t2w.get) if t2w and any(t2w.values()) else None
        if busy_lm >= busy_t2w:
            bound, busy, why = lm, busy_lm, f"the {lm} loop"
        else:
            bound, busy = top, busy_t2w
            shares = ", ".join(f"{s} {w['stage_share'][s]:.0%}" for s in t2w)
            why = f"token2wav ({shares} of stage time)"
        full = stats["active_streams"] >= stats["max_streams"] and stats["queued"] > 0
        prefix = (f"admission: all {stats['max_streams']} streams busy and {stats['queued']} waiting; "
                  if full else "")
        if busy >= 0.8:
            return (f"{prefix}{bound} bounds throughput: {why} was busy {busy:.0%} of the last {w['requests']} "
                    f"requests' {w['seconds']:.1f} s.")
        return (f"{prefix}no stage is saturated (busiest: {why}, {busy:.0%} busy over the last {w['requests']} "
                f"requests): throughput follows the offered load or host-side work (Python, the GIL, the network).")


class _Gauges:
    """Gauges read at scrape time: engine occupancy and the GPU."""

    def __init__(self, t: Telemetry):
        self.t = t

    def describe(self):
        return []  # read at collect time only (nothing to check at registration)

    def collect(self):
        s = self.t.engine.stats()
        for name, doc, value in (("tts_active_streams", "Requests being generated", s["active_streams"]),
                                 ("tts_queue_depth", "Requests waiting for a free stream", s["queued"]),
                                 ("tts_max_streams", "Streams the engine runs at once", s["max_streams"]),
                                 ("tts_ready", "1 once the server is loaded and warmed", int(self.t.ready))):
            yield GaugeMetricFamily(name, doc, value=value)
        g = self.t.gpu.facts() if self.t.gpu.available else None
        if g:
            if g.get("utilization_percent"):
                yield GaugeMetricFamily("tts_gpu_utilization_percent", "GPU utilisation (NVML, last sample period)",
                                        value=g["utilization_percent"]["gpu"])
            if g.get("memory_bytes"):
                yield GaugeMetricFamily("tts_gpu_memory_used_bytes", "GPU memory used (all processes)",
                                        value=g["memory_bytes"]["used"])
                yield GaugeMetricFamily("tts_gpu_memory_total_bytes", "GPU memory", value=g["memory_bytes"]["total"])
            if g.get("power_w") is not None:
                yield GaugeMetricFamily("tts_gpu_power_watts", "GPU power draw", value=g["power_w"])
            if g.get("temperature_c") is not None:
                yield GaugeMetricFamily("tts_gpu_temperature_celsius", "GPU temperature", value=g["temperature_c"])
            if g.get("clocks_mhz", {}).get("sm") is not None:
                yield GaugeMetricFamily("tts_gpu_sm_clock_mhz", "GPU SM clock", value=g["clocks_mhz"]["sm"])


def merge_expositions(texts: dict[str, str], label: str = "replica") -> str:
    """Several servers' /metrics texts as one exposition: every sample keeps its labels and gains
    `label`="<its server>", families keep their type and help. One scrape then sees every replica,
    and Prometheus adds them up (`sum without (replica) (...)`)."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.utils import floatToGoString

    def escaped(v: str, quotes: bool = True) -> str:  # the text format's escapes (label values, help)
        v = v.replace("\\", "\\\\").replace("\n", "\\n")
        return v.replace('"', '\\"') if quotes else v

    families: dict[str, tuple[str, str, list[str]]] = {}
    for server, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            _, _, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for sample in fam.samples:
                labels = {**sample.labels, label: server}
                body = ",".join(f'{k}="{escaped(str(v))}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{body}}} {floatToGoString(sample.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        shown = f"{name}_total" if kind == "counter" else name  # as prometheus_client writes (and reads) counters
        out += [f"# HELP {shown} {escaped(doc, quotes=False)}", f"# TYPE {shown} {kind}", *lines]
    return "\n".join(out) + "\n"


# -- the profiler ---------------------------------------------------------------------------------------------
class Profiler:
    """A torch profiler trace of the next N requests (every engine thread), for download as a Chrome
    trace (chrome://tracing, Perfetto). One recording at a time per process."""

    def __init__(self, device, folder: str | None = None):
        import torch

        self.device = torch.device(device)
        self._own_folder = folder is None  # a temporary folder of ours: removed at shutdown
        self.folder = folder or tempfile.mkdtemp(prefix="tts-profile-")
        self.state = "idle"  # idle | recording | writing | ready | failed
        self.wanted = self.done = 0
        self.error = None
        self.path: str | None = None
        self.started_at: float | None = None
        self.all_threads = True
        self._prof = None
        self._lock = threading.Lock()

    def status(self) -> dict:
        s = {"state": self.state, "requests": self.wanted, "requests_done": self.done}
        if self.state == "ready":
            s.update(download="/diagnostics/profile/trace", bytes=os.path.getsize(self.path))
        if self.error:
            s["error"] = self.error
        if self.state in ("recording", "ready") and not self.all_threads:
            s["note"] = "this torch cannot profile all threads: only the calling thread's operators are in the trace"
        return s

    def start(self, requests: int) -> bool:
        """False when a recording is already running."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        with self._lock:
            if self.state in ("recording", "writing"):
                return False
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            try:  # the engine's work happens in its own threads; torch profiles only the caller's by default
                cfg = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
                self._prof = profile(activities=acts, experimental_config=cfg)
                self.all_threads = True
            except (AttributeError, TypeError):
                self._prof = profile(activities=acts)
                self.all_threads = False
            try:
                self._prof.__enter__()
            except Exception:
                self._prof = None
                raise
            self.state, self.wanted, self.done, self.error = "recording", requests, 0, None
            self.started_at = time.perf_counter()
            return True

    def request_ended(self, started: float) -> None:
        """A request that arrived at `started` (perf_counter) ended; the N-th since the start stops it."""
        with self._lock:
            if self.state != "recording" or self.started_at is None or started < self.started_at:
                return
            self.done += 1
            if self.done < self.wanted:
                return
            self.state = "writing"
        threading.Thread(target=self._finish, name="tts-profiler", daemon=True).start()

    def _finish(self) -> None:
        try:
            self._prof.__exit__(None, None, None)
            path = os.path.join(self.folder, f"trace-{time.strftime('%Y%m%d-%H%M%S')}.json")
            self._prof.export_chrome_trace(path)
            if self.path and self.path != path and os.path.exists(self.path):
                os.unlink(self.path)
            self.path, self.state = path, "ready"
        except Exception as e:  # noqa: BLE001 - reported by the status endpoint
            self.state, self.error = "failed", f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            self._prof = None

    def remove_files(self) -> None:
        import shutil

        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def cancel(self) -> bool:
        with self._lock:
            if self.state != "recording":
                return False
            self.state = "writing"
        try:
            self._prof.__exit__(None, None, None)
        finally:
            self._prof, self.state = None, "idle"
        return True
