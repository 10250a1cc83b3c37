"""The edge pipeline: audio -> speech gate -> ASR -> classifier -> privacy filter -> signals.

Models are loaded once into :class:`EdgeModels` and shared; a :class:`Pipeline` is one device's view
of them (its region and the wearer's opt-out), cheap to create.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.asr import AsrOptions, Transcriber, Transcript
from sotto.edge.audio import Audio, load_audio, probe_duration
from sotto.edge.classifier import TextClassifier
from sotto.edge.gazetteer import Gazetteer
from sotto.edge.ldp import LocalPrivacy
from sotto.edge.privacy import Dropped, FilterOptions, PrivacyFilter
from sotto.edge.text import readings
from sotto.edge.vad import SpeechGate, SpeechGateOptions
from sotto.policy import Policy, models_dir
from sotto.wire import Signal, canonical_region


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Everything that configures the device's models (defaults are the shipped ones)."""

    models_dir: str | None = None
    classifier_backend: str = "onnx"
    classifier_threads: int = 1
    asr: AsrOptions = field(default_factory=AsrOptions)
    speech_gate: SpeechGateOptions = field(default_factory=SpeechGateOptions)
    filter: FilterOptions = field(default_factory=FilterOptions)


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the pipeline made of one utterance. ``transcript`` never leaves the device."""

    input: str
    transcript: str | None
    signals: list[Signal]
    dropped: Dropped | None
    #: Milliseconds spent per stage (audio, vad, asr, classify, filter).
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: With local differential privacy on: the signals after the daily budget and randomized response
    #: (None when it is off, and then ``signals`` are sent as they are).
    noised: list[Signal] | None = None
    #: Signals the daily privacy budget held back.
    withheld: int = 0

    @property
    def outgoing(self) -> list[Signal]:
        """What may be handed to the delivery client: the noised signals when LDP is on."""
        return self.signals if self.noised is None else self.noised

    def to_json(self, policy: Policy) -> dict[str, Any]:
        """The public `sotto-edge analyze` JSON object (a stable contract)."""
        return {
            "input": self.input,
            "transcript": self.transcript,
            "signals": [
                {
                    "id": s.category_id,
                    "name": policy.taxonomy[s.category_id].name,
                    "tier1": policy.taxonomy[s.category_id].tier1,
                    "weight": s.weight,
                }
                for s in self.signals
            ],
            "dropped": None
            if self.dropped is None
            else {"reason": self.dropped.reason, "detail": self.dropped.detail},
        }

    def noised_json(self, policy: Policy) -> dict[str, Any]:
        """The extra keys of `sotto-edge analyze --show-noised`: what would actually be sent."""
        return {
            "sent": [
                {
                    "id": s.category_id,
                    "name": policy.taxonomy[s.category_id].name,
                    "tier1": policy.taxonomy[s.category_id].tier1,
                    "weight": s.weight,
                    "epsilon": s.epsilon,
                }
                for s in self.outgoing
            ],
            "withheld_by_budget": self.withheld,
        }


@dataclass(slots=True)
class EarlyTranscript:
    """A transcription started before its utterance was closed (``UtteranceStream`` starts one while it
    waits to be sure the wearer has stopped): the speech-only audio it was started on, and its result to
    come. :meth:`Pipeline.analyze_audio` uses it only when the closed utterance's speech is exactly the same
    audio, so the analysis is the one a transcription at the close would give; ``used`` says whether it was.
    """

    speech: Audio
    result: Future[Transcript]
    used: bool = False


class EdgeModels:
    """Loaded models and policy, shared by every Pipeline in the process.

    The speech gate and ASR load on first use, so text-only callers never pay for Whisper.
    """

    def __init__(self, config: EdgeConfig | None = None) -> None:
        self.config = config or EdgeConfig()
        root = models_dir(self.config.models_dir)
        self.policy = Policy.load(root)
        self.classifier = TextClassifier(root, self.config.classifier_backend, self.config.classifier_threads)
        self.gazetteer = Gazetteer.load(root) if self.config.filter.gazetteer else None
        self._gate: SpeechGate | None = None
        self._asr: Transcriber | None = None
        self._lock = threading.Lock()

    @property
    def speech_gate(self) -> SpeechGate:
        with self._lock:
            if self._gate is None:
                self._gate = SpeechGate(self.config.speech_gate)
            return self._gate

    @property
    def transcriber(self) -> Transcriber:
        with self._lock:
            if self._asr is None:
                self._asr = Transcriber(self.config.asr)
            return self._asr

    def load_audio_models(self) -> None:
        """Load the speech gate and ASR now instead of on the first utterance."""
        _ = self.speech_gate, self.transcriber


#: The longest utterance analysed (Whisper's window; ``PcmStream`` keeps at most as much): a longer one is
#: not a query but a recording, and is dropped (``too_long``) before it is decoded or transcribed.
MAX_UTTERANCE_S = 30.0


def too_long(seconds: float) -> Dropped:
    return Dropped(
        "too_long", f"{seconds:.1f} s of audio; an utterance may last at most {MAX_UTTERANCE_S:g} s"
    )


class Pipeline:
    """One device: its region, the wearer's settings (opt-out, minor), local differential privacy, and the
    shared models."""

    def __init__(
        self,
        models: EdgeModels,
        region: str = "US",
        opted_out: bool = False,
        minor: bool = False,
        ldp: LocalPrivacy | None = None,
    ) -> None:
        self.models = models
        self.region = canonical_region(region)
        self.filter = PrivacyFilter.for_model(
            models.policy, models.classifier.meta, models.config.filter, models.gazetteer
        )
        self.filter.set_opt_out(opted_out)
        self.filter.set_minor(minor)
        #: Applied after the filter, to the signals that passed it only.
        self.ldp = ldp

    def set_opt_out(self, opted_out: bool) -> None:
        self.filter.set_opt_out(opted_out)

    def set_minor(self, minor: bool) -> None:
        """Mark the wearer as a minor (or not); the region table's ``no_minors`` rule decides the rest."""
        self.filter.set_minor(minor)

    def analyze_text(self, text: str, today: dt.date | None = None, label: str | None = None) -> Analysis:
        """Classify and filter a transcript or typed query."""
        day = today or dt.datetime.now(dt.UTC).date()
        # Format characters resolved first (edge.text): what is printed and classified is what a person
        # reads, never the raw bidi overrides or zero-width characters.
        texts = readings(text)
        gate = self.filter.gate(self.region, day)
        if gate is not None:
            return Analysis(label if label is not None else texts[0], None, [], gate)
        return self._classify(label if label is not None else texts[0], texts, day, {})

    def analyze_audio(
        self,
        audio: Audio,
        label: str = "<pcm>",
        today: dt.date | None = None,
        early: EarlyTranscript | None = None,
    ) -> Analysis:
        """Run the whole chain on one utterance of 16 kHz mono audio. ``early``: a transcription already
        started on this utterance's speech, taken instead of transcribing again when the speech gate finds
        exactly that speech here (the wearer's settings, the classifier and the filter are applied now)."""
        day = today or dt.datetime.now(dt.UTC).date()
        gate = self.filter.gate(self.region, day)
        if gate is not None:  # opted out or blocked region: the audio is not even looked at
            return Analysis(label, None, [], gate)
        if audio.duration_s > MAX_UTTERANCE_S:
            return Analysis(label, None, [], too_long(audio.duration_s))
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        speech = self.models.speech_gate.detect(audio)
        t1 = time.perf_counter()
        timings["vad"] = (t1 - t0) * 1000
        if not speech.has_speech or speech.speech is None:
            return Analysis(label, None, [], Dropped("no_speech", "no speech detected"), timings)
        if early is not None and np.array_equal(early.speech.samples, speech.speech.samples):
            transcript = early.result.result()  # usually finished while the gate waited for the end
            early.used = True
        else:
            transcript = self.models.transcriber.transcribe(speech.speech)
        timings["asr"] = (time.perf_counter() - t1) * 1000
        if not transcript.text:
            return Analysis(label, "", [], Dropped("no_speech", "no words recognised"), timings)
        return self._classify(label, readings(transcript.text), day, timings)

    def analyze_file(self, path: str | os.PathLike[str], today: dt.date | None = None) -> Analysis:
        duration = probe_duration(path)  # before decoding: a long file would be decoded whole
        if duration is not None and duration > MAX_UTTERANCE_S:
            return Analysis(str(Path(path)), None, [], too_long(duration))
        t0 = time.perf_counter()
        audio = load_audio(path)
        load_ms = (time.perf_counter() - t0) * 1000
        result = self.analyze_audio(audio, label=str(Path(path)), today=today)
        result.timings_ms["audio"] = load_ms
        return result

    def _classify(self, label: str, texts: list[str], day: dt.date, timings: dict[str, float]) -> Analysis:
        transcript = texts[0]
        t0 = time.perf_counter()
        # Text that reads one way and is stored another is classified both ways: the most sensitive
        # reading decides, so hiding a sensitive query behind a bidi override fails closed.
        output = max((self.models.classifier.classify(t) for t in texts), key=lambda o: o.sensitive)
        t1 = time.perf_counter()
        decision = self.filter.decide(output, day, transcript)
        timings["classify"] = (t1 - t0) * 1000
        timings["filter"] = (time.perf_counter() - t1) * 1000
        if isinstance(decision, Dropped):
            return Analysis(label, transcript, [], decision, timings)
        if self.ldp is None:
            return Analysis(label, transcript, decision, None, timings)
        noised, withheld = self.ldp.privatize(decision)
        return Analysis(label, transcript, decision, None, timings, noised, withheld)
