"""A spoken query becomes a merged interest profile: real server, real emulator, real audio.

Starts `sotto-server serve` on SQLite with a token per device, runs tools/emulate_device.py against it
(with local differential privacy on, as in the demo) through a capturing TCP proxy with real recorded
clips from shared/data plus spoken queries (espeak-ng), then checks the stored profiles against what the
devices sent, and what crossed the wire: no transcript word, no audio bytes, no sensitive category.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from e2e_testkit import ROOT, SHARED, CaptureProxy, aggregator, grpc_requests, write_wav

from sotto.edge.audio import load_audio
from sotto.policy import Policy
from sotto.v1 import signals_pb2

pytestmark = pytest.mark.e2e

REAL_CLIPS = [
    SHARED / "speech" / "asr_whisper_jfk" / "jfk.wav",
    SHARED / "speech" / "asr_rhasspy_commands" / "turn_on_the_living_room_lamp.wav",
    SHARED / "speech" / "asr_misc_librispeech" / "2412-153948-0000.flac",
    SHARED / "speech" / "asr_pocketsphinx" / "cards_005.wav",
]
SPOKEN = {
    "interest_flight.wav": "book me a flight to paris for next week",
    "interest_shoes.wav": "where can i buy new running shoes",
    "sensitive_pain.wav": "i need a doctor for my back pain",
    "sensitive_rent.wav": "i cannot pay my rent this month, where can i get help",
}
EPSILON = 1.0


def speak(text: str, out: Path) -> None:
    espeak = shutil.which("espeak-ng")
    assert espeak, (
        "espeak-ng is required for the end-to-end test (apt-get install espeak-ng; .ci/run installs it)"
    )
    subprocess.run(
        [espeak, "-v", "en-us", "-s", "150", "-w", str(out), text], check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for clip in REAL_CLIPS:
        assert clip.is_file(), f"{clip}: shared speech data is missing"
        shutil.copyfile(clip, folder / clip.name)
    for name, text in SPOKEN.items():
        speak(text, folder / name)
    rng = np.random.default_rng(5)
    write_wav(folder / "silence.wav", bytes(16000 * 2 * 3))
    noise = (rng.normal(0, 0.1, 16000 * 3) * 32767).clip(-32768, 32767).astype("<i2").tobytes()
    write_wav(folder / "noise.wav", noise)
    return folder


@pytest.fixture(scope="module")
def run(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("run")
    report = tmp / "report.json"
    devices = ["e2e-device-0001", "e2e-device-0002"]
    with aggregator(tmp / "sotto.db", devices) as server, CaptureProxy(server.target) as proxy:
        emulator = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.emulate_device",
                "--target",
                proxy.address,
                "--devices",
                "2",
                "--queries",
                str(clips),
                "--profile-prefix",
                "e2e",
                "--batch-size",
                "2",
                "--report",
                str(report),
                "--token-file",
                str(server.token_file),
                "--ldp-epsilon",
                str(EPSILON),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert emulator.returncode == 0, emulator.stderr
        profiles = {}
        for device in devices:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sotto.server",
                    "profile",
                    "--target",
                    server.target,
                    "--admin-token-file",
                    str(server.admin_token_file),
                    device,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            profiles[device] = json.loads(out.stdout) if out.returncode == 0 else None
        captured = proxy.captured
        connections = proxy.connections
        tokens = list(json.loads(server.token_file.read_text()).values())
    return {
        "summary": json.loads(report.read_text()),
        "profiles": profiles,
        "captured": captured,
        "connections": connections,
        "tokens": tokens,
        "stdout": emulator.stdout,
    }


def analyses(run: dict[str, object], device: str = "e2e-device-0001") -> dict[str, dict[str, object]]:
    summary = run["summary"]
    assert isinstance(summary, dict)
    return {Path(a["input"]).name: a for a in summary["analyses"][device]}


def test_every_utterance_went_through_the_pipeline(run: dict[str, object], clips: Path) -> None:
    summary = run["summary"]
    assert isinstance(summary, dict)
    n_files = len(list(clips.iterdir()))
    assert summary["utterances"] == 2 * n_files
    assert summary["batches_pending"] == 0 and not summary["batches_rejected"]
    assert "summary" in str(run["stdout"])
    jfk = analyses(run)["jfk.wav"]["transcript"]
    assert "ask not what your country can do for you" in re.sub(r"[^a-z ]", "", str(jfk).lower())


def test_silence_and_noise_yield_no_signal(run: dict[str, object]) -> None:
    got = analyses(run)
    for name in ("silence.wav", "noise.wav"):
        assert got[name]["signals"] == []
        assert got[name]["dropped"] == {"reason": "no_speech", "detail": got[name]["dropped"]["detail"]}
        assert got[name]["transcript"] is None


def test_sensitive_spoken_queries_yield_no_signal(run: dict[str, object]) -> None:
    got = analyses(run)
    for name in ("sensitive_pain.wav", "sensitive_rent.wav"):
        assert got[name]["signals"] == [], got[name]
        assert got[name]["dropped"]["reason"] == "sensitive", got[name]


def test_interest_spoken_queries_yield_signals(run: dict[str, object]) -> None:
    got = analyses(run)
    assert got["interest_flight.wav"]["signals"][0]["tier1"] == "Travel"
    assert got["interest_shoes.wav"]["signals"], got["interest_shoes.wav"]


def test_stored_profiles_match_what_the_devices_sent(run: dict[str, object]) -> None:
    summary = run["summary"]
    profiles = run["profiles"]
    assert isinstance(summary, dict) and isinstance(profiles, dict)
    for device, profile in profiles.items():
        sent: dict[str, float] = {}
        for analysis in summary["analyses"][device]:
            # What left the device: after the daily budget and randomized response (full weight each).
            for s in analysis["sent"]:
                assert s["epsilon"] == EPSILON and s["weight"] == 1.0
                sent[s["id"]] = sent.get(s["id"], 0.0) + s["weight"]
        assert sent, "the demo clips must produce at least one signal"
        assert profile is not None, f"no profile stored for {device}"
        stored = {s["id"]: s["score"] for s in profile["scores"]}
        assert set(stored) == set(sent)
        # All signals are from today, so the decayed score equals the plain sum of weights.
        for cid, weight in sent.items():
            assert stored[cid] == pytest.approx(weight, rel=1e-6)


def test_nothing_but_signals_crossed_the_wire(run: dict[str, object], clips: Path) -> None:
    captured = run["captured"]
    assert isinstance(captured, bytes) and len(captured) > 0
    # Besides the batches, only each device's bearer token crosses (call metadata): 256 random bits that
    # could spell a word by chance, so they are taken out before looking for words.
    for token in run["tokens"]:  # type: ignore[attr-defined]
        captured = captured.replace(token.encode(), b"")
    wire = captured.lower()
    words = set()
    for device in ("e2e-device-0001", "e2e-device-0002"):
        for analysis in analyses(run, device).values():
            words |= {
                w for w in re.findall(r"[a-z']+", str(analysis["transcript"] or "").lower()) if len(w) >= 4
            }
    assert {"flight", "paris", "doctor", "country"} <= words  # the transcripts were real
    leaked = sorted(w for w in words if w.encode() in wire)
    assert leaked == [], f"transcript words on the wire: {leaked}"
    checked = 0
    for clip in clips.iterdir():
        # Runs of 16 PCM samples, every 512 bytes: from the file as recorded and as the device decoded it
        # (16 kHz mono int16, what the pipeline works on).
        pcm = (np.clip(load_audio(clip).samples, -1, 1) * 32767).astype("<i2").tobytes()
        sources = [pcm]
        if clip.suffix == ".wav":
            with wave.open(str(clip)) as wav:
                sources.append(wav.readframes(wav.getnframes()))
        for frames in sources:
            windows = [frames[i : i + 32] for i in range(0, len(frames) - 32, 512)]
            windows = [w for w in windows if len(set(w)) > 4]  # silence and near-silence match anything
            checked += len(windows)
            assert not any(w in captured for w in windows), f"audio bytes of {clip.name} on the wire"
    assert checked > 1000


def test_only_allowed_categories_crossed_the_wire(run: dict[str, object]) -> None:
    """Every request on the wire, decoded from the HTTP/2 frames: only batches of allowed, noised
    categories; and no sensitive category id anywhere in the bytes, in its encoded form."""
    policy = Policy.load()
    summary = run["summary"]
    connections = run["connections"]
    assert isinstance(summary, dict) and isinstance(connections, list) and connections
    batches = [signals_pb2.SignalBatch.FromString(m) for c in connections for m in grpc_requests(c)]
    assert len(batches) == summary["batches_sent"] + summary["retries"]
    ids = [s.category_id for b in batches for s in b.signals]
    assert len(ids) == summary["signals_sent"] > 0
    assert all(b.ldp_epsilon_milli == EPSILON * 1000 for b in batches)
    assert set(ids) <= policy.interest_ids
    assert not [cid for cid in ids if cid in policy.sensitive]
    wire = run["captured"]
    assert isinstance(wire, bytes)
    for cid in policy.taxonomy:
        if cid in policy.sensitive:
            encoded = b"\x0a" + bytes([len(cid)]) + cid.encode()  # Signal.category_id = cid
            assert encoded not in wire, f"sensitive category {cid} on the wire"
