"""Privacy policy data: the IAB taxonomy, the reviewed sensitive list and the region table.

Part of the contract both sides share: the aggregator enforces the same policy as the device. Pure standard
library, so that neither side pulls in the other's runtime. The tables are package data of ``sotto.models``
(found with ``importlib.resources``, so an installed wheel works), unless a folder is named explicitly or
in ``$SOTTO_MODELS_DIR``.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.resources
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sotto.wire import TAXONOMY_VERSION

#: Sensitivity classes the device detects and drops (the keys used in models/ and in drop details).
SENSITIVE_CLASSES: tuple[str, ...] = (
    "health",
    "mental_health",
    "reproductive",
    "sexual_orientation",
    "religion",
    "politics",
    "ethnicity",
    "trade_union",
    "criminal_record",
    "financial_hardship",
    "disability",
    "immigration",
    "genetic",
    "biometric",
)


class PolicyError(ValueError):
    """A policy or model data file is missing or malformed."""


def models_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate the model and policy folder.

    Order: an explicit path, then ``$SOTTO_MODELS_DIR``, then the files shipped in the package
    ``sotto.models`` (a wheel, an editable install or a source checkout alike). Nothing is ever
    downloaded.
    """
    if explicit is not None:
        path = Path(explicit)
    elif os.environ.get("SOTTO_MODELS_DIR"):
        path = Path(os.environ["SOTTO_MODELS_DIR"])
    else:
        path = bundled_models_dir()
    if not (path / "iab_content_taxonomy_3.1.tsv").is_file():
        raise PolicyError(
            f"no Sotto models folder at {path} (expected iab_content_taxonomy_3.1.tsv there); "
            "pass the folder explicitly or set SOTTO_MODELS_DIR"
        )
    return path


def bundled_models_dir() -> Path:
    """The folder of the model and policy files shipped in the package ``sotto.models``."""
    root = importlib.resources.files("sotto.models")
    if not isinstance(root, Path):  # e.g. imported from a zip file: the runtimes need real files
        raise PolicyError(f"the package sotto.models must be installed as files, not in {root}")
    return root


def _read_tsv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a TSV with their line numbers; every required column must have a value."""
    if not path.is_file():
        raise PolicyError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise PolicyError(
                f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}"
            )
        for row in reader:
            # csv skips blank lines, so the reader's own line counter is the one to report.
            empty = [c for c in required if row.get(c) is None]
            if empty:
                raise PolicyError(f"{path}:{reader.line_num}: no value for {', '.join(empty)}")
            rows.append((reader.line_num, dict(row)))
    return rows


@dataclass(frozen=True, slots=True)
class Category:
    """One IAB Content Taxonomy category."""

    id: str
    name: str
    parent: str | None
    tier1: str


class Taxonomy:
    """IAB Content Taxonomy 3.1, indexed by unique id."""

    def __init__(self, categories: dict[str, Category]) -> None:
        self._by_id = categories

    @classmethod
    def load(cls, path: Path) -> Taxonomy:
        # The IAB file has a two-line header; the second line names the columns.
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(rows) < 3 or rows[1][:3] != ["Unique ID", "Parent", "Name"]:
            raise PolicyError(f"{path}: not an IAB Content Taxonomy TSV (expected 'Unique ID, Parent, Name')")
        raw = {r[0].strip(): (r[1].strip() or None, r[2].strip()) for r in rows[2:] if r and r[0].strip()}
        categories: dict[str, Category] = {}
        for cid, (parent, name) in raw.items():
            root = cid
            while raw[root][0] is not None:
                root = raw[root][0]  # type: ignore[assignment]
                if root not in raw:
                    raise PolicyError(f"{path}: category {cid} has unknown ancestor {root}")
            categories[cid] = Category(cid, name, parent, raw[root][1])
        return cls(categories)

    def __contains__(self, cid: object) -> bool:
        return cid in self._by_id

    def __getitem__(self, cid: str) -> Category:
        return self._by_id[cid]

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[str]:
        """Every category id."""
        return iter(self._by_id)

    def ancestors(self, cid: str) -> list[str]:
        """The category itself followed by its ancestors up to tier 1."""
        chain = [cid]
        parent = self._by_id[cid].parent
        while parent is not None:
            chain.append(parent)
            parent = self._by_id[parent].parent
        return chain


@dataclass(frozen=True, slots=True)
class SensitiveEntry:
    id: str
    subtree: bool
    cls: str
    reason: str


class SensitiveCategories:
    """The reviewed list of taxonomy categories that may never be emitted or stored."""

    def __init__(self, taxonomy: Taxonomy, entries: list[SensitiveEntry]) -> None:
        self._taxonomy = taxonomy
        self._entries = {e.id: e for e in entries}

    @classmethod
    def load(cls, path: Path, taxonomy: Taxonomy) -> SensitiveCategories:
        entries = []
        for n, row in _read_tsv(path, ("id", "subtree", "class", "reason")):
            cid = row["id"].strip()
            if cid not in taxonomy:
                raise PolicyError(f"{path}:{n}: {cid!r} is not an IAB {TAXONOMY_VERSION} category id")
            if row["subtree"] not in ("yes", "no"):
                raise PolicyError(f"{path}:{n}: subtree must be 'yes' or 'no', got {row['subtree']!r}")
            if row["class"] not in (*SENSITIVE_CLASSES, "other"):
                raise PolicyError(f"{path}:{n}: unknown class {row['class']!r}")
            entries.append(SensitiveEntry(cid, row["subtree"] == "yes", row["class"], row["reason"]))
        return cls(taxonomy, entries)

    def match(self, cid: str) -> SensitiveEntry | None:
        """The entry that makes ``cid`` sensitive, or None."""
        if cid not in self._taxonomy:
            return None
        for depth, node in enumerate(self._taxonomy.ancestors(cid)):
            entry = self._entries.get(node)
            if entry is not None and (depth == 0 or entry.subtree):
                return entry
        return None

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and self.match(cid) is not None


@dataclass(frozen=True, slots=True)
class RegionRule:
    #: ISO 3166-1 alpha-2 code, or ``*`` for every region.
    region: str
    rule: str
    effective_from: dt.date
    effective_to: dt.date | None
    note: str


#: The region column value that makes a rule apply everywhere.
ALL_REGIONS = "*"


class RegionPolicy:
    """Who may be profiled where, with effective dates: the region table (models/region_policy.tsv).

    Rules: ``block`` (no signal at all from the region) and ``no_minors`` (no interest signal for a
    profile marked as a minor). ``*`` in the region column applies a rule everywhere. A deployment
    changes the table, never the code: both the device and the aggregator read it.
    """

    RULES = ("block", "no_minors")

    def __init__(self, rules: list[RegionRule]) -> None:
        self._rules = rules

    @classmethod
    def load(cls, path: Path) -> RegionPolicy:
        rules = []
        for n, row in _read_tsv(path, ("region", "rule", "effective_from", "effective_to")):
            region = row["region"].strip().upper()
            if region != ALL_REGIONS and (len(region) != 2 or not region.isalpha()):
                raise PolicyError(
                    f"{path}:{n}: region must be ISO 3166-1 alpha-2 or '*' (every region), "
                    f"got {row['region']!r}"
                )
            if row["rule"] not in cls.RULES:
                raise PolicyError(
                    f"{path}:{n}: rule must be one of {', '.join(cls.RULES)}, got {row['rule']!r}"
                )
            try:
                start = dt.date.fromisoformat(row["effective_from"])
                end = dt.date.fromisoformat(row["effective_to"]) if row["effective_to"] else None
            except ValueError as exc:
                raise PolicyError(f"{path}:{n}: dates must be YYYY-MM-DD ({exc})") from None
            rules.append(RegionRule(region, row["rule"], start, end, row.get("note") or ""))
        return cls(rules)

    def _find(self, rule_name: str, region: str, on: dt.date | None) -> RegionRule | None:
        day = on or dt.datetime.now(dt.UTC).date()
        region = region.upper()
        for rule in self._rules:
            if (
                rule.rule == rule_name
                and rule.region in (region, ALL_REGIONS)
                and rule.effective_from <= day
                and (rule.effective_to is None or day < rule.effective_to)
            ):
                return rule
        return None

    def blocked(self, region: str, on: dt.date | None = None) -> RegionRule | None:
        """The rule that blocks ``region`` on day ``on`` (today, UTC, by default), or None."""
        return self._find("block", region, on)

    def minors_blocked(self, region: str, on: dt.date | None = None) -> RegionRule | None:
        """The rule that forbids interest signals of minors in ``region`` on day ``on``, or None."""
        return self._find("no_minors", region, on)


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything the device and the aggregator enforce, loaded from one models folder."""

    taxonomy: Taxonomy
    sensitive: SensitiveCategories
    regions: RegionPolicy
    interest_ids: frozenset[str]

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | None = None) -> Policy:
        root = models_dir(folder)
        taxonomy = Taxonomy.load(root / "iab_content_taxonomy_3.1.tsv")
        sensitive = SensitiveCategories.load(root / "sensitive_categories.tsv", taxonomy)
        regions = RegionPolicy.load(root / "region_policy.tsv")
        interest_ids = set()
        for n, row in _read_tsv(root / "interest_categories.tsv", ("id",)):
            cid = row["id"]
            if cid not in taxonomy:
                raise PolicyError(f"{root / 'interest_categories.tsv'}:{n}: unknown category id {cid!r}")
            if cid in sensitive:
                raise PolicyError(
                    f"{root / 'interest_categories.tsv'}:{n}: category {cid} is on the sensitive list"
                )
            interest_ids.add(cid)
        return cls(taxonomy, sensitive, regions, frozenset(interest_ids))
