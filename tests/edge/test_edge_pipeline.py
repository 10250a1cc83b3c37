"""sotto.edge.classifier and sotto.edge.pipeline with the real shipped model: what a query turns into."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from edge_testkit import (
    JFK_LINE,
    JFK_WAV,
    MODELS,
    PROFILE,
    TODAY,
    copy_models,
    forbid_classifier,
    free_port,
    words,
)

from sotto.edge.asr import ModelError
from sotto.edge.audio import SAMPLE_RATE, Audio
from sotto.edge.classifier import NONE_LABEL, TextClassifier, normalize_text
from sotto.edge.client import DeliveryClient
from sotto.edge.pipeline import Analysis, EdgeConfig, EdgeModels, Pipeline
from sotto.edge.privacy import DROP_REASONS, Dropped
from sotto.wire import day_number

COMMERCIAL = "book me a flight to paris for next week"
NO_INTEREST = "set an alarm for 6 am"
SENSITIVE = {
    "what are the side effects of my chemotherapy": "health",
    "which mosque near me has friday prayers": "religion",
}


def _listed_interest_ids() -> set[str]:
    with (MODELS / "interest_categories.tsv").open(encoding="utf-8", newline="") as fh:
        return {row["id"] for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)}


# --- classifier -----------------------------------------------------------------------------------


def test_normalize_text() -> None:
    assert normalize_text("  I need NEW running-shoes!!  ") == "i need new running shoes"
    assert normalize_text("What's on?") == "what's on"
    assert normalize_text("...") == ""


def test_label_set_is_the_interest_list_plus_none(edge_models: EdgeModels) -> None:
    labels = edge_models.classifier.meta.interest_labels
    assert len(labels) == len(set(labels))
    assert set(labels) == _listed_interest_ids() | {NONE_LABEL}
    assert NONE_LABEL in edge_models.classifier.meta.sensitive_labels


def test_probabilities_sum_to_one(edge_models: EdgeModels) -> None:
    texts = [normalize_text(t) for t in (COMMERCIAL, NO_INTEREST, *SENSITIVE, "x")]
    interest, sensitive = edge_models.classifier.probabilities(texts)
    meta = edge_models.classifier.meta
    assert interest.shape == (len(texts), len(meta.interest_labels))
    assert sensitive.shape == (len(texts), len(meta.sensitive_labels))
    np.testing.assert_allclose(interest.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(sensitive.sum(axis=1), 1.0, atol=1e-4)
    assert (interest >= 0).all() and (sensitive >= 0).all()


def test_classifier_output_is_ranked_and_consistent(edge_models: EdgeModels) -> None:
    out = edge_models.classifier.classify(COMMERCIAL)
    probs = [p for _, p in out.interests]
    assert probs == sorted(probs, reverse=True)
    assert NONE_LABEL not in {cid for cid, _ in out.interests}
    assert sum(probs) + out.no_interest == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= out.sensitive <= 1.0
    assert out.sensitive_class != NONE_LABEL


def test_punctuation_and_case_do_not_change_the_result(edge_models: EdgeModels) -> None:
    plain = edge_models.classifier.classify(COMMERCIAL)
    spoken = edge_models.classifier.classify("Book me a flight to Paris, for next week!")
    assert spoken == plain


def test_batch_of_one_equals_classify(edge_models: EdgeModels) -> None:
    assert edge_models.classifier.classify_batch([COMMERCIAL]) == [
        edge_models.classifier.classify(COMMERCIAL)
    ]


def test_batch_mates_do_not_change_a_result(edge_models: EdgeModels) -> None:
    single = edge_models.classifier.classify(COMMERCIAL)
    _, batched = edge_models.classifier.classify_batch([NO_INTEREST, COMMERCIAL])
    assert batched.interests[0][1] == pytest.approx(single.interests[0][1], abs=1e-3)
    assert batched.sensitive == pytest.approx(single.sensitive, abs=1e-3)


def test_empty_text_is_classified_without_error(edge_models: EdgeModels) -> None:
    (out,) = edge_models.classifier.classify_batch(["?!"])
    assert out.interests


def test_corrupted_model_file_is_refused(tmp_path: Path) -> None:
    folder = copy_models(tmp_path / "models")
    onnx = folder / "classifier.onnx"
    data = bytearray(onnx.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    onnx.write_bytes(bytes(data))

    with pytest.raises(ModelError, match="SHA-256") as info:
        TextClassifier(folder)
    assert "classifier.onnx" in str(info.value)
    with pytest.raises(ModelError, match="SHA-256"):
        EdgeModels(EdgeConfig(models_dir=str(folder)))


def test_missing_model_file_is_refused(tmp_path: Path) -> None:
    folder = copy_models(tmp_path / "models")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json: model file not found"):
        TextClassifier(folder)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of onnx"):
        TextClassifier(backend="tflite-gpu")


# --- pipeline on text -----------------------------------------------------------------------------


def test_commercial_query_yields_a_travel_signal(pipeline: Pipeline, edge_models: EdgeModels) -> None:
    result = pipeline.analyze_text(COMMERCIAL, today=TODAY)

    assert result.dropped is None
    assert result.transcript == COMMERCIAL
    assert result.signals, "no signal for a clearly commercial query"
    taxonomy = edge_models.policy.taxonomy
    assert taxonomy[result.signals[0].category_id].tier1 == "Travel"
    for signal in result.signals:
        assert signal.day == day_number(TODAY)
        assert 1 <= signal.weight_level <= 4
        assert signal.category_id in edge_models.policy.interest_ids
        assert signal.category_id not in edge_models.policy.sensitive


def test_no_interest_query_is_dropped(pipeline: Pipeline) -> None:
    result = pipeline.analyze_text(NO_INTEREST, today=TODAY)
    assert result.signals == []
    assert result.dropped == Dropped("no_interest", None)


@pytest.mark.parametrize(("query", "cls"), list(SENSITIVE.items()))
def test_sensitive_query_is_dropped_without_signals(pipeline: Pipeline, query: str, cls: str) -> None:
    result = pipeline.analyze_text(query, today=TODAY)
    assert result.signals == []
    assert result.dropped == Dropped("sensitive", cls)


def test_blocked_region_never_runs_the_classifier(
    monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels
) -> None:
    forbid_classifier(monkeypatch, edge_models)
    device = Pipeline(edge_models, region="DE")

    result = device.analyze_text(COMMERCIAL, today=TODAY)

    assert result.dropped is not None and result.dropped.reason == "region"
    assert result.signals == [] and result.transcript is None


def test_opt_out_never_runs_the_classifier(monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels) -> None:
    forbid_classifier(monkeypatch, edge_models)
    device = Pipeline(edge_models, region="US", opted_out=True)

    result = device.analyze_text(COMMERCIAL, today=TODAY)

    assert result.dropped is not None and result.dropped.reason == "opt_out"
    assert result.signals == [] and result.transcript is None


def test_an_opt_out_kept_in_the_outbox_silences_the_device_after_a_restart(
    monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    client = DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{free_port()}", outbox=outbox)
    try:
        client.set_opt_out(True)
    finally:
        client.close()
    forbid_classifier(monkeypatch, edge_models)

    restarted = DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{free_port()}", outbox=outbox)
    try:
        device = Pipeline(edge_models, region="US", opted_out=restarted.opted_out)  # as the README wires it
        result = device.analyze_text(COMMERCIAL, today=TODAY)
    finally:
        restarted.close()

    assert result.dropped is not None and result.dropped.reason == "opt_out"
    assert result.signals == [] and result.transcript is None


def test_opt_out_can_be_switched_off(pipeline: Pipeline) -> None:
    pipeline.set_opt_out(True)
    dropped = pipeline.analyze_text(COMMERCIAL, today=TODAY).dropped
    assert dropped is not None and dropped.reason == "opt_out"
    pipeline.set_opt_out(False)
    assert pipeline.analyze_text(COMMERCIAL, today=TODAY).signals


def test_forbidding_the_classifier_is_effective(
    monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels
) -> None:
    """Control for the two tests above: the patch does stop an unrestricted device."""
    forbid_classifier(monkeypatch, edge_models)
    with pytest.raises(AssertionError, match="the classifier ran"):
        Pipeline(edge_models, region="US").analyze_text(COMMERCIAL, today=TODAY)


def test_region_before_its_rule_starts_is_not_blocked(pipeline: Pipeline, edge_models: EdgeModels) -> None:
    result = Pipeline(edge_models, region="DE").analyze_text(COMMERCIAL, today=dt.date(2024, 6, 1))
    assert result.dropped is None and result.signals


@pytest.mark.parametrize("region", ["USA", "1", ""])
def test_pipeline_rejects_bad_region(edge_models: EdgeModels, region: str) -> None:
    with pytest.raises(ValueError, match="alpha-2"):
        Pipeline(edge_models, region=region)


def test_to_json_is_the_public_shape(pipeline: Pipeline, edge_models: EdgeModels) -> None:
    doc = pipeline.analyze_text(COMMERCIAL, today=TODAY).to_json(edge_models.policy)
    assert set(doc) == {"input", "transcript", "signals", "dropped"}
    assert doc["dropped"] is None
    for item in doc["signals"]:
        assert set(item) == {"id", "name", "tier1", "weight"}
        assert item["weight"] in (0.25, 0.5, 0.75, 1.0)
    dropped = pipeline.analyze_text(NO_INTEREST, today=TODAY).to_json(edge_models.policy)
    assert dropped["dropped"] == {"reason": "no_interest", "detail": None}
    assert dropped["dropped"]["reason"] in DROP_REASONS


# --- pipeline on audio ----------------------------------------------------------------------------


def test_silence_is_dropped_as_no_speech(pipeline: Pipeline) -> None:
    result = pipeline.analyze_audio(Audio(np.zeros(2 * SAMPLE_RATE, dtype=np.float32)), today=TODAY)
    assert result.dropped is not None and result.dropped.reason == "no_speech"
    assert result.transcript is None
    assert result.signals == []


def test_audio_in_blocked_region_is_not_even_listened_to(
    monkeypatch: pytest.MonkeyPatch, edge_models: EdgeModels
) -> None:
    def deaf(audio: Audio) -> None:
        raise AssertionError("the speech gate ran")

    monkeypatch.setattr(edge_models.speech_gate, "detect", deaf)
    result = Pipeline(edge_models, region="FR").analyze_file(JFK_WAV, today=TODAY)
    assert result.dropped is not None and result.dropped.reason == "region"
    assert result.transcript is None


def test_speech_file_runs_the_whole_chain(pipeline: Pipeline) -> None:
    result: Analysis = pipeline.analyze_file(JFK_WAV, today=TODAY)
    assert result.input == str(JFK_WAV)
    assert result.transcript is not None and JFK_LINE in words(result.transcript)
    assert {"audio", "vad", "asr", "classify", "filter"} <= set(result.timings_ms)
    # Whatever the verdict, it is either signals or a reason, never both.
    assert (result.dropped is None) == bool(result.signals)
