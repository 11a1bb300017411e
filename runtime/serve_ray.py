"""`python -m runtime.serve --ray`: the same speech server on Ray Serve, one engine per replica.

    python -m runtime.serve --ray --replicas 2 --model cosyvoice3-tiny              # local Ray, 2 replicas
    python -m runtime.serve --ray --autoscale 1,4 --device cuda ...                 # 1 to 4 GPUs
    python -m runtime.serve --ray --address HEAD:6379 --replicas 8 --device cuda ... # a running cluster

Each replica is a Ray actor that loads the model, starts its own `runtime.engine.Engine` and serves
the FastAPI app of `runtime.serve.create_app` (Ray Serve's ingress runs that app inside the replica,
so every endpoint, error and streaming behaviour is the single-process server's). Ray's HTTP proxy
routes requests across replicas and restarts one that dies; a request held by a dead replica fails
(its client sees an error or a cut stream, never a short file that looks whole), the others go on.

- Placement: `num_gpus=1` per replica on CUDA (Ray sets CUDA_VISIBLE_DEVICES, so the replica's
  "cuda" is its own GPU), `--replica-cpus` CPU cores per replica on the CPU.
- Voices: the on-disk bundles under `--voices-dir` are shared by every replica on a machine (on a
  cluster, give it a shared folder); a voice made through one replica is found by the others.
- Metrics: `/metrics` is answered by whichever replica the proxy picks (its own counters; the
  `X-TTS-Replica` header and `/diagnostics`' `replica` say which). `/metrics?scope=cluster` is every
  live replica's, each sample labelled `replica`: replicas push their metrics text every
  `METRICS_PUSH_S` to one small Ray actor (`MetricsBoard`, owned by this command's process), and the
  replica that answers merges what the board holds (a replica silent for `METRICS_MAX_AGE_S`, e.g. a
  dead one, drops out). Ray also exports its own per-deployment request counts and latencies from
  every node (`ray start --metrics-export-port`).
- Profiles: `POST /diagnostics/profile` records on the replica that answers it (its next N requests).
  Each replica pushes its profile status with its metrics, and a finished trace once, as a Ray object
  it owns (`ray.put`), to the board; `GET /diagnostics/profile` on any replica lists every replica's
  state under `replicas`, and `GET /diagnostics/profile/trace?replica=ID` fetches that replica's trace
  through whichever replica answers (gone with the replica that owns it).
- Code: replicas import this repository, so every node needs it at the same path (workers get it on
  their PYTHONPATH through the deployment's runtime environment).

A cluster: `ray start --head --port 6379` on one machine, `ray start --address HEAD:6379` on each other,
then this command with `--address HEAD:6379` on any of them.

Placement (`--placement`): `replicated` (the default) is the above, one full engine per replica.
`disaggregated` runs two deployments: `--lm-replicas N` of `LMReplica` (deployment `speech-lm`, not an
ingress: an engine of role "lm", one GPU each on CUDA) and `--replicas M` of `SpeechReplica` (the
HTTP ingress, an engine of role "token2wav"). A request's worker on the ingress asks the LM
deployment, through a streaming DeploymentHandle call (`handle.options(stream=True).tokens.remote`),
for its tokens: (utterance index, new token ids, done) every few tokens; Ray routes each call to an
LM replica. The ingress sends plain data (text, the speaker conditioning, seed, fixed token count)
and both sides split the text the same way, so a seed gives the replicated placement's audio. A
request cancelled on the ingress (a client that went away) cancels its handle call, and the LM
replica frees the row. LM replicas push their metrics to the board too (labelled `lm:<id>` in
`/metrics?scope=cluster`) with their engine counts, which `/diagnostics` shows under `replica`.
Which placement is faster is not measured yet (it needs GPUs): docs/serving.md.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from models.errors import UserError

APP_NAME = "tts"
DEPLOYMENT = "speech"
LM_DEPLOYMENT = "speech-lm"
PLACEMENTS = ("replicated", "disaggregated")
NAMESPACE = "tts"  # the driver's Ray namespace (Serve's replicas live in their own)
BOARD = "tts-metrics-board"
METRICS_PUSH_S = 2.0
METRICS_MAX_AGE_S = 10.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ReplicaSettings:
    """Everything a replica needs to build its engine and app (sent to every replica)."""

    model_name: str
    backends: str = "torch"
    device: str = "cpu"
    engines_dir: str | None = None
    precision: str = "fp32"
    seed: int = 0
    max_streams: int | None = None
    max_queue: int | None = None
    max_len: int | None = None
    queue_timeout: float = 30.0
    threads: int | None = None
    serve: dict = field(default_factory=dict)  # ServeConfig fields
    placement: str = "replicated"  # or "disaggregated" (the module docstring)
    new_shapes: str = "capture"  # Engine(new_shapes=...)
    options: dict | None = None  # Engine(options=...), e.g. {"flow_mode": "prefix"}
    stream_state_gb: float | None = None  # Engine(stream_state_gb=...)


def _engine(settings: ReplicaSettings, **role):
    import torch

    from models.registry import load_model
    from runtime.engine import Engine

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load_model(settings.model_name, device=settings.device, seed=settings.seed)
    return Engine(model, settings.backends, device=settings.device, engines_dir=settings.engines_dir,
                  precision=settings.precision, max_streams=settings.max_streams, max_queue=settings.max_queue,
                  max_len=settings.max_len, queue_timeout=settings.queue_timeout, new_shapes=settings.new_shapes,
                  options=settings.options, stream_state_gb=settings.stream_state_gb, **role)


class SpeechReplica:
    """One replica: its engine and the server's app (Ray Serve calls `__serve_build_asgi_app__`).
    With `lm` (the LM deployment's handle: the disaggregated placement) its engine is a token2wav
    one whose tokens come from that deployment."""

    def __init__(self, settings: ReplicaSettings, lm=None):
        from runtime.serve import ServeConfig, create_app

        self.settings = settings
        role = {} if lm is None else {"role": "token2wav", "token_source": RayTokenSource(lm)}
        engine = _engine(settings, **role)
        self.replica_id, self.started = _replica_id(), time.time()
        self.board = _metrics_board()
        # `app` is a name Ray Serve's wrapper uses for itself
        self.speech_app = create_app(engine, ServeConfig(**settings.serve, replica_facts=self.facts,
                                                         cluster_metrics=self.cluster_metrics if self.board else None,
                                                         peer_profiles=PeerProfiles(self.board) if self.board else None))
        self._pushed_trace: str | None = None  # the trace file whose bytes the board holds
        # started and warmed here, not in the app's lifespan: Ray routes to a replica once its constructor
        # returns, and a replica still warming up would answer its share of the traffic with 503s (minutes
        # with a compiled backend, at every scale-up) while warm replicas sit idle
        srv = self.speech_app.state.server
        srv.prepare()
        if srv.failed:
            raise RuntimeError(f"the replica failed to start: {srv.failed}")
        if self.board is not None:
            threading.Thread(target=self._push_metrics, name="metrics-push", daemon=True).start()

    def _own_metrics(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.speech_app.state.server.telemetry.registry).decode()

    def _push_metrics(self) -> None:
        while True:
            try:
                self.board.put.remote(self.replica_id, self._own_metrics())
                self._push_profile()
            except Exception:  # noqa: BLE001 - the board went with its driver: this replica is going too
                return
            time.sleep(METRICS_PUSH_S)

    def _push_profile(self) -> None:
        """This replica's profile status, and a new trace's bytes once (a Ray object this replica owns,
        passed inside a list so the board keeps the reference, not the bytes)."""
        import ray

        profiler = self.speech_app.state.server.profiler
        status, trace = profiler.status(), None
        if "download" in status:  # any replica serves it with the id (the router picks which answers)
            status["download"] += f"?replica={self.replica_id}"
        if status["state"] == "ready" and profiler.path != self._pushed_trace:
            with open(profiler.path, "rb") as f:
                trace = [ray.put(f.read())]
            self._pushed_trace = profiler.path
        self.board.put_profile.remote(self.replica_id, status, trace)

    def cluster_metrics(self) -> dict[str, str]:
        """{replica id: metrics text} of every replica heard from lately, this one's fresh."""
        import ray

        texts = ray.get(self.board.recent.remote(METRICS_MAX_AGE_S), timeout=10)
        texts[self.replica_id] = self._own_metrics()
        return texts

    def __serve_build_asgi_app__(self):
        return self.speech_app

    def facts(self) -> dict:
        """Which replica this is, and what Ray Serve says about the deployment's replicas."""
        out = {"replica_id": self.replica_id, "pid": os.getpid(), "node": socket.gethostname(),
               "up_seconds": round(time.time() - self.started, 1), "placement": self.settings.placement,
               "ray_token_auth": ray_token_auth()}
        try:
            from ray import serve

            app = serve.status().applications.get(APP_NAME)
            dep = app.deployments.get(DEPLOYMENT) if app else None
            if dep is not None:
                out["deployment_status"] = str(dep.status.value if hasattr(dep.status, "value") else dep.status)
                out["replica_states"] = {str(k.value if hasattr(k, "value") else k): v
                                         for k, v in dep.replica_states.items()}
            lm = app.deployments.get(LM_DEPLOYMENT) if app else None
            if lm is not None:
                out["lm_deployment_status"] = str(lm.status.value if hasattr(lm.status, "value") else lm.status)
                out["lm_replica_states"] = {str(k.value if hasattr(k, "value") else k): v
                                            for k, v in lm.replica_states.items()}
        except Exception as e:  # noqa: BLE001 - facts for a diagnostics page; say why they are missing
            out["status_error"] = f"{type(e).__name__}: {e}"[:200]
        if self.settings.placement == "disaggregated" and self.board is not None:
            try:  # the LM replicas' engine counts, as last pushed (every METRICS_PUSH_S)
                out["lm_replicas"] = ray_get(self.board.recent_facts.remote(METRICS_MAX_AGE_S))
            except Exception as e:  # noqa: BLE001
                out["lm_replicas_error"] = f"{type(e).__name__}: {e}"[:200]
        return out

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        srv = self.speech_app.state.server
        if srv.failed:
            raise RuntimeError(f"the replica failed to start: {srv.failed}")
        if srv.ready.is_set() and not srv.engine.running:
            raise RuntimeError("the replica's engine stopped")


class LMReplica:
    """One replica of the LM deployment (the disaggregated placement): an engine of role "lm" whose
    `tokens` streams a request's token messages to the ingress that asked (see the module docstring)."""

    # engine counts pushed to the board with the metrics (what /diagnostics shows of LM replicas)
    FACTS = ("active_streams", "queued", "max_streams", "lm_rows", "lm_steps", "lm_batch_mean")

    def __init__(self, settings: ReplicaSettings):
        from runtime.telemetry import Telemetry

        self.settings = settings
        self.engine = _engine(settings, role="lm").start()
        self.telemetry = Telemetry(self.engine)  # its on_batch hook counts the LM steps
        if settings.serve.get("warmup", "full") != "none":
            self.engine.warm_up(levels=sorted({1, self.engine.max_streams}))
        self.telemetry.ready = True
        self.replica_id = _replica_id()
        self.board = _metrics_board()
        if self.board is not None:
            threading.Thread(target=self._push_metrics, name="metrics-push", daemon=True).start()

    def _push_metrics(self) -> None:
        from prometheus_client import generate_latest

        while True:
            try:
                stats = self.engine.stats()
                self.board.put.remote(f"lm:{self.replica_id}", generate_latest(self.telemetry.registry).decode(),
                                      {k: stats[k] for k in self.FACTS})
            except Exception:  # noqa: BLE001 - the board went with its driver: this replica is going too
                return
            time.sleep(METRICS_PUSH_S)

    async def tokens(self, request: dict):
        """A request's token messages (utterance index, new token ids, done) as the engine makes them;
        an error is the last message, ("error", {...}) (exceptions do not cross Ray intact). A call
        cancelled by its caller ends here (CancelledError at the await), and the engine frees the row."""
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            handle = self.engine.tokens(**request)
        except Exception as e:  # noqa: BLE001 - said to the caller as a message
            yield error_message(e)
            return
        box: asyncio.Queue = asyncio.Queue()

        def pump():  # the handle blocks: a thread per request moves its messages onto this loop
            try:
                for message in handle:
                    loop.call_soon_threadsafe(box.put_nowait, message)
                loop.call_soon_threadsafe(box.put_nowait, None)
            except BaseException as e:  # noqa: BLE001
                loop.call_soon_threadsafe(box.put_nowait, e)

        threading.Thread(target=pump, name=f"lm-pump-{handle.id}", daemon=True).start()
        try:
            while True:
                message = await box.get()
                if message is None:
                    return
                if isinstance(message, BaseException):
                    yield error_message(message)
                    return
                yield message
        finally:
            handle.cancel()  # a no-op once it ended; else the caller went away: free the row

    def stats(self) -> dict:
        return {"replica_id": self.replica_id, **self.engine.stats()}

    def check_health(self) -> None:
        if not self.engine.running:
            raise RuntimeError("the LM replica's engine stopped")


def error_message(e: BaseException) -> tuple:
    """An exception as a token message that pickles (EngineFull's retry hint included)."""
    from models.errors import UserError
    from runtime.engine import EngineFull

    if isinstance(e, UserError):
        return ("error", {"problem": e.problem, "fix": e.fix, "param": e.param,
                          "retry_after": e.retry_after if isinstance(e, EngineFull) else None})
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return ("error", {"problem": f"the LM replica failed ({type(e).__name__}: {first}).",
                      "fix": "see the LM replica's log", "param": None, "retry_after": None})


def raise_message(info: dict):
    from runtime.engine import EngineFull

    if info.get("retry_after") is not None:
        raise EngineFull(info["problem"], info["retry_after"])
    raise UserError(info["problem"], info.get("fix"), param=info.get("param"))


class RayTokenSource:
    """The token2wav engine's token source: a streaming call to the LM deployment per request."""

    def __init__(self, lm_handle):
        self.handle = lm_handle.options(stream=True)

    def __call__(self, request: dict) -> "RayTokenStream":
        return RayTokenStream(self.handle.tokens.remote(request))


class RayTokenStream:
    def __init__(self, response):
        self.response = response  # a DeploymentResponseGenerator

    def __iter__(self):
        for message in self.response:  # blocks in the engine's reader thread (not an event loop)
            if message[0] == "error":
                raise_message(message[1])
            yield message

    def cancel(self) -> None:
        self.response.cancel()  # Ray cancels the LM replica's call: its `tokens` ends, the row is freed


def ray_get(ref, timeout: float = 10):
    import ray

    return ray.get(ref, timeout=timeout)


class MetricsBoard:
    """A Ray actor holding each replica's latest metrics text (see the module docstring), and the LM
    replicas' engine counts."""

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}
        self.facts: dict[str, tuple[float, dict]] = {}
        self.profiles: dict[str, tuple[float, dict]] = {}
        self.traces: dict[str, list] = {}  # replica -> [reference to its last trace's bytes]

    def put_profile(self, replica: str, status: dict, trace: list | None = None) -> None:
        self.profiles[replica] = (time.time(), status)
        if trace is not None:
            self.traces[replica] = trace
        elif status.get("state") != "ready":  # a new recording replaces (and the profiler deletes) the last one
            self.traces.pop(replica, None)

    def profile_statuses(self, max_age: float) -> dict[str, dict]:
        now = time.time()
        self.profiles = {r: (t, x) for r, (t, x) in self.profiles.items() if now - t <= max_age}
        self.traces = {r: x for r, x in self.traces.items() if r in self.profiles}
        return {r: x for r, (_, x) in self.profiles.items()}

    def trace(self, replica: str) -> list | None:
        return self.traces.get(replica)

    def put(self, replica: str, text: str, facts: dict | None = None) -> None:
        self.texts[replica] = (time.time(), text)
        if facts is not None:
            self.facts[replica] = (time.time(), facts)

    def recent(self, max_age: float) -> dict[str, str]:
        now = time.time()
        self.texts = {r: (t, x) for r, (t, x) in self.texts.items() if now - t <= max_age}
        return {r: x for r, (_, x) in self.texts.items()}

    def recent_facts(self, max_age: float) -> dict[str, dict]:
        now = time.time()
        self.facts = {r: (t, x) for r, (t, x) in self.facts.items() if now - t <= max_age}
        return {r: x for r, (_, x) in self.facts.items()}


class PeerProfiles:
    """The replicas' profiles as the board holds them (ServeConfig.peer_profiles)."""

    def __init__(self, board):
        self.board = board

    def statuses(self) -> dict[str, dict]:
        return ray_get(self.board.profile_statuses.remote(METRICS_MAX_AGE_S))

    def trace(self, replica: str) -> bytes | None:
        held = ray_get(self.board.trace.remote(replica))
        return None if held is None else ray_get(held[0], timeout=60)


def _metrics_board():
    """The driver's MetricsBoard, or None (outside Ray, or a driver that made none)."""
    try:
        import ray

        return ray.get_actor(BOARD, namespace=NAMESPACE)
    except Exception:  # noqa: BLE001 - no board: /metrics?scope=cluster says so
        return None


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside Ray (tests of the class): the process is the replica
        return f"pid-{os.getpid()}"


def _worker_pythonpath() -> str:
    """This repository first, then whatever this process has on PYTHONPATH: a runtime environment's
    variable replaces the worker's, so packages found through PYTHONPATH here must be named again."""
    parts = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != REPO]
    return os.pathsep.join(parts)


def check_fits(gpu: bool, replicas: int, replica_cpus: float, local: bool, lm_replicas: int = 0) -> None:
    """Refuse a deployment Ray could never place: Ray Serve would wait for resources forever, saying
    so only in its log. A replica needs one node with its CPU cores (and a GPU); on a local cluster,
    which no autoscaler grows, the first `replicas` (plus the disaggregated placement's `lm_replicas`,
    which take the same) must fit in the machine too."""
    import ray

    what = f"{replica_cpus:g} CPU core(s)" + (" and a GPU" if gpu else "")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= replica_cpus and (not gpu or n.get("GPU", 0) >= 1) for n in nodes):
        have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "no live node"
        raise UserError(f"no Ray node has {what} for a replica (nodes: {have}).",
                        "lower --replica-cpus, or add a node that has them")
    if local:
        total = ray.cluster_resources()
        cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
        n = replicas + lm_replicas
        if n * replica_cpus > cpus or (gpu and n > gpus):
            if lm_replicas:
                raise UserError(f"{replicas} replica(s) and {lm_replicas} LM replica(s) of {what} each do not fit this "
                                f"machine's Ray ({cpus:g} CPU core(s), {gpus:g} GPU(s)).",
                                "lower --replicas, --lm-replicas or --replica-cpus, or join a cluster with --address")
            raise UserError(f"{replicas} replica(s) of {what} do not fit this machine's Ray ({cpus:g} CPU core(s), "
                            f"{gpus:g} GPU(s)).", "lower --replicas or --replica-cpus, or join a cluster with --address")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing listens at a host:port --address: Ray itself retries for minutes."""
    if address == "auto" or "://" in address:
        return  # "auto" reads the local session file; ray:// clients have their own errors
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT.",
                        "pass the head node's GCS address, e.g. --address 10.0.0.1:6379, or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {address} ({e.strerror or e}).",
                        "start one with `ray start --head` there, or pass the address it printed") from None


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        lo, hi = (int(x) for x in value.split(","))
    except ValueError:
        raise UserError(f"--autoscale {value!r} is not MIN,MAX.", "pass two replica counts, e.g. --autoscale 1,4") from None
    if lo < 1 or hi < lo:
        raise UserError(f"--autoscale {value} needs 1 <= MIN <= MAX.", "pass e.g. --autoscale 1,4")
    return lo, hi


def deployment(settings: ReplicaSettings, replicas: int | None, autoscale: tuple[int, int] | None,
               replica_cpus: float, lm_replicas: int | None = None):
    """The Ray Serve application: `replicas` copies (or autoscaled between the two counts) of
    SpeechReplica, one GPU each on CUDA; with `lm_replicas` (the disaggregated placement) those are
    token2wav ingresses in front of `lm_replicas` copies of LMReplica, one GPU each too."""
    from ray import serve

    gpu = settings.device.startswith("cuda")
    streams = settings.max_streams or 64
    queue = settings.max_queue if settings.max_queue is not None else 4 * streams
    opts: dict = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_gpus": 1 if gpu else 0, "num_cpus": replica_cpus,
                              "runtime_env": {"env_vars": {"PYTHONPATH": _worker_pythonpath()}}},
        # what one engine holds: its streams and its queue; beyond that the proxy queues,
        "max_ongoing_requests": streams + queue,
        # and refuses (503) past one more engine queue per replica: Ray's default queues without bound,
        # so an overloaded cluster would never say so (the engine's own 429 needs the request to reach it)
        "max_queued_requests": queue * max(autoscale[1] if autoscale is not None else (replicas or 1), 1),
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 10,
    }
    if autoscale is not None:
        opts["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                      "target_ongoing_requests": max(1, int(streams * 0.75))}
    else:
        opts["num_replicas"] = replicas
    if lm_replicas is not None:
        lm = serve.deployment(**{**opts, "name": LM_DEPLOYMENT, "num_replicas": lm_replicas})(LMReplica).bind(settings)
        return serve.deployment(**opts)(serve.ingress()(SpeechReplica)).bind(settings, lm)
    return serve.deployment(**opts)(serve.ingress()(SpeechReplica)).bind(settings)


def check_placement(placement: str, lm_replicas: int | None, autoscale: str | None) -> None:
    if placement not in PLACEMENTS:
        raise UserError(f"unknown --placement {placement!r}.", f"choose one of {', '.join(PLACEMENTS)}")
    if placement != "disaggregated":
        if lm_replicas is not None:
            raise UserError("--lm-replicas is an option of --placement disaggregated.",
                            "add --placement disaggregated, or leave it out")
        return
    if autoscale is not None:
        raise UserError("--placement disaggregated takes fixed replica counts, not --autoscale.",
                        "pass --replicas and --lm-replicas, or use --placement replicated with --autoscale")
    if lm_replicas is not None and lm_replicas < 1:
        raise UserError(f"--lm-replicas {lm_replicas} is not a positive count.", "pass --lm-replicas 1 or more")


def run(settings: ReplicaSettings, host: str, port: int, replicas: int | None, autoscale: str | None,
        address: str | None, replica_cpus: float, lm_replicas: int | None = None) -> None:
    """Start (or join) Ray, deploy, print where it serves, and block until Ctrl-C / SIGTERM."""
    import sys

    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("--ray needs Ray Serve, which is not installed.", "run make setup (it installs ray[serve])") from None
    check_placement(settings.placement, lm_replicas, autoscale)
    if settings.placement == "disaggregated" and lm_replicas is None:
        lm_replicas = 1
    scale = parse_autoscale(autoscale)
    if scale is not None and replicas is not None:
        raise UserError("--replicas and --autoscale exclude each other.", "pass one of them")
    if replicas is not None and replicas < 1:
        raise UserError(f"--replicas {replicas} is not a positive count.", "pass --replicas 1 or more")
    if replicas is None and scale is None:
        replicas = 1
    if replica_cpus < 0:
        raise UserError(f"--replica-cpus {replica_cpus:g} is negative.", "pass a CPU share of 0 or more, e.g. 1")
    if port == 0:  # Ray's proxy needs a number: take a free one now
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    os.environ["PYTHONPATH"] = _worker_pythonpath()  # a local cluster's workers
    if address is not None:
        check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, namespace=NAMESPACE)
    except Exception as e:  # noqa: BLE001 - Ray raises many types here; the user needs its first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise UserError(f"could not {where}: {first}",
                        "check `ray status` on the head node" if address else
                        "see Ray's log above; `ray stop` ends a stale local cluster") from None
    if not ray_token_auth():
        print(f"warning: {RAY_AUTH_OFF}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        check_fits(settings.device.startswith("cuda"), replicas if scale is None else scale[0], replica_cpus,
                   local=address is None, lm_replicas=lm_replicas or 0)
        # the replicas' metrics meet here; the actor lives as long as this process (not detached)
        _board = ray.remote(num_cpus=0)(MetricsBoard).options(name=BOARD, namespace=NAMESPACE,
                                                               get_if_exists=True).remote()
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(settings, replicas, scale, replica_cpus, lm_replicas), name=APP_NAME, route_prefix="/")
        shown = f"[{host}]" if ":" in host else host
        count = f"{replicas} replica(s)" if scale is None else f"{scale[0]}-{scale[1]} replicas (autoscaled)"
        if lm_replicas is not None:
            count = f"disaggregated: {lm_replicas} LM replica(s) and {replicas} token2wav replica(s)"
        print(f"serving {settings.model_name} on http://{shown}:{port} through Ray Serve, {count}, "
              f"{settings.device}; GET /ready says when a replica is warmed up", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except RuntimeError as e:  # a deployment that never became healthy: Ray's message names the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Ray Serve could not start the server: {first}", "see the replica logs above") from None
    finally:
        # a second Ctrl-C / SIGTERM while Ray stops ends the process at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: _exit_now("stopped at once on a second signal", 130))
        deadline = time.monotonic() + SHUTDOWN_S
        # a shared cluster keeps running: only our application goes from it
        if not (stop_by(deadline, serve.shutdown if address is None else lambda: serve.delete(APP_NAME))
                and stop_by(deadline, ray.shutdown)):
            # Serve's controller, a replica or Ray's own shutdown hung (seen once on 2 loaded CPU cores):
            # a stop must not wait forever. A local cluster's processes share this process's fate.
            _exit_now(f"Ray did not stop within {SHUTDOWN_S:g} s; its processes were left to end with this one", 0)
    print("stopped.", file=sys.stderr)


# --api-key guards the HTTP API only. Ray's own ports (GCS, raylets, object stores) listen on the node's
# address and run whatever code a connecting driver sends, so the cluster itself needs its token
# authentication: Ray 2.59+ turns it on for a local `ray.init()` cluster (it makes a token in ~/.ray)
# unless RAY_AUTH_MODE says otherwise, and a cluster joined with --ray-address has what its head set.
RAY_AUTH_OFF = ("the Ray cluster runs without token authentication: anyone who reaches its ports can run code "
                "on its machines (--api-key guards only the HTTP API). Fix: leave RAY_AUTH_MODE unset (a local cluster "
                "then makes a token) or start the cluster with RAY_AUTH_MODE=token (docs/serving.md)")


def ray_token_auth() -> bool:
    """Whether this process talks to Ray with token authentication: ray.init() settles RAY_AUTH_MODE
    (it sets "token" for a new local cluster, or when a token is found for a joined one)."""
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


SHUTDOWN_S = 45.0  # Serve's graceful stop (replicas get graceful_shutdown_timeout_s) and Ray's, together


def stop_by(deadline: float, fn) -> bool:
    """Run fn in a daemon thread and wait for it until `deadline` (time.monotonic()); whether it
    returned. A hung shutdown call cannot hold the process; its errors are printed, not raised (the
    process is stopping anyway)."""
    import sys

    def call():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - stopping: say it and go on
            print(f"while stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    worker = threading.Thread(target=call, name="stop", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    return not worker.is_alive()


def _exit_now(message: str, code: int) -> None:
    import sys

    print(f"{message}.", file=sys.stderr, flush=True)
    os._exit(code)
