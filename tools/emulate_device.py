"""Emulate many pairs of glasses against a real aggregator, through the real edge pipeline.

    python -m tools.emulate_device --target 127.0.0.1:50051 --devices 5
    python -m tools.emulate_device --target 127.0.0.1:50051 --queries my_queries.txt --text
    python -m tools.emulate_device --target 127.0.0.1:50051 --queries clips/ --region US,DE --report out.json
    python -m tools.emulate_device --target aggregator:50051 --token-file tokens.json --tls-ca ca.pem
    python -m tools.emulate_device --target 127.0.0.1:50051 --text --outbox-dir outboxes --offline-for 20
    python -m tools.emulate_device --target 127.0.0.1:50051 --text --outbox-dir outboxes --kill-every 5
    python -m tools.emulate_device --target 127.0.0.1:50051 --ldp-epsilon 2 --daily-budget 20

Each virtual device has a profile id, a region and a list of voice queries (audio files, or text lines
spoken with espeak-ng when it is installed, or analysed as text with --text). Every utterance goes
through speech gate, ASR, classifier and privacy filter; surviving signals go through local differential
privacy when --ldp-epsilon is set (daily budget, then randomized response), and are batched and sent with
the device's client. The run ends with a summary (also as JSON with --report).

With --outbox-dir each device keeps its outbox in a SQLite file there (as the glasses do), so it survives
the emulator: --offline-for SECONDS keeps the devices off the network that long while they go on
producing (their outboxes fill, then drain in order), and --kill-every N runs the devices in a child
process that is killed with SIGKILL after every N utterances, at a random moment while it produces and
sends, and restarted until every query is done; the summary then shows that every signal the outboxes
accepted was acknowledged once (the aggregator applies a resent batch once).

An aggregator started with `sotto-server serve` wants a token per device: `sotto-server token issue
--db URL PREFIX-device-0001 PREFIX-device-0002 ... > tokens.json` writes the JSON --token-file reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sotto.edge.audio import AudioError
from sotto.edge.client import DeliveryClient, TlsOptions
from sotto.edge.ldp import DEFAULT_DAILY_BUDGET, LdpOptions, LocalPrivacy
from sotto.edge.pipeline import Analysis, EdgeConfig, EdgeModels, Pipeline
from sotto.wire import REGION_PATTERN
from tools.paths import SPEECH, child_env

ROOT = Path(__file__).resolve().parents[1]

DEMO_QUERIES = ROOT / "tools" / "demo" / "queries.txt"
#: Real recorded clips added to the built-in demo when shared/data is present.
DEMO_CLIPS = [
    "asr_rhasspy_commands/turn_on_the_living_room_lamp.wav",
    "asr_whisper_jfk/jfk.wav",
    "asr_pocketsphinx/cards_005.wav",
    "asr_misc_librispeech/2412-153948-0000.flac",
]
#: Outbox state key where a device records how many of its queries it has analysed.
PROGRESS_KEY = "emulator_progress"
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus"}


@dataclass(frozen=True, slots=True)
class Query:
    """One utterance: text to speak or analyse, or a recorded audio file."""

    text: str | None = None
    audio: Path | None = None

    @property
    def label(self) -> str:
        return str(self.audio) if self.audio else str(self.text)


@dataclass(slots=True)
class DeviceReport:
    profile_id: str
    region: str
    utterances: int = 0
    signals: int = 0
    #: Signals the daily privacy budget held back (LDP only).
    withheld: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    analyses: list[dict[str, Any]] = field(default_factory=list)


def load_queries(path: Path | None, include_clips: bool) -> list[Query]:
    """Queries from a text file (one per line), a folder of audio files, or the built-in demo."""
    if path is None:
        queries = [Query(text=t) for t in _lines(DEMO_QUERIES)]
        if include_clips:
            queries += [Query(audio=SPEECH / c) for c in DEMO_CLIPS if (SPEECH / c).is_file()]
        return queries
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder")
        return [Query(audio=p) for p in files]
    if path.is_file():
        if path.suffix.lower() in AUDIO_SUFFIXES:
            return [Query(audio=path)]
        queries = [Query(text=t) for t in _lines(path)]
        if not queries:
            raise ValueError(f"{path}: no queries (expected one query per line)")
        return queries
    raise ValueError(f"{path}: no such file or folder")


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (give a text file with one query per line)") from None


class Speaker:
    """Text to speech with espeak-ng, cached per text (each spoken once per run)."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("espeak-ng")
        self.folder = folder
        self._cache: dict[str, Path] = {}
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.binary is not None

    def speak(self, text: str) -> Path:
        with self._lock:
            if text not in self._cache:
                out = self.folder / f"utt{len(self._cache):05d}.wav"
                subprocess.run(
                    [self.binary or "espeak-ng", "-v", "en-us", "-s", "160", "-w", str(out), text],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                self._cache[text] = out
            return self._cache[text]


def run_device(
    device: Pipeline,
    client: DeliveryClient,
    queries: list[Query],
    speaker: Speaker | None,
    as_text: bool,
    report: DeviceReport,
    progress: Any,
    online_at: float = 0.0,
    drain_s: float = 30.0,
    announce: bool = False,
) -> None:
    """Analyse the device's queries in order, resuming after the last one its outbox recorded (after a
    kill), sending when a batch is due once the device is online; then drain the outbox."""
    done = int(client.outbox.get_state(PROGRESS_KEY) or 0)
    for index, query in enumerate(queries):
        if index < done:
            continue
        started = time.perf_counter()
        result: Analysis
        try:
            if query.audio is not None:
                result = device.analyze_file(query.audio)
            elif as_text or speaker is None:
                result = device.analyze_text(query.text or "")
            else:
                spoken = device.analyze_file(speaker.speak(query.text or ""))
                result = dataclasses.replace(spoken, input=query.label)
        except AudioError as exc:
            print(f"emulate_device: skipped {query.label}: {exc}", file=sys.stderr)
            progress.update(1)
            continue
        report.latencies_ms.append((time.perf_counter() - started) * 1000)
        report.utterances += 1
        report.signals += len(result.signals)
        report.withheld += result.withheld
        if result.dropped:
            report.dropped[result.dropped.reason] += 1
        document = result.to_json(device.models.policy)
        if device.ldp is not None:  # what was sent, after the budget and randomized response
            document.update(result.noised_json(device.models.policy))
        report.analyses.append(document)
        client.add(result.outgoing)
        # Not atomic with the add: a kill in between replays the utterance, and the outbox counts the
        # replayed signals as accepted again (they are new signals as far as delivery is concerned).
        client.outbox.set_state(PROGRESS_KEY, str(index + 1))
        progress.update(1)
        if announce:
            print("utterance", flush=True)
        if time.time() >= online_at:
            client.flush_if_due()
    if time.time() < online_at:
        time.sleep(online_at - time.time())
    give_up = time.monotonic() + drain_s
    while not client.flush() and time.monotonic() < give_up:
        time.sleep(0.2)


def load_tokens(path: Path, profiles: list[str]) -> dict[str, str]:
    """The bearer token of every device from a JSON object {profile_id: token}."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--token-file {path}: expected JSON {{profile_id: token}} ({exc})") from None
    if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
        raise ValueError(f"--token-file {path}: expected a JSON object {{profile_id: token}}")
    missing = [p for p in profiles if p not in document]
    if missing:
        raise ValueError(
            f"--token-file {path}: no token for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    return {p: document[p] for p in profiles}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(
    reports: list[DeviceReport],
    clients: list[DeliveryClient],
    wall_s: float,
    mode: str,
    ldp_epsilon: float | None = None,
) -> dict[str, Any]:
    dropped: Counter[str] = Counter()
    for r in reports:
        dropped.update(r.dropped)
    latencies = [x for r in reports for x in r.latencies_ms]
    ingest = [x for c in clients for x in c.stats.latencies_ms]
    sent = sum(c.stats.signals_sent for c in clients)
    wire = sum(c.stats.bytes_sent for c in clients)
    rejected: Counter[str] = Counter()
    outbox: Counter[str] = Counter()
    for c in clients:
        rejected.update(c.stats.rejected)
        stats = c.outbox_stats()
        outbox.update(stats.counters)
        outbox["queued_signals"] += stats.queued_signals
    return {
        "mode": mode,
        "devices": len(reports),
        "utterances": sum(r.utterances for r in reports),
        "signals_produced": sum(r.signals for r in reports),
        "ldp_epsilon": ldp_epsilon,
        "signals_withheld_by_budget": sum(r.withheld for r in reports),
        "signals_sent": sent,
        "batches_sent": sum(c.stats.batches_sent for c in clients),
        "batches_pending": sum(c.pending_batches for c in clients),
        "batches_rejected": dict(rejected),
        # Lifetime counters of the devices' outboxes (they survive kills when the outboxes are files).
        "outbox": {
            key: outbox[key]
            for key in (
                "signals_added",
                "signals_acknowledged",
                "batches_acknowledged",
                "signals_dropped_overflow",
                "signals_dropped_age",
                "signals_set_aside",
                "signals_purged",
                "queued_signals",
            )
        },
        "retries": sum(c.stats.retries for c in clients),
        "dropped": dict(sorted(dropped.items())),
        "bytes_on_wire": wire,
        "bytes_per_signal": round(wire / sent, 2) if sent else None,
        "pipeline_ms_p50": percentile(latencies, 0.5),
        "pipeline_ms_p95": percentile(latencies, 0.95),
        "ingest_ms_p50": percentile(ingest, 0.5),
        "ingest_ms_p99": percentile(ingest, 0.99),
        "wall_s": round(wall_s, 2),
        "profiles": [
            {
                "profile_id": r.profile_id,
                "region": r.region,
                "utterances": r.utterances,
                "signals": r.signals,
                "dropped": dict(r.dropped),
            }
            for r in reports
        ],
        "analyses": {r.profile_id: r.analyses for r in reports},
    }


def print_summary(s: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    rows = [
        ("mode", s["mode"]),
        ("devices", s["devices"]),
        ("utterances", s["utterances"]),
        ("signals produced", s["signals_produced"]),
        ("local differential privacy", f"epsilon {s['ldp_epsilon']}" if s["ldp_epsilon"] else "off"),
        ("signals withheld by the daily budget", s["signals_withheld_by_budget"]),
        ("signals sent (acknowledged)", s["signals_sent"]),
        ("batches sent / pending", f"{s['batches_sent']} / {s['batches_pending']}"),
        ("batches rejected", ", ".join(f"{k}: {v}" for k, v in s["batches_rejected"].items()) or "0"),
        (
            "outbox: accepted / acknowledged",
            f"{s['outbox']['signals_added']} / {s['outbox']['signals_acknowledged']} signals "
            f"({s['outbox']['batches_acknowledged']} batches)",
        ),
        (
            "outbox: dropped / set aside / queued",
            f"{s['outbox']['signals_dropped_overflow'] + s['outbox']['signals_dropped_age']} / "
            f"{s['outbox']['signals_set_aside']} / {s['outbox']['queued_signals']}",
        ),
        ("dropped, by reason", ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "0"),
        ("bytes on the wire", f"{s['bytes_on_wire']} ({s['bytes_per_signal'] or '-'} per signal)"),
        ("pipeline latency p50 / p95", f"{ms(s['pipeline_ms_p50'])} / {ms(s['pipeline_ms_p95'])}"),
        ("Ingest latency p50 / p99", f"{ms(s['ingest_ms_p50'])} / {ms(s['ingest_ms_p99'])}"),
        ("wall time", f"{s['wall_s']} s"),
    ]
    if "kills" in s:
        rows.insert(-1, ("device processes killed (SIGKILL)", s["kills"]))
    width = max(len(k) for k, _ in rows)
    print("\nSotto device emulator: summary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="aggregator address")
    p.add_argument("--devices", type=int, default=3, help="number of virtual devices (default: 3)")
    p.add_argument(
        "--queries",
        type=Path,
        default=None,
        help="text file (one query per line) or folder of audio files (default: built-in demo)",
    )
    p.add_argument(
        "--text", action="store_true", help="analyse text queries as text instead of speaking them"
    )
    p.add_argument(
        "--region",
        default="US",
        help="ISO 3166-1 alpha-2 region; a comma list is assigned round-robin (default: US)",
    )
    p.add_argument(
        "--per-device",
        type=int,
        default=0,
        help="queries per device, drawn from the set (default: 0 = every query)",
    )
    p.add_argument("--profile-prefix", default="emulated", help="profile ids are PREFIX-device-NNNN")
    p.add_argument("--batch-size", type=int, default=20, help="signals per batch (default: 20)")
    p.add_argument("--workers", type=int, default=2, help="devices run concurrently (default: 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="Ingest deadline in seconds (default: 5)")
    p.add_argument("--seed", type=int, default=7, help="seed for drawing queries (default: 7)")
    p.add_argument(
        "--no-clips", action="store_true", help="leave the real recorded clips out of the demo set"
    )
    p.add_argument(
        "--ldp-epsilon",
        type=float,
        default=0.0,
        help="local differential privacy: randomized-response epsilon per signal (default: 0 = off; "
        "tools/demo.sh uses 2)",
    )
    p.add_argument(
        "--daily-budget",
        type=int,
        default=DEFAULT_DAILY_BUDGET,
        help=f"with --ldp-epsilon: signals per device per day (default: {DEFAULT_DAILY_BUDGET})",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="folder for each device's persisted privacy budget (default: a temporary folder per run)",
    )
    p.add_argument("--models", default=None, help="models folder (default: the shipped models/)")
    p.add_argument("--report", type=Path, default=None, help="write the summary as JSON to this file")
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="JSON {profile_id: token}, a bearer token per device (from `sotto-server token issue`)",
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM CA of the aggregator's certificate; turns TLS on (default: plaintext)",
    )
    p.add_argument(
        "--outbox-dir",
        type=Path,
        default=None,
        help="keep each device's outbox in DIR/PROFILE.db, surviving the emulator (default: in memory)",
    )
    p.add_argument(
        "--max-delay",
        type=float,
        default=300.0,
        help="seconds a signal may wait for its batch to fill before it is sent anyway (default: 300)",
    )
    p.add_argument(
        "--offline-for",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the devices produce but do not send for this long, then drain their outboxes (default: 0)",
    )
    p.add_argument(
        "--kill-every",
        type=int,
        default=0,
        metavar="N",
        help="run the devices in a child process killed with SIGKILL after every N utterances, at a random "
        "moment, and restarted until done; needs --outbox-dir (default: 0 = never)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="how long a device keeps trying to empty its outbox at the end (default: 30)",
    )
    # Internal: how the --kill-every supervisor runs its child.
    p.add_argument("--online-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def supervise(argv: list[str], args: argparse.Namespace) -> int:
    """--kill-every: run the devices in a child process, SIGKILL it after every N utterances at a random
    moment (while it analyses, writes its outbox or sends), restart it, until it finishes by itself."""
    child_args: list[str] = []
    skip = False
    for arg in argv:  # the same options, without --kill-every and its value
        if skip:
            skip = False
            continue
        if arg == "--kill-every":
            skip = True
            continue
        if arg.startswith("--kill-every="):
            continue
        child_args.append(arg)
    online_at = time.time() + args.offline_for
    command = [
        sys.executable,
        "-m",
        "tools.emulate_device",
        *child_args,
        "--worker",
        "--online-at",
        str(online_at),
    ]
    rng = random.Random(args.seed)
    kills = 0
    while True:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env())
        assert child.stdout is not None
        seen = 0
        last = gap = 0.0
        for line in child.stdout:
            if line.strip() != "utterance":
                continue
            now = time.monotonic()
            gap, last = (now - last if last else 0.0), now
            seen += 1
            if seen >= args.kill_every:
                # A random moment before the next utterance would be done: while the child analyses,
                # writes its outbox or sends.
                time.sleep(rng.uniform(0, min(gap, 0.5)))
                child.send_signal(signal.SIGKILL)
                break
        child.stdout.close()
        code = child.wait()
        if code == -signal.SIGKILL:
            kills += 1
            continue
        if args.report is not None and args.report.exists():
            summary = json.loads(args.report.read_text(encoding="utf-8"))
            summary["kills"] = kills
            args.report.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"emulate_device: {kills} device processes killed with SIGKILL along the way", file=sys.stderr)
        return code


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.kill_every < 0 or args.offline_for < 0 or args.max_delay < 0 or args.drain_seconds < 0:
        parser.error("--kill-every, --offline-for, --max-delay and --drain-seconds must be at least 0")
    if args.kill_every and args.outbox_dir is None:
        parser.error("--kill-every needs --outbox-dir: the outboxes must outlive the killed process")
    regions = [r.strip().upper() for r in args.region.split(",") if r.strip()]
    if not regions or not all(REGION_PATTERN.fullmatch(r) for r in regions):
        parser.error(f"--region {args.region!r}: expected ISO 3166-1 alpha-2 codes such as US or US,DE")
    if args.devices < 1 or args.workers < 1 or args.batch_size < 1 or args.per_device < 0:
        parser.error("--devices, --workers and --batch-size must be at least 1; --per-device at least 0")
    try:
        queries = load_queries(args.queries, include_clips=not args.no_clips)
    except ValueError as exc:
        parser.error(str(exc))
    if args.report is not None and not args.report.parent.is_dir():
        parser.error(f"--report {args.report}: folder {args.report.parent} does not exist")
    if args.tls_ca is not None and not args.tls_ca.is_file():
        parser.error(f"--tls-ca {args.tls_ca}: no such file")
    if args.state_dir is not None and not args.state_dir.is_dir():
        parser.error(f"--state-dir {args.state_dir}: no such folder")
    ldp_options = None
    if args.ldp_epsilon:
        try:
            ldp_options = LdpOptions(args.ldp_epsilon, args.daily_budget)
        except ValueError as exc:
            parser.error(f"--ldp-epsilon/--daily-budget: {exc}")
    if args.outbox_dir is not None:
        args.outbox_dir.mkdir(parents=True, exist_ok=True)
    if args.kill_every:
        return supervise(argv, args)
    online_at = args.online_at if args.online_at is not None else time.time() + args.offline_for
    profiles = [f"{args.profile_prefix}-device-{i + 1:04d}" for i in range(args.devices)]
    tokens = None
    if args.token_file is not None:
        try:
            tokens = load_tokens(args.token_file, profiles)
        except ValueError as exc:
            parser.error(str(exc))

    from tqdm import tqdm

    models = EdgeModels(EdgeConfig(models_dir=args.models))
    needs_audio = any(q.audio for q in queries) or not args.text
    with tempfile.TemporaryDirectory(prefix="sotto-emu-") as tmp:
        speaker = Speaker(Path(tmp))
        if not args.text and not speaker.available and any(q.text for q in queries):
            print(
                "emulate_device: espeak-ng is not installed; analysing text queries as text "
                "(install espeak-ng to speak them, or pass --text)",
                file=sys.stderr,
            )
        as_text = args.text or not speaker.available
        mode = (
            "text" if as_text and not any(q.audio for q in queries) else ("audio" if not as_text else "mixed")
        )
        if needs_audio:
            models.load_audio_models()
        rng = random.Random(args.seed)
        channel = (
            grpc.insecure_channel(args.target)
            if args.tls_ca is None
            else grpc.secure_channel(args.target, TlsOptions.from_files(ca=args.tls_ca).credentials())
        )
        devices, clients, reports, plans = [], [], [], []
        for i in range(args.devices):
            region = regions[i % len(regions)]
            profile = profiles[i]
            plan = (
                rng.sample(queries, k=min(args.per_device, len(queries)))
                if args.per_device
                else list(queries)
            )
            ldp = None
            if ldp_options is not None:
                state = args.state_dir or Path(tmp)
                budget = state / f"{profile}.budget.json"
                ldp = LocalPrivacy(models.policy.interest_ids, ldp_options, budget)
            devices.append(Pipeline(models, region=region, ldp=ldp))
            clients.append(
                DeliveryClient(
                    profile,
                    region,
                    channel=channel,
                    batch_size=args.batch_size,
                    timeout_s=args.timeout,
                    token=None if tokens is None else tokens[profile],
                    outbox=None if args.outbox_dir is None else args.outbox_dir / f"{profile}.db",
                    max_delay_s=args.max_delay,
                )
            )
            reports.append(DeviceReport(profile, region))
            plans.append(plan)
        started = time.perf_counter()
        with (
            tqdm(
                total=sum(len(p) for p in plans),
                unit="utt",
                desc="utterances",
                file=sys.stderr,
                disable=args.worker,
            ) as bar,
            ThreadPoolExecutor(max_workers=args.workers) as pool,
        ):
            futures = [
                pool.submit(
                    run_device, d, c, p, speaker, as_text, r, bar, online_at, args.drain_seconds, args.worker
                )
                for d, c, p, r in zip(devices, clients, plans, reports, strict=True)
            ]
            for fut in futures:
                fut.result()
        summary = summarize(reports, clients, time.perf_counter() - started, mode, args.ldp_epsilon or None)
        for client in clients:
            client.close()
        channel.close()
    print_summary(summary)
    if args.report is not None:
        args.report.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    ok = summary["batches_pending"] == 0 and not summary["batches_rejected"]
    if not ok:
        print("emulate_device: some batches were not delivered (see the summary)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
