"""What the reviewed gazetteer (models/gazetteer/) adds and costs, beside the model alone.

    python -m tools.gazetteer_report                    # held-out split and round 4, side by side
    python -m tools.gazetteer_report --threshold 0.02   # at another sensitivity threshold (repeatable)
    python -m tools.gazetteer_report --hits train       # list the training queries the gazetteer fires on

The classifier runs once per query (ONNX Runtime); the device's privacy filter then decides twice, with
and without the gazetteer, so the two columns differ only by it. Round 4 (tools/data/round4) is not
trained on by the shipped model, so it is a second check. Terms are reviewed against the training split
only (``--hits train``); the held-out split and round 4 are measured, never used to choose terms.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from sotto.edge.gazetteer import Gazetteer
from sotto.edge.pipeline import EdgeConfig, EdgeModels
from sotto.edge.privacy import Dropped, FilterOptions, PrivacyFilter
from sotto.policy import SENSITIVE_CLASSES
from tools import modeldata
from tools.evaluate import DAY, metrics

ROOT = Path(__file__).resolve().parents[1]
ROUND4 = ROOT / "tools" / "data" / "round4"

Decision = tuple[str | None, str | None]


def round4() -> list[modeldata.Example]:
    """The fourth round of hand-written queries (interest, no interest, sensitive), all as one set."""

    def rows(path: Path) -> list[dict[str, str]]:
        with path.open(encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))

    out: list[modeldata.Example] = []
    for path in sorted(ROUND4.glob("interest_queries_*.tsv")):
        out += [
            modeldata.Example(r["text"], r["category_id"], "none", path.stem, "round4") for r in rows(path)
        ]
    for path in sorted(ROUND4.glob("no_interest_queries_*.tsv")):
        out += [modeldata.Example(r["text"], "none", "none", path.stem, "round4") for r in rows(path)]
    for path in sorted(ROUND4.glob("sensitive_queries_*.tsv")):
        out += [
            modeldata.Example(r["text"], None, r["class"], path.stem, "round4", mixed=r["mixed"] == "1")
            for r in rows(path)
        ]
    return out


def both_decisions(
    examples: list[modeldata.Example],
    models: EdgeModels,
    gazetteer: Gazetteer,
    thresholds: list[float] | None = None,
) -> list[tuple[list[Decision], list[Decision]]]:
    """Per sensitivity threshold (default: the model's own), the decisions of the model alone and of
    the model or gazetteer: (top signal id or None, drop reason or None) per example. The classifier
    runs once per example."""
    outputs = [models.classifier.classify(ex.text) for ex in examples]
    meta = models.classifier.meta
    result = []
    for threshold in thresholds or [meta.sensitive_threshold]:
        # The device's filter (the model's commercial gate), at this threshold, without and with the lists.
        filters = tuple(
            PrivacyFilter.for_model(
                models.policy, meta, FilterOptions(sensitive_threshold=threshold, gazetteer=on), gazetteer
            )
            for on in (False, True)
        )
        out: tuple[list[Decision], list[Decision]] = ([], [])
        for ex, output in zip(examples, outputs, strict=True):
            for sink, device_filter in zip(out, filters, strict=True):
                decision = device_filter.decide(output, DAY, ex.text)
                if isinstance(decision, Dropped):
                    sink.append((None, decision.reason))
                else:
                    sink.append((decision[0].category_id, None))
        result.append(out)
    return result


def render(figures: dict[str, tuple[dict[str, Any], dict[str, Any]]], terms: int, threshold: float) -> str:
    """Markdown: per data set, the model alone and with the gazetteer."""
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    names = list(figures)
    head = " | ".join(f"{n}: model | {n}: + gazetteer" for n in names)
    lines = [
        f"Gazetteer: {terms} terms; sensitivity threshold {threshold:g}. Queries: "
        + "; ".join(
            f"{n}: {m['counts']['sensitive']} sensitive, {m['counts']['interest']} interest, "
            f"{m['counts']['no_interest']} no-interest"
            for n, (m, _) in figures.items()
        )
        + ".",
        "",
        f"| metric | {head} |",
        "| --- |" + " --- | --- |" * len(names),
    ]
    rows = [
        ("sensitive leak, overall", "sensitive_leak_rate"),
        ("sensitive leak, worst class", "sensitive_leak_rate_worst_class"),
        ("sensitive leak, mixed queries", "sensitive_leak_rate_mixed"),
        ("benign interest queries dropped as sensitive", "benign_interest_dropped_as_sensitive"),
        ("all benign queries dropped as sensitive", "benign_dropped_as_sensitive"),
        ("interest queries: top signal's tier-1 correct", "interest_tier1_accuracy"),
        ("no-interest queries: no signal", "no_interest_silent_rate"),
    ]
    for label, key in rows:
        lines.append(
            f"| {label} | " + " | ".join(f"{pct(a[key])} | {pct(b[key])}" for a, b in figures.values()) + " |"
        )
    for cls in SENSITIVE_CLASSES:
        cells = []
        for a, b in figures.values():
            ra, n = a["leak_by_class"].get(cls, (0.0, 0))[:2]
            rb = b["leak_by_class"].get(cls, (0.0,))[0]
            cells.append(f"{pct(ra)} of {n} | {pct(rb)}")
        lines.append(f"| leak: {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--hits",
        choices=("train",),
        help="instead of figures: the training queries the gazetteer fires on (to review terms)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        action="append",
        help="sensitivity threshold(s) to compare at (repeat; default: the model's own)",
    )
    args = parser.parse_args(argv)
    gazetteer = Gazetteer.load(args.models)
    if args.hits:
        for ex in modeldata.load_all():
            if ex.split == args.hits:
                hit = gazetteer.match(ex.text)
                if hit is not None:
                    print(f"{ex.sensitive}\t{hit.term}\t{hit.sensitive_class}\t{ex.text}")
        return 0
    models = EdgeModels(
        EdgeConfig(models_dir=str(args.models), classifier_threads=1, filter=FilterOptions(gazetteer=False))
    )
    sets = {
        "held-out": [e for e in modeldata.load_all() if e.split == "eval"],
        "round 4": round4(),
    }
    thresholds = args.threshold or [models.classifier.meta.sensitive_threshold]
    figures: list[dict[str, tuple[dict[str, Any], dict[str, Any]]]] = [{} for _ in thresholds]
    for name, examples in sets.items():
        for by_threshold, (alone, with_gazetteer) in zip(
            figures, both_decisions(examples, models, gazetteer, thresholds), strict=True
        ):
            by_threshold[name] = (
                metrics(examples, alone, models.policy),
                metrics(examples, with_gazetteer, models.policy),
            )
    print("\n\n".join(render(f, len(gazetteer), t) for f, t in zip(figures, thresholds, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
