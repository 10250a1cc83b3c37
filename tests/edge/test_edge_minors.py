"""The minors rule on the device: a row of the region table (data, not code) stops every interest signal
of a wearer marked as a minor before anything is listened to, and editing the table changes that."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from edge_testkit import PROFILE, REGION_HEADER, TODAY, copy_policy

from sotto.edge.client import DeliveryClient
from sotto.edge.pipeline import EdgeModels, Pipeline
from sotto.edge.privacy import PrivacyFilter
from sotto.policy import Policy, PolicyError, RegionPolicy

COMMERCIAL = "where can i buy a new laptop"


def _gate(policy: Policy, region: str = "US", day: dt.date = TODAY, minor: bool = True) -> str | None:
    privacy = PrivacyFilter(policy, 0.5, max_no_interest=0.5)
    privacy.set_minor(minor)
    dropped = privacy.gate(region, day)
    return None if dropped is None else dropped.reason


def _with_region_table(tmp_path: Path, rows: str) -> Policy:
    folder = copy_policy(tmp_path / "models")
    (folder / "region_policy.tsv").write_text(REGION_HEADER + rows, encoding="utf-8")
    return Policy.load(folder)


def test_shipped_table_has_the_minors_rule_for_every_region(policy: Policy) -> None:
    for region in ("US", "BR", "JP", "IN"):
        rule = policy.regions.minors_blocked(region, TODAY)
        assert rule is not None and rule.region == "*"
        assert _gate(policy, region) == "minor"
        assert _gate(policy, region, minor=False) is None


def test_a_minor_gets_no_signal_and_nothing_is_queued(
    edge_models: EdgeModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = Pipeline(edge_models, region="US", minor=True)

    def must_not_run(text: str) -> None:
        raise AssertionError("the classifier ran for a minor")

    monkeypatch.setattr(edge_models.classifier, "classify", must_not_run)
    result = device.analyze_text(COMMERCIAL, today=TODAY)
    assert result.signals == [] and result.outgoing == [] and result.transcript is None
    assert result.dropped is not None and result.dropped.reason == "minor"
    client = DeliveryClient(PROFILE, "US", target="127.0.0.1:9")  # never contacted: nothing to send
    try:
        client.add(result.outgoing)
        assert client.pending_batches == 0
    finally:
        client.close()


def test_unmarking_the_wearer_lets_signals_through_again(edge_models: EdgeModels) -> None:
    device = Pipeline(edge_models, region="US", minor=True)
    assert device.analyze_text(COMMERCIAL, today=TODAY).dropped is not None
    device.set_minor(False)
    assert device.analyze_text(COMMERCIAL, today=TODAY).signals


def test_removing_the_row_lifts_the_rule_without_code_change(tmp_path: Path) -> None:
    policy = _with_region_table(tmp_path, "DE\tblock\t2025-01-01\t\tEU\n")
    assert _gate(policy, "US") is None
    assert _gate(policy, "DE") == "region"  # the other rules are untouched


def test_a_regional_minors_rule_applies_only_there_and_between_its_dates(tmp_path: Path) -> None:
    policy = _with_region_table(tmp_path, "US\tno_minors\t2026-06-01\t2027-01-01\tUS only, from June\n")
    assert _gate(policy, "US", TODAY) is None  # before the rule starts
    assert _gate(policy, "US", dt.date(2026, 7, 1)) == "minor"
    assert _gate(policy, "BR", dt.date(2026, 7, 1)) is None  # another region
    assert _gate(policy, "US", dt.date(2027, 1, 1)) is None  # after it ends
    assert _gate(policy, "US", dt.date(2026, 7, 1), minor=False) is None


def test_star_region_and_rule_names_are_validated(tmp_path: Path) -> None:
    table = tmp_path / "region_policy.tsv"
    table.write_text(REGION_HEADER + "**\tno_minors\t2025-01-01\t\tx\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="alpha-2 or '\\*'"):
        RegionPolicy.load(table)
    table.write_text(REGION_HEADER + "*\tno_kids\t2025-01-01\t\tx\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="rule must be one of block, no_minors"):
        RegionPolicy.load(table)
