"""What the demo shows, set beside what the glasses heard: tools/demo.sh prints its findings with this.

    python -m tools.demo_explain profiles --report report.json --target HOST:PORT --admin-token-file F
    python -m tools.demo_explain fleet --report fleet.json --target HOST:PORT --admin-token-file F

``profiles``: for each emulated device of an emulator report, the categories its glasses heard (the
privacy filter's decision, before any noise), what they sent (after local differential privacy), and the
profile the aggregator merged from it (GetProfile).

``fleet``: for a fleet run with local differential privacy, the true number of signals per category (what
the devices emitted before randomized response) beside the aggregator's de-biased estimate and its 95%
interval (AudienceSize), for the categories heard most and a few never heard at all.

The report is the emulator's ``--report`` JSON; ``analyses`` holds each utterance's ``signals`` (before
noise), ``sent`` and ``withheld_by_budget``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sotto.policy import Policy, PolicyError, models_dir
from sotto.v1 import signals_pb2, signals_pb2_grpc

#: Categories named by newcomers who saw them in a noised demo profile (shown when never heard).
NEVER_HEARD_EXAMPLES = ("Birdwatching", "Auto Repair", "Cooking")


@dataclass(frozen=True, slots=True)
class Estimate:
    """One category: the truth, what arrived noised, and the aggregator's de-biased estimate."""

    category_id: str
    name: str
    truth: int
    received: int
    estimate: float | None
    low: float | None
    high: float | None

    @property
    def covered(self) -> bool | None:
        """Whether the interval holds the truth (None: the aggregator reported nothing)."""
        if self.low is None or self.high is None:
            return None
        return self.low <= self.truth <= self.high


def load_report(path: Path) -> dict[str, Any]:
    """An emulator report; ``ValueError`` when it is not one."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not an emulator report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("analyses"), dict):
        raise ValueError(f"{path}: not an emulator report (no 'analyses'; run the emulator with --report)")
    return report


def heard_and_sent(analyses: list[dict[str, Any]]) -> tuple[Counter[str], Counter[str]]:
    """(signals per category that left the privacy filter and the budget, before noise; signals per
    category as sent, after noise). The budget withholds the last signals of an utterance (it is spent in
    order), so the true ones sent are the first ``len(signals) - withheld_by_budget``."""
    heard: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    for analysis in analyses:
        signals = analysis["signals"]
        kept = len(signals) - int(analysis.get("withheld_by_budget", 0))
        heard.update(s["id"] for s in signals[:kept])
        sent.update(s["id"] for s in analysis.get("sent", signals[:kept]))
    return heard, sent


def _stub(target: str, token_file: Path) -> tuple[signals_pb2_grpc.SignalAggregatorStub, grpc.Channel, Any]:
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the admin token file {token_file}: {exc}") from None
    channel = grpc.insecure_channel(target)
    return signals_pb2_grpc.SignalAggregatorStub(channel), channel, (("authorization", f"Bearer {token}"),)


def _names(policy: Policy, counts: Counter[str], limit: int) -> list[str]:
    return [f"{policy.taxonomy[c].name} ×{n}" for c, n in counts.most_common(limit)]


def explain_profiles(
    report: dict[str, Any], target: str, token_file: Path, policy: Policy, top_k: int
) -> None:
    """Print, per device: heard (before noise), sent (after noise), the merged profile."""
    stub, channel, metadata = _stub(target, token_file)
    epsilon = report.get("ldp_epsilon")
    with channel:
        for profile_id, analyses in report["analyses"].items():
            heard, sent = heard_and_sent(analyses)
            try:
                profile = stub.GetProfile(
                    signals_pb2.GetProfileRequest(profile_id=profile_id, top_k=top_k),
                    timeout=10,
                    metadata=metadata,
                )
                merged = [f"{s.name} {s.score:.2f}" for s in profile.scores]
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                merged = [
                    "(no profile: nothing was sent)" if code == grpc.StatusCode.NOT_FOUND else code.name
                ]
            print(f"\n{profile_id}: {len(analyses)} utterances")
            rows = [
                ("heard (before noise)", _names(policy, heard, top_k) or ["nothing commercial"]),
                ("sent (after noise)" if epsilon else "sent", _names(policy, sent, top_k) or ["nothing"]),
                ("aggregator's profile", merged),
            ]
            for label, items in rows:
                print(f"  {label:<22}{'; '.join(items)}")
    if epsilon:
        keep = _keep_probability(float(epsilon), len(policy.interest_ids))
        print(
            f"\nWith local differential privacy at epsilon {epsilon:g}, each signal keeps its true "
            f"category with probability {keep:.1%} and otherwise names one of the other "
            f"{len(policy.interest_ids) - 1} interest categories at random. So one device's profile is "
            "mostly noise, by design: neither the aggregator nor anyone who reads it can tell which "
            "categories a wearer really talked about. What the aggregator can still learn is how common "
            "each interest is across many devices; the fleet below shows it."
        )
    else:
        print(
            "\nLocal differential privacy is off: each profile holds exactly the categories its glasses "
            "heard (weights decay with a half-life, so the scores are the decayed sums)."
        )


def _keep_probability(epsilon: float, categories: int) -> float:
    """k-ary randomized response: the chance a signal keeps its true category."""
    return math.exp(epsilon) / (math.exp(epsilon) + categories - 1)


def fleet_estimates(
    report: dict[str, Any], target: str, token_file: Path, policy: Policy, top: int
) -> list[Estimate]:
    """The truth and the aggregator's de-biased estimate for the ``top`` categories heard most and for
    up to three interest categories never heard."""
    heard: Counter[str] = Counter()
    received: Counter[str] = Counter()
    for analyses in report["analyses"].values():
        h, s = heard_and_sent(analyses)
        heard.update(h)
        received.update(s)
    chosen = [c for c, _ in heard.most_common(top)]
    by_name = {policy.taxonomy[c].name: c for c in policy.interest_ids}
    never = [by_name[n] for n in NEVER_HEARD_EXAMPLES if n in by_name and heard[by_name[n]] == 0]
    never += [c for c in sorted(policy.interest_ids) if heard[c] == 0 and c not in never]
    chosen += never[:3]
    stub, channel, metadata = _stub(target, token_file)
    out = []
    with channel:
        for category_id in chosen:
            reply = stub.AudienceSize(
                signals_pb2.AudienceSizeRequest(category_id=category_id, min_score=0.0),
                timeout=10,
                metadata=metadata,
            )
            known = not reply.too_small
            out.append(
                Estimate(
                    category_id,
                    policy.taxonomy[category_id].name,
                    heard[category_id],
                    received[category_id],
                    reply.estimated_signals if known else None,
                    reply.estimate_low if known else None,
                    reply.estimate_high if known else None,
                )
            )
    return out


def explain_fleet(report: dict[str, Any], estimates: list[Estimate], policy: Policy) -> None:
    """Print the truth beside the estimates, and what they mean."""
    epsilon = report.get("ldp_epsilon")
    sent = int(report.get("signals_sent", 0))
    print(
        f"\n{report['devices']} devices, {report['utterances']} utterances, {sent} signals sent, every one "
        f"noised with epsilon {epsilon:g} (randomized response over {len(policy.interest_ids)} categories)."
    )
    header = ("category", "truth", "arrived as", "estimate", "95% interval", "holds truth")
    rows = [
        (
            e.name,
            str(e.truth),
            str(e.received),
            "below k" if e.estimate is None else f"{e.estimate:.0f}",
            "-" if e.low is None else f"{e.low:.0f} .. {e.high:.0f}",
            {True: "yes", False: "NO", None: "-"}[e.covered],
        )
        for e in estimates
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  "
            + "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if any(e.estimate is None for e in estimates):
        print(
            "\nbelow k: the aggregator gives no estimate under its k-anonymity threshold (--min-audience); "
            "at this scale the noise swamps a count that small."
        )
    covered = [e.covered for e in estimates if e.covered is not None]
    print(
        f"\ntruth: signals of the category the devices emitted (before noise); arrived as: how many noised "
        f"signals named it; estimate: the aggregator's count de-biased for the noise. {sum(covered)} of "
        f"{len(covered)} intervals hold the truth: about 95 in 100 should, over many runs (the noise is "
        "fresh every time), so a miss now and then is expected. No single signal can be trusted, yet the "
        "fleet-wide counts come out right within their intervals. An interval is wide because each signal "
        "says so little: it grows with the square root of the signals sent while the counts grow with "
        "the signals themselves, so it narrows, relative to the counts, as the fleet grows, or as epsilon "
        "grows (less privacy)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo_explain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=("profiles", "fleet"))
    parser.add_argument("--report", type=Path, required=True, help="the emulator's --report JSON")
    parser.add_argument("--target", required=True, metavar="HOST:PORT", help="the aggregator (plaintext)")
    parser.add_argument("--admin-token-file", type=Path, required=True, help="an admin token")
    parser.add_argument("--top", type=int, default=6, help="categories (or profile entries) to show")
    parser.add_argument("--models", default=None, help="models folder (default: the shipped models/)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    try:
        report = load_report(args.report)
        policy = Policy.load(models_dir(args.models))
        if args.what == "profiles":
            explain_profiles(report, args.target, args.admin_token_file, policy, args.top)
        else:
            if not report.get("ldp_epsilon"):
                raise ValueError(
                    f"{args.report}: the fleet was run without --ldp-epsilon; nothing to de-bias"
                )
            explain_fleet(
                report, fleet_estimates(report, args.target, args.admin_token_file, policy, args.top), policy
            )
    except (ValueError, PolicyError) as exc:
        print(f"demo_explain: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(
            f"demo_explain: error: the aggregator answered {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )  # type: ignore[attr-defined]
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
