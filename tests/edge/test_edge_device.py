"""sotto.edge.Device: the pipeline, local privacy and delivery wired once, with one persisted state."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from edge_testkit import PROFILE, AggregatorThread, forbid_classifier, free_port

from sotto.edge import Device, LdpOptions
from sotto.edge.client import DeliveryClient
from sotto.edge.ldp import BUDGET_STATE_KEY
from sotto.edge.outbox import Outbox
from sotto.edge.pipeline import EdgeModels
from sotto.policy import Policy
from sotto.server import ServerConfig

COMMERCIAL = "book me a flight to paris for next week"


def _device(models: EdgeModels, outbox: Path | None, **kwargs: object) -> Device:
    kwargs.setdefault("target", f"127.0.0.1:{free_port()}")
    kwargs.setdefault("token", "sotto_unused")
    return Device(PROFILE, "US", outbox=outbox, models=models, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("profile_id", "region", "message"),
    [
        ("short", "US", "profile id 'short' must be 8 to 64 characters"),
        ("profile with spaces", "US", "must be 8 to 64 characters"),
        (PROFILE, "U1", "region 'U1' must be an officially assigned ISO 3166-1 alpha-2 code"),
        (PROFILE, "USA", "region 'USA' must be an officially assigned ISO 3166-1 alpha-2 code"),
        (PROFILE, "", "region '' must be an officially assigned ISO 3166-1 alpha-2 code"),
        # Shaped like a code but not one the region table could place: refused, never profiled.
        (PROFILE, "EU", "region 'EU' must be an officially assigned"),
        (PROFILE, "EL", "region 'EL' must be an officially assigned"),
        (PROFILE, "XX", "region 'XX' must be an officially assigned"),
        (PROFILE, "QQ", "region 'QQ' must be an officially assigned"),
    ],
)
def test_a_bad_profile_id_or_region_is_refused_before_anything_is_written(
    edge_models: EdgeModels, tmp_path: Path, profile_id: str, region: str, message: str
) -> None:
    outbox = tmp_path / "state" / "outbox.db"
    with pytest.raises(ValueError, match=message):
        Device(profile_id, region, outbox=outbox, target="127.0.0.1:1", token="t", models=edge_models)
    assert not outbox.parent.exists()


def test_the_delivery_client_refuses_a_bad_region_before_opening_its_outbox(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.db"
    with pytest.raises(ValueError, match=r"region 'U\$' must be"):
        DeliveryClient(PROFILE, "U$", target="127.0.0.1:1", outbox=outbox)
    assert not outbox.exists()


def test_a_lower_case_region_travels_in_upper_case_and_is_accepted(
    edge_models: EdgeModels, policy: Policy, tmp_path: Path
) -> None:
    """A client given "us" used to store it with every signal and fail on every later flush."""
    with AggregatorThread(f"sqlite:///{tmp_path / 'agg.db'}", ServerConfig(policy=policy)) as aggregator:
        device = Device(
            PROFILE, "us", outbox=tmp_path / "outbox.db", target=aggregator.target, models=edge_models
        )
        try:
            assert device.region == "US" and device.client.region == "US"
            assert device.hear_text(COMMERCIAL).signals
            assert device.flush()
            assert device.outbox.stats().get("signals_acknowledged") >= 1
        finally:
            device.close()
        assert aggregator.profile().scores


def test_what_the_device_hears_is_stored_sent_and_in_its_ledger(
    edge_models: EdgeModels, policy: Policy, tmp_path: Path
) -> None:
    with AggregatorThread(f"sqlite:///{tmp_path / 'agg.db'}", ServerConfig(policy=policy)) as aggregator:
        with Device(
            PROFILE, "US", outbox=tmp_path / "o.db", target=aggregator.target, models=edge_models
        ) as d:
            result = d.hear_text(COMMERCIAL)
            assert result.signals and d.outbox.stats().queued_signals == len(result.signals)
            assert d.flush_if_due() is None  # one utterance is not a full batch yet
            assert d.flush()
            sent = d.ledger()
        stored = {e.category_id for e in aggregator.profile().scores}
    assert [e.category_id for e in sent] == [s.category_id for s in result.signals]
    assert stored == {s.category_id for s in result.signals}


def test_an_opt_out_silences_the_device_across_a_restart(
    monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    with _device(edge_models, outbox) as device:
        assert device.hear_text(COMMERCIAL).signals
        assert device.set_opt_out(True) >= 1  # what was queued is erased at once
    forbid_classifier(monkeypatch, edge_models)
    with _device(edge_models, outbox) as restarted:
        assert restarted.opted_out
        result = restarted.hear_text(COMMERCIAL)
        assert result.dropped is not None and result.dropped.reason == "opt_out"
        assert result.transcript is None
        assert restarted.outbox.stats().queued_signals == 0


def test_switching_the_opt_out_off_resumes_listening(edge_models: EdgeModels, tmp_path: Path) -> None:
    with _device(edge_models, tmp_path / "outbox.db") as device:
        device.set_opt_out(True)
        device.set_opt_out(False)
        assert not device.opted_out
        assert device.hear_text(COMMERCIAL).signals


def test_the_minor_mark_is_remembered_and_stops_signals(
    monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    with _device(edge_models, outbox) as device:
        assert device.hear_text(COMMERCIAL).signals
        assert device.set_minor(True) >= 1  # the shipped table forbids minors everywhere: queue erased
    forbid_classifier(monkeypatch, edge_models)
    with _device(edge_models, outbox) as restarted:
        assert restarted.minor
        result = restarted.hear_text(COMMERCIAL)
        assert result.dropped is not None and result.dropped.reason == "minor"
        assert restarted.outbox.stats().queued_signals == 0


def test_the_privacy_budget_lives_in_the_outbox_and_survives_a_restart(
    edge_models: EdgeModels, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    ldp = LdpOptions(epsilon=2.0, daily_budget=1)
    with _device(edge_models, outbox, ldp=ldp) as device:
        first = device.hear_text(COMMERCIAL)
        assert first.noised and first.noised[0].epsilon == 2.0
        assert device.hear_text(COMMERCIAL).withheld >= 1
    with _device(edge_models, outbox, ldp=ldp) as restarted:
        again = restarted.hear_text(COMMERCIAL)
        assert again.signals and again.noised == [] and again.withheld == len(again.signals)
    with Outbox(outbox) as box:
        assert json.loads(box.get_state(BUDGET_STATE_KEY) or "{}")["spent"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("outbox.db")) == []


def test_a_device_without_credentials_says_so(
    edge_models: EdgeModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sotto.edge")
    with Device(PROFILE, "US", outbox=None, target="127.0.0.1:1", models=edge_models):
        pass
    assert "no token and no TLS client certificate" in caplog.text
    assert PROFILE not in caplog.text


def test_a_batch_refused_as_unauthenticated_is_logged_loudly(
    edge_models: EdgeModels, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sotto.edge")
    config = ServerConfig(policy=policy, require_auth=True)
    with (
        AggregatorThread(f"sqlite:///{tmp_path / 'agg.db'}", config) as aggregator,
        Device(
            PROFILE, "US", outbox=None, target=aggregator.target, token="sotto_wrong", models=edge_models
        ) as d,
    ):
        d.hear_text(COMMERCIAL)
        d.flush()
        assert d.outbox.stats().get("batches_set_aside") == 1
    assert "refused a batch" in caplog.text and "UNAUTHENTICATED" in caplog.text
    assert "token missing or revoked" in caplog.text


def test_uk_is_taken_as_gb_and_blocked_like_it(edge_models: EdgeModels) -> None:
    # The usual name of the United Kingdom is not its ISO code; it maps to GB, which the table blocks.
    device = Device(PROFILE, "uk", outbox=None, target="127.0.0.1:1", token="t", models=edge_models)
    try:
        assert device.region == "GB"
        result = device.hear_text("where can i buy trail running shoes")
        assert result.dropped is not None and result.dropped.reason == "region"
        assert device.outbox.stats().queued_signals == 0
    finally:
        device.close()
