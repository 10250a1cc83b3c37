"""What the teacher's heads would buy on the device's decision path, priced from the committed soft labels.

    python -m tools.teacher_pairings                       # each pairing of the two heads
    python -m tools.teacher_pairings --band 0.02 0.5       # and a cascade: the teacher asked only when
                                                           # the model's score is in [0.02, 0.5)

The device model's probabilities come from the shipped ONNX file, one query at a time as on the device;
the teacher's from its soft-label file (tools/data/teacher_labels.npz, the softmax of its logits). Each
pairing takes its detector (P(sensitive)) from one and its interest head from the other. Its sensitivity
threshold and commercial gate are set on the calibration split by the build's own rule
(``operating_points`` and ``pick_gate`` in tools/build_models.py); the held-out queries are then decided
by the device's privacy filter (the heads alone: gazetteer off) and measured by ``tools.evaluate.metrics``.

Nothing here ships or chooses anything: it tells what a detector or interest head with the teacher's
knowledge would be worth before one is built. The soft-label file covers the transfer set only, so the
held-out-only folder (tools/data/heldout), which the teacher never labels, is left out of the figures.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.classifier import (
    ClassifierMeta,
    ClassifierOutput,
    normalize_text,
    outputs_from_probabilities,
)
from sotto.edge.privacy import FilterOptions, PrivacyFilter
from sotto.policy import Policy
from tools import modeldata
from tools.build_models import OperatingPoint, operating_points, pick_gate, split_training
from tools.evaluate import DAY, metrics, outcome
from tools.teacher_labels import SoftLabels, read_soft_labels, softmax, text_key

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("model", "teacher")


@dataclass(frozen=True)
class Split:
    """Examples with both sources' probabilities, row for row: (interest, sensitivity) each."""

    examples: list[modeldata.Example]
    model: tuple[np.ndarray, np.ndarray]
    teacher: tuple[np.ndarray, np.ndarray]

    def heads(
        self, detector: str, interest: str, band: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(interest, sensitivity) probabilities of a pairing. With ``band``, the detector is the model's
        except where the model's score is in [low, high), where it is the teacher's (a cascade)."""
        for name in (detector, interest):
            if name not in SOURCES:
                raise ValueError(f"unknown head source {name!r}; one of {SOURCES}")
        p_int = getattr(self, interest)[0]
        p_sen = getattr(self, detector)[1]
        if band is not None:
            if detector != "model":
                raise ValueError("a cascade asks the teacher inside the band and the model outside it")
            asked = self.asked(band)
            p_sen = np.where(asked[:, None], self.teacher[1], self.model[1])
        return p_int, p_sen

    def asked(self, band: tuple[float, float]) -> np.ndarray:
        """Which rows a cascade over ``band`` would ask the teacher about."""
        low, high = band
        score = 1.0 - self.model[1][:, 0]
        return (score >= low) & (score < high)


def teacher_probabilities(
    labels: SoftLabels, examples: list[modeldata.Example]
) -> tuple[list[int], tuple[np.ndarray, np.ndarray]]:
    """(indices of the examples the file covers, their interest and sensitivity probabilities)."""
    rows = labels.rows()
    keep = [i for i, e in enumerate(examples) if text_key(e.text) in rows]
    idx = [rows[text_key(examples[i].text)] for i in keep]
    return keep, (softmax(labels.interest[idx]), softmax(labels.sensitive[idx]))


def decide(
    split: Split, outputs: list[ClassifierOutput], point: OperatingPoint, policy: Policy
) -> list[tuple[str | None, str | None]]:
    """The device filter's decision on each example's classifier output, at the point's threshold and
    gate: (top signal id or None, drop reason or None), as tools.evaluate.metrics takes them."""
    device_filter = PrivacyFilter(
        policy,
        sensitive_threshold=point.threshold,
        options=FilterOptions(gazetteer=False),
        max_no_interest=point.max_no_interest,
    )
    return [
        outcome(device_filter.decide(output, DAY, ex.text))
        for ex, output in zip(split.examples, outputs, strict=True)
    ]


def price(
    calib: Split,
    held: Split,
    meta: ClassifierMeta,
    policy: Policy,
    detector: str,
    interest: str,
    band: tuple[float, float] | None = None,
) -> tuple[OperatingPoint, dict[str, Any]]:
    """One pairing: its operating point on the calibration split and its held-out figures
    (``tools.evaluate.metrics``, plus the share of interest queries left silent without being dropped,
    and how often the interest head's most likely category has the right tier-1 family)."""
    p_int, p_sen = calib.heads(detector, interest, band)
    outputs = outputs_from_probabilities(meta, p_int, p_sen)
    point = pick_gate(operating_points(1.0 - p_sen[:, 0], outputs, calib.examples, policy))
    held_outputs = outputs_from_probabilities(meta, *held.heads(detector, interest, band))
    decisions = decide(held, held_outputs, point, policy)
    figures = metrics(held.examples, decisions, policy)
    is_interest = [e.sensitive == "none" and e.interest not in (None, "none") for e in held.examples]
    figures["interest_silent"] = float(
        np.mean([d[1] == "no_interest" for d, i in zip(decisions, is_interest, strict=True) if i])
    )
    tier1 = {cid: policy.taxonomy[cid].tier1 for cid in policy.interest_ids}
    ranked = [o.interests[0][0] for o in held_outputs]
    figures["argmax_tier1_accuracy"] = float(
        np.mean(
            [
                tier1[top] == tier1[str(e.interest)]
                for e, top, i in zip(held.examples, ranked, is_interest, strict=True)
                if i
            ]
        )
    )
    return point, figures


def load(models: Path, soft: Path) -> tuple[Split, Split, ClassifierMeta, Policy, int]:
    """Both splits with both sources' probabilities, the model's metadata and policy, and how many
    held-out queries the soft labels do not cover."""
    from tokenizers import Tokenizer

    from tools.build_models import onnx_probabilities

    meta = ClassifierMeta.load(models / "classifier.json")
    labels = read_soft_labels(soft, meta.interest_labels, meta.sensitive_labels)
    tokenizer = Tokenizer.from_file(str(models / "tokenizer.json"))
    examples = modeldata.load_all()
    _, calib = split_training([e for e in examples if e.split == "train"])
    held = [e for e in examples if e.split == "eval"]
    splits = []
    uncovered = 0
    for part in (calib, held):
        keep, teacher = teacher_probabilities(labels, part)
        uncovered += len(part) - len(keep)
        part = [part[i] for i in keep]
        model = onnx_probabilities(
            models / "classifier.onnx", tokenizer, [normalize_text(e.text) or "." for e in part]
        )
        splits.append(Split(part, model, teacher))
    return splits[0], splits[1], meta, Policy.load(models), uncovered


def render(rows: list[tuple[str, OperatingPoint, dict[str, Any], float | None]]) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    counts = rows[0][2]["counts"]
    lines = [
        f"Held-out queries with teacher labels: {counts['interest']} interest, {counts['no_interest']} "
        f"no-interest, {counts['sensitive']} sensitive. Each pairing at its own calibrated point.",
        "",
        "| detector, interest head | threshold | gate | benign interest dropped | tier-1 correct "
        "| no-interest silent | leak | leak, worst class | interest silent, not dropped "
        "| most likely category's tier-1 | asked the teacher |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, point, m, asked in rows:
        lines.append(
            f"| {name} | {point.threshold:.4f} | {point.max_no_interest:g} "
            f"| {pct(m['benign_interest_dropped_as_sensitive'])} | {pct(m['interest_tier1_accuracy'])} "
            f"| {pct(m['no_interest_silent_rate'])} | {100 * m['sensitive_leak_rate']:.2f}% "
            f"| {pct(m['sensitive_leak_rate_worst_class'])} | {pct(m['interest_silent'])} "
            f"| {pct(m['argmax_tier1_accuracy'])} | {'' if asked is None else pct(asked)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--teacher-labels", type=Path, default=ROOT / "tools" / "data" / "teacher_labels.npz")
    parser.add_argument(
        "--band",
        type=float,
        nargs=2,
        action="append",
        metavar=("LOW", "HIGH"),
        help="also price a cascade that asks the teacher when the model's score is in [LOW, HIGH) (repeat)",
    )
    args = parser.parse_args(argv)
    for low, high in args.band or []:
        if not 0.0 <= low < high <= 1.0:
            parser.error(f"--band {low:g} {high:g}: need 0 <= LOW < HIGH <= 1")
    try:
        calib, held, meta, policy, uncovered = load(args.models, args.teacher_labels)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    rows: list[tuple[str, OperatingPoint, dict[str, Any], float | None]] = []
    for detector, interest in (
        ("model", "model"),
        ("teacher", "model"),
        ("model", "teacher"),
        ("teacher", "teacher"),
    ):
        point, m = price(calib, held, meta, policy, detector, interest)
        rows.append((f"{detector}, {interest}", point, m, None))
    for low, high in args.band or []:
        point, m = price(calib, held, meta, policy, "model", "model", (low, high))
        rows.append((f"cascade [{low:g}, {high:g}), model", point, m, float(held.asked((low, high)).mean())))
    print(render(rows))
    print(f"\n({uncovered} held-out or calibration queries have no teacher labels and are left out.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
