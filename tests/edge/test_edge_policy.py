"""sotto.policy: the sensitive list (with subtrees), the region table (with dates) and refusing bad files."""

from __future__ import annotations

import csv
import datetime as dt
import re
from pathlib import Path

import pytest
from edge_testkit import MODELS, REGION_HEADER, SENSITIVE_HEADER, copy_policy

from sotto.policy import SENSITIVE_CLASSES, Policy, PolicyError, RegionPolicy, SensitiveCategories, models_dir


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _interest_ids_from_file() -> list[str]:
    with (MODELS / "interest_categories.tsv").open(encoding="utf-8", newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


# --- sensitive categories -------------------------------------------------------------------------


def test_descendant_of_a_subtree_entry_is_sensitive(policy: Policy) -> None:
    # 305 Pregnancy -> 302 Reproductive Health -> ... -> 286 Medical Health (listed with subtree=yes).
    assert "286" in policy.taxonomy.ancestors("305")
    assert "305" in policy.sensitive
    entry = policy.sensitive.match("305")
    assert entry is not None
    assert (entry.id, entry.cls) == ("286", "health")


def test_entry_without_subtree_covers_only_itself(policy: Policy) -> None:
    # 223 Healthy Living is listed with subtree=no; its child 225 Fitness and Exercise is allowed.
    assert policy.taxonomy["225"].parent == "223"
    assert "223" in policy.sensitive
    assert "225" not in policy.sensitive
    assert policy.sensitive.match("225") is None
    assert "225" in policy.interest_ids


def test_unknown_id_is_not_matched(policy: Policy) -> None:
    assert policy.sensitive.match("no-such-id") is None
    assert 286 not in policy.sensitive  # type: ignore[operator]  # not a str


def test_no_interest_category_is_sensitive(policy: Policy) -> None:
    ids = _interest_ids_from_file()
    assert len(ids) > 50
    assert policy.interest_ids == frozenset(ids)
    flagged = {cid: policy.sensitive.match(cid) for cid in ids if cid in policy.sensitive}
    assert flagged == {}


def test_every_sensitive_class_is_known(policy: Policy) -> None:
    with (MODELS / "sensitive_categories.tsv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        assert row["class"] in (*SENSITIVE_CLASSES, "other")
        assert row["id"] in policy.sensitive


# --- region table ---------------------------------------------------------------------------------


def test_shipped_region_table_blocks_eu_and_not_us(policy: Policy) -> None:
    rule = policy.regions.blocked("DE")
    assert rule is not None and rule.region == "DE"
    assert policy.regions.blocked("de") is not None  # region codes are case-insensitive
    assert policy.regions.blocked("US") is None


def test_region_rules_apply_only_between_their_dates(tmp_path: Path) -> None:
    today = _utc_today()
    future_start = today + dt.timedelta(days=30)
    past_start, past_end = today - dt.timedelta(days=400), today - dt.timedelta(days=100)
    table = tmp_path / "region_policy.tsv"
    table.write_text(
        REGION_HEADER
        + f"AA\tblock\t{future_start}\t\tnot yet\n"
        + f"BB\tblock\t{past_start}\t{past_end}\tover\n",
        encoding="utf-8",
    )
    regions = RegionPolicy.load(table)

    # Neither rule blocks today, whether today is implied or given.
    assert regions.blocked("AA") is None
    assert regions.blocked("BB") is None
    assert regions.blocked("AA", today) is None
    assert regions.blocked("BB", today) is None
    # Each blocks on a day inside its range.
    inside_future = regions.blocked("AA", future_start + dt.timedelta(days=5))
    assert inside_future is not None and inside_future.note == "not yet"
    assert regions.blocked("AA", future_start) is not None
    inside_past = regions.blocked("BB", past_start + dt.timedelta(days=100))
    assert inside_past is not None and inside_past.note == "over"
    assert regions.blocked("BB", past_start - dt.timedelta(days=1)) is None
    # A rule never leaks to another region.
    assert regions.blocked("CC", future_start + dt.timedelta(days=5)) is None


# --- malformed files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("DEU\tblock\t2025-01-01\t\tthree letters\n", "ISO 3166-1 alpha-2"),
        ("D1\tblock\t2025-01-01\t\tdigit\n", "ISO 3166-1 alpha-2"),
        ("DE\tblock\t2025-13-01\t\tbad month\n", "YYYY-MM-DD"),
        ("DE\tblock\t2025-01-01\t01/02/2026\tbad end\n", "YYYY-MM-DD"),
        ("DE\tallow\t2025-01-01\t\tunknown rule\n", "rule must be one of block"),
    ],
    ids=["three-letters", "digit", "bad-date", "bad-end-date", "unknown-rule"],
)
def test_malformed_region_table_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    table = tmp_path / "region_policy.tsv"
    table.write_text(REGION_HEADER + "US\tblock\t2025-01-01\t\tfine\n" + row, encoding="utf-8")
    with pytest.raises(PolicyError, match=message) as info:
        RegionPolicy.load(table)
    assert f"{table}:3:" in str(info.value)


def test_region_table_missing_a_column_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "region_policy.tsv"
    table.write_text("region\trule\teffective_from\nDE\tblock\t2025-01-01\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="effective_to") as info:
        RegionPolicy.load(table)
    assert str(table) in str(info.value)


def test_short_region_row_is_a_policy_error(tmp_path: Path) -> None:
    table = tmp_path / "region_policy.tsv"
    table.write_text(REGION_HEADER + "DE\tblock\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=re.escape(f"{table}:2:")):
        RegionPolicy.load(table)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    table = tmp_path / "region_policy.tsv"
    table.write_text(REGION_HEADER + "US\tblock\t2025-01-01\t\tx\n\nXYZ\tblock\t2025-01-01\t\tx\n")
    with pytest.raises(PolicyError, match=re.escape(f"{table}:4:")):
        RegionPolicy.load(table)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("286\tyes\tastrology\tMedical Health\tunknown class\n", "unknown class 'astrology'"),
        ("999999\tyes\thealth\tNope\tunknown id\n", "'999999' is not an IAB 3.1 category id"),
        ("286\tmaybe\thealth\tMedical Health\tbad flag\n", "subtree must be 'yes' or 'no'"),
    ],
    ids=["unknown-class", "unknown-id", "bad-subtree"],
)
def test_malformed_sensitive_list_names_file_and_line(
    policy: Policy, tmp_path: Path, row: str, message: str
) -> None:
    path = tmp_path / "sensitive_categories.tsv"
    path.write_text(SENSITIVE_HEADER + "453\tyes\treligion\tReligion\tok\n" + row, encoding="utf-8")
    with pytest.raises(PolicyError, match=message) as info:
        SensitiveCategories.load(path, policy.taxonomy)
    assert f"{path}:3:" in str(info.value)


def test_unknown_interest_category_is_refused(tmp_path: Path) -> None:
    folder = copy_policy(tmp_path / "models")
    listing = folder / "interest_categories.tsv"
    lines = listing.read_text(encoding="utf-8").splitlines(keepends=True)
    listing.write_text("".join(lines) + "NOPE42\tNowhere\tNothing\tnot in the taxonomy\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="unknown category id 'NOPE42'") as info:
        Policy.load(folder)
    assert f"{listing}:{len(lines) + 1}:" in str(info.value)


def test_models_folder_listing_a_sensitive_interest_is_refused(tmp_path: Path) -> None:
    folder = copy_policy(tmp_path / "models")
    listing = folder / "interest_categories.tsv"
    lines = listing.read_text(encoding="utf-8").splitlines(keepends=True)
    # 305 Pregnancy: sensitive only through its ancestor 286, so the subtree rule must catch it.
    lines.insert(3, "305\tMedical Health\tPregnancy\tbaby products\n")
    listing.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(PolicyError, match="category 305 is on the sensitive list") as info:
        Policy.load(folder)
    assert f"{listing}:4:" in str(info.value)


def test_the_copied_policy_loads_unchanged(tmp_path: Path, policy: Policy) -> None:
    """Control for the two tests above: the copy itself is valid."""
    loaded = Policy.load(copy_policy(tmp_path / "models"))
    assert loaded.interest_ids == policy.interest_ids
    assert len(loaded.taxonomy) == len(policy.taxonomy)


def test_folder_without_taxonomy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="iab_content_taxonomy_3.1.tsv") as info:
        models_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_policy_file_is_refused(tmp_path: Path) -> None:
    folder = copy_policy(tmp_path / "models")
    (folder / "region_policy.tsv").unlink()
    with pytest.raises(PolicyError, match="region_policy.tsv: file not found"):
        Policy.load(folder)
