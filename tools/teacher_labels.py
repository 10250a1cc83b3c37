"""The teacher's soft labels as committed data, and the transfer set they cover (no torch needed).

``python -m tools.teacher`` fine-tunes a large encoder and writes its logits for every text of the
transfer set into one ``.npz`` file; ``python -m tools.build_models --teacher-labels FILE`` distils from
that file without running the teacher. This module is the contract between the two:

- ``transfer_set()``: every query text in shared/data (CLINC150 and HWU64 in full, whatever the intent
  maps keep, all MedQuAD questions, all BBQ contexts, the speech transcripts) and every hand-written file
  (tools/data/handwritten, tools/data/round4). Never the final exam: ``transfer_set`` reads only the
  recipe's own folders (modeldata.HANDWRITTEN_FOLDERS) and refuses any other.
- ``text_key(text)``: the first 16 hex digits of the SHA-256 of the normalised text (as the device
  normalises it), so the file holds no query text and a query is found whatever its case or punctuation.
- the file: ``keys`` (sorted), ``groups`` (where each text came from), float16 ``interest`` and
  ``sensitive`` logits in the label order of ``interest_labels`` and ``sensitive_labels``, and ``meta``
  (JSON: encoder, its weights' SHA-256, training steps, seed).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sotto.edge.classifier import normalize_text
from tools import modeldata

#: The hand-written folders of tools/data the transfer set reads (the final exam is not one of them).
HANDWRITTEN_FOLDERS = modeldata.HANDWRITTEN_FOLDERS


def text_key(text: str) -> str:
    """The key of a query in the soft-label file: 16 hex digits of the SHA-256 of its normalised form."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def _handwritten_texts(folders: tuple[str, ...]) -> list[tuple[str, str]]:
    other = set(folders) - set(HANDWRITTEN_FOLDERS)
    if other:
        raise ValueError(f"only the recipe's hand-written folders are read, not {sorted(other)}")
    out = []
    for name in folders:
        folder = modeldata.DATA / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such data folder")
        for path in sorted(folder.glob("*.tsv")):
            out += [(row["text"], "handwritten") for row in modeldata._read_tsv(path)]
    return out


def _shared_texts(shared: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    clinc = json.loads((shared / "queries" / "clinc150" / "data_full.json").read_text(encoding="utf-8"))
    for part in sorted(clinc):
        out += [(text, "clinc150") for text, _ in clinc[part]]
    with (shared / "queries" / "hwu64" / "hwu64_all.csv").open(encoding="utf-8", newline="") as fh:
        out += [(row["answer_from_anno"], "hwu64") for row in csv.DictReader(fh, delimiter=";")]
    with (shared / "sensitive" / "medquad" / "medquad_questions.csv").open(
        encoding="utf-8", newline=""
    ) as fh:
        out += [(row["question"], "medquad") for row in csv.DictReader(fh)]
    for name in sorted(modeldata.BBQ_CLASSES):
        with (shared / "sensitive" / "bbq" / name).open(encoding="utf-8") as fh:
            out += [(json.loads(line)["context"], "bbq") for line in fh if line.strip()]
    for path in sorted((shared / "speech").glob("*/transcripts.tsv")):
        out += [(row["reference_text"], "speech") for row in modeldata._read_tsv(path)]
    return out


def transfer_set(
    shared: Path | None = None, folders: tuple[str, ...] = HANDWRITTEN_FOLDERS
) -> list[tuple[str, str, str]]:
    """(key, normalised text, group) for every distinct text of the transfer set, sorted by key.

    A text found in several places keeps the group of the first: hand-written before the public sets.
    """
    seen: dict[str, tuple[str, str]] = {}
    for text, group in _handwritten_texts(folders) + _shared_texts(shared or modeldata.SHARED):
        norm = normalize_text(text)
        if norm:
            seen.setdefault(text_key(norm), (norm, group))
    return [(key, norm, group) for key, (norm, group) in sorted(seen.items())]


@dataclass(frozen=True, slots=True)
class SoftLabels:
    """The teacher's logits, one row per key, in the label order of the file."""

    keys: np.ndarray  # (n,) str, sorted
    groups: np.ndarray  # (n,) str
    interest: np.ndarray  # (n, len(interest_labels)) float16 logits
    sensitive: np.ndarray  # (n, len(sensitive_labels)) float16 logits
    interest_labels: list[str]
    sensitive_labels: list[str]
    meta: dict[str, object]

    def rows(self) -> dict[str, int]:
        """Key -> row index."""
        return {str(k): i for i, k in enumerate(self.keys)}


def write_soft_labels(path: Path, labels: SoftLabels) -> None:
    """Write the soft-label file (compressed npz, float16 logits, rows sorted by key)."""
    order = np.argsort(labels.keys, kind="stable")
    keys = labels.keys[order]
    if len(set(keys.tolist())) != len(keys):
        raise ValueError("duplicate keys in the soft labels")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        keys=keys.astype("<U16"),
        groups=labels.groups[order].astype(str),
        interest=labels.interest[order].astype(np.float16),
        sensitive=labels.sensitive[order].astype(np.float16),
        interest_labels=np.array(labels.interest_labels),
        sensitive_labels=np.array(labels.sensitive_labels),
        meta=np.array(json.dumps(labels.meta, sort_keys=True)),
    )
    tmp.replace(path)


def read_soft_labels(
    path: Path, interest_labels: list[str] | None = None, sensitive_labels: list[str] | None = None
) -> SoftLabels:
    """Read a soft-label file; with label lists given, refuse a file whose label order differs from them."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no soft-label file (python -m tools.teacher writes one)")
    with np.load(path, allow_pickle=False) as data:
        missing = {"keys", "groups", "interest", "sensitive", "interest_labels", "sensitive_labels", "meta"}
        missing -= set(data.files)
        if missing:
            raise ValueError(f"{path}: not a soft-label file (missing {sorted(missing)})")
        labels = SoftLabels(
            keys=data["keys"],
            groups=data["groups"],
            interest=data["interest"],
            sensitive=data["sensitive"],
            interest_labels=[str(x) for x in data["interest_labels"]],
            sensitive_labels=[str(x) for x in data["sensitive_labels"]],
            meta=json.loads(str(data["meta"])),
        )
    n = len(labels.keys)
    if labels.interest.shape != (n, len(labels.interest_labels)) or labels.sensitive.shape != (
        n,
        len(labels.sensitive_labels),
    ):
        raise ValueError(f"{path}: logit shapes do not match the keys and labels")
    for name, want, got in (
        ("interest", interest_labels, labels.interest_labels),
        ("sensitivity", sensitive_labels, labels.sensitive_labels),
    ):
        if want is not None and want != got:
            raise ValueError(f"{path}: the teacher's {name} labels differ from this build's; relabel")
    if not np.isfinite(labels.interest).all() or not np.isfinite(labels.sensitive).all():
        raise ValueError(f"{path}: non-finite logits")
    return labels


def softmax(logits: np.ndarray) -> np.ndarray:
    """The probabilities of a file's logits, row by row (computed in float64)."""
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


def held_out_report(labels: SoftLabels, thresholds: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05)) -> str:
    """What the teacher knows, sensitive-or-not alone, on the held-out queries it has labels for: the
    share of sensitive ones it misses and of benign interest ones it flags, at each threshold on
    1 - P(none)."""
    rows = labels.rows()
    held = [e for e in modeldata.load_all() if e.split == "eval" and text_key(e.text) in rows]
    score = 1.0 - softmax(labels.sensitive[[rows[text_key(e.text)] for e in held]])[:, 0]
    sensitive = np.array([e.sensitive != modeldata.NONE for e in held])
    interest = np.array(
        [e.sensitive == modeldata.NONE and e.interest not in (None, modeldata.NONE) for e in held]
    )
    lines = [
        f"held-out queries with teacher labels: {len(held)} ({int(sensitive.sum())} sensitive, "
        f"{int(interest.sum())} benign interest)",
        "threshold | sensitive missed | benign interest flagged",
    ]
    for t in thresholds:
        lines.append(f"{t:g} | {np.mean(score[sensitive] < t):.2%} | {np.mean(score[interest] >= t):.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="What a soft-label file's teacher knows, on the held-out queries."
    )
    parser.add_argument("file", type=Path, help="a soft-label file (tools/data/teacher_labels.npz)")
    args = parser.parse_args(argv)
    try:
        labels = read_soft_labels(args.file)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    print(held_out_report(labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
