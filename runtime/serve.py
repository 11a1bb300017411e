"""python -m runtime.serve: an OpenAI-compatible speech server in front of the engine.

    python -m runtime.serve --model cosyvoice3-tiny [--backend compile:bf16 --device cuda] [--host 127.0.0.1] [--port 8000]

One process, one model, one `runtime.engine.Engine`. `create_app(engine, ...)` builds the FastAPI app
(tests and other hosts can run it under any ASGI server); `main` is the command line, which binds
the socket first (a port in use is one line, before the model loads) and runs uvicorn.

Endpoints (README.md "Serving" shows requests and answers):

- `POST /v1/audio/speech`: OpenAI's body (`model`, `input`, `voice`, `response_format`, `speed`,
  `instructions`, `stream_format`) plus our optional `seed` (same seed, same audio, whatever else the
  server is doing: the engine's per-request random streams), `tokens` (a fixed speech token count: a
  benchmarking knob) and `stream` (false: the complete file with exact headers instead of chunks).
  Audio streams as the engine makes it (chunked transfer) in every format: wav, pcm, flac, mp3, opus
  (runtime/encode.py says what each costs), or as server-sent events (`stream_format: "sse"`).
- `GET /v1/audio/voices`, `POST /v1/audio/voices` (multipart: `audio_sample`, `transcript`, `name`),
  `GET` / `DELETE /v1/audio/voices/{id}`: voices cloned once and stored (runtime/voices.py).
- `GET /v1/models`; `GET /health` (alive), `GET /ready` (loaded and warmed), `GET /metrics`
  (Prometheus), `GET /diagnostics` (GPU facts, stage shares, a verdict), `POST /diagnostics/profile`.

The engine is synchronous and threaded; the event loop never waits on it: `submit` runs in the
thread pool, and each request has a pump thread that reads its audio chunks, encodes them and hands
the bytes to the loop. The response waits for the first audio before it sends its headers, so a
request that fails before any audio (queue timeout, engine failure) still gets its status and JSON
error; after that a failure cuts the chunked stream short (no final chunk: clients see a broken
transfer, not a short file that looks whole). A client that goes away, before or after the first
audio, cancels its request: the engine frees its row at the next step.

Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`), one line each with
the fix: 400 bad input, 401 missing or wrong API key, 404 unknown voice id / path, 409 a profile
already recording, 413 oversized upload or body, 429 engine full (Retry-After), 503 warming up, the
queue wait ran out or the engine is stopping (Retry-After), 500 only for a failure inside the engine,
never with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import click
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import UserError, exit_on_user_error
from runtime.encode import Encoder, available_formats, check_format
from runtime.engine import Engine, EngineFull
from runtime.telemetry import Profiler, Telemetry
from runtime.voices import ID_RE, StoreFailed, VoiceNotFound, VoiceStore

log = logging.getLogger("tts.serve")

SEED_MAX = 2**32 - 1
# OpenAI's model names, answered by the one model this server runs (drop-in clients send them)
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
SPEECH_FIELDS = {"model", "input", "voice", "response_format", "speed", "instructions", "stream_format", "seed",
                 "tokens", "stream"}
VOICE_FIELDS = {"audio_sample", "transcript", "name", "consent", "type"}
JSON_BODY_LIMIT = 1 << 20
WARM_TEXT = "Warm up every graph the engine will need before the first listener arrives."


@dataclass
class ServeConfig:
    """What the server needs besides the engine (the command line fills it; tests pass their own)."""

    voices_dir: str = "voices"
    api_key: str | None = None
    max_input_chars: int = 4096  # OpenAI's limit
    max_upload_bytes: int = 10 << 20
    warmup: str = "full"  # full | requests | none
    aliases: tuple[str, ...] = OPENAI_MODELS
    diagnostics_window: int = 50
    profile_dir: str | None = None
    max_profile_requests: int = 1000
    # set when the app runs as one of several replicas (runtime/serve_ray.py): facts about this replica
    # ({"replica_id", "pid", ...}), shown in /diagnostics; the id is sent as X-TTS-Replica on every answer
    replica_facts: object = None
    # set with replica_facts: a callable returning {replica id: its /metrics text} for every live
    # replica; GET /metrics?scope=cluster merges them (each sample labelled with its replica)
    cluster_metrics: object = None
    # set with replica_facts: the other replicas' profiles (`statuses() -> {replica id: profile status}`,
    # `trace(replica id) -> bytes | None`), so a profile recorded by one replica can be followed and
    # downloaded through whichever replica the router picks
    peer_profiles: object = None


# -- errors ------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# the shared model code names the command line's options in its fixes; over HTTP they are body fields
_CLI_WORDS = [("--prompt-wav", "audio_sample"), ("--prompt-text", "transcript"), ("--text", "input"),
              ("--voice", "voice"), ("--tokens", "tokens")]


def http_words(message: str) -> str:
    for cli, field in _CLI_WORDS:
        message = message.replace(cli, field)
    return message


def bad(e: UserError, param: str | None = None, code: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, http_words(str(e)), param, code)


def retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# -- the server's state ----------------------------------------------------------------------------------
class Server:
    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.model, self.cfg = engine, engine.model, config
        self.store = VoiceStore(config.voices_dir, engine.model)
        self.telemetry = Telemetry(engine, window=config.diagnostics_window)
        self.profiler = Profiler(engine.device, config.profile_dir)
        self.ready = threading.Event()
        self.failed: str | None = None
        self.phase = "starting"
        self.started_engine = False
        self.warm_facts: dict = {}
        self.on_failure = None  # the command line stops uvicorn with it
        self._ids = iter(range(1, 1 << 62))

    # start-up, in a thread of its own (the event loop answers /health meanwhile)
    def prepare(self) -> None:
        if self.ready.is_set() or self.failed:  # done already (a Ray replica prepares in its constructor)
            return
        try:
            t0 = time.perf_counter()
            if not self.engine.running:
                self.phase = "starting the engine"
                self.engine.start()
                self.started_engine = True
            self.warm_facts = warm_up(self.engine, self.cfg.warmup, lambda p: setattr(self, "phase", p))
            if self.model.zero_shot:
                self.phase = "hashing the model for the voice store"
                _ = self.store.fingerprint
            self.warm_facts["seconds"] = round(time.perf_counter() - t0, 2)
            self.phase = "ready"
            self.telemetry.ready = True
            self.ready.set()
            log.info("ready: %s", self.warm_facts)
        except Exception as e:  # noqa: BLE001 - a start-up failure is one line, and the process ends
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.failed = first if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
            self.phase = "failed"
            log.error("start-up failed: %s", self.failed)
            if self.on_failure is not None:
                self.on_failure(self.failed)

    def shutdown(self) -> None:
        self.profiler.cancel()
        self.profiler.remove_files()
        if self.started_engine and self.engine.running:
            self.engine.stop()

    def require_ready(self) -> None:
        if self.failed:
            raise ApiError(503, f"the server failed to start: {self.failed}", code="server_failed",
                           kind="server_error")
        if not self.ready.is_set():
            raise ApiError(503, f"the server is warming up ({self.phase}).", code="warming_up", kind="server_error",
                           headers=retry_after(5))

    def next_id(self) -> int:
        return next(self._ids)


def warm_up(engine: Engine, mode: str, phase=lambda p: None) -> dict:
    """Make every graph the engine will run exist before the first request: the LM's decode buckets
    are captured by `Engine.start`; here every other graph is called once per shape bucket its
    backend compiles or captures (`Backend.warm_points`: nothing for eager and artifact backends),
    then synthetic requests run through the whole engine, alone and at full concurrency, so the
    batcher's paths, the prefill and the stream decoders have run once too."""
    facts = {"mode": mode, "graph_calls": 0, "requests": 0}
    if mode in ("full",):
        facts["graph_calls"] = engine.warm_graphs(phase=phase)
    if mode in ("full", "requests"):
        tokens = max(8, int(engine.model.token_rate() * 2))  # two seconds: a first chunk and a later one
        for level in sorted({1, engine.max_streams}):
            phase(f"warming with {level} concurrent request(s)")
            handles = [engine.submit(WARM_TEXT, seed=i, fixed_tokens=tokens) for i in range(level)]
            for h in handles:
                h.audio()
            facts["requests"] += level
    return facts


# -- request parsing ------------------------------------------------------------------------------------------
@dataclass
class SpeechRequest:
    input: str
    voice: str
    response_format: str
    stream_format: str
    seed: int
    tokens: int | None
    stream: bool


def _type_error(field: str, want: str, value) -> ApiError:
    return ApiError(400, f"{field} must be {want}, not {type(value).__name__} {json.dumps(value)[:60]}. Fix: send "
                         f"{field} as {want}.", field, "invalid_type")


def parse_speech(body, srv: Server) -> SpeechRequest:
    """Check an OpenAI speech body (plus our fields); every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object (OpenAI's speech request).", None, "invalid_body")
    unknown = sorted(set(body) - SPEECH_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; a speech request takes "
                            f"{', '.join(sorted(SPEECH_FIELDS))}. Fix: leave out {', '.join(unknown)}.", unknown[0],
                       "unknown_parameter")
    model = srv.model
    name = body.get("model")
    if name is not None:
        served = [model.name, *srv.cfg.aliases]
        if not isinstance(name, str):
            raise _type_error("model", "a string", name)
        if name not in served:
            raise ApiError(400, f"model {name!r} is not served here; this server runs {model.name} (also answering "
                                f"to {', '.join(srv.cfg.aliases)}). Fix: pass model {model.name!r}.", "model",
                           "model_not_found")
    text = body.get("input")
    if text is None:
        raise ApiError(400, "input is missing: the text to speak. Fix: pass input.", "input", "missing_required_parameter")
    if not isinstance(text, str):
        raise _type_error("input", "a string", text)
    if not text.strip():
        raise ApiError(400, "input is empty. Fix: pass some words to speak.", "input", "empty_input")
    limit = srv.cfg.max_input_chars
    if len(text) > limit:
        raise ApiError(400, f"input is {len(text)} characters long; the limit is {limit}. Fix: split the text "
                            f"into several requests.", "input", "input_too_long")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON \\ud800 escape: the tokenizer would fail
        raise ApiError(400, f"input holds an unpaired surrogate (U+{ord(text[e.start]):04X} at character {e.start}). "
                            "Fix: send valid Unicode text.", "input", "invalid_input") from None
    voice = body.get("voice", "default")
    if isinstance(voice, dict) and set(voice) == {"id"}:  # OpenAI's custom voice object {"id": ...}
        voice = voice["id"]
    if not isinstance(voice, str):
        raise _type_error("voice", 'a voice name or {"id": ...}', voice)
    fmt = body.get("response_format", "mp3")  # OpenAI's default
    if not isinstance(fmt, str):
        raise _type_error("response_format", "a string", fmt)
    try:
        check_format(fmt)
    except UserError as e:
        raise bad(e, "response_format", "unsupported_format") from None
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise _type_error("speed", "a number", speed)
    if speed != 1.0:
        raise ApiError(400, f"speed {speed} is not available: {model.name} ({model.family}) has no speed control, "
                            "and this server does not time-stretch audio behind your back. Fix: leave speed out or "
                            "pass 1.0 (and change the speed on the client if you must).", "speed", "unsupported_value")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _type_error("instructions", "a string", instructions)
    if instructions and instructions.strip():
        raise ApiError(400, f"instructions are not used by {model.name} ({model.family}): no model family here "
                            "takes style instructions. Fix: leave instructions out.", "instructions",
                       "unsupported_parameter")
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, f"stream_format {str(stream_format)[:40]!r} is not one of audio, sse. Fix: pass audio "
                            "(chunked bytes, the default) or sse (server-sent events).", "stream_format",
                       "unsupported_value")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(SEED_MAX + 1)  # OpenAI's behaviour: new audio each time; the header tells it
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ApiError(400, f"seed {json.dumps(seed)[:40]} is not an integer from 0 to {SEED_MAX}. Fix: pass one "
                            "in that range, or leave seed out for a random one.", "seed", "invalid_value")
    tokens = body.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ApiError(400, f"tokens {json.dumps(tokens)[:40]} is not a positive integer (a fixed count of speech "
                            "tokens per sentence, for benchmarks). Fix: leave it out.", "tokens", "invalid_value")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise _type_error("stream", "true or false", stream)
    return SpeechRequest(text, voice, fmt, stream_format, seed, tokens, stream)


def resolve_voice(voice: str, srv: Server) -> dict:
    """Engine.submit keyword arguments for a voice name: the family's default speaker, a named voice,
    or a stored voice's conditioning."""
    if voice == "default":
        return {}
    if voice in srv.model.named_voices():
        return {"voice": voice}
    if ID_RE.fullmatch(voice):
        try:
            return {"speaker": dict(srv.store.speaker(voice))}  # a copy per request: the cached one stays as stored
        except VoiceNotFound:
            pass  # said below, with the names on offer
        except UserError as e:
            raise bad(e, "voice", "voice_unusable") from None
    named = ", ".join(("default", *srv.model.named_voices()))
    shown = voice if len(voice) <= 80 else voice[:80] + "..."
    raise ApiError(400, f"unknown voice {shown!r} ({srv.model.name} knows {named} and the voices created on it). "
                        "Fix: pick one from GET /v1/audio/voices.", "voice", "voice_not_found")


async def read_limited(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 beyond `limit` bytes (by its Content-Length before reading,
    or while reading a chunked upload)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the {what} is {int(length)} bytes; the limit is {limit}. Fix: send a smaller one.",
                       None, "payload_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the {what} is larger than the limit of {limit} bytes. Fix: send a smaller one.",
                           None, "payload_too_large")
    return bytes(body)


# -- streaming ----------------------------------------------------------------------------------------------------
_END = object()
_GONE = object()


class _Pump(threading.Thread):
    """Reads one request's chunks from the engine (blocking), encodes them and posts the bytes to the
    event loop's queue; ends with _END or the request's exception."""

    def __init__(self, handle, encoder: Encoder, loop: asyncio.AbstractEventLoop):
        super().__init__(name=f"tts-pump-{handle.id}", daemon=True)
        self.handle, self.encoder, self.loop = handle, encoder, loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def run(self) -> None:
        try:
            while True:
                chunk = self.handle.get()
                if chunk is None:
                    break
                data = self.encoder.feed(chunk.numpy())
                if data:
                    self._post(data)
            tail = self.encoder.finish()
            if tail:
                self._post(tail)
            self._post(_END)
        except BaseException as e:  # noqa: BLE001 - the request's failure goes to its response
            self.encoder.close()
            self._post(e)

    def _post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is stopping
            self.handle.cancel()


async def next_item(pump: _Pump, request: Request, poll: float = 0.1):
    """The pump's next item, or _GONE if the client disconnected while we waited (its request is
    cancelled then)."""
    getter = asyncio.ensure_future(pump.queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=poll)
            if done:
                return getter.result()
            if await request.is_disconnected():
                pump.handle.cancel()
                return _GONE
    finally:
        if not getter.done():
            getter.cancel()


class _Aborted(Exception):
    """The engine failed after the headers went out: the stream ends without its final chunk."""


class AudioStream(StreamingResponse):
    """A StreamingResponse that always watches for the client going away and cancels the request from
    there (Starlette's watches only for servers declaring ASGI spec < 2.4, and otherwise notices at
    the next send), that ends a failed stream without the final chunk, and that reports its end even
    when the body never started."""

    def __init__(self, content, on_disconnect, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_disconnect, self.on_close = on_disconnect, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away during a send
                        self.on_disconnect()
                    except _Aborted as e:
                        log.warning("stream cut short: %s", e)
                    finally:
                        tg.cancel_scope.cancel()

                async def watch():
                    try:
                        await self.listen_for_disconnect(receive)
                    except Exception:  # noqa: BLE001 - Ray Serve's receive raises once its client left: gone
                        pass
                    self.on_disconnect()
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        except BaseException:  # cancelled from outside (Ray's proxy, when its client left): the request goes
            self.on_disconnect()
            raise
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()  # also when the body never started (the client left before the headers)


UPLOAD_MAX_SECONDS = 120  # a decode bound for voice uploads; each family refuses what it cannot use below it


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


async def speech(request: Request, srv: Server):
    srv.require_ready()
    arrived = time.perf_counter()
    raw = await read_limited(request, JSON_BODY_LIMIT, "request body")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:100]}).", None, "invalid_json") from None
    except RecursionError:  # [[[[... deeper than Python's parser goes: not a request anyone means
        raise ApiError(400, "the request body is not valid JSON (nested too deeply).", None, "invalid_json") from None
    req = parse_speech(body, srv)
    voice = await run_in_threadpool(resolve_voice, req.voice, srv)
    engine = srv.engine
    try:
        handle = await _submit_or_cancel(engine.submit, req.input, seed=req.seed, fixed_tokens=req.tokens,
                                         stream=True, **voice)
    except EngineFull as e:
        raise ApiError(429, http_words(str(e)), None, "engine_full", "rate_limit_error",
                       retry_after(e.retry_after)) from None
    except UserError as e:
        raise bad(e, e.param or "input", "invalid_input") from None
    key = srv.next_id()
    srv.telemetry.request_started(key)
    pump = _Pump(handle, Encoder(req.response_format, srv.model.sample_rate, streaming=req.stream),
                 asyncio.get_running_loop())
    pump.start()
    state = {"first": None, "outcome": "failed", "ended": False}

    def ended():
        """Once per request, however it ends: a request that did not complete is cancelled (its row
        freed), and the metrics, diagnostics window and profiler hear of it."""
        if state["ended"]:
            return
        state["ended"] = True
        if state["outcome"] != "completed":
            handle.cancel()
        first = None if state["first"] is None else state["first"] - arrived
        srv.telemetry.request_ended(key, first, handle.stats.audio_seconds, state["outcome"], req.stream)
        srv.profiler.request_ended(arrived)

    try:
        return await _respond(request, srv, req, handle, pump, state, ended, arrived)
    except BaseException:  # cancelled (Ray's proxy cancels the task of a client that left) or failed
        if not state["ended"]:  # before the response took over: the request must not run for nobody
            if state["outcome"] == "failed":
                state["outcome"] = "cancelled"
            ended()
        raise


async def _submit_or_cancel(submit, *args, **kwargs):
    """`submit` in a worker thread; if this task is cancelled meanwhile (the client left), the handle
    the thread still returns is cancelled then, instead of running a request nobody will read."""
    future = asyncio.get_running_loop().run_in_executor(None, lambda: submit(*args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().cancel())
        raise


async def _respond(request, srv, req, handle, pump, state, ended, arrived):
    """The response of a submitted request (its first item decides the status)."""
    first = await next_item(pump, request)
    if first is _GONE or isinstance(first, BaseException):
        state["outcome"] = "cancelled" if first is _GONE else "failed"
        ended()
        if first is _GONE:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        raise _failure(first)
    headers = {"X-Seed": str(req.seed), "X-Request-Id": str(handle.id), "X-Sample-Rate": str(srv.model.sample_rate),
               "Cache-Control": "no-store"}
    media = "text/event-stream" if req.stream_format == "sse" else check_format(req.response_format)

    if not req.stream:  # the complete file: every item, then one response with its length
        parts, item = [], first
        while item is not _END:
            if item is _GONE:
                state["outcome"] = "cancelled"
                ended()
                return Response(status_code=499)
            if isinstance(item, BaseException):
                ended()
                raise _failure(item)
            parts.append(item)
            item = await next_item(pump, request)
        data = b"".join(parts)
        state["outcome"] = "completed"
        ended()
        if req.stream_format == "sse":
            data = sse(_delta(data)) + sse(_done(handle))
        return Response(data, media_type=media, headers=headers)

    async def body_iter():
        item = first
        try:
            while item is not _END:
                if isinstance(item, BaseException):
                    if req.stream_format == "sse":
                        err = _failure(item)
                        yield sse({"type": "error", "error": {"message": err.message, "type": err.kind,
                                                              "code": err.code}})
                        return
                    raise _Aborted(str(item))
                if state["first"] is None:
                    state["first"] = time.perf_counter()
                yield sse(_delta(item)) if req.stream_format == "sse" else item
                item = await pump.queue.get()
            if req.stream_format == "sse":
                yield sse(_done(handle))
            state["outcome"] = "completed"
        finally:
            ended()

    def gone():
        if not state["ended"]:
            state["outcome"] = "cancelled"
        handle.cancel()

    return AudioStream(body_iter(), gone, ended, media_type=media, headers=headers)


def _delta(data: bytes) -> dict:
    return {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}


def _done(handle) -> dict:
    tokens = sum(len(t) for t in handle.stats.tokens)
    return {"type": "speech.audio.done", "usage": {"output_tokens": tokens,
                                                   "audio_seconds": round(handle.stats.audio_seconds, 3)}}


def _failure(e: BaseException) -> ApiError:
    """The status of a request that failed before its first audio."""
    if isinstance(e, EngineFull):  # waited too long for a row, or the engine is stopping
        return ApiError(503, http_words(str(e)), None, "engine_busy", "server_error", retry_after(e.retry_after))
    if isinstance(e, UserError):
        return ApiError(500, http_words(str(e)), None, "engine_error", "server_error")
    return ApiError(500, f"the request failed inside the server ({type(e).__name__}). Fix: see the server log.",
                    None, "internal_error", "server_error")


# -- voices -----------------------------------------------------------------------------------------------------
def builtin_voices(srv: Server) -> list[dict]:
    return [{"id": v, "object": "audio.voice", "name": v, "type": "builtin", "model": srv.model.name}
            for v in ("default", *srv.model.named_voices())]


async def create_voice(request: Request, srv: Server):
    srv.require_ready()
    model = srv.model
    if not model.zero_shot:
        named = ", ".join(("default", *model.named_voices()))
        raise ApiError(400, f"{model.name} ({model.family}) cannot clone a voice from a recording here. Fix: use one "
                            f"of its voices: {named}.", None, "zero_shot_unsupported")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(400, "a voice is created from a multipart/form-data upload (fields audio_sample, transcript, "
                            f"name), not {ctype or 'a body without a content type'}.", None, "invalid_content_type")
    raw = await read_limited(request, srv.cfg.max_upload_bytes, "upload")

    async def replay():
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=len(VOICE_FIELDS))
    except StarletteHTTPException as e:
        raise ApiError(400, f"the upload is not a valid multipart form ({e.detail}).", None, "invalid_form") from None
    try:
        unknown = sorted(set(form.keys()) - VOICE_FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; a voice takes audio_sample, transcript, name "
                                f"(consent is accepted and unused). Fix: leave out {', '.join(unknown)}.", unknown[0],
                           "unknown_parameter")
        kind = form.get("type", "audio_sample")
        if kind != "audio_sample":
            raise ApiError(400, f"voice type {str(kind)[:40]!r} is not supported: voices are cloned from a recording "
                                "(audio_sample).", "type", "unsupported_value")
        upload = form.get("audio_sample")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "audio_sample is missing: the prompt recording, as a file field. Fix: upload it "
                                "as audio_sample.", "audio_sample", "missing_required_parameter")
        transcript = form.get("transcript", "")
        name = form.get("name", "")
        if not isinstance(transcript, str) or not isinstance(name, str):
            raise ApiError(400, "transcript and name are text fields, not files.", "transcript", "invalid_type")
        if len(transcript) > srv.cfg.max_input_chars:
            raise ApiError(400, f"transcript is {len(transcript)} characters long; the limit is "
                                f"{srv.cfg.max_input_chars}.", "transcript", "input_too_long")
        if len(name) > 200:
            raise ApiError(400, "name is longer than 200 characters.", "name", "invalid_value")
        audio = await upload.read()
        filename = upload.filename or ""
    finally:
        await form.close()
    record, created = await run_in_threadpool(_clone, srv, audio, filename, transcript.strip(), name.strip())
    return JSONResponse({**record, "created": created}, status_code=201 if created else 200)


def _clone(srv: Server, audio: bytes, filename: str, transcript: str, name: str) -> tuple[dict, bool]:
    """Decode-check the upload (a clear 400 instead of a failure deep in the front end), then let the
    store make or find the voice. The recording goes to a private temporary file because the family
    reads a path; its name never appears in a message."""
    import io

    import numpy as np
    import soundfile as sf

    from models.audio import PROMPT_MIN_SECONDS

    if not audio:
        raise ApiError(400, "audio_sample is empty. Fix: upload a recording of a few seconds.", "audio_sample",
                       "invalid_audio")
    try:
        # the length first, from the header: a small compressed file can decode to hours (GBs of
        # float32), and no family takes a prompt of more than UPLOAD_MAX_SECONDS
        info = sf.info(io.BytesIO(audio))
        if info.samplerate > 0 and info.frames > UPLOAD_MAX_SECONDS * info.samplerate:
            raise ApiError(400, f"audio_sample is {info.frames / info.samplerate:.0f} s long. Fix: upload a recording "
                                f"of a few seconds (the model takes at most tens of seconds).", "audio_sample",
                           "audio_too_long")
        data, rate = sf.read(io.BytesIO(audio), dtype="float32", always_2d=True)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - soundfile raises its own error types
        why = str(getattr(e, "error_string", "") or str(e).splitlines()[0])[:120]  # without the BytesIO's repr
        raise ApiError(400, f"audio_sample cannot be decoded as audio ({why}). Fix: upload a WAV, FLAC, OGG or MP3 "
                            "file.", "audio_sample", "invalid_audio") from None
    if data.size == 0 or not np.isfinite(data).all():
        raise ApiError(400, "audio_sample holds no samples or NaN / infinite ones. Fix: upload a clean recording.",
                       "audio_sample", "invalid_audio")
    seconds = data.shape[0] / rate
    if seconds < PROMPT_MIN_SECONDS:
        raise ApiError(400, f"audio_sample is {seconds * 1000:.0f} ms long; at least {PROMPT_MIN_SECONDS} s are "
                            "needed. Fix: upload a few seconds of clean speech.", "audio_sample", "audio_too_short")
    ext = os.path.splitext(filename)[1].lower()
    ext = ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".wav"
    folder = tempfile.mkdtemp(prefix="tts-voice-")
    path = os.path.join(folder, "prompt" + ext)
    try:
        with open(path, "wb") as f:
            f.write(audio)
        name = name or f"voice-{secrets.token_hex(3)}"
        try:
            return srv.store.create(path, audio, transcript, name, seconds)
        except StoreFailed as e:
            raise ApiError(500, str(e), None, "voice_store_failed", "server_error") from None
        except UserError as e:
            msg = http_words(str(e)).replace(f"audio file {path}", "audio_sample").replace(path, "audio_sample")
            raise ApiError(400, msg, "audio_sample", "invalid_voice") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _voice_id(value: str, srv: Server) -> str:
    if value in ("default", *srv.model.named_voices()):
        raise ApiError(400, f"{value!r} is a built-in voice of {srv.model.name}; only created voices can be deleted.",
                       "voice_id", "builtin_voice")
    if not ID_RE.fullmatch(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ApiError(400, f"{shown!r} is not a voice id (64 hex digits). Fix: use an id from GET /v1/audio/voices.",
                       "voice_id", "invalid_voice_id")
    return value


# -- the app --------------------------------------------------------------------------------------------------------
_ROUTES = [(re.compile(r"^/v1/audio/voices/[^/]+$"), "/v1/audio/voices/{id}")]
_KNOWN = {"/v1/audio/speech", "/v1/audio/voices", "/v1/models", "/health", "/ready", "/metrics", "/diagnostics",
          "/diagnostics/profile", "/diagnostics/profile/trace"}
_OPEN = {"/health", "/ready"}


def endpoint_label(path: str) -> str:
    """A bounded label for the requests counter (never the raw path: ids and typos would explode it)."""
    if path in _KNOWN:
        return path
    for pattern, label in _ROUTES:
        if pattern.match(path):
            return label
    return "other"


class Gate:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide disconnects from streaming responses):
    the API key, and the requests counter by endpoint and status."""

    def __init__(self, app, srv: Server):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self.srv.cfg.api_key
            if key and scope["path"] not in _OPEN and not self._authorized(scope, key):
                await self._unauthorized(scope)(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.srv.telemetry.requests.labels(endpoint_label(scope["path"]), str(status["code"])).inc()

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value.decode("latin-1")
                if given[:7].lower() == "bearer ":
                    return hmac.compare_digest(given[7:].strip().encode(), key.encode())
        return False

    @staticmethod
    def _unauthorized(scope) -> JSONResponse:
        has = any(name == b"authorization" for name, _ in scope.get("headers", []))
        msg = ("the API key is wrong." if has else "an API key is required: this server was started with one.")
        err = ApiError(401, f"{msg} Fix: send the header 'Authorization: Bearer <key>' with the server's key "
                            "(the openai client: api_key=...).", None, "invalid_api_key")
        err.headers = {"WWW-Authenticate": "Bearer"}
        return err.response()


class NameTheReplica:
    """ASGI middleware: X-TTS-Replica on every HTTP answer (which replica of several served it)."""

    def __init__(self, app, replica_id: str):
        self.app, self.header = app, (b"x-tts-replica", replica_id.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def create_app(engine: Engine, config: ServeConfig | None = None, **overrides) -> FastAPI:
    """The FastAPI app serving `engine` (started by the app's lifespan when it is not running yet,
    then warmed; stopped at shutdown if the app started it). `overrides` set ServeConfig fields."""
    cfg = config or ServeConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if cfg.warmup not in ("full", "requests", "none"):
        raise UserError(f"unknown warm-up {cfg.warmup!r}.", "choose full, requests or none")
    srv = Server(engine, cfg)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=srv.prepare, name="tts-start", daemon=True).start()
        yield
        await run_in_threadpool(srv.shutdown)

    app = FastAPI(title="tts-engines speech server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    own_replica = str(cfg.replica_facts().get("replica_id", "")) if cfg.replica_facts else None
    if own_replica is not None:
        # plain ASGI, not @app.middleware: that wrapper would sit between the streaming response and
        # the client's disconnect message
        app.add_middleware(NameTheReplica, replica_id=own_replica)

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return bad(e).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return ApiError(400, f"{where or 'the request'}: {first.get('msg', 'invalid')}.", where, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        what = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}."
        if e.status_code == 404:
            msg += " Fix: see GET /docs for the endpoints."
        return ApiError(e.status_code, msg, None, what).response()

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error ({type(e).__name__}). Fix: see the server log.", None, "internal_error",
                        "server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if srv.failed:
            return JSONResponse({"status": "failed", "error": srv.failed}, status_code=503)
        if not srv.ready.is_set():
            return JSONResponse({"status": "warming", "phase": srv.phase}, status_code=503, headers=retry_after(5))
        return {"status": "ready", "model": srv.model.name, "warmup": srv.warm_facts}

    @app.get("/metrics")
    async def metrics(scope: str = "replica"):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from runtime.telemetry import merge_expositions

        if scope not in ("replica", "cluster"):
            raise ApiError(400, f"unknown metrics scope {scope!r}. Fix: pass scope=replica (this server, the default) "
                                "or scope=cluster (every replica).", "scope", "invalid_scope")
        if scope == "cluster":
            if not cfg.cluster_metrics:
                raise ApiError(400, "scope=cluster needs a server with replicas; this one runs alone. Fix: use /metrics "
                                    "(or start it with --ray).", "scope", "no_replicas")
            texts = await run_in_threadpool(cfg.cluster_metrics)
            data = await run_in_threadpool(merge_expositions, texts)
            return Response(data.encode(), media_type=CONTENT_TYPE_LATEST)
        data = await run_in_threadpool(generate_latest, srv.telemetry.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "tts-engines",
                                            "root": srv.model.name} for n in (srv.model.name, *cfg.aliases)]}

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        return await speech(request, srv)

    @app.get("/v1/audio/voices")
    async def list_voices():
        stored = await run_in_threadpool(srv.store.list) if srv.model.zero_shot else []
        return {"object": "list", "data": builtin_voices(srv) + stored}

    @app.post("/v1/audio/voices")
    async def post_voice(request: Request):
        return await create_voice(request, srv)

    @app.get("/v1/audio/voices/{voice_id}")
    async def get_voice(voice_id: str):
        for v in builtin_voices(srv):
            if v["id"] == voice_id:
                return v
        vid = _voice_id(voice_id, srv)
        try:
            return await run_in_threadpool(srv.store.record, vid)
        except VoiceNotFound as e:
            raise bad(e, "voice_id", "voice_not_found", 404) from None

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        vid = _voice_id(voice_id, srv)
        try:
            await run_in_threadpool(srv.store.delete, vid)
        except VoiceNotFound as e:
            raise bad(e, "voice_id", "voice_not_found", 404) from None
        except StoreFailed as e:
            raise ApiError(500, str(e), None, "voice_store_failed", "server_error") from None
        return {"id": vid, "object": "audio.voice.deleted", "deleted": True}

    @app.get("/diagnostics")
    async def diagnostics():
        import torch

        t = srv.telemetry
        gpu, summary = await run_in_threadpool(lambda: (t.gpu.facts(), t.summary()))
        return {"model": srv.model.describe(), "device": str(engine.device), "backends": engine.pipe.describe_backends(),
                "torch": torch.__version__, "ready": srv.ready.is_set(), "phase": srv.phase, "gpu": gpu, **summary,
                "profile": srv.profiler.status(),
                # shapes met in service (Engine new_shapes): eager calls, keys waiting for a capture
                "new_shapes": engine.new_shape_stats(),
                # flow_mode prefix: what the streams keep between chunks, against its budget
                **({"stream_state": engine.state_budget.stats()} if engine.state_budget is not None else {}),
                **({"replica": await run_in_threadpool(cfg.replica_facts)} if cfg.replica_facts else {})}

    async def profile_view() -> dict:
        """This replica's profile status; behind a router, which replica that is and every replica's."""
        out = srv.profiler.status()
        if own_replica is not None:
            out["replica"] = own_replica
            if out.get("download"):
                out["download"] += f"?replica={own_replica}"
        if cfg.peer_profiles is not None:
            try:
                out["replicas"] = await run_in_threadpool(cfg.peer_profiles.statuses)
            except Exception as e:  # noqa: BLE001 - the others' statuses are extra facts: say why they are missing
                out["replicas_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        return out

    @app.post("/diagnostics/profile", status_code=202)
    async def start_profile(requests: int = 10):
        if not 1 <= requests <= cfg.max_profile_requests:
            raise ApiError(400, f"requests={requests} is outside 1..{cfg.max_profile_requests}.", "requests",
                           "invalid_value")
        try:
            started = srv.profiler.start(requests)
        except Exception as e:  # noqa: BLE001 - the profiler itself failed to start
            raise ApiError(500, f"the torch profiler did not start ({type(e).__name__}: {str(e)[:160]}).", None,
                           "profiler_failed", "server_error") from None
        if not started:
            raise ApiError(409, f"a profile is already being recorded ({srv.profiler.done} of {srv.profiler.wanted} "
                                "requests). Fix: wait for it, or DELETE /diagnostics/profile.", None, "profile_running")
        return await profile_view()

    @app.get("/diagnostics/profile")
    async def profile_status():
        return await profile_view()

    @app.delete("/diagnostics/profile")
    async def cancel_profile():
        cancelled = await run_in_threadpool(srv.profiler.cancel)
        return {**srv.profiler.status(), "cancelled": cancelled}

    @app.get("/diagnostics/profile/trace")
    async def profile_trace(replica: str | None = None):
        p = srv.profiler
        if replica is not None and replica != own_replica:
            # recorded by another replica (a router sent this request here): its trace, through the peers
            if cfg.peer_profiles is None:
                raise ApiError(404, f"replica={replica!r} is not this server's (it is not one of several replicas). "
                                    "Fix: leave replica out.", "replica", "unknown_replica")
            try:
                data = await run_in_threadpool(cfg.peer_profiles.trace, replica)
            except Exception as e:  # noqa: BLE001 - the owner went away with its trace
                raise ApiError(404, f"the trace of replica {replica} cannot be fetched ({type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}). Fix: record a "
                                    "new profile.", "replica", "profile_not_ready") from None
            if data is None:
                raise ApiError(404, f"replica {replica} has no trace ready (GET /diagnostics/profile lists every "
                                    "replica's state). Fix: wait until its state is ready, or record one with POST "
                                    "/diagnostics/profile?requests=N.", "replica", "profile_not_ready")
            return Response(data, media_type="application/json",
                            headers={"content-disposition": f'attachment; filename="trace-{replica}.json"'})
        if p.state != "ready":
            raise ApiError(409 if p.state in ("recording", "writing") else 404,
                           f"no trace to download (profile {p.state}, {p.done} of {p.wanted} requests recorded). "
                           "Fix: POST /diagnostics/profile?requests=N, send N requests, then download.", None,
                           "profile_not_ready")
        return FileResponse(p.path, media_type="application/json", filename=os.path.basename(p.path))

    # outside FastAPI's own middleware: 404s and 401s are counted too
    app.add_middleware(Gate, srv=srv)
    return app


# -- the command line ---------------------------------------------------------------------------------------------
def bind(host: str, port: int):
    """The listening socket, bound before the model loads: a port in use is one line, at once, and
    --port 0 picks a free one (printed)."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port.", "pass a port from 1 to 65535 (0: any free port)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} cannot be resolved ({e.strerror}).",
                        "pass an address such as 127.0.0.1, or 0.0.0.0 for every interface") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "is in use", errno.EACCES: "needs privileges (ports below 1024)",
               errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(e.errno, e.strerror)
        raise UserError(f"cannot listen on {host}:{port}: it {why}.", "pass another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--model", "model_name", default="cosyvoice3-tiny", show_default=True,
              help="Preset name or an upstream model folder.")
@click.option("--backend", "backends", default="torch", show_default=True,
              help="As for runtime.synthesize; the LM stage runs with torch, cudagraph or compile (the engine's slot cache).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--engines-dir", default=None, help="Folder with exported artifacts (default engines/<model>).")
@click.option("--precision", default="fp32", show_default=True, help="Artifact precision for ort/trt backends.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; set --api-key then).")
@click.option("--port", default=8000, show_default=True, help="TCP port (0: any free port, printed).")
@click.option("--api-key", envvar="TTS_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health and /ready "
                   "(or set TTS_API_KEY).")
@click.option("--voices-dir", default="voices", show_default=True,
              help="Where created voices are stored (several servers may share it).")
@click.option("--max-streams", default=None, type=int, help="Requests generated at once (default: from memory).")
@click.option("--max-queue", default=None, type=int, help="Requests waiting for a stream (default 4x streams).")
@click.option("--max-len", default=None, type=int, help="KV cache columns per stream (prompt + tokens).")
@click.option("--queue-timeout", default=30.0, show_default=True, help="Seconds a request may wait for a stream.")
@click.option("--max-input-chars", default=4096, show_default=True, help="Longest input text.")
@click.option("--max-upload-mb", default=10.0, show_default=True, help="Largest voice upload.")
@click.option("--warmup", default="full", show_default=True, type=click.Choice(["full", "requests", "none"]),
              help="full: every shape bucket of every compiled graph, then requests alone and at full "
                   "concurrency; requests: only those; none: only the LM's decode graphs.")
@click.option("--new-shapes", default="capture", show_default=True, type=click.Choice(["capture", "defer"]),
              help="A flow / vocoder shape the warm-up did not meet: capture (or compile) it in the request's call, "
                   "or defer: run it uncompiled now and capture it when the engine is idle (or at its third call).")
@click.option("--flow-mode", default=None, type=click.Choice(["solver", "steps", "prefix"]),
              help="CosyVoice flow: one-graph solver (default), per-step calls, or prefix: each chunk solves its new "
              "frames only against what its stream kept (CosyVoice3, flow=torch).")
@click.option("--stream-state-gb", default=None, type=float,
              help="With --flow-mode prefix: GiB all streams may keep (default: half the device memory free at the first request); a "
              "stream past it recomputes its frames.")
@click.option("--threads", default=None, type=int, help="CPU threads per operator (torch.set_num_threads).")
@click.option("--seed", default=0, show_default=True, help="Seed of a preset's random weights.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve through Ray Serve: one engine per replica (runtime/serve_ray.py).")
@click.option("--replicas", default=None, type=int, help="With --ray: replicas (default 1; one GPU each on cuda).")
@click.option("--autoscale", default=None, help="With --ray: MIN,MAX replicas, scaled on ongoing requests.")
@click.option("--address", default=None, help="With --ray: a running Ray cluster (HEAD:6379); default: start one here.")
@click.option("--replica-cpus", default=1.0, show_default=True, help="With --ray: CPU cores per replica.")
@click.option("--placement", default=None, type=click.Choice(["replicated", "disaggregated"]),
              help="With --ray: replicated (default): one full engine per replica; disaggregated: --lm-replicas LM "
                   "replicas streaming tokens to --replicas token2wav replicas (the HTTP ingress).")
@click.option("--lm-replicas", default=None, type=int, help="With --placement disaggregated: LM replicas (default 1).")
@exit_on_user_error
def main(model_name, backends, device, engines_dir, precision, host, port, api_key, voices_dir, max_streams,
         max_queue, max_len, queue_timeout, max_input_chars, max_upload_mb, warmup, new_shapes, flow_mode, stream_state_gb,
         threads, seed, log_level,
         use_ray, replicas, autoscale, address, replica_cpus, placement, lm_replicas):
    import sys

    import torch
    import uvicorn

    from models.registry import load_model
    from runtime.synthesize import check_device

    for name, value in (("--max-streams", max_streams), ("--max-len", max_len), ("--threads", threads),
                        ("--max-input-chars", max_input_chars)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value} is not a positive count.", f"pass {name} 1 or more, or leave it out")
    if max_queue is not None and max_queue < 0:
        raise UserError(f"--max-queue {max_queue} is negative.", "pass --max-queue 0 or more")
    if queue_timeout <= 0 or max_upload_mb <= 0:
        raise UserError("--queue-timeout and --max-upload-mb must be positive.", "pass positive numbers")
    device = check_device(device)
    if not use_ray and (replicas is not None or autoscale is not None or address is not None):
        raise UserError("--replicas, --autoscale and --address are options of --ray.", "add --ray, or leave them out")
    if not use_ray and (placement is not None or lm_replicas is not None):
        raise UserError("--placement and --lm-replicas are options of --ray.", "add --ray, or leave them out")
    if use_ray:
        from runtime.serve_ray import ReplicaSettings, check_placement, run

        check_placement(placement or "replicated", lm_replicas, autoscale)

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not _is_loopback(host) and not api_key:
            log.warning("listening on %s without an API key (pass --api-key or set TTS_API_KEY)", host)
        settings = ReplicaSettings(model_name, backends, device, engines_dir, precision, seed, max_streams, max_queue,
                                   max_len, queue_timeout, threads,
                                   dict(voices_dir=os.path.abspath(voices_dir), api_key=api_key,
                                        max_input_chars=max_input_chars, max_upload_bytes=int(max_upload_mb * (1 << 20)),
                                        warmup=warmup), placement or "replicated", new_shapes,
                                   {"flow_mode": flow_mode} if flow_mode else None, stream_state_gb)
        run(settings, host, port, replicas, autoscale, address, replica_cpus, lm_replicas)
        return
    sock = bind(host, port)
    bound = sock.getsockname()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(host) and not api_key:
        log.warning("listening on %s without an API key: anyone who reaches this address can use the server "
                    "(pass --api-key or set TTS_API_KEY)", host)
    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_name, device=device, seed=seed)
    engine = Engine(model, backends, device=device, engines_dir=engines_dir, precision=precision,
                    max_streams=max_streams, max_queue=max_queue, max_len=max_len, queue_timeout=queue_timeout,
                    new_shapes=new_shapes, options={"flow_mode": flow_mode} if flow_mode else None,
                    stream_state_gb=stream_state_gb)
    app = create_app(engine, ServeConfig(voices_dir=voices_dir, api_key=api_key, max_input_chars=max_input_chars,
                                         max_upload_bytes=int(max_upload_mb * (1 << 20)), warmup=warmup))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                           lifespan="on"))
    srv = app.state.server
    srv.on_failure = lambda msg: setattr(server, "should_exit", True)
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"serving {model.name} on http://{shown}:{bound[1]} ({engine.max_streams} streams, {device}); "
          f"GET /ready says when it is warmed up", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGTERM / Ctrl-C it stopped on, once it has stopped
        print("stopped.", file=sys.stderr)
        return
    if srv.failed:
        raise UserError(f"the server did not start: {srv.failed}")


if __name__ == "__main__":
    main()

