"""What the device benchmarks feed the pipeline: synthetic speech (espeak-ng), real clips, text queries."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sotto.edge.audio import SAMPLE_RATE, Audio, load_audio
from sotto.edge.classifier import normalize_text
from tools.paths import REPO, SPEECH

DEMO_QUERIES = REPO / "tools" / "demo" / "queries.txt"
#: Real recordings (file, reference transcript file) from shared/data, shortest first.
CLIPS = (
    "asr_rhasspy_commands/turn_on_the_living_room_lamp.wav",
    "asr_pocketsphinx/cards_005.wav",
    "asr_misc_librispeech/2412-153948-0000.flac",
    "asr_whisper_jfk/jfk.wav",
)
#: Spoken queries for the synthetic utterances: commercial, so that signals come out and get encoded.
SPOKEN = {
    2.0: "play some jazz for the drive",
    5.0: "where can i buy a good pair of trail running shoes for the mountains this summer",
    10.0: "i am looking for a cheap flight to lisbon in may and a hotel near the old town with a pool, "
    "and maybe a rental car for a day trip to the beaches in the south",
}
PROFILE_ID = "bench-profile-0001"


@dataclass(frozen=True, slots=True)
class Utterance:
    """One utterance of the benchmark: its audio and the words spoken in it."""

    label: str
    kind: str
    audio: Audio
    reference: str


def espeak() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit("bench: espeak-ng is needed for synthetic utterances (apt-get install espeak-ng)")
    return binary


def say(text: str, path: Path, speed: int = 160) -> Path:
    """Write ``text`` spoken by espeak-ng (American English) at ``speed`` words per minute to ``path``."""
    subprocess.run(
        [espeak(), "-v", "en-us", "-s", str(speed), "-w", str(path), text],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def speak(text: str, folder: Path, speed: int = 160) -> Audio:
    """``text`` spoken by espeak-ng (American English) at ``speed`` words per minute, as 16 kHz audio."""
    return load_audio(say(text, folder / f"tts-{uuid.uuid4().hex[:8]}.wav", speed))


def synthetic(seconds: float, folder: Path) -> Utterance:
    """A spoken query about ``seconds`` long (the speaking rate is adjusted), padded with silence to it.

    The trailing silence is what a device sees before it decides the wearer has stopped talking.
    """
    text = SPOKEN.get(seconds) or _words_for(seconds)
    audio = speak(text, folder)
    if abs(audio.duration_s - seconds) > 0.25:
        speed = int(max(80, min(450, 160 * audio.duration_s / seconds)))
        audio = speak(text, folder, speed)
    target = int(seconds * SAMPLE_RATE)
    samples = audio.samples[:target]
    if len(samples) < target:
        samples = np.concatenate([samples, np.zeros(target - len(samples), dtype=np.float32)])
    return Utterance(f"synthetic {seconds:g} s", "synthetic", Audio(samples), text)


def _words_for(seconds: float) -> str:
    base = SPOKEN[10.0].split()
    # About 2.7 words a second at a natural rate.
    count = max(3, int(seconds * 2.7))
    return " ".join((base * (count // len(base) + 1))[:count])


def _reference(path: Path) -> str:
    table = path.parent / "transcripts.tsv"
    if table.is_file():
        lines = table.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t") if lines else []
        column = header.index("reference_text") if "reference_text" in header else 1
        for line in lines[1:]:
            parts = line.split("\t")
            if len(parts) > column and Path(parts[0]).name == path.name:
                return parts[column]
    return ""


def clips(names: Sequence[str]) -> list[Utterance]:
    """Real recordings from shared/data (those that exist), with their reference transcripts."""
    out = []
    for name in names:
        path = SPEECH / name
        if path.is_file():
            out.append(Utterance(path.name, "clip", load_audio(path), _reference(path)))
    return out


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference length, on the classifier's normalised text."""
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


def demo_queries() -> list[str]:
    return [line.strip() for line in DEMO_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
