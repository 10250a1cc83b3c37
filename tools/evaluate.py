"""Evaluate the shipped classifier and privacy filter on held-out data (never trained on).

    python -m tools.evaluate                 # print figures, confusion per class
    python -m tools.evaluate --write-card    # also write them into models/MODEL_CARD.md
    python -m tools.evaluate --baseline      # add a TF-IDF + logistic-regression baseline (needs [train])
    python -m tools.evaluate --backend onnx  # one runtime only (default: onnx and tflite)
    python -m tools.evaluate --gazetteer off # the model alone, without the reviewed gazetteer
    python -m tools.evaluate --curve models/leak_vs_dropped.png --previous build/previous/models
                                             # the leak / benign-dropped curve, beside another model's
    python -m tools.evaluate --final-exam    # also the final-exam set (tools/data/final_exam), once

The held-out data are the held-out fifth of every hand-written round the model was trained on, the
held-out-only folder (tools/data/heldout) and the public sets' test splits (tools/modeldata.py). The
decision path is the device's own: Pipeline.analyze_text (classifier + privacy filter), once per
classifier runtime. Also reported: how often the runtimes agree with each other and with the float
model's outputs kept at build time (models/reference_outputs.npz), and each sensitivity class's leak
with its one-sided 95% upper bound (Clopper-Pearson).

The final exam was written to another brief by another writer than the training data, and is kept
apart from every decision: no threshold, data or architecture choice may look at it. Evaluate it once,
for the model being shipped, and report it beside the held-out figures.
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

from sotto.edge.classifier import (
    BACKENDS,
    DEFAULT_MAX_NO_INTEREST,
    NONE_LABEL,
    ClassifierMeta,
    outputs_from_probabilities,
)
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.privacy import Dropped, FilterOptions, PrivacyFilter
from sotto.policy import SENSITIVE_CLASSES, Policy
from sotto.wire import Signal
from tools import modeldata
from tools.build_models import upper_bound, would_emit

ROOT = Path(__file__).resolve().parents[1]

DAY = dt.date(2026, 6, 1)
FINAL_EXAM = ROOT / "tools" / "data" / "final_exam" / "final_exam.tsv"
#: Confidence of the per-class upper bounds.
BOUND_CONFIDENCE = 0.95
BACKEND_TITLES = {"onnx": "ONNX Runtime", "tflite": "TFLite", "float": "float reference"}
CARD_START, CARD_END = "<!-- evaluate.py:start -->", "<!-- evaluate.py:end -->"
TARGETS = {
    "interest_tier1_accuracy": (">=", 0.85),
    "no_interest_silent_rate": (">=", 0.95),
    "sensitive_leak_rate": ("<=", 0.005),
    "sensitive_leak_rate_worst_class": ("<=", 0.015),
    "benign_interest_dropped_as_sensitive": ("<=", 0.05),
    "model_files_mb": ("<=", 90.0),
}
#: p50 of classify + filter for one query on one thread, per runtime (ms).
LATENCY_TARGETS = {"onnx": 25.0, "tflite": 40.0}
#: Agreement of the runtimes with each other and with the float reference.
PARITY_TARGET = 0.995


def final_exam(path: Path = FINAL_EXAM) -> list[modeldata.Example]:
    """The final-exam queries as examples: ``label`` is an interest category id, "none" (no interest) or
    "sensitive:<class>"; ``mixed`` marks a benign request carrying a sensitive detail."""
    out = []
    for i, row in enumerate(modeldata._read_tsv(path), start=2):
        label, text = row["label"], row["text"]
        if label.startswith("sensitive:"):
            out.append(
                modeldata.Example(
                    text, None, label.split(":", 1)[1], "final_exam", "eval", row["mixed"] == "1"
                )
            )
        elif label:
            out.append(modeldata.Example(text, label, "none", "final_exam", "eval"))
        else:
            raise ValueError(f"{path}:{i}: no label")
    return out


def outcome(decision: list[Signal] | Dropped) -> tuple[str | None, str | None]:
    """A privacy filter's decision as ``metrics`` takes it: (top signal id or None, drop reason or None)."""
    if isinstance(decision, Dropped):
        return None, decision.reason
    return decision[0].category_id, None


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
    leak_by_class = {
        c: (sum(v) / len(v), len(v), sum(v), upper_bound(sum(v), len(v), BOUND_CONFIDENCE))
        for c, v in sorted(per_class.items())
    }
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


def filter_parts(
    examples: list[modeldata.Example], models: EdgeModels
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the filter's decision is made of, for each example: the model's sensitivity score (1 - P(none),
    dropped when it reaches the threshold), whether the gazetteer names a listed term (dropped whatever
    the threshold) and whether the filter would emit a signal were the query not dropped."""
    outputs = models.classifier.classify_batch([e.text for e in examples])
    score = np.array([o.sensitive for o in outputs])
    named = np.array(
        [models.gazetteer is not None and models.gazetteer.match(e.text) is not None for e in examples]
    )
    emits = would_emit(models.policy, outputs, models.classifier.meta.max_no_interest)
    return score, named, emits


def leak_dropped_curve(
    examples: list[modeldata.Example],
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
    thresholds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(benign interest queries dropped as sensitive, sensitive queries leaked) at each threshold: a
    sensitive query leaks when neither the model (score below the threshold) nor the gazetteer drops it
    and the filter would emit for it."""
    score, named, emits = parts
    sensitive = np.array([e.sensitive != "none" for e in examples])
    interest = np.array([e.sensitive == "none" and e.interest not in (None, "none") for e in examples])
    flagged = (score[None, :] >= thresholds[:, None]) | named[None, :]
    dropped = flagged[:, interest].mean(axis=1)
    leaked = (~flagged[:, sensitive] & emits[None, sensitive]).mean(axis=1)
    return dropped, leaked


def plot_curves(
    path: Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float]]],
    title: str,
) -> None:
    """Leak rate against benign interest queries dropped, one line per model, each operating point
    marked (matplotlib, from the tools extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, (name, (dropped, leaked, point)) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(100 * dropped, 100 * leaked, color=color, label=name)
        ax.plot(100 * point[0], 100 * point[1], "o", color=color, markersize=7)
        ax.annotate(
            f"{100 * point[0]:.1f}% dropped, {100 * point[1]:.2f}% leak",
            (100 * point[0], 100 * point[1]),
            textcoords="offset points",
            xytext=(8, 8),
            fontsize=8,
            color=color,
        )
    ax.axhline(100 * TARGETS["sensitive_leak_rate"][1], color="grey", linestyle=":", linewidth=1)
    ax.axvline(
        100 * TARGETS["benign_interest_dropped_as_sensitive"][1], color="grey", linestyle=":", linewidth=1
    )
    ax.set_xlim(0, 30)
    ax.set_ylim(0, 4)
    ax.set_xlabel("benign interest queries dropped as sensitive (%)")
    ax.set_ylabel("sensitive queries leaked (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


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
    device_filter = PrivacyFilter(policy, sensitive_threshold=thr, max_no_interest=DEFAULT_MAX_NO_INTEREST)
    outputs = outputs_from_probabilities(meta, p_int, np.stack([1.0 - p_sen, p_sen], axis=1))
    return metrics(evals, [outcome(device_filter.decide(o, DAY)) for o in outputs], policy)


def check(name: str, value: float, backend: str | None = None) -> str:
    op, target = (
        ("<=", LATENCY_TARGETS[backend]) if name == "classify_filter_p50_ms" and backend else TARGETS[name]
    )
    ok = value >= target if op == ">=" else value <= target
    return f"{'meets' if ok else 'MISSES'} {op} {target:g}"


METRIC_ROWS = [
    ("interest queries: top signal's tier-1 correct", "interest_tier1_accuracy"),
    ("interest queries: top signal's exact category correct", "interest_tier2_accuracy"),
    ("no-interest queries: no signal emitted", "no_interest_silent_rate"),
    ("sensitive queries: any signal emitted (leak), overall", "sensitive_leak_rate"),
    ("sensitive queries: leak, worst class", "sensitive_leak_rate_worst_class"),
    ("sensitive mixed queries (benign request + sensitive detail): leak", "sensitive_leak_rate_mixed"),
    ("benign interest queries dropped as sensitive", "benign_interest_dropped_as_sensitive"),
    ("all benign queries dropped as sensitive", "benign_dropped_as_sensitive"),
]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _counts(m: dict[str, Any]) -> str:
    c = m["counts"]
    return (
        f"{c['interest']} interest, {c['no_interest']} no-interest, {c['sensitive']} sensitive queries "
        f"({c['benign']} benign in all)"
    )


def render(
    results: dict[str, dict[str, Any]],
    base: dict[str, Any] | None,
    agreement: dict[str, float] | None,
    command: str,
    exam: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Markdown: one column per runtime, then the baseline and the target; the final exam's figures
    beside the held-out ones when it was evaluated."""
    first = next(iter(results.values()))["metrics"]
    names = list(results)
    titles = [BACKEND_TITLES.get(n, n) for n in names]
    exam_titles = [f"final exam, {t}" for t in titles] if exam else []
    lines = [
        f"Held-out evaluation: {_counts(first)}. Command: `{command}`.",
    ]
    if exam:
        lines.append(f"Final exam (measured, never used to choose): {_counts(next(iter(exam.values())))}.")
    lines += [
        "",
        "| metric | " + " | ".join(titles + exam_titles) + " | baseline (TF-IDF + LR) | target |",
        "| --- | " + " | ".join("---" for _ in titles + exam_titles) + " | --- | --- |",
    ]

    def verdicts(key: str, values: list[float], exam_values: list[float] | None = None) -> str:
        """The target's verdict; the held-out and final-exam ones named apart when they differ."""
        if key not in TARGETS:
            return ""
        held = "; ".join(sorted({check(key, v) for v in values}))
        on_exam = "; ".join(sorted({check(key, v) for v in exam_values or []}))
        return held if not exam_values or on_exam == held else f"held-out: {held}; final exam: {on_exam}"

    for label, key in METRIC_ROWS:
        values = [results[n]["metrics"][key] for n in names]
        exam_values = [exam[n][key] for n in names] if exam else []
        lines.append(
            f"| {label} | "
            + " | ".join(_pct(v) for v in values + exam_values)
            + f" | {_pct(base[key]) if base else 'not run'} | {verdicts(key, values, exam_values)} |"
        )
    blank = "".join(" | " for _ in exam_titles)
    lat = [results[n]["latency_ms"] for n in names]
    lines.append(
        "| classify + filter one query, p50 / p95, 1 thread | "
        + " | ".join(f"{p50:.2f} / {p95:.2f} ms" for p50, p95 in lat)
        + f"{blank} | | "
        + "; ".join(
            f"{t}: {check('classify_filter_p50_ms', lt[0], n)}"
            for n, t, lt in zip(names, titles, lat, strict=True)
        )
        + " |"
    )
    sizes = [results[n]["size_mb"] for n in names]
    lines.append(
        "| model files a device ships (this runtime's classifier + tokenizer) | "
        + " | ".join(f"{v:.1f} MB" for v in sizes)
        + f"{blank} | | {verdicts('model_files_mb', sizes)} |"
    )
    if agreement:
        lines += [
            "",
            f"Agreement on the {int(agreement['queries'])} held-out queries (same top category / same "
            f"sensitive decision / largest difference of any probability; target {100 * PARITY_TARGET:g}%):",
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
        f"Leak per sensitivity class ({BACKEND_TITLES.get(names[0], names[0])}): leaked of queries, rate, "
        f"and the one-sided {100 * BOUND_CONFIDENCE:g}% upper bound of the rate (Clopper-Pearson):",
        "",
        "| class | held-out leaked | rate | 95% upper bound |"
        + (" final exam leaked | rate | 95% upper bound |" if exam else ""),
        "| --- | --- | --- | --- |" + (" --- | --- | --- |" if exam else ""),
    ]
    for cls in SENSITIVE_CLASSES:
        row = f"| {cls} | "
        for m in [first] + ([exam[names[0]]] if exam else []):
            rate, n, k, upper = m["leak_by_class"].get(cls, (0.0, 0, 0, 1.0))
            row += f"{k} / {n} | {100 * rate:.2f}% | {100 * upper:.2f}% | "
        lines.append(row.rstrip())
    lines += ["", "Most frequent tier-1 errors on held-out interest queries (expected -> got):", ""]
    lines += [f"- {a} -> {b}: {n}" for (a, b), n in first["tier1_confusion"]]
    return "\n".join(lines)


def load_models(folder: Path, backend: str, gazetteer: bool) -> EdgeModels:
    return EdgeModels(
        EdgeConfig(
            models_dir=str(folder),
            classifier_backend=backend,
            classifier_threads=1,
            filter=FilterOptions(gazetteer=gazetteer),
        )
    )


def curves(
    evals: list[modeldata.Example], models: dict[str, EdgeModels], path: Path, title: str
) -> dict[str, list[float]]:
    """Draw the leak / benign-dropped curve of each model to ``path``; each model's operating point (its
    own threshold) as (dropped, leaked)."""
    thresholds = np.concatenate([[0.0], np.geomspace(1e-6, 1.0, 600)])
    drawn: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float]]] = {}
    points: dict[str, list[float]] = {}
    for name, m in models.items():
        parts = filter_parts(evals, m)
        dropped, leaked = leak_dropped_curve(evals, parts, thresholds)
        threshold = m.classifier.meta.sensitive_threshold
        at = leak_dropped_curve(evals, parts, np.array([threshold]))
        point = (float(at[0][0]), float(at[1][0]))
        drawn[name] = (dropped, leaked, point)
        points[name] = [threshold, *point]
    plot_curves(path, drawn, title)
    return points


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
    parser.add_argument(
        "--final-exam",
        action="store_true",
        help="also evaluate tools/data/final_exam (once, for the model being shipped; never to choose)",
    )
    parser.add_argument("--curve", type=Path, help="draw the leak / benign-dropped curve (ONNX) to this PNG")
    parser.add_argument(
        "--previous",
        type=Path,
        help="a models folder of an earlier model, drawn beside this one on the curve",
    )
    args = parser.parse_args(argv)
    if args.previous is not None and args.curve is None:
        parser.error("--previous needs --curve")
    for folder in [args.models] + ([args.previous] if args.previous else []):
        if not (folder / "classifier.json").is_file():
            parser.error(f"{folder}: no classifier.json (not a models folder)")

    examples = modeldata.load_all()
    evals = [e for e in examples if e.split == "eval"]
    exam_examples = final_exam() if args.final_exam else None
    meta = json.loads((args.models / "classifier.json").read_text())
    loaded: dict[str, EdgeModels] = {}
    results: dict[str, dict[str, Any]] = {}
    exam: dict[str, dict[str, Any]] | None = {} if exam_examples else None
    for backend in dict.fromkeys(args.backend):
        models = load_models(args.models, backend, args.gazetteer == "on")
        loaded[backend] = models
        m = metrics(evals, decisions(evals, models), models.policy)
        results[backend] = {
            "metrics": m,
            "latency_ms": latency_ms(models, [e.text for e in evals[:: max(1, len(evals) // 300)]]),
            "size_mb": sum((args.models / meta["files"][k]).stat().st_size for k in (backend, "tokenizer"))
            / 1e6,
        }
        if exam is not None and exam_examples:
            exam[backend] = metrics(exam_examples, decisions(exam_examples, models), models.policy)
    reference = args.models / "reference_outputs.npz"
    agreement = parity(loaded, reference) if reference.is_file() else None
    policy = next(iter(loaded.values())).policy
    base = baseline(examples, evals, policy) if args.baseline else None
    command = " ".join(["python -m tools.evaluate", *(argv if argv is not None else sys.argv[1:])])
    report = render(results, base, agreement, command, exam)
    points = None
    if args.curve is not None:
        on_curve = {"this model": load_models(args.models, "onnx", args.gazetteer == "on")}
        if args.previous is not None:
            on_curve = {
                "previous model": load_models(args.previous, "onnx", args.gazetteer == "on"),
                "new model": on_curve["this model"],
            }
        points = curves(
            evals,
            on_curve,
            args.curve,
            f"held-out: {_counts(next(iter(results.values()))['metrics'])}\nONNX Runtime, "
            f"gazetteer {args.gazetteer}",
        )
        report += (
            "\n\nOperating points on the curve (threshold: benign interest dropped, leak): "
            + "; ".join(f"{name} {t:.4g}: {_pct(d)}, {100 * lk:.2f}%" for name, (t, d, lk) in points.items())
        )
        print(f"wrote {args.curve}")
    print(report)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "backends": results,
                    "agreement": agreement,
                    "baseline": base,
                    "final_exam": exam,
                    "curve": points,
                },
                indent=2,
                default=str,
            )
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
