"""The speech server (runtime/serve.py), started for real and spoken to over HTTP.

Three servers, one per kind of claim, each started once for the module:

- `cv3`: `python -m runtime.serve --model cosyvoice3-tiny` as a subprocess (the command a user runs),
  with an API key from TTS_API_KEY, 8 streams, a queue of 1 that times out after 1 s;
- `voices`: the app from `create_app` under uvicorn in a thread, on an upstream-format CosyVoice3
  folder with stand-in front-end ONNX models (tests/conftest.py), so zero-shot voices can be made;
- `orpheus`: the same on orpheus-tiny (named voices, no cloning).

Clients: the official `openai` package (`client.audio.speech.create`, `with_streaming_response`) and
httpx. Requests fix their speech token count (`tokens`) to keep the CPU time small; the tiny preset's
flow takes at most 200 tokens per utterance.
"""

from __future__ import annotations

import io
import json
import os
import re
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-key"
TEXT = "Hello there, this is the speech server."


# -- servers -------------------------------------------------------------------------------------------------
def wait_ready(base: str, timeout: float = 120.0, proc=None, log=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{''.join(log or [])}")
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base} not ready in {timeout} s:\n{''.join(log or [])}")


class Subprocess:
    """`python -m runtime.serve ... --port 0`; the port is read from its first line."""

    def __init__(self, *args, env=None):
        self.log: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", *args, "--port", "0"], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        found = threading.Event()
        self.base = None

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"on (http://[\d.]+:\d+)", line)
                if m and self.base is None:
                    self.base = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(60)
        assert self.base, "".join(self.log)
        wait_ready(self.base, proc=self.proc, log=self.log)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


class InThread:
    """The app of `create_app` under uvicorn in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        from runtime.serve import bind

        sock = bind("127.0.0.1", 0)
        self.base = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_ready(self.base)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def cv3(tmp_path_factory):
    voices = tmp_path_factory.mktemp("cv3-voices")
    s = Subprocess("--model", "cosyvoice3-tiny", "--max-streams", "8", "--max-queue", "1", "--queue-timeout", "1",
                   "--threads", "1", "--warmup", "requests", "--new-shapes", "defer", "--voices-dir", str(voices),
                   "--log-level", "warning",
                   env={"TTS_API_KEY": KEY})
    yield s.base
    assert s.stop() == 0, "".join(s.log)
    assert not any("Traceback" in line for line in s.log), "".join(s.log)


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    from tests.conftest import make_upstream_folder, write_fake_frontend_onnx
    from models.registry import load_model
    from runtime.engine import Engine
    from runtime.serve import create_app

    root = tmp_path_factory.mktemp("voice-server")
    folder = make_upstream_folder(root, "cosyvoice3")
    write_fake_frontend_onnx(folder, "v3")
    engine = Engine(load_model(folder), "torch", max_streams=4)
    app = create_app(engine, voices_dir=str(root / "voices"), warmup="none", max_upload_bytes=300_000)
    s = InThread(app)
    s.root = root
    yield s
    s.stop()


@pytest.fixture(scope="module")
def orpheus(tmp_path_factory):
    from models.registry import load_model
    from runtime.engine import Engine
    from runtime.serve import create_app

    engine = Engine(load_model("orpheus-tiny"), "torch", max_streams=2)
    s = InThread(create_app(engine, voices_dir=str(tmp_path_factory.mktemp("orpheus-voices")), warmup="none"))
    yield s
    s.stop()


def client(base: str, key: str | None = KEY, retries: int = 0):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=key or "unused", max_retries=retries, timeout=60)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.int32)


def speak(base: str, key: str | None = KEY, **body) -> httpx.Response:
    body = {"model": "cosyvoice3-tiny", "input": TEXT, "voice": "default", "response_format": "pcm", "seed": 1,
            "tokens": 40, **body}
    return httpx.post(base + "/v1/audio/speech", json=body, headers=auth(key) if key else {}, timeout=60)


def wav_of(sig: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, sig, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def prompt_wav(seconds: float = 2.0, hz: float = 180.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    return wav_of((0.3 * np.sin(2 * np.pi * hz * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32))


def silent_flac(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(rate * seconds), dtype=np.float32), rate, format="FLAC")
    return buf.getvalue()


def flac_with_length(data: bytes, samples: int) -> bytes:
    """A streamed FLAC says "length unknown" in STREAMINFO; python-soundfile cannot read that, so the
    test writes the length in (what a non-streaming encoder patches at its end) before decoding."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # first metadata block: STREAMINFO
    info = bytearray(data[8:8 + 34])
    packed = int.from_bytes(info[10:18], "big")
    assert packed & ((1 << 36) - 1) == 0  # total samples: unknown
    info[10:18] = (packed | samples).to_bytes(8, "big")
    return data[:8] + bytes(info) + data[8 + 34:]


# -- health, auth, formats ------------------------------------------------------------------------------------
def test_health_ready_and_api_key(cv3):
    assert httpx.get(cv3 + "/health").json() == {"status": "ok"}  # open without a key
    ready = httpx.get(cv3 + "/ready").json()
    assert ready["status"] == "ready" and ready["warmup"]["requests"] == 9  # alone, then all 8 streams
    for headers, word in (({}, "an API key is required"), (auth("sk-wrong"), "the API key is wrong")):
        r = httpx.get(cv3 + "/metrics", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and word in err["message"] and "Authorization: Bearer" in err["message"]
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(cv3, "sk-wrong").audio.speech.create(model="cosyvoice3-tiny", voice="default", input=TEXT)
    models = client(cv3).models.list()
    assert [m.id for m in models.data][:2] == ["cosyvoice3-tiny", "tts-1"]


def test_every_format_is_valid_audio(cv3):
    """Each response_format through the openai client decodes to the request's audio: wav and pcm to
    the same samples, flac losslessly (streamed and complete), mp3 and opus to the same length."""
    c = client(cv3)
    extra = {"seed": 5, "tokens": 50}
    got = {fmt: c.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format=fmt,
                                      extra_body=extra).content
           for fmt in ("wav", "pcm", "flac", "mp3", "opus")}
    ref = pcm16(got["pcm"])
    n = 50 * 2 * 480  # 50 tokens, 2 mel frames each, 480 samples a frame
    assert ref.size == n and np.abs(ref).max() > 100
    wav, rate = sf.read(io.BytesIO(got["wav"]), dtype="int16")
    assert rate == 24000 and np.array_equal(wav, ref)
    assert got["wav"][40:44] == b"\xff\xff\xff\xff"  # streamed: the data length is left open
    flac, rate = sf.read(io.BytesIO(flac_with_length(got["flac"], n)), dtype="int16")
    assert rate == 24000 and np.array_equal(flac, ref)
    whole = c.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="flac",
                                  extra_body={**extra, "stream": False}).content
    flac, _ = sf.read(io.BytesIO(whole), dtype="int16")  # complete: STREAMINFO has the length
    assert np.array_equal(flac, ref)
    for fmt in ("mp3", "opus"):
        audio, rate = sf.read(io.BytesIO(got[fmt]), dtype="float32")
        assert rate == 24000 and np.isfinite(audio).all() and np.abs(audio).max() > 0.01
        # opus keeps the length; a streamed mp3 adds the encoder's delay and padding (under 4 frames)
        assert n <= audio.size <= n + (4 * 576 if fmt == "mp3" else 0), (fmt, audio.size)
    whole = c.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="mp3",
                                  extra_body={**extra, "stream": False}).content
    assert sf.info(io.BytesIO(whole)).frames == n  # complete: its LAME header says where the audio is


def test_audio_streams_before_the_request_finishes(cv3):
    """The openai client's streaming response gets several chunks, the first long before the last;
    the streamed bytes are the same as the complete response's."""
    c = client(cv3)
    t0 = time.perf_counter()
    arrivals, parts = [], []
    with c.audio.speech.with_streaming_response.create(model="cosyvoice3-tiny", voice="default", input=TEXT,
                                                       response_format="pcm",
                                                       extra_body={"seed": 9, "tokens": 190}) as response:
        assert response.headers["transfer-encoding"] == "chunked" and response.headers["x-seed"] == "9"
        for part in response.iter_bytes():
            arrivals.append(time.perf_counter() - t0)
            parts.append(part)
    assert len(parts) >= 3, [len(p) for p in parts]
    assert arrivals[0] < 0.6 * arrivals[-1], arrivals
    whole = speak(cv3, seed=9, tokens=190, stream=False)
    assert whole.headers["content-length"] == str(190 * 960 * 2)
    assert b"".join(parts) == whole.content


def test_sse_stream(cv3):
    with httpx.stream("POST", cv3 + "/v1/audio/speech", headers=auth(), timeout=60,
                      json={"input": TEXT, "stream_format": "sse", "response_format": "pcm", "seed": 3,
                            "tokens": 60}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    import base64

    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) >= 3
    assert events[-1] == {"type": "speech.audio.done", "usage": {"output_tokens": 60, "audio_seconds": 2.4}}
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio == speak(cv3, seed=3, tokens=60).content


def test_concurrent_requests_equal_sequential_ones(cv3):
    """Eight different requests, one by one and then all at once: the same audio (a seed fixes a
    request's audio whatever else the engine is doing), within one step of 16-bit rounding."""
    reqs = [dict(input=f"Request number {i} of the concurrency test.", seed=100 + i, tokens=30 + 7 * i)
            for i in range(8)]
    alone = [speak(cv3, **r).content for r in reqs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: speak(cv3, **r), reqs))
    for r, a, t in zip(reqs, alone, together):
        assert t.status_code == 200
        a, t = pcm16(a), pcm16(t.content)
        assert a.size == t.size == r["tokens"] * 960
        assert np.abs(a - t).max() <= 1
    diag = httpx.get(cv3 + "/diagnostics", headers=auth()).json()
    assert diag["engine"]["lm_batch_mean"] > 1  # they did share decode steps


def test_flow_prefix_server_equals_the_recomputing_one(cv3):
    """`serve --flow-mode prefix`: four concurrent requests, their chunks solved together against each
    stream's kept prefix (and, past a small --stream-state-gb, recomputed), give the default server's
    audio within one step of 16-bit rounding; /diagnostics shows the budget, nothing held at the end."""
    s = Subprocess("--model", "cosyvoice3-tiny", "--max-streams", "4", "--threads", "1", "--warmup", "none",
                   "--flow-mode", "prefix", "--stream-state-gb", "0.004", "--log-level", "warning",
                   env={"TTS_API_KEY": KEY})
    try:
        reqs = [dict(input=f"Request number {i} of the prefix test.", seed=200 + i, tokens=60 + 40 * i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            kept = list(pool.map(lambda r: speak(s.base, **r), reqs))
        ref = [speak(cv3, **r) for r in reqs]
        for r, k, a in zip(reqs, kept, ref):
            assert k.status_code == a.status_code == 200
            k, a = pcm16(k.content), pcm16(a.content)
            assert k.size == a.size == r["tokens"] * 960
            assert np.abs(k.astype(np.int32) - a).max() <= 1
        state = httpx.get(s.base + "/diagnostics", headers=auth()).json()["stream_state"]
        assert state["limit_bytes"] == int(0.004 * (1 << 30)) and state["held_bytes"] == 0 and state["peak_bytes"] > 0
        assert state["refused"] > 0  # the small budget made some streams recompute
    finally:
        assert s.stop() == 0, "".join(s.log)


# -- errors ----------------------------------------------------------------------------------------------------
BAD = [
    ({"input": ""}, "input", "input is empty"),
    ({"input": "x" * 4097}, "input", "input is 4097 characters long; the limit is 4096"),
    ({"voice": "alloy"}, "voice", "unknown voice 'alloy'"),
    ({"voice": {"name": "x"}}, "voice", "voice must be"),
    ({"response_format": "aac"}, "response_format", "no AAC encoder"),
    ({"response_format": "ogg"}, "response_format", "choose one of wav, pcm, flac, mp3, opus"),
    ({"model": "gpt-5"}, "model", "model 'gpt-5' is not served here"),
    ({"speed": 1.5}, "speed", "has no speed control"),
    ({"instructions": "whisper"}, "instructions", "instructions are not used"),
    ({"stream_format": "ws"}, "stream_format", "not one of audio, sse"),
    ({"seed": -1}, "seed", "is not an integer from 0 to 4294967295"),
    ({"tokens": 0}, "tokens", "not a positive integer"),
    ({"tokens": 100_000}, "tokens", "speech tokens this model takes for one sentence"),
    ({"temperature": 0.7}, "temperature", "unknown field(s) temperature"),
    ({"input": 12}, "input", "input must be a string"),
    ({"input": "..."}, "input", "nothing to speak"),
]


@pytest.mark.parametrize("body,param,message", BAD, ids=[b[1] + "-" + b[2][:20] for b in BAD])
def test_bad_speech_requests(cv3, body, param, message):
    r = speak(cv3, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"
    assert "Fix:" in err["message"] and "\n" not in err["message"] and "Traceback" not in r.text
    assert not re.search(r"--(text|voice|tokens|prompt)", err["message"])  # body fields, not CLI options


def test_bad_bodies_and_paths(cv3):
    post = lambda data, **kw: httpx.post(cv3 + "/v1/audio/speech", content=data,  # noqa: E731
                                         headers={**auth(), "Content-Type": "application/json"}, **kw)
    r = post(b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(b"[1, 2]")
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
    r = post(b"[" * 100_000)  # deeper than the JSON parser recurses: a 400 too, not a 500
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "the request body is not valid JSON (nested too deeply).")
    r = post(b"{" + b" " * (1 << 20) + b"}")
    assert r.status_code == 413 and "the limit is 1048576" in r.json()["error"]["message"]
    r = httpx.get(cv3 + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(cv3 + "/v1/audio/speech", headers=auth())
    assert r.status_code == 405 and "error" in r.json()
    # voice ids are 64 hex digits; nothing else reaches the file system
    for vid in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "default"):
        r = httpx.delete(cv3 + f"/v1/audio/voices/{vid}", headers=auth())
        assert r.status_code in (400, 404) and "error" in r.json(), (vid, r.text)
    r = httpx.post(cv3 + "/v1/audio/voices", headers=auth(), files={"audio_sample": ("a.wav", prompt_wav())})
    assert r.status_code == 400 and "cannot clone a voice" in r.json()["error"]["message"]
    import openai

    with pytest.raises(openai.BadRequestError, match="has no speed control"):
        client(cv3).audio.speech.create(model="cosyvoice3-tiny", voice="default", input=TEXT, speed=2.0)


def test_full_engine_429_queue_timeout_503_and_disconnects_free_slots(cv3):
    """Eight long streams fill the engine. A queued request whose client leaves gives its place back;
    then a ninth waits in the queue of one and a tenth is refused at once (429, Retry-After). Closing
    the streams' connections cancels them: the first freed row finds the ninth waited longer than the
    1 s queue timeout (503, Retry-After), and every row is free again soon after."""
    clients = [httpx.Client(headers=auth(), timeout=60) for _ in range(8)]
    long = " ".join(f"This is sentence number {k} of a long request." for k in range(8))  # 8 x 190 tokens

    def open_stream(i):
        s = clients[i].stream("POST", cv3 + "/v1/audio/speech", json={"input": long, "response_format": "pcm",
                                                                      "seed": i, "tokens": 190})
        r = s.__enter__()
        assert r.status_code == 200
        # all kept: a dropped context or iterator closes its connection (as a client going away)
        pieces = r.iter_bytes()
        next(pieces)  # audio is flowing: this request holds a row
        return r, pieces, s

    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(open_stream, range(8)))
    engine = lambda: httpx.get(cv3 + "/diagnostics", headers=auth()).json()["engine"]  # noqa: E731

    def until(cond, seconds=5.0):
        deadline = time.time() + seconds
        while not cond(engine()) and time.time() < deadline:
            time.sleep(0.02)
        return engine()

    assert engine()["active_streams"] == 8
    # a queued request whose client leaves before any audio gives its queue place back at once
    body = json.dumps({"input": TEXT, "response_format": "pcm", "tokens": 40}).encode()
    port = int(cv3.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert until(lambda e: e["queued"] == 1)["queued"] == 1
    assert until(lambda e: e["queued"] == 0)["queued"] == 0
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(r=speak(cv3, seed=50)))
    waiter.start()
    assert until(lambda e: e["queued"] == 1)["queued"] == 1
    full = speak(cv3, seed=51)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert "the engine is full (8 streams running, 1 waiting)" in full.json()["error"]["message"]
    time.sleep(1.2)  # past the queue timeout
    for (r, _, _), c in zip(streams, clients):
        r.close()  # the client goes away mid-stream
        c.close()
    waiter.join(30)
    assert queued["r"].status_code == 503 and int(queued["r"].headers["retry-after"]) >= 1
    assert "waited 1 s for a free stream" in queued["r"].json()["error"]["message"]
    e = until(lambda e: e["active_streams"] == 0 and e["lm_rows"] == 0)
    assert e["active_streams"] == 0 and e["lm_rows"] == 0 and e["queued"] == 0
    metrics = httpx.get(cv3 + "/metrics", headers=auth()).text
    assert re.search(r'tts_speech_outcomes_total\{outcome="cancelled"\} ([89]|\d\d)', metrics), metrics
    assert speak(cv3, seed=52).status_code == 200  # the freed rows serve again


# -- metrics, diagnostics, profile -------------------------------------------------------------------------------
def test_metrics_parse(cv3):
    from prometheus_client.parser import text_string_to_metric_families

    speak(cv3, seed=7)
    assert httpx.get(cv3 + "/metrics").status_code == 401
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(cv3 + "/metrics", headers=auth()).text)}
    for name in ("tts_requests", "tts_time_to_first_audio_seconds", "tts_real_time_factor", "tts_active_streams",
                 "tts_queue_depth", "tts_batch_size", "tts_stage_seconds", "tts_audio_seconds", "tts_ready"):
        assert name in families, sorted(families)
    assert families["tts_time_to_first_audio_seconds"].type == "histogram"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("tts_requests_total", (("endpoint", "/v1/audio/speech"), ("status", "200")))] >= 1
    assert samples[("tts_requests_total", (("endpoint", "/metrics"), ("status", "401")))] >= 1
    assert samples[("tts_time_to_first_audio_seconds_count", ())] >= 1
    assert samples[("tts_ready", ())] == 1
    stages = {s.labels["stage"] for s in families["tts_stage_seconds"].samples}
    assert stages == {"llm", "flow", "vocoder"}
    assert all(samples[("tts_stage_seconds_total", (("stage", s),))] > 0 for s in stages)
    assert {s.labels["stage"] for s in families["tts_batch_size"].samples} == stages
    assert "tts_gpu_utilization_percent" not in families  # no GPU here: no made-up numbers
    # one server alone has no cluster scope; an unknown scope is named
    r = httpx.get(cv3 + "/metrics?scope=cluster", headers=auth())
    assert r.status_code == 400 and r.json()["error"]["message"] == ("scope=cluster needs a server with replicas; this "
                                                                      "one runs alone. Fix: use /metrics (or start it with --ray).")
    r = httpx.get(cv3 + "/metrics?scope=everything", headers=auth())
    assert r.status_code == 400 and r.json()["error"]["param"] == "scope"


def test_merged_metrics_label_every_replica():
    """merge_expositions (what /metrics?scope=cluster serves under Ray): each replica's samples keep
    their labels and values and gain `replica`; counters and histograms keep their types."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from runtime.telemetry import merge_expositions

    texts = {}
    for replica, n in (("r1", 3), ("r2", 5)):
        reg = CollectorRegistry()
        Counter("tts_requests", 'HTTP "requests"\\ by endpoint', ["endpoint"], registry=reg).labels('/a"b').inc(n)
        Histogram("tts_time_to_first_audio_seconds", "first audio", buckets=[0.1, 1.0], registry=reg).observe(0.1 * n)
        texts[replica] = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(merge_expositions(texts))}
    assert families["tts_requests"].type == "counter" and families["tts_requests"].documentation == 'HTTP "requests"\\ by endpoint'
    assert {(s.labels["replica"], s.labels["endpoint"], s.value) for s in families["tts_requests"].samples} == \
        {("r1", '/a"b', 3.0), ("r2", '/a"b', 5.0)}
    hist = families["tts_time_to_first_audio_seconds"]
    assert hist.type == "histogram"
    assert {(s.labels["replica"], s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")} == \
        {("r1", "0.1", 0.0), ("r1", "1.0", 1.0), ("r1", "+Inf", 1.0), ("r2", "0.1", 0.0), ("r2", "1.0", 1.0), ("r2", "+Inf", 1.0)}


def test_diagnostics_and_profile(cv3):
    speak(cv3, seed=8)
    d = httpx.get(cv3 + "/diagnostics", headers=auth()).json()
    assert d["gpu"] == {"available": False, "reason": "the engine runs on the CPU"}
    # the CLI's --new-shapes reached the engine (eager torch backends have no shapes to defer)
    assert d["new_shapes"] == {"policy": "defer", "eager_calls": 0, "waiting": 0, "idle_captures": 0,
                               "idle_capture_seconds": 0.0}
    w = d["window"]
    assert w["requests"] >= 1 and abs(sum(w["stage_share"].values()) - 1) < 1e-3
    assert set(w["thread_busy"]) == {"lm", "token2wav"} and isinstance(d["verdict"], str) and "\n" not in d["verdict"]
    assert re.search(r"(bounds throughput|no stage is saturated)", d["verdict"]), d["verdict"]
    r = httpx.post(cv3 + "/diagnostics/profile?requests=0", headers=auth())
    assert r.status_code == 400
    r = httpx.post(cv3 + "/diagnostics/profile?requests=2", headers=auth())
    assert r.status_code == 202 and r.json()["state"] == "recording"
    assert httpx.post(cv3 + "/diagnostics/profile?requests=1", headers=auth()).status_code == 409
    r = httpx.get(cv3 + "/diagnostics/profile/trace", headers=auth())
    assert r.status_code == 409 and "0 of 2 requests" in r.json()["error"]["message"]
    speak(cv3, seed=10)
    speak(cv3, seed=11)
    deadline = time.time() + 30
    while httpx.get(cv3 + "/diagnostics/profile", headers=auth()).json()["state"] != "ready" and time.time() < deadline:
        time.sleep(0.1)
    r = httpx.get(cv3 + "/diagnostics/profile/trace", headers=auth(), timeout=60)
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    events = r.json()["traceEvents"]
    threads = {e.get("tid") for e in events if str(e.get("name", "")).startswith("aten::")}
    assert len(threads) >= 2  # the LM thread and the batcher: the engine's threads are all in it
    # one server, no replicas: naming one is a mistake, said as such
    r = httpx.get(cv3 + "/diagnostics/profile/trace?replica=abc", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_replica"
    assert "replica" not in httpx.get(cv3 + "/diagnostics/profile", headers=auth()).json()


def test_loadtest_drives_the_server(cv3, tmp_path):
    from click.testing import CliRunner

    from runtime.loadtest import main

    out = tmp_path / "lt.json"
    res = CliRunner().invoke(main, ["--url", cv3, "--api-key", KEY, "--concurrency", "1,2", "--requests", "2",
                                    "--tokens", "40", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["meta"]["model"] == "cosyvoice3-tiny" and data["meta"]["url"] == cv3 and data["baseline"] is None
    for lv in data["levels"]:
        assert lv["requests"] == 2 and lv["failed"] == 0 and lv["audio_s_per_s"] > 0
        assert 0 < lv["ttfa_ms"]["p50"] < 10_000 and isinstance(lv["underruns"], int)
        assert lv["engine"]["max_streams"] == 8
    res = CliRunner().invoke(main, ["--url", cv3, "--concurrency", "1", "--requests", "1"])
    assert res.exit_code == 2 and "wants an API key" in res.output


# -- voices -----------------------------------------------------------------------------------------------------
def test_voice_create_use_list_delete(voices):
    base = voices.base
    up = {"audio_sample": ("prompt.wav", prompt_wav(), "audio/wav")}
    r = httpx.post(base + "/v1/audio/voices", files=up, data={"transcript": "hello world", "name": "anna"})
    assert r.status_code == 201, r.text
    v = r.json()
    assert re.fullmatch(r"[0-9a-f]{64}", v["id"]) and v["name"] == "anna" and v["created"] is True
    again = httpx.post(base + "/v1/audio/voices", files=up, data={"transcript": "hello world", "name": "anna"})
    assert again.status_code == 200 and again.json()["id"] == v["id"] and again.json()["created"] is False
    other = httpx.post(base + "/v1/audio/voices", files=up, data={"transcript": "hello"}).json()["id"]
    assert other != v["id"]  # the transcript is part of the content hash
    listed = httpx.get(base + "/v1/audio/voices").json()["data"]
    assert listed[0]["id"] == "default" and {x["id"] for x in listed[1:]} == {v["id"], other}
    bundle = voices.root / "voices" / v["id"]
    assert sorted(os.listdir(bundle)) == ["speaker.safetensors", "voice.json"]
    c = client(base)
    extra = {"seed": 4, "tokens": 30}
    as_name = c.audio.speech.create(model="cosyvoice3-golden", voice=v["id"], input="hello world",
                                    response_format="pcm", extra_body=extra).content
    as_object = c.audio.speech.create(model="cosyvoice3-golden", voice={"id": v["id"]}, input="hello world",
                                      response_format="pcm", extra_body=extra).content
    plain = c.audio.speech.create(model="cosyvoice3-golden", voice="default", input="hello world",
                                  response_format="pcm", extra_body=extra).content
    assert as_name == as_object and len(as_name) == 30 * 960 * 2 and as_name != plain
    r = httpx.delete(base + f"/v1/audio/voices/{v['id']}")
    assert r.json() == {"id": v["id"], "object": "audio.voice.deleted", "deleted": True}
    assert not bundle.exists()
    assert httpx.delete(base + f"/v1/audio/voices/{v['id']}").status_code == 404
    r = speak(base, None, model="cosyvoice3-golden", voice=v["id"])
    assert r.status_code == 400 and "unknown voice" in r.json()["error"]["message"]
    assert httpx.delete(base + "/v1/audio/voices/default").status_code == 400


def test_voice_upload_errors(voices):
    base = voices.base
    post = lambda files=None, data=None, **kw: httpx.post(base + "/v1/audio/voices", files=files, data=data, **kw)  # noqa: E731
    cases = [
        (post({"audio_sample": ("x.wav", os.urandom(4000))}), 400, "audio_sample cannot be decoded as audio"),
        (post({"audio_sample": ("x.wav", prompt_wav(0.2))}), 400, "audio_sample is 200 ms long"),
        (post({"audio_sample": ("x.wav", b"")}), 400, "audio_sample is empty"),
        (post({"audio_sample": ("x.wav", prompt_wav(12.0))}), 413, "the limit is 300000"),
        # 200 s of silence in 4.7 kB: refused from its header, before decoding it (a small file can
        # decode to GBs of samples)
        (post({"audio_sample": ("x.flac", silent_flac(200))}), 400, "audio_sample is 200 s long"),
        (post({"transcript": (None, "hi")}), 400, "audio_sample is missing"),
        (post({"audio_sample": ("x.wav", prompt_wav())}, {"voice": "x"}), 400, "unknown field(s) voice"),
        (post({"audio_sample": ("x.wav", prompt_wav())}, {"type": "prompt"}), 400, "voice type 'prompt'"),
        (httpx.post(base + "/v1/audio/voices", json={"audio_sample": "x"}), 400, "multipart/form-data"),
    ]
    for r, status, message in cases:
        assert r.status_code == status and message in r.json()["error"]["message"], (status, message, r.text)
        assert "/tmp" not in r.text and "tts-voice-" not in r.text  # no server paths in messages


def test_voice_store_is_shared_and_checked(voices, tmp_path):
    """Two stores on one folder are two server processes: one creates, the other finds and loads
    the same tensors; a changed or damaged bundle and another model's bundle are refused."""
    import torch

    from models.errors import UserError
    from models.registry import load_model
    from runtime.voices import StoreFailed, VoiceStore, check_id

    folder = str(voices.root / "cosyvoice3-golden")
    a, b = VoiceStore(str(tmp_path / "v"), load_model(folder)), VoiceStore(str(tmp_path / "v"), load_model(folder))
    wav = tmp_path / "p.wav"
    wav.write_bytes(prompt_wav())
    rec, created = a.create(str(wav), wav.read_bytes(), "hello world", "x", 2.0)
    assert created and [r["id"] for r in b.list()] == [rec["id"]]
    sa, sb = a.speaker(rec["id"]), b.speaker(rec["id"])
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
                                          for k in sa)
    assert b.create(str(wav), wav.read_bytes(), "hello world", "y", 2.0)[1] is False  # found, not made again
    bundle = tmp_path / "v" / rec["id"]
    meta = json.loads((bundle / "voice.json").read_text())
    (bundle / "voice.json").write_text(json.dumps({**meta, "transcript": "changed"}))
    with pytest.raises(UserError, match="does not match its id"):
        VoiceStore(str(tmp_path / "v"), load_model(folder)).speaker(rec["id"])
    (bundle / "voice.json").write_text(json.dumps(meta))
    blob = bytearray((bundle / "speaker.safetensors").read_bytes())
    blob[-1] ^= 1
    (bundle / "speaker.safetensors").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="is damaged"):
        VoiceStore(str(tmp_path / "v"), load_model(folder)).speaker(rec["id"])
    with pytest.raises(UserError, match="was created for another model"):
        VoiceStore(str(tmp_path / "v"), load_model("cosyvoice3-tiny")).speaker(rec["id"])
    with pytest.raises(UserError, match="was created for another model"):  # nor deleted by that model's server
        VoiceStore(str(tmp_path / "v"), load_model("cosyvoice3-tiny")).delete(rec["id"])
    # a bundle missing a field is left out of the list (it made the whole list a 500), and a damaged
    # one is deleted (its own error says "delete it": the delete refused it with that same advice)
    (bundle / "voice.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "created_at"}))
    assert b.list() == []
    (bundle / "voice.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        VoiceStore(str(tmp_path / "v"), load_model(folder)).speaker(rec["id"])
    b.delete(rec["id"])
    assert not bundle.exists() and b.list() == []
    for bad_id in ("../" + rec["id"][:61], rec["id"].upper(), rec["id"] + "/x", "", rec["id"] + "\n"):
        with pytest.raises(UserError, match="is not a voice id"):
            check_id(bad_id)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(StoreFailed, match="the voice was not stored"):  # the server answers 500 for it
        VoiceStore(str(blocked), load_model(folder)).create(str(wav), wav.read_bytes(), "hi", "z", 2.0)


def test_gpu_facts_and_gauges_with_a_stand_in_nvml(monkeypatch):
    """No GPU here: the NVML calls run against a stand-in module with NVML's names and units (mW,
    bytes, MHz), so /diagnostics and the GPU gauges are checked for their shape and arithmetic."""
    import types

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from runtime.telemetry import GPU, _Gauges

    nv = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0, nvmlClocksEventReasonGpuIdle=1,
        nvmlClocksEventReasonSwPowerCap=4, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda u: (_ for _ in ()).throw(RuntimeError("no such uuid")),
        nvmlDeviceGetHandleByIndex=lambda i: ("board", i), nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=41),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=20 << 30, total=141 << 30),
        nvmlDeviceGetPowerUsage=lambda h: 431_500, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetClockInfo=lambda h, c: {1: 1755, 2: 3201}[c], nvmlDeviceGetMaxClockInfo=lambda h, c: {1: 1980, 2: 3201}[c],
        nvmlDeviceGetTemperature=lambda h, t: 61, nvmlDeviceGetCurrentClocksEventReasons=lambda h: 4,
        nvmlSystemGetDriverVersion=lambda: "580.159.04")
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    gpu = GPU("cuda:0")
    f = gpu.facts()
    assert f == {"available": True, "name": "NVIDIA H200", "driver": "580.159.04",
                 "clocks_mhz": {"sm": 1755, "memory": 3201, "sm_max": 1980, "memory_max": 3201},
                 "temperature_c": 61, "power_w": 431.5, "power_limit_w": 700.0,
                 "utilization_percent": {"gpu": 87, "memory": 41},
                 "memory_bytes": {"used": 20 << 30, "total": 141 << 30}, "clock_limits": ["power cap"]}
    stats = {"active_streams": 3, "queued": 1, "max_streams": 8}
    t = types.SimpleNamespace(gpu=gpu, ready=True, engine=types.SimpleNamespace(stats=lambda: stats))
    registry = CollectorRegistry()
    registry.register(_Gauges(t))
    got = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert got == {"tts_active_streams": 3, "tts_queue_depth": 1, "tts_max_streams": 8, "tts_ready": 1,
                   "tts_gpu_utilization_percent": 87, "tts_gpu_memory_used_bytes": 20 << 30,
                   "tts_gpu_memory_total_bytes": 141 << 30, "tts_gpu_power_watts": 431.5,
                   "tts_gpu_temperature_celsius": 61, "tts_gpu_sm_clock_mhz": 1755}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py missing: a reason, not an error
    assert GPU("cuda:0").facts()["reason"].startswith("NVML is not available")


def test_warm_up_calls_every_bucket_a_backend_lists():
    """`--warmup full` calls each non-LM graph once per point its backend lists (here two points
    planted on the eager flow backend, which lists none itself), then runs requests alone and at full
    concurrency. The compile backend lists every (batch bucket, padded-length bucket) pair the
    batcher can send, no batch beyond the spec's limit."""
    from models.registry import load_model
    from runtime.backends.compiled import CompiledBackend, bucket_size
    from runtime.engine import Engine
    from runtime.serve import warm_up

    model = load_model("cosyvoice3-tiny")
    engine = Engine(model, "torch", max_streams=2).start()
    try:
        flow = next(g for g, r in engine.pipe.runners.items() if r.spec.stage == "flow" and r.spec.pad is not None)
        runner = engine.pipe.runners[flow]
        assert runner.warm_points(4) == []  # eager: nothing to compile
        pad = runner.spec.pad.dim
        runner.warm_points = lambda rows: [{"B": 1, pad: 16}, {"B": 2, pad: 24}]
        seen = []
        real = engine.pipe.call
        engine.pipe.call = lambda graph, feed: seen.append(  # noqa: E731
            (graph, runner.spec.sizes_of(feed) if graph == flow else None)) or real(graph, feed)
        facts = warm_up(engine, "full")
        engine.pipe.call = real
    finally:
        engine.stop()
    assert facts["graph_calls"] == 2 and facts["requests"] == 3  # one alone, then both streams
    warmed = [sizes for graph, sizes in seen[:2]]
    assert all(graph == flow for graph, _ in seen[:2]) and [(w["B"], w[pad]) for w in warmed] == [(1, 16), (2, 24)]
    spec = model.graph_specs()[flow]
    compiled = CompiledBackend.__new__(CompiledBackend)  # the listing alone: nothing is compiled
    compiled.spec, compiled.rule = spec, spec.pad
    points = compiled.warm_points(64)
    b, n = spec.dim("B"), spec.dim(pad)
    assert {p["B"] for p in points} == {x for x in (1, 2, 4, 8, 16, 32, 64) if b.min <= x <= b.max} | {b.max}
    assert {p[pad] for p in points} == {max(min(bucket_size(k), n.max), k) for k in range(n.min, n.max + 1)}


def test_not_ready_answers_503():
    """Before its start-up has run (here: no lifespan at all) the app answers /health, and says 503
    with Retry-After on /ready and on speech."""
    from starlette.testclient import TestClient

    from models.registry import load_model
    from runtime.engine import Engine
    from runtime.serve import create_app

    app = create_app(Engine(load_model("cosyvoice3-tiny"), "torch", max_streams=1), voices_dir=os.devnull)
    c = TestClient(app)  # not entered: the lifespan (engine start, warm-up) does not run
    assert c.get("/health").status_code == 200
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "warming" and r.headers["retry-after"] == "5"
    r = c.post("/v1/audio/speech", json={"input": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "warming_up" and "retry-after" in r.headers


# -- orpheus ----------------------------------------------------------------------------------------------------
def test_orpheus_named_voices(orpheus):
    base = orpheus.base
    listed = httpx.get(base + "/v1/audio/voices").json()["data"]
    assert [v["id"] for v in listed] == ["default", "tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe"]
    assert {v["type"] for v in listed} == {"builtin"}
    r = speak(base, None, model="orpheus-tiny", voice="leah", response_format="wav", tokens=56)
    assert r.status_code == 200
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 24000 and audio.size > 0
    r = httpx.post(base + "/v1/audio/voices", files={"audio_sample": ("a.wav", prompt_wav())})
    assert r.status_code == 400 and "cannot clone a voice" in r.json()["error"]["message"]
    assert "tara" in r.json()["error"]["message"]


def test_a_request_whose_task_is_cancelled_is_cancelled_in_the_engine():
    """Ray's proxy cancels the replica's task of a client that left: during the engine's submit (in a
    worker thread) the handle it still returns is cancelled, so no row decodes for nobody."""
    import asyncio
    import threading

    from runtime.serve import _submit_or_cancel

    release = threading.Event()

    class FakeHandle:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    handle = FakeHandle()

    def submit(text):
        assert text == "hello"
        release.wait(5)
        return handle

    async def main():
        task = asyncio.create_task(_submit_or_cancel(submit, "hello"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not handle.cancelled  # the submit is still running
        release.set()
        for _ in range(200):
            if handle.cancelled:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert handle.cancelled


def test_an_engine_failure_after_the_first_audio_cuts_the_stream(monkeypatch):
    """The audio so far went out with a 200; when the engine fails after that, the chunked body ends
    without its terminating chunk (the client's HTTP library reports an incomplete body, not a short
    file that looks whole), and an SSE stream ends with an error event instead of speech.audio.done."""
    from models.registry import load_model
    from models.streaming import CosyVoiceStream
    from runtime.engine import Engine
    from runtime.serve import create_app

    chunk = CosyVoiceStream._chunk

    def fails_after_the_first(self, tokens, finalize):
        if self.offset > 0:  # the first chunk went out
            raise RuntimeError("out of memory (simulated)")
        return chunk(self, tokens, finalize)

    monkeypatch.setattr(CosyVoiceStream, "_chunk", fails_after_the_first)
    s = InThread(create_app(Engine(load_model("cosyvoice3-tiny"), "torch", max_streams=2), voices_dir=os.devnull,
                            warmup="none"))
    try:
        body = {"model": "cosyvoice3-tiny", "input": TEXT, "voice": "default", "response_format": "pcm", "seed": 1,
                "tokens": 150}
        got = b""
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", s.base + "/v1/audio/speech", json=body, timeout=60) as r:
                assert r.status_code == 200
                for part in r.iter_raw():
                    got += part
        assert 0 < len(got) < 150 * 960 * 2  # the first chunk's audio, then the cut
        with httpx.stream("POST", s.base + "/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[0]["type"] == "speech.audio.delta" and events[-1]["type"] == "error"
        assert "out of memory (simulated)" in events[-1]["error"]["message"]
        assert not any(e["type"] == "speech.audio.done" for e in events)
        assert httpx.get(s.base + "/health").status_code == 200  # and the server goes on
    finally:
        s.stop()
