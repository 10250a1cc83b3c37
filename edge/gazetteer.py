"""A reviewed gazetteer: a second recall path for sensitive queries beside the model.

The model misses sensitive queries that need knowledge rather than phrasing: a medication's brand name,
a benefit program, an immigration form number, a union local, a rite, a dating app, a gene. The lists in
``models/gazetteer/*.tsv`` (``term``, ``class``, ``source``; sources and licences in
``models/gazetteer/SOURCES.md``) name such terms, each reviewed to reveal its class about the speaker with
high precision. Matching is whole words on the same normalised text the model sees: every n-gram of the
transcript (up to the longest term) is looked up in one dict, so the cost does not grow with the number
of terms and a term never fires inside another word ("eid" does not match "eiderdown").
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from sotto.edge.classifier import normalize_text
from sotto.policy import SENSITIVE_CLASSES, PolicyError, models_dir

FOLDER = "gazetteer"
COLUMNS = ("term", "class", "source")


@dataclass(frozen=True, slots=True)
class GazetteerMatch:
    """The first listed term found in a text, with its class and the list it came from."""

    term: str
    sensitive_class: str
    source: str


class Gazetteer:
    """Whole-word, whole-phrase lookup of reviewed sensitive terms."""

    def __init__(self, entries: dict[str, GazetteerMatch]) -> None:
        self._entries = entries
        self._max_words = max((len(t.split()) for t in entries), default=0)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_terms(cls, rows: list[tuple[str, str, str]]) -> Gazetteer:
        """Build from (term, class, source) rows; terms are normalised like transcripts."""
        entries: dict[str, GazetteerMatch] = {}
        for row in rows:
            entry = _entry(*row)
            entries.setdefault(entry.term, entry)
        return cls(entries)

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | None = None) -> Gazetteer:
        """Every ``*.tsv`` in the models folder's ``gazetteer/``. A folder without lists is an error, not
        an empty gazetteer: a device that was asked for this recall path must not silently lose it."""
        root = Path(models_dir(folder)) / FOLDER
        paths = sorted(root.glob("*.tsv")) if root.is_dir() else []
        if not paths:
            raise PolicyError(
                f"{root}: no gazetteer lists (*.tsv) found; "
                "set FilterOptions(gazetteer=False) to run on the model alone"
            )
        rows: list[tuple[str, str, str]] = []
        for path in paths:
            with path.open(encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
                if tuple(reader.fieldnames or ()) != COLUMNS:
                    raise PolicyError(
                        f"{path}: columns must be {', '.join(COLUMNS)}, got {reader.fieldnames}"
                    )
                for row in reader:
                    term, sensitive_class, source = ((row.get(c) or "").strip() for c in COLUMNS)
                    try:
                        _entry(term, sensitive_class, source)
                    except ValueError as exc:
                        raise PolicyError(f"{path}:{reader.line_num}: {exc}") from None
                    rows.append((term, sensitive_class, source))
        return cls.from_terms(rows)

    def match(self, text: str) -> GazetteerMatch | None:
        """The longest listed term found in ``text`` (earliest first among equals), or None."""
        if not self._entries:
            return None
        words = normalize_text(text).split()
        for n in range(min(self._max_words, len(words)), 0, -1):
            for i in range(len(words) - n + 1):
                hit = self._entries.get(" ".join(words[i : i + n]))
                if hit is not None:
                    return hit
        return None


def _entry(term: str, sensitive_class: str, source: str) -> GazetteerMatch:
    """One checked entry: a term that is not empty once normalised, a known class, a source."""
    key = normalize_text(term)
    if not key:
        raise ValueError(f"gazetteer term {term!r} is empty once normalised")
    if sensitive_class not in SENSITIVE_CLASSES:
        raise ValueError(
            f"gazetteer term {term!r}: unknown class {sensitive_class!r}; "
            f"expected one of {', '.join(SENSITIVE_CLASSES)}"
        )
    if not source:
        raise ValueError(f"gazetteer term {term!r} has no source")
    return GazetteerMatch(key, sensitive_class, source)
