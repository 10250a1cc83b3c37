"""Helpers of the edge tests: test signals, policy folders, a CLI runner and an aggregator in a thread."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from sotto.edge.audio import SAMPLE_RATE
from sotto.edge.classifier import ClassifierOutput
from sotto.edge.outbox import Outbox
from sotto.edge.pipeline import EdgeModels
from sotto.policy import models_dir
from sotto.server import ServerConfig, create_server, open_store
from sotto.v1 import signals_pb2, signals_pb2_grpc
from tools.paths import SPEECH

REPO = Path(__file__).resolve().parents[2]
MODELS = models_dir()
JFK_WAV = SPEECH / "asr_whisper_jfk" / "jfk.wav"
LIBRISPEECH_FLAC = SPEECH / "asr_misc_librispeech" / "2412-153948-0000.flac"
JFK_LINE = "ask not what your country can do for you"
#: One spoken digit ("three"), 0.24 s, cut tightly: the shortest kind of query there is.
SPOKEN_DIGIT_WAV = SPEECH / "asr_fsdd_digits" / "recordings" / "3_theo_0.wav"

#: A fixed "today" for everything that takes a date, so results do not depend on the calendar.
TODAY = dt.date(2026, 3, 1)
PROFILE = "profile_0001"
#: Interest categories from models/interest_categories.tsv (none of them sensitive).
MUSIC, MOVIES, DOGS, CATS, GARDENING = "338", "324", "425", "424", "275"
TRAVEL_TYPE = "664"
POLICY_FILES = (
    "iab_content_taxonomy_3.1.tsv",
    "sensitive_categories.tsv",
    "region_policy.tsv",
    "interest_categories.tsv",
)
REGION_HEADER = "region\trule\teffective_from\teffective_to\tnote\n"
SENSITIVE_HEADER = "id\tsubtree\tclass\tname\treason\n"


# --- text -----------------------------------------------------------------------------------------


def words(text: str) -> str:
    """Lower-case words separated by single spaces, for punctuation-insensitive comparisons."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


# --- audio ----------------------------------------------------------------------------------------


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1] (shape (n,) or (n, channels)) as int16 PCM with stdlib ``wave``."""
    frames = samples if samples.ndim == 2 else samples[:, None]
    pcm = np.clip(np.round(frames * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(frames.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def chords(seconds_each: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    """Synthetic "music": C major, A minor and F major triads, each sustained, at 16 kHz."""
    triads = ((261.63, 329.63, 392.00), (220.00, 261.63, 329.63), (174.61, 220.00, 261.63))
    parts = [sum(tone(seconds_each, SAMPLE_RATE, f, amplitude / 3) for f in triad) for triad in triads]
    return np.concatenate(parts).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()


# --- classifier outputs and policy folders --------------------------------------------------------


def output(
    interests: Sequence[tuple[str, float]],
    no_interest: float = 0.01,
    sensitive: float = 0.0,
    sensitive_class: str = "health",
) -> ClassifierOutput:
    """A hand-made classifier result (interests are taken in the order given, as "best first")."""
    return ClassifierOutput(list(interests), no_interest, sensitive, sensitive_class)


def forbid_classifier(monkeypatch: pytest.MonkeyPatch, models: EdgeModels) -> None:
    """Make ``models``' classifier fail the test if anything reaches it (for inputs that must stop before)."""

    def refuse(texts: list[str]) -> list[ClassifierOutput]:
        raise AssertionError(f"the classifier ran on {texts!r}")

    monkeypatch.setattr(models.classifier, "classify_batch", refuse)


def copy_policy(dst: Path) -> Path:
    """A models folder with only the policy files (enough for ``Policy.load``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in POLICY_FILES:
        shutil.copyfile(MODELS / name, dst / name)
    return dst


def copy_models(dst: Path) -> Path:
    """A full copy of the shipped models folder."""
    shutil.copytree(MODELS, dst)
    return dst


# --- the wire allow-list -------------------------------------------------------------------------

ALLOWLIST = REPO / "proto" / "WIRE_ALLOWLIST.tsv"
_PROTO_TYPES = {
    "string": FieldDescriptor.TYPE_STRING,
    "bytes": FieldDescriptor.TYPE_BYTES,
    "uint32": FieldDescriptor.TYPE_UINT32,
    "uint64": FieldDescriptor.TYPE_UINT64,
    "double": FieldDescriptor.TYPE_DOUBLE,
    "bool": FieldDescriptor.TYPE_BOOL,
    "message": FieldDescriptor.TYPE_MESSAGE,
}


@dataclass(frozen=True)
class AllowedField:
    """One reviewed row of proto/WIRE_ALLOWLIST.tsv."""

    field: str
    number: int
    proto_type: int
    repeated: bool
    #: device (a device sends it), server or admin.
    sender: str
    #: The name of the value check a device-sent field must pass (see test_edge_wire.py), or "-".
    check: str
    why: str


def load_allowlist() -> dict[str, AllowedField]:
    """The reviewed allow-list of wire fields, by full field name; every column must be filled in."""
    rows: dict[str, AllowedField] = {}
    with ALLOWLIST.open(encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
            empty = [k for k, v in row.items() if not (v or "").strip()]
            assert not empty, f"{ALLOWLIST}:{n}: empty column(s) {empty}"
            assert row["type"] in _PROTO_TYPES, f"{ALLOWLIST}:{n}: unknown type {row['type']!r}"
            assert row["label"] in ("optional", "repeated"), f"{ALLOWLIST}:{n}: label {row['label']!r}"
            sender = row["sender"]
            assert sender in ("device", "server", "admin"), f"{ALLOWLIST}:{n}: sender {sender!r}"
            assert row["field"] not in rows, f"{ALLOWLIST}:{n}: {row['field']} listed twice"
            rows[row["field"]] = AllowedField(
                row["field"],
                int(row["number"]),
                _PROTO_TYPES[row["type"]],
                row["label"] == "repeated",
                row["sender"],
                row["check"],
                row["why it is safe"],
            )
    return rows


# --- the CLI --------------------------------------------------------------------------------------


def run_edge(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m sotto.edge ARGS`` (``sotto-edge``) as a real process, from outside the source tree."""
    return subprocess.run(
        [sys.executable, "-m", "sotto.edge", *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
        check=False,
    )


def run_cli(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m sotto.edge analyze ARGS`` as a real process, from outside the source tree."""
    return run_edge("analyze", *args, timeout=timeout)


# --- an aggregator on its own event loop ----------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picked it, then we let go of it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AggregatorThread:
    """The real aggregator (``open_store`` + ``create_server``) on an asyncio loop in a background thread.

    grpc.aio needs a running loop; the blocking ``DeliveryClient`` under test must not run on that
    loop's thread, so the server gets a thread of its own and the test thread stays synchronous.
    """

    def __init__(self, url: str, config: ServerConfig, port: int = 0, half_life_days: float = 30) -> None:
        self.url = url
        self.config = config
        self.port = port
        self.half_life_days = half_life_days
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        try:
            store = await open_store(self.url, self.half_life_days)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            server, self.port = await create_server(f"127.0.0.1:{self.port}", store, self.config)
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await server.stop(None)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            await store.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> AggregatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("aggregator did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"aggregator failed to start: {self._error!r}") from self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def profile(self, profile_id: str = PROFILE) -> signals_pb2.Profile:
        """The profile as the aggregator serves it (its own blocking channel)."""
        with grpc.insecure_channel(self.target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            return stub.GetProfile(signals_pb2.GetProfileRequest(profile_id=profile_id), timeout=10)


def assert_outbox_balanced(box: Outbox) -> None:
    """Every signal ever added is accounted for: acknowledged, set aside, dropped, purged or queued."""
    s = box.stats()
    assert s.get("signals_added") == s.signals_gone + s.queued_signals
