"""Evaluate the shipped classifier and privacy filter on held-out data (never trained on).

    python -m tools.evaluate                 # print figures, confusion per class
    python -m tools.evaluate --write-card    # also write them into models/MODEL_CARD.md
    python -m tools.evaluate --baseline      # add a TF-IDF + logistic-regression baseline (needs [train])
    python -m tools.evaluate --backend onnx  # one runtime only (default: onnx and tflite)
    python -m tools.evaluate --gazetteer off # the model alone, without the reviewed gazetteer

The decision path is the device's own: Pipeline.analyze_text (classifier + privacy filter), once per
classifier runtime. Also reported: how often the runtimes agree with each other and with the float
model's outputs kept at build time (models/reference_outputs.npz).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.classifier import BACKENDS, NONE_LABEL, ClassifierMeta, outputs_from_probabilities
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.privacy import Dropped, FilterOptions, PrivacyFilter
from sotto.policy import SENSITIVE_CLASSES, Policy
from tools import modeldata

ROOT = Path(__file__).resolve().parents[1]

DAY = dt.date(2026, 6, 1)
BACKEND_TITLES = {"onnx": "ONNX Runtime", "tflite": "TFLite", "float": "float reference"}
CARD_START, CARD_END = "<!-- evaluate.py:start -->", "<!-- evaluate.py:end -->"
TARGETS = {
    "interest_tier1_accuracy": (">=", 0.85),
    "no_interest_silent_rate": (">=", 0.90),
    "sensitive_leak_rate": ("<=", 0.01),
    "sensitive_leak_rate_worst_class": ("<=", 0.01),
    "benign_interest_dropped_as_sensitive": ("<=", 0.05),
    "classify_filter_p50_ms": ("<=", 10.0),
    "model_files_mb": ("<=", 30.0),
}


def decisions(examples: list[modeldata.Example], models: EdgeModels) -> list[tuple[str | None, str | None]]:
    """(top signal id or None, drop reason or None) for each example."""
    device = Pipeline(models, region="US")
    out = []
    for ex in examples:
        result = device.analyze_text(ex.text, today=DAY)
        top = result.signals[0].category_id if result.signals else None
        out.append((top, result.dropped.reason if result.dropped else None))
    return out


def metrics(
    examples: list[modeldata.Example], got: list[tuple[str | None, str | None]], policy: Policy
) -> dict[str, Any]:
    tier1 = {cid: policy.taxonomy[cid].tier1 for cid in policy.interest_ids}
    interest = [
        (e, g)
        for e, g in zip(examples, got, strict=True)
        if e.sensitive == "none" and e.interest not in (None, "none")
    ]
    silent = [
        (e, g) for e, g in zip(examples, got, strict=True) if e.sensitive == "none" and e.interest == "none"
    ]
    sensitive = [(e, g) for e, g in zip(examples, got, strict=True) if e.sensitive != "none"]
    benign = [(e, g) for e, g in zip(examples, got, strict=True) if e.sensitive == "none"]
    per_class: dict[str, list[bool]] = defaultdict(list)
    for e, g in sensitive:
        per_class[e.sensitive].append(g[0] is not None)
    leak_by_class = {c: (sum(v) / len(v), len(v)) for c, v in sorted(per_class.items())}
    mixed = [g[0] is not None for e, g in sensitive if e.mixed]
    return {
        "counts": {
            "interest": len(interest),
            "no_interest": len(silent),
            "sensitive": len(sensitive),
            "benign": len(benign),
        },
        "interest_tier1_accuracy": sum(
            g[0] is not None and tier1[g[0]] == tier1[e.interest]  # type: ignore[index]
            for e, g in interest
        )
        / len(interest),
        "interest_tier2_accuracy": sum(g[0] == e.interest for e, g in interest) / len(interest),
        "no_interest_silent_rate": sum(g[0] is None for e, g in silent) / len(silent),
        "sensitive_leak_rate": sum(g[0] is not None for e, g in sensitive) / len(sensitive),
        "sensitive_leak_rate_worst_class": max(v[0] for v in leak_by_class.values()),
        "sensitive_leak_rate_mixed": sum(mixed) / max(1, len(mixed)),
        "leak_by_class": leak_by_class,
        "benign_interest_dropped_as_sensitive": sum(g[1] == "sensitive" for e, g in interest) / len(interest),
        "benign_dropped_as_sensitive": sum(g[1] == "sensitive" for e, g in benign) / len(benign),
        "tier1_confusion": Counter(
            (tier1[e.interest], tier1[g[0]] if g[0] else f"<{g[1]}>")  # type: ignore[index]
            for e, g in interest
            if g[0] is None or tier1[g[0]] != tier1[e.interest]  # type: ignore[index]
        ).most_common(12),
    }


def agreement(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], threshold: float
) -> tuple[float, float]:
    """Share of rows on which two (interest, sensitive) probability pairs give the same top category,
    and the same sensitive/not decision at ``threshold``."""
    top = float(np.mean(a[0].argmax(1) == b[0].argmax(1)))
    sensitive = float(np.mean((1 - a[1][:, 0] >= threshold) == (1 - b[1][:, 0] >= threshold)))
    return top, sensitive


def parity(models: dict[str, EdgeModels], reference: Path) -> dict[str, float]:
    """Agreement on the held-out queries: each runtime with the float reference, and the runtimes with
    each other: same top category, same sensitive/not decision, largest probability difference."""
    ref = np.load(reference)
    texts = [str(t) for t in ref["texts"]]
    probs = {"float": (ref["interest"], ref["sensitive"])}
    for name, m in models.items():
        probs[name] = m.classifier.probabilities(texts)
    threshold = next(iter(models.values())).classifier.meta.sensitive_threshold
    out: dict[str, float] = {"queries": float(len(texts))}
    names = list(models)
    pairs = [(n, "float") for n in names] + [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    for a, b in pairs:
        (ia, sa), (ib, sb) = probs[a], probs[b]
        out[f"{a}~{b}:top"], out[f"{a}~{b}:sensitive"] = agreement(probs[a], probs[b], threshold)
        out[f"{a}~{b}:max_abs_diff"] = float(max(np.abs(ia - ib).max(), np.abs(sa - sb).max()))
    return out


def latency_ms(models: EdgeModels, texts: list[str], repeats: int = 3) -> tuple[float, float]:
    device = Pipeline(models, region="US")
    device.analyze_text("warm up the session", today=DAY)
    times = []
    for _ in range(repeats):
        for text in texts:
            t0 = time.perf_counter()
            device.analyze_text(text, today=DAY)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def baseline(
    examples: list[modeldata.Example],
    evals: list[modeldata.Example],
    policy: Policy,
    threshold_recall: float = 0.995,
) -> dict[str, Any]:
    """TF-IDF word+char n-grams with logistic regression: same labels, the device filter's rule, and a
    threshold flagging 99.5% of sensitive training queries out of fold."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline, make_union

    from sotto.edge.classifier import normalize_text

    train = [e for e in examples if e.split == "train"]

    def features():  # type: ignore[no-untyped-def]
        return make_union(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=3, sublinear_tf=True),
        )

    x_text = [normalize_text(e.text) for e in train]
    sen = make_pipeline(features(), LogisticRegression(max_iter=2000, C=4.0, class_weight="balanced"))
    y_sen = np.array([e.sensitive != "none" for e in train])
    oof = cross_val_predict(sen, x_text, y_sen, cv=5, method="predict_proba")[:, 1]
    scores = np.sort(oof[y_sen])
    thr = float(scores[int((1 - threshold_recall) * len(scores))])
    sen.fit(x_text, y_sen)
    rows = [i for i, e in enumerate(train) if e.interest is not None and e.sensitive == "none"]
    interest = make_pipeline(features(), LogisticRegression(max_iter=2000, C=8.0))
    interest.fit([x_text[i] for i in rows], [train[i].interest for i in rows])
    ev_text = [normalize_text(e.text) for e in evals]
    p_sen = sen.predict_proba(ev_text)[:, 1]
    p_int = interest.predict_proba(ev_text)
    # The device's own filter decides, exactly as for the shipped model (one sensitivity class here).
    meta = ClassifierMeta(list(interest.classes_), [NONE_LABEL, "sensitive"], thr, 0, {}, {})
    device_filter = PrivacyFilter(policy, sensitive_threshold=thr)
    outputs = outputs_from_probabilities(meta, p_int, np.stack([1.0 - p_sen, p_sen], axis=1))
    got: list[tuple[str | None, str | None]] = []
    for decision in (device_filter.decide(o, DAY) for o in outputs):
        if isinstance(decision, Dropped):
            got.append((None, decision.reason))
        else:
            got.append((decision[0].category_id, None))
    return metrics(evals, got, policy)


def check(name: str, value: float) -> str:
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"{'meets' if ok else 'MISSES'} {op} {target:g}"


def render(
    results: dict[str, dict[str, Any]],
    base: dict[str, Any] | None,
    agreement: dict[str, float] | None,
    command: str,
) -> str:
    """Markdown: one column per runtime, then the baseline and the target."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    first = next(iter(results.values()))["metrics"]
    c = first["counts"]
    names = list(results)
    lines = [
        f"Held-out evaluation: {c['interest']} interest, {c['no_interest']} no-interest, "
        f"{c['sensitive']} sensitive "
        f"queries ({c['benign']} benign in all). Command: `{command}`.",
        "",
        "| metric | "
        + " | ".join(BACKEND_TITLES.get(n, n) for n in names)
        + " | baseline (TF-IDF + LR) | target |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- | --- |",
    ]
    rows = [
        ("interest queries: top signal's tier-1 correct", "interest_tier1_accuracy"),
        ("interest queries: top signal's exact category correct", "interest_tier2_accuracy"),
        ("no-interest queries: no signal emitted", "no_interest_silent_rate"),
        ("sensitive queries: any signal emitted (leak), overall", "sensitive_leak_rate"),
        ("sensitive queries: leak, worst class", "sensitive_leak_rate_worst_class"),
        ("sensitive mixed queries (benign request + sensitive detail): leak", "sensitive_leak_rate_mixed"),
        ("benign interest queries dropped as sensitive", "benign_interest_dropped_as_sensitive"),
        ("all benign queries dropped as sensitive", "benign_dropped_as_sensitive"),
    ]

    def verdicts(key: str, values: list[float]) -> str:
        if key not in TARGETS:
            return ""
        return "; ".join(sorted({check(key, v) for v in values}))

    for label, key in rows:
        values = [results[n]["metrics"][key] for n in names]
        lines.append(
            f"| {label} | "
            + " | ".join(pct(v) for v in values)
            + f" | {pct(base[key]) if base else 'not run'} | {verdicts(key, values)} |"
        )
    lat = [results[n]["latency_ms"] for n in names]
    lines.append(
        "| classify + filter one query, p50 / p95, 1 thread | "
        + " | ".join(f"{p50:.2f} / {p95:.2f} ms" for p50, p95 in lat)
        + f" | | {verdicts('classify_filter_p50_ms', [p50 for p50, _ in lat])} |"
    )
    sizes = [results[n]["size_mb"] for n in names]
    lines.append(
        "| model files a device ships (this runtime's classifier + tokenizer) | "
        + " | ".join(f"{v:.1f} MB" for v in sizes)
        + f" | | {verdicts('model_files_mb', sizes)} |"
    )
    if agreement:
        lines += [
            "",
            f"Agreement on the {int(agreement['queries'])} held-out queries (same top category / same "
            "sensitive decision / largest difference of any probability):",
            "",
            "| pair | top category | sensitive decision | max abs difference |",
            "| --- | --- | --- | --- |",
        ]
        for key in agreement:
            if key.endswith(":top"):
                pair = key[: -len(":top")]
                a, b = pair.split("~")
                title = f"{BACKEND_TITLES.get(a, a)} vs {BACKEND_TITLES.get(b, b)}"
                lines.append(
                    f"| {title} | {100 * agreement[key]:.2f}% "
                    f"| {100 * agreement[pair + ':sensitive']:.2f}% | "
                    f"{agreement[pair + ':max_abs_diff']:.2g} |"
                )
    lines += [
        "",
        f"Leak rate per sensitivity class (held-out, {BACKEND_TITLES.get(names[0], names[0])}):",
        "",
        "| class | leak | queries |",
        "| --- | --- | --- |",
    ]
    for cls in SENSITIVE_CLASSES:
        rate, n = first["leak_by_class"].get(cls, (0.0, 0))
        lines.append(f"| {cls} | {pct(rate)} | {n} |")
    lines += ["", "Most frequent tier-1 errors on interest queries (expected -> got):", ""]
    lines += [f"- {a} -> {b}: {n}" for (a, b), n in first["tier1_confusion"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--write-card", action="store_true", help="update models/MODEL_CARD.md")
    parser.add_argument("--baseline", action="store_true", help="also train and score the TF-IDF baseline")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="classifier runtimes to evaluate (default: all)",
    )
    parser.add_argument(
        "--gazetteer",
        choices=("on", "off"),
        default="on" if FilterOptions().gazetteer else "off",
        help="the reviewed gazetteer as a second recall path (default: the device's default)",
    )
    args = parser.parse_args(argv)

    examples = modeldata.load_all()
    evals = [e for e in examples if e.split == "eval"]
    meta = json.loads((args.models / "classifier.json").read_text())
    loaded: dict[str, EdgeModels] = {}
    results: dict[str, dict[str, Any]] = {}
    for backend in dict.fromkeys(args.backend):
        models = EdgeModels(
            EdgeConfig(
                models_dir=str(args.models),
                classifier_backend=backend,
                classifier_threads=1,
                filter=FilterOptions(gazetteer=args.gazetteer == "on"),
            )
        )
        loaded[backend] = models
        m = metrics(evals, decisions(evals, models), models.policy)
        results[backend] = {
            "metrics": m,
            "latency_ms": latency_ms(models, [e.text for e in evals[:: max(1, len(evals) // 300)]]),
            "size_mb": sum((args.models / meta["files"][k]).stat().st_size for k in (backend, "tokenizer"))
            / 1e6,
        }
    reference = args.models / "reference_outputs.npz"
    agreement = parity(loaded, reference) if reference.is_file() else None
    policy = next(iter(loaded.values())).policy
    base = baseline(examples, evals, policy) if args.baseline else None
    command = " ".join(["python -m tools.evaluate", *(argv if argv is not None else sys.argv[1:])])
    report = render(results, base, agreement, command)
    print(report)
    if args.json:
        args.json.write_text(
            json.dumps({"backends": results, "agreement": agreement, "baseline": base}, indent=2, default=str)
        )
    if args.write_card:
        card = args.models / "MODEL_CARD.md"
        text = card.read_text(encoding="utf-8")
        if CARD_START not in text or CARD_END not in text:
            sys.exit(f"{card}: markers {CARD_START} / {CARD_END} not found")
        head, rest = text.split(CARD_START, 1)
        _, tail = rest.split(CARD_END, 1)
        card.write_text(f"{head}{CARD_START}\n{report}\n{CARD_END}{tail}", encoding="utf-8")
        print(f"updated {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
