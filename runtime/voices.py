"""Voices cloned once from a prompt recording, kept on disk as content-hashed bundles.

A zero-shot voice costs a front-end pass (speaker embedding, prompt speech tokens, prompt mel, the
LLM prompt prefix: whatever `model.make_speaker(prompt_wav, transcript)` returns) that is the same for
every request. The speech server makes it once, when the voice is created, and stores it:

    <folder>/<id>/speaker.safetensors   the conditioning's tensors
    <folder>/<id>/voice.json            everything else (lists of ids, strings) and the facts below

`id` is the sha256 (hex, 64 characters) of the model fingerprint, the prompt recording's bytes and
the transcript: the same recording and transcript for the same model give the same id, in any process
at any time, so creating a voice twice returns the first one, and processes sharing the folder agree
on names without talking to each other. The model fingerprint covers the family, its configuration
and the sha256 of its weight files (not the folder's path), so a bundle is refused by a server running
other weights rather than silently conditioning them with features they were not trained on.

Writes are atomic and safe between processes: a bundle is written to a temporary folder beside its
final place and renamed into place whole (a second process creating the same voice loses the rename
race harmlessly: the content is the same); deleting renames the folder away first, so a reader sees a
whole bundle or none. Loading checks the id against the hash of its recorded inputs and the tensors
against their recorded sha256. Ids are validated (64 lowercase hex digits) before any path is built,
so no id can name a file outside the folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import OrderedDict

import torch

from models.errors import UserError, from_os_error
from models.family import TTSModel
from models.files import temp_path

ID_RE = re.compile(r"[0-9a-f]{64}")  # matched whole (fullmatch): "$" would take a trailing newline
BUNDLE_FORMAT = 1
TENSORS = "speaker.safetensors"
META = "voice.json"


def model_fingerprint(model: TTSModel) -> str:
    """sha256 of what decides the conditioning a prompt yields: the family's description (without
    where the files live) and its weight files' hashes (the folder's name is left out when there are
    hashes: a copy of the same weights elsewhere is the same model)."""
    facts = dict(model.describe())
    facts.pop("source", None)
    hashes = model.checkpoint_hashes()
    if hashes:
        facts.pop("name", None)
    blob = json.dumps({"model": facts, "weights": hashes, "format": BUNDLE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def voice_id(fingerprint: str, audio_sha256: str, transcript: str) -> str:
    h = hashlib.sha256()
    for part in (b"tts-voice", fingerprint.encode(), audio_sha256.encode(), transcript.encode("utf-8")):
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs share one byte string
        h.update(part)
    return h.hexdigest()


def check_id(value: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}..."
        raise UserError(f"{shown!r} is not a voice id (64 hex digits).",
                        "use an id from POST /v1/audio/voices or GET /v1/audio/voices")
    return value


class VoiceNotFound(UserError):
    pass


class VoiceOfAnotherModel(UserError):
    """A stored voice made for other weights: not this server's to use, nor to delete."""


class StoreFailed(UserError):
    """The bundle could not be written or removed (a full disk, permissions): the server's problem,
    not the request's."""


class VoiceStore:
    """The bundles of one model in `folder` (created when missing); `cache` speakers stay in memory."""

    def __init__(self, folder: str, model: TTSModel, cache: int = 256):
        self.folder = os.path.abspath(folder)
        self.model = model
        self._fingerprint: str | None = None
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._cache_size = cache
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """Computed on first use: hashing a real model's weights takes a few seconds."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _path(self, vid: str) -> str:
        return os.path.join(self.folder, check_id(vid))

    # -- create ---------------------------------------------------------------------------------------
    def create(self, prompt_wav: str, audio_bytes: bytes, transcript: str, name: str, seconds: float) -> tuple[dict, bool]:
        """The voice for this recording (`prompt_wav`, holding `audio_bytes`) and transcript: (record,
        created now). Runs the model's front end only when no bundle exists yet."""
        vid = voice_id(self.fingerprint, hashlib.sha256(audio_bytes).hexdigest(), transcript)
        try:
            return self.record(vid), False
        except VoiceNotFound:
            pass
        speaker = self.model.make_speaker(prompt_wav, transcript or None)
        # a voice whose prompt leaves no room for a sentence would refuse every request: refused now
        self.model.split_text("Hello.", speaker)
        tensors = {k: v.detach().cpu().contiguous() for k, v in speaker.items() if isinstance(v, torch.Tensor)}
        fields = {k: v for k, v in speaker.items() if not isinstance(v, torch.Tensor)}
        try:
            json.dumps(fields)
        except TypeError as e:  # a family whose conditioning holds other objects cannot be stored
            raise UserError(f"the voice conditioning of {self.model.name} cannot be stored ({e}).",
                            "use the voice's recording with every request instead") from None
        from safetensors.torch import save

        blob = save(tensors)
        meta = {"format": BUNDLE_FORMAT, "id": vid, "object": "audio.voice", "name": name, "type": "audio_sample",
                "created_at": int(time.time()), "model": self.model.name, "model_fingerprint": self.fingerprint,
                "audio_sha256": hashlib.sha256(audio_bytes).hexdigest(), "audio_seconds": round(seconds, 3),
                "transcript": transcript, "tensors_sha256": hashlib.sha256(blob).hexdigest(), "fields": fields}
        self._publish(vid, blob, meta)
        return self.record(vid), True

    def _publish(self, vid: str, blob: bytes, meta: dict) -> None:
        final = self._path(vid)
        try:
            os.makedirs(self.folder, exist_ok=True)
            tmp = temp_path(final)
            os.mkdir(tmp)
        except OSError as e:
            raise StoreFailed(from_os_error(e, self.folder, "the voice was not stored").problem,
                              "free space or fix the permissions of --voices-dir") from None
        try:
            for name, data in ((TENSORS, blob), (META, json.dumps(meta, indent=1).encode())):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.rename(tmp, final)  # atomic; fails on a non-empty folder: another process was first
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        except OSError as e:
            raise StoreFailed(from_os_error(e, final, "the voice was not stored").problem,
                              "free space or fix the permissions of --voices-dir") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- read -----------------------------------------------------------------------------------------
    def _meta(self, vid: str) -> dict:
        path = self._path(vid)
        try:
            with open(os.path.join(path, META), "rb") as f:
                meta = json.loads(f.read())
        except (FileNotFoundError, NotADirectoryError):
            raise VoiceNotFound(f"there is no voice {vid}.", "list the voices with GET /v1/audio/voices") from None
        except (OSError, ValueError) as e:
            raise UserError(f"the stored voice {vid} cannot be read ({type(e).__name__}).",
                            "delete it (DELETE /v1/audio/voices/{id}) and create it again") from None
        if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT or meta.get("id") != vid:
            raise UserError(f"the stored voice {vid} is not a bundle this server reads.",
                            "delete it and create it again")
        if meta.get("model_fingerprint") != self.fingerprint:
            raise VoiceOfAnotherModel(f"the voice {vid} was created for another model ({meta.get('model')}, other weights).",
                            f"create it again on this server (model {self.model.name})")
        if voice_id(self.fingerprint, str(meta.get("audio_sha256")), str(meta.get("transcript", ""))) != vid:
            raise UserError(f"the stored voice {vid} does not match its id (its voice.json was changed).",
                            "delete it and create it again")
        return meta

    def record(self, vid: str) -> dict:
        """The public description of a stored voice (as the API returns it)."""
        meta = self._meta(vid)
        return {k: meta[k] for k in ("id", "object", "name", "type", "created_at", "model", "transcript",
                                     "audio_seconds")}

    def speaker(self, vid: str) -> dict:
        """The stored conditioning, for `Engine.submit(speaker=...)`."""
        path = self._path(vid)
        with self._lock:
            cached = self._cache.get(vid)
        if cached is not None:
            if os.path.isdir(path):  # deleted by another process: forget it too
                with self._lock:
                    self._cache.move_to_end(vid)
                return cached
            with self._lock:
                self._cache.pop(vid, None)
        meta = self._meta(vid)
        try:
            with open(os.path.join(path, TENSORS), "rb") as f:
                blob = f.read()
        except OSError:
            raise VoiceNotFound(f"there is no voice {vid}.", "list the voices with GET /v1/audio/voices") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise UserError(f"the stored voice {vid} is damaged (its tensors do not match their hash).",
                            "delete it and create it again")
        from safetensors.torch import load

        speaker = {**meta["fields"], **load(blob)}
        with self._lock:
            self._cache[vid] = speaker
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return speaker

    def list(self) -> list[dict]:
        """This model's voices, oldest first (bundles of other models and damaged ones are skipped)."""
        try:
            names = os.listdir(self.folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            if ID_RE.fullmatch(name):
                try:
                    out.append(self.record(name))
                except (UserError, KeyError, TypeError):  # another model's, damaged, or missing a field
                    continue
        return sorted(out, key=lambda r: (r["created_at"], r["id"]))

    def delete(self, vid: str) -> None:
        path = self._path(vid)
        try:
            self._meta(vid)  # not found / another model's voice: said before anything is removed
        except (VoiceNotFound, VoiceOfAnotherModel):
            raise
        except UserError:  # damaged: deleting it is the fix its own error names
            pass
        gone = temp_path(path)
        try:
            os.rename(path, gone)  # readers see the whole bundle or nothing
        except FileNotFoundError:
            raise VoiceNotFound(f"there is no voice {vid}.", "list the voices with GET /v1/audio/voices") from None
        except OSError as e:
            raise StoreFailed(from_os_error(e, path, "the voice was not deleted", doing="delete").problem,
                              "fix the permissions of --voices-dir") from None
        shutil.rmtree(gone, ignore_errors=True)
        with self._lock:
            self._cache.pop(vid, None)
