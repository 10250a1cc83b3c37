"""What the reviewed gazetteer (models/gazetteer/) adds and costs, beside the model alone.

    python -m tools.gazetteer_report                    # the held-out split, all and hand-written only
    python -m tools.gazetteer_report --threshold 0.15   # at another sensitivity threshold (repeatable)
    python -m tools.gazetteer_report --hits train       # list the training queries the gazetteer fires on

The classifier runs once per query (ONNX Runtime); the device's privacy filter then decides twice, with
and without the gazetteer, so the two columns differ only by it. The held-out split is shown whole and
as its hand-written part (the held-out fifth of tools/data/handwritten and round4, and every query of
tools/data/heldout), where the implicit phrasings and names a list can catch are. Terms are reviewed
against the training split only (``--hits train``); the held-out split is measured, never used to
choose terms, and the final exam is not read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sotto.edge.gazetteer import Gazetteer
from sotto.edge.pipeline import EdgeConfig, EdgeModels
from sotto.edge.privacy import FilterOptions, PrivacyFilter
from sotto.policy import SENSITIVE_CLASSES
from tools import modeldata
from tools.evaluate import DAY, metrics, outcome

ROOT = Path(__file__).resolve().parents[1]

Decision = tuple[str | None, str | None]


def written(examples: list[modeldata.Example]) -> list[modeldata.Example]:
    """The hand-written ones among ``examples`` (not the public CLINC150, HWU64, MedQuAD or BBQ sets)."""
    return [e for e in examples if not modeldata.is_public(e)]


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
                sink.append(outcome(device_filter.decide(output, DAY, ex.text)))
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
    held_out = [e for e in modeldata.load_all() if e.split == "eval"]
    sets = {"held-out": held_out, "held-out, hand-written": written(held_out)}
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
