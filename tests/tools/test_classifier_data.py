"""The hand-written classifier data in tools/data/handwritten/ keeps the review rules it was written under.

These files are trained on (four fifths) and evaluated on (one fifth, by text hash), so a label typo, a
duplicate that lands on both sides of the split, or a burst of near-templated lines would quietly bend
both the model and its figures. The rules are those in tools/data/README.md.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import pytest

from sotto.policy import SENSITIVE_CLASSES
from tools import modeldata

ROOT = Path(__file__).resolve().parents[2]

FOLDER = ROOT / "tools" / "data" / "handwritten"
#: The fourth round, written under the same rules and split the same way (tools/data/README.md).
ROUND4 = ROOT / "tools" / "data" / "round4"
#: Sensitive queries written for evaluation only, under the same rules: never trained on.
HELD_OUT = ROOT / "tools" / "data" / "heldout"
#: The final-exam set: another brief, another writer; evaluated once, never trained or tuned on.
EXAM = ROOT / "tools" / "data" / "final_exam" / "final_exam.tsv"
#: file stem prefix -> (header, label column, allowed labels or None for "interest category ids")
KINDS: dict[str, tuple[list[str], str, set[str] | None]] = {
    "interest_queries": (["text", "category_id"], "category_id", None),
    "no_interest_queries": (["text", "label"], "label", {"none"}),
    "benign_hard_negatives": (["text", "label"], "label", {"benign"}),
    "sensitive_queries": (["text", "class", "mixed"], "class", set(SENSITIVE_CLASSES)),
}
#: Review rule: within one file, at most this many queries of one label open with the same two words.
MAX_SAME_OPENING = 6
#: Every interest category and every sensitivity class has at least this many hand-written queries.
MIN_PER_CATEGORY = 40
MIN_PER_SENSITIVE_CLASS = 100


def _kind(path: Path) -> str:
    return path.stem.rsplit("_", 1)[0]


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows), read as the recipe reads them (``modeldata._read_tsv``)."""
    rows = modeldata._read_tsv(path)
    return (list(rows[0]) if rows else []), rows


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


FILES = sorted(FOLDER.glob("*.tsv")) + sorted(ROUND4.glob("*.tsv")) + sorted(HELD_OUT.glob("*.tsv"))


@functools.cache
def _interest_ids() -> frozenset[str]:
    return frozenset(r["id"] for r in modeldata._read_tsv(modeldata.DATA / "interest_categories.tsv"))


def test_every_file_is_of_a_known_kind() -> None:
    assert FILES
    assert {_kind(p) for p in FILES} <= set(KINDS), [p.name for p in FILES if _kind(p) not in KINDS]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_header_labels_and_columns(path: Path) -> None:
    header, label, allowed = KINDS[_kind(path)]
    fields, rows = _rows(path)
    assert fields == header
    allowed = _interest_ids() if allowed is None else allowed
    for i, row in enumerate(rows, start=2):
        assert None not in row and all(v is not None for v in row.values()), f"{path.name}:{i}: column count"
        assert row["text"].strip() == row["text"] and row["text"], f"{path.name}:{i}: empty or padded text"
        assert row[label] in allowed, f"{path.name}:{i}: unknown label {row[label]!r}"
        if "mixed" in row:
            assert row["mixed"] in ("0", "1"), f"{path.name}:{i}: mixed must be 0 or 1"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_openings_are_varied(path: Path) -> None:
    _, label, _ = KINDS[_kind(path)]
    _, rows = _rows(path)
    openings = Counter((r[label], " ".join(_norm(r["text"]).split()[:2])) for r in rows)
    crowded = {k: n for k, n in openings.items() if n > MAX_SAME_OPENING}
    assert not crowded, f"{path.name}: too many queries open the same way: {crowded}"


def test_no_query_appears_twice_across_files() -> None:
    where: dict[str, list[str]] = {}
    for path in FILES:
        for row in _rows(path)[1]:
            where.setdefault(_norm(row["text"]), []).append(path.name)
    repeated = {text: files for text, files in where.items() if len(files) > 1}
    assert not repeated, f"{len(repeated)} duplicated queries, e.g. {list(repeated.items())[:5]}"


def test_the_final_exam_is_labelled_and_apart_from_the_training_data() -> None:
    fields, rows = _rows(EXAM)
    assert fields == ["text", "label", "mixed"]
    labels = _interest_ids() | {"none"} | {f"sensitive:{c}" for c in SENSITIVE_CLASSES}
    for i, row in enumerate(rows, start=2):
        assert row["label"] in labels, f"{EXAM.name}:{i}: unknown label {row['label']!r}"
        assert row["mixed"] in ("0", "1") and (row["mixed"] == "0" or row["label"].startswith("sensitive:"))
    per_class = Counter(r["label"] for r in rows if r["label"].startswith("sensitive:"))
    assert len(rows) >= 1500 and min(per_class[f"sensitive:{c}"] for c in SENSITIVE_CLASSES) >= 45
    training = {_norm(r["text"]) for path in FILES for r in _rows(path)[1]}
    copies = [r["text"] for r in rows if _norm(r["text"]) in training]
    assert not copies, f"final-exam queries also in the training files: {copies[:5]}"
    assert len({_norm(r["text"]) for r in rows}) == len(rows), "a final-exam query appears twice"


def test_the_recipe_never_reads_the_final_exam() -> None:
    recipe = "\n".join(
        (ROOT / "tools" / name).read_text()
        for name in ("modeldata.py", "build_models.py", "teacher.py", "teacher_labels.py")
    )
    assert "final_exam" not in recipe


def test_every_category_and_class_is_covered() -> None:
    per_category: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    for path in FILES:
        for row in _rows(path)[1]:
            if _kind(path) == "interest_queries":
                per_category[row["category_id"]] += 1
            elif _kind(path) == "sensitive_queries":
                per_class[row["class"]] += 1
    thin = {c: per_category[c] for c in _interest_ids() if per_category[c] < MIN_PER_CATEGORY}
    assert not thin, f"interest categories with too few hand-written queries: {thin}"
    thin = {c: per_class[c] for c in SENSITIVE_CLASSES if per_class[c] < MIN_PER_SENSITIVE_CLASS}
    assert not thin, f"sensitivity classes with too few hand-written queries: {thin}"


def test_held_out_only_queries_are_never_trained_on_and_give_every_class_200() -> None:
    held_out = modeldata.held_out()
    assert held_out and all(e.split == "eval" and e.sensitive != "none" for e in held_out)
    examples = modeldata.load_all()
    texts = {e.text.lower().strip() for e in held_out}
    assert all(e.split == "eval" for e in examples if e.text.lower().strip() in texts)
    per_class = Counter(e.sensitive for e in examples if e.split == "eval" and e.sensitive != "none")
    thin = {c: per_class[c] for c in SENSITIVE_CLASSES if per_class[c] < 200}
    assert not thin, f"classes with fewer than 200 held-out queries: {thin}"


def test_held_out_only_queries_nearly_copy_no_training_query() -> None:
    # A reworded copy of a training query would be measured as if unseen (word-set Jaccard >= 0.8).
    training = [e.text for e in modeldata.load_all() if e.split == "train"]
    pairs = modeldata.near_copies([e.text for e in modeldata.held_out()], training)
    assert not pairs, f"{len(pairs)} held-out-only queries nearly copy training queries, e.g. {pairs[:5]}"


def test_near_copies_finds_reworded_copies_and_only_them() -> None:
    others = ["where can i buy trail running shoes", "timer for ten minutes", "ebt balance"]
    found = modeldata.near_copies(
        ["Where can I buy trail-running shoes?", "trail running shoes sale", "EBT balance", "ebt card"],
        others,
    )
    assert found == [
        ("Where can I buy trail-running shoes?", "where can i buy trail running shoes"),
        ("EBT balance", "ebt balance"),
    ]


def test_the_held_out_fifth_is_stable_and_about_a_fifth() -> None:
    examples = modeldata.handwritten()
    held_out = sum(e.split == "eval" for e in examples) / len(examples)
    assert 0.17 < held_out < 0.23
    # The split is a function of the text alone, whatever file or order a query comes in.
    assert all(e.split == modeldata._hash_split(e.text) for e in examples)
