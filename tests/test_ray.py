"""The speech server on Ray Serve (runtime/serve_ray.py), started for real: `python -m runtime.serve --ray
--replicas 2` starts a local Ray cluster on the CPU with two replicas of an upstream-format CosyVoice3
folder (stand-in front-end models, so voices can be cloned), and the tests speak to Ray's HTTP proxy
with the official `openai` client and httpx.

Claims: both replicas answer (Ray Serve's status, read by a replica, says 2 RUNNING; the X-TTS-Replica
header names two replicas); the same request gives the same audio whichever replica serves it; a voice
cloned through one replica is used by the other (the on-disk bundles); killing a replica in the middle
of requests cuts only the requests it held (their streams end broken, not as short files that look
whole), the others complete, and Ray brings a new replica up; /metrics?scope=cluster holds both
replicas' samples.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (make setup installs it)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Hello there, this is the speech server."
# long enough (700 speech tokens per sentence) that a replica is still generating when it is killed
LONG = "This is a long request, and the replica serving it will not live to finish it."
# the same request through two engines whose batches hold other neighbours: float rounding of the
# padded batches, then 16-bit PCM (a wrong seed, voice or token is off by the audio's whole scale)
PCM_TOLERANCE = 8 / 32768


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer:
    def __init__(self, folder: str, voices: str, placement: tuple[str, ...] = ("--replicas", "2")):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.serve", "--ray", *placement, "--port", str(self.port),
             "--model", folder, "--max-streams", "6", "--threads", "1", "--warmup", "none",
             "--voices-dir", voices, "--log-level", "warning"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def replicas(self, want: int = 2, timeout: float = 180.0, lm: int | None = None) -> dict[str, int]:
        """Poll /diagnostics until Ray says `want` replicas run (and `lm` LM replicas, which have
        pushed their counts) and that many distinct replicas have answered; {replica id: pid}."""
        seen: dict[str, int] = {}
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{''.join(self.log[-40:])}")
            try:
                r = httpx.get(self.base + "/diagnostics", timeout=5)
                if r.status_code == 200 and r.json().get("ready"):
                    rep = r.json()["replica"]
                    lm_ok = lm is None or (rep.get("lm_replica_states") == {"RUNNING": lm}
                                           and len(rep.get("lm_replicas", {})) == lm)
                    if rep.get("replica_states") == {"RUNNING": want} and lm_ok:
                        seen[rep["replica_id"]] = rep["pid"]
                        if len(seen) >= want:
                            return seen
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{want} replicas did not answer in {timeout} s (saw {seen}):\n{''.join(self.log[-40:])}")

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; the exit code. The server bounds its own stop (serve_ray.SHUTDOWN_S), so
        one that outlives twice that is a failure, reported with its log rather than a bare timeout."""
        from runtime.serve_ray import SHUTDOWN_S

        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(2 * SHUTDOWN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"the server did not stop within {2 * SHUTDOWN_S:g} s of SIGINT:\n"
                                 + "".join(self.log[-40:])) from None


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-server")
    s = RayServer(_upstream_folder(root), str(root / "voices"))
    try:
        s.ids = s.replicas(2)
        yield s
    finally:
        code = s.stop()
    assert code == 0, "".join(s.log[-40:])


def _upstream_folder(root) -> str:
    from tests.conftest import make_upstream_folder, write_fake_frontend_onnx

    folder = make_upstream_folder(root, "cosyvoice3")
    write_fake_frontend_onnx(folder, "v3")
    return str(folder)


def _client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _wav(data: bytes) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24000
    return audio


@pytest.fixture(scope="class")
def server(tmp_path_factory):
    """The disaggregated server of TestDisaggregated, for that class only: ended before the replicated
    server of the tests below starts (two Ray clusters at once would crowd 2 cores)."""
    root = tmp_path_factory.mktemp("ray-disaggregated")
    s = RayServer(_upstream_folder(root), str(root / "voices"),
                  ("--placement", "disaggregated", "--lm-replicas", "1", "--replicas", "1"))
    s.folder = s.proc.args[s.proc.args.index("--model") + 1]
    try:
        s.ids = s.replicas(1, lm=1)
        yield s
    finally:
        code = s.stop()
    assert code == 0, "".join(s.log[-40:])


class TestDisaggregated:
    """`--placement disaggregated --lm-replicas 1 --replicas 1`: an LM deployment streaming tokens to a
    token2wav ingress."""

    def test_it_speaks_the_full_engines_audio(self, server):
        """Ray runs both deployments; 6 concurrent requests through the official client give, seed for
        seed, the audio of a full engine in this process (within PCM_TOLERANCE);
        a cloned voice's conditioning reaches the LM replica too."""
        import torch

        from models.registry import load_model
        from runtime.engine import Engine
        from tests.test_server import prompt_wav

        rep = httpx.get(server.base + "/diagnostics").json()["replica"]
        assert rep["placement"] == "disaggregated" and rep["replica_states"] == {"RUNNING": 1}
        assert rep["deployment_status"] == rep["lm_deployment_status"] == "HEALTHY"
        assert rep["lm_replica_states"] == {"RUNNING": 1} and len(rep["lm_replicas"]) == 1
        c = _client(server.base)

        def one(seed):
            return _wav(c.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="wav",
                                              extra_body={"seed": seed, "tokens": 30 + seed}).content)

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(one, range(6)))
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with Engine(load_model(server.folder), "torch", max_streams=6) as engine:
                refs = [engine.submit(TEXT, seed=s, fixed_tokens=30 + s) for s in range(6)]
                refs = [h.audio().numpy() for h in refs]
        finally:
            torch.set_num_threads(n)
        for seed, (a, ref) in enumerate(zip(got, refs)):
            assert a.shape == ref.shape == ((30 + seed) * 960,)
            # float rounding: the replica's batches differ from this engine's (other neighbours, other
            # padding); measured up to 2.5 16-bit steps in a loaded suite run, 0.6 alone
            assert np.abs(a - ref).max() <= PCM_TOLERANCE, seed
        up = {"audio_sample": ("prompt.wav", prompt_wav(), "audio/wav")}
        r = httpx.post(server.base + "/v1/audio/voices", files=up, data={"transcript": "hello world"}, timeout=60)
        assert r.status_code in (200, 201), r.text
        audio = c.audio.speech.create(model="tts-1", voice=r.json()["id"], input="hello world", response_format="pcm",
                                      extra_body={"seed": 3, "tokens": 20})
        assert len(audio.content) == 20 * 960 * 2

    def test_lm_metrics_join_the_cluster_scope(self, server):
        """The LM stage's time is counted on the LM replica (labelled lm:<id>), token2wav's on the ingress."""
        from prometheus_client.parser import text_string_to_metric_families

        r = httpx.post(server.base + "/v1/audio/speech", timeout=60,
                       json={"model": "tts-1", "input": TEXT, "voice": "default", "tokens": 10})
        assert r.status_code == 200, r.text
        (ingress,) = server.ids
        deadline, stages = time.time() + 30, {}
        while time.time() < deadline:
            text = httpx.get(server.base + "/metrics?scope=cluster", timeout=10).text
            families = {f.name: f for f in text_string_to_metric_families(text)}
            stages = {(s.labels["stage"], s.labels["replica"].split(":")[0]) for s in families["tts_stage_seconds"].samples
                      if s.name.endswith("_total") and s.value > 0}
            if ("llm", "lm") in stages:
                break
            time.sleep(0.5)
        assert stages == {("llm", "lm"), ("flow", ingress), ("vocoder", ingress)}

    def test_a_client_that_goes_away_frees_the_lm_row(self, server):
        """A long request (3 sentences of 800 tokens: 2400 LM steps) whose client leaves after its first
        audio: the ingress cancels its call to the LM deployment, whose engine stops that request within
        its first sentence (measured: about 250 steps; without the cancel, 800 or more) and frees the row."""
        def lm():
            (facts,) = httpx.get(server.base + "/diagnostics", timeout=10).json()["replica"]["lm_replicas"].values()
            return facts

        def settled(since=None, timeout=40):
            """The LM replica idle, its counts past `since` steps and equal in two reads more than one
            push interval apart (its counts reach the board every 2 s: two quick reads can both be a
            push older than the request)."""
            deadline, last = time.time() + timeout, None
            while time.time() < deadline:
                f = lm()
                idle = f["active_streams"] == 0 and f["lm_rows"] == 0 and (since is None or f["lm_steps"] > since)
                if idle and last is not None and f["lm_steps"] == last:
                    return f
                last = f["lm_steps"] if idle else None
                time.sleep(2.5)
            raise AssertionError(f"the LM replica did not settle: {lm()}")

        steps0 = settled()["lm_steps"]
        body = {"model": "tts-1", "input": "This is a long request. It has three sentences. The client will not wait.",
                "voice": "default", "response_format": "pcm", "seed": 1, "tokens": 800}
        with httpx.stream("POST", server.base + "/v1/audio/speech", json=body, timeout=60) as r:
            assert r.status_code == 200
            assert next(r.iter_bytes())  # the first audio, then the client goes
        after = settled(since=steps0)
        assert after["lm_steps"] - steps0 < 800, (steps0, after)


def test_both_replicas_answer_and_agree(ray_server):
    """8 concurrent requests through the proxy all succeed; requests with the same seed give the same
    audio on either replica (asked again until both replicas have served one)."""
    c = _client(ray_server.base)

    def one(i):
        r = c.audio.speech.with_raw_response.create(model="tts-1", voice="default", input=TEXT, response_format="wav",
                                                    extra_body={"seed": 7 if i % 2 else i, "tokens": 40})
        return r.headers["x-tts-replica"], _wav(r.content)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert {rid for rid, _ in results} <= set(ray_server.ids)
    same_seed = [(rid, a) for i, (rid, a) in enumerate(results) if i % 2]
    for _ in range(30):  # the router need not split them: ask again until the other replica answers
        if len({rid for rid, _ in same_seed}) == 2:
            break
        same_seed.append(one(1))
    assert {rid for rid, _ in same_seed} == set(ray_server.ids)
    ref = same_seed[0][1]
    assert ref.size == 40 * 960
    for _, a in same_seed[1:]:
        assert a.shape == ref.shape and np.abs(a - ref).max() <= PCM_TOLERANCE  # rounding (as above)
    replica = httpx.get(ray_server.base + "/diagnostics").json()["replica"]
    assert replica["replica_states"] == {"RUNNING": 2}
    # the local cluster guards its own ports with a token (--api-key covers only the HTTP API)
    assert replica["ray_token_auth"] is True


def test_a_voice_cloned_on_one_replica_is_used_by_the_other(ray_server):
    from tests.test_server import prompt_wav

    up = {"audio_sample": ("prompt.wav", prompt_wav(), "audio/wav")}
    r = httpx.post(ray_server.base + "/v1/audio/voices", files=up, data={"transcript": "hello world"}, timeout=60)
    assert r.status_code in (200, 201), r.text
    vid, made_by = r.json()["id"], r.headers["x-tts-replica"]
    answered = set()
    deadline = time.time() + 60
    while answered != set(ray_server.ids) and time.time() < deadline:
        g = httpx.get(ray_server.base + f"/v1/audio/voices/{vid}", timeout=30)
        assert g.status_code == 200 and g.json()["id"] == vid, g.text
        answered.add(g.headers["x-tts-replica"])
    assert answered == set(ray_server.ids) and made_by in answered
    audio = _client(ray_server.base).audio.speech.create(model="tts-1", voice=vid, input="hello world",
                                                         response_format="pcm", extra_body={"seed": 3, "tokens": 20})
    assert len(audio.content) == 20 * 960 * 2


def test_cluster_metrics_hold_every_replica(ray_server):
    """/metrics is the answering replica's own; /metrics?scope=cluster holds both replicas' samples,
    each labelled with its replica id (the ids X-TTS-Replica names), whichever replica answers."""
    from prometheus_client.parser import text_string_to_metric_families

    def speak(_):
        r = httpx.post(ray_server.base + "/v1/audio/speech", timeout=60,
                       json={"model": "tts-1", "input": TEXT, "voice": "default", "tokens": 10})
        assert r.status_code == 200, r.text
        return r.headers["x-tts-replica"]

    answered = set()
    for _ in range(10):  # speech through both replicas: 8 at once, again until the router used both
        with ThreadPoolExecutor(8) as pool:
            answered |= set(pool.map(speak, range(8)))
        if answered == set(ray_server.ids):
            break
    deadline, seen, served = time.time() + 30, {}, set()
    while time.time() < deadline:  # replicas push every 2 s: the other replica's speech shows within seconds
        r = httpx.get(ray_server.base + "/metrics?scope=cluster", timeout=10)
        assert r.status_code == 200, r.text
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        seen = {s.labels["replica"]: s.value for s in families["tts_max_streams"].samples}
        served = {s.labels["replica"] for s in families["tts_requests"].samples
                  if s.labels.get("endpoint") == "/v1/audio/speech"}
        if set(seen) == served == set(ray_server.ids):
            break
        time.sleep(0.5)
    assert seen == {rid: 6.0 for rid in ray_server.ids}
    assert served == set(ray_server.ids)
    own = {f.name: f for f in text_string_to_metric_families(httpx.get(ray_server.base + "/metrics").text)}
    assert all("replica" not in s.labels for s in own["tts_max_streams"].samples)


def test_a_profile_recorded_by_one_replica_is_followed_and_downloaded_through_any(ray_server):
    """Behind Ray's router a profile is recorded by the replica that took the POST, and the calls that
    follow it land anywhere: every replica lists every replica's profile state, and the trace comes
    whole (the same bytes) through either replica; an unknown replica's trace is a 404."""
    started = httpx.post(ray_server.base + "/diagnostics/profile", params={"requests": 2}, timeout=30)
    assert started.status_code == 202, started.text
    owner = started.json()["replica"]
    assert owner in ray_server.ids and started.json()["state"] == "recording"
    c = _client(ray_server.base)
    deadline = time.time() + 120
    while True:  # requests until the owner has served two (the router spreads them)
        c.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="wav",
                              extra_body={"seed": 1, "tokens": 20})
        status = httpx.get(ray_server.base + "/diagnostics/profile", timeout=30).json()
        if status.get("replicas", {}).get(owner, {}).get("state") == "ready":
            break
        assert time.time() < deadline, status
    assert status["replicas"][owner]["download"] == f"/diagnostics/profile/trace?replica={owner}"
    bodies = {}
    for _ in range(40):  # until both replicas have answered the download
        r = httpx.get(ray_server.base + "/diagnostics/profile/trace", params={"replica": owner}, timeout=60)
        assert r.status_code == 200, r.text
        bodies[r.headers["x-tts-replica"]] = r.content
        if len(bodies) == 2:
            break
    assert set(bodies) == set(ray_server.ids)
    first, second = bodies.values()
    assert first == second and "traceEvents" in json.loads(first)
    missing = httpx.get(ray_server.base + "/diagnostics/profile/trace", params={"replica": "no-such-replica"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "profile_not_ready"

def test_a_killed_replica_loses_only_its_requests_and_comes_back(ray_server):
    """Six long streamed requests; once every one has its first audio, one replica is killed (SIGKILL):
    its requests end with a broken stream, the others deliver all their audio; Ray replaces it."""
    victim = sorted(ray_server.ids)[0]
    outcomes: dict[int, dict] = {}
    started = threading.Barrier(7)

    def stream(i):
        out = outcomes.setdefault(i, {"bytes": 0})
        body = {"model": "tts-1", "input": LONG, "voice": "default", "response_format": "pcm", "seed": i, "tokens": 700}
        try:
            with httpx.stream("POST", ray_server.base + "/v1/audio/speech", json=body, timeout=120) as r:
                out["status"], out["replica"] = r.status_code, r.headers.get("x-tts-replica")
                first = True
                for chunk in r.iter_bytes():
                    out["bytes"] += len(chunk)
                    if first:
                        first = False
                        started.wait(120)
            out["complete"] = True
        except (httpx.HTTPError, threading.BrokenBarrierError) as e:
            out["error"] = type(e).__name__
            if started.n_waiting:
                started.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started.wait(120)  # every request has its first audio (6 streams per replica: none queues)
    on_victim = [i for i, o in outcomes.items() if o.get("replica") == victim]
    assert on_victim and len(on_victim) < 6, outcomes  # the proxy spread them
    os.kill(ray_server.ids[victim], signal.SIGKILL)
    for t in threads:
        t.join(120)
    full = 700 * 960 * 2
    for i, o in outcomes.items():
        if o["replica"] == victim:
            assert "error" in o and o["bytes"] < full, (i, o)  # cut, and the client knows it
        else:
            assert o.get("complete") and o["status"] == 200 and o["bytes"] == full, (i, o)
    # Ray starts a replacement: two replicas run again, one of them new
    now = ray_server.replicas(2, timeout=120)
    assert victim not in now and len(set(now) & set(ray_server.ids)) == 1
    ray_server.ids = now
    r = _client(ray_server.base).audio.speech.with_raw_response.create(
        model="tts-1", voice="default", input=TEXT, response_format="pcm", extra_body={"seed": 1, "tokens": 20})
    assert r.status_code == 200 and len(r.content) == 20 * 960 * 2


def test_replicas_keep_the_packages_found_through_pythonpath(monkeypatch):
    # a runtime environment's PYTHONPATH replaces the worker's: the repository goes first, and what the
    # starting process found through PYTHONPATH (packages installed with pip --target) stays after it
    from runtime import serve_ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/site/a", serve_ray.REPO, "/site/b"]))
    assert serve_ray._worker_pythonpath() == os.pathsep.join([serve_ray.REPO, "/site/a", "/site/b"])
    monkeypatch.delenv("PYTHONPATH")
    assert serve_ray._worker_pythonpath() == serve_ray.REPO


@pytest.mark.parametrize("auth_mode", [None, "disabled"])
def test_a_replica_no_node_can_hold_is_refused_at_once(auth_mode):
    # Ray Serve would wait for the resources forever, saying so only in its log. The same start says
    # whether Ray's own ports are guarded: a local cluster makes a token unless RAY_AUTH_MODE=disabled
    from runtime.serve_ray import RAY_AUTH_OFF

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if auth_mode:
        env["RAY_AUTH_MODE"] = auth_mode
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "runtime.serve", "--ray", "--replica-cpus", "4096", "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert (f"warning: {RAY_AUTH_OFF}" in res.stderr.splitlines()) == (auth_mode == "disabled"), res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert re.fullmatch(r"error: no Ray node has 4096 CPU core\(s\) for a replica \(nodes: \d+ CPU, 0 GPU\)\. "
                        r"Fix: lower --replica-cpus, or add a node that has them", errors[0]), errors[0]
    assert "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 90


def test_a_disaggregated_placement_that_does_not_fit_is_refused(monkeypatch):
    # the LM replicas take a GPU (or their CPU cores) each too: both counts must fit a local cluster
    import ray

    from models.errors import UserError
    from runtime.serve_ray import check_fits

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    check_fits(True, 2, 1.0, local=True, lm_replicas=2)
    with pytest.raises(UserError) as err:
        check_fits(True, 3, 1.0, local=True, lm_replicas=2)
    assert str(err.value) == ("3 replica(s) and 2 LM replica(s) of 1 CPU core(s) and a GPU each do not fit this machine's "
                              "Ray (16 CPU core(s), 4 GPU(s)). Fix: lower --replicas, --lm-replicas or --replica-cpus, "
                              "or join a cluster with --address")
    with pytest.raises(UserError, match=r"^5 replica\(s\) of 1 CPU core\(s\) and a GPU do not fit"):
        check_fits(True, 5, 1.0, local=True)  # the replicated placement's message is as it was
    check_fits(True, 3, 1.0, local=False, lm_replicas=2)  # a cluster may grow: only one replica must fit a node


def test_a_stop_that_hangs_is_given_up_at_its_deadline(capsys):
    # Ray's shutdown once outlived the 90 s a test gave the server to stop (2 loaded CPU cores): each
    # shutdown call now runs against one deadline, and a call past it is left behind, not waited for
    from runtime.serve_ray import stop_by

    t0 = time.monotonic()
    assert stop_by(t0 + 0.3, lambda: time.sleep(5)) is False
    assert 0.25 < time.monotonic() - t0 < 1.0
    assert stop_by(time.monotonic() + 5, lambda: None) is True
    assert stop_by(time.monotonic() - 1, lambda: time.sleep(0.05)) is False  # the deadline has passed

    def fails():
        raise RuntimeError("the controller is gone")

    assert stop_by(time.monotonic() + 5, fails) is True  # it returned: the error is said, not raised
    assert capsys.readouterr().err == "while stopping: RuntimeError: the controller is gone\n"
