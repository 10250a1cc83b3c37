"""tools.gazetteer_report: the model alone and with the gazetteer differ only by the gazetteer."""

from __future__ import annotations

from collections import Counter

from sotto.edge.gazetteer import Gazetteer
from sotto.edge.pipeline import EdgeConfig, EdgeModels
from sotto.edge.privacy import FilterOptions
from tools import gazetteer_report, modeldata
from tools.evaluate import metrics


def test_both_columns_share_one_classification_and_differ_by_the_gazetteer() -> None:
    models = EdgeModels(EdgeConfig(filter=FilterOptions(gazetteer=False)))
    examples = [
        modeldata.Example("playlist for my grindr date", None, "sexual_orientation", "t", "eval"),
        modeldata.Example("play some jazz in the kitchen", "338", "none", "t", "eval"),
        modeldata.Example("set a timer for ten minutes", "none", "none", "t", "eval"),
    ]
    [(alone, with_gazetteer)] = gazetteer_report.both_decisions(examples, models, Gazetteer.load())
    assert alone[0][0] is not None  # the model alone leaks it
    assert with_gazetteer[0] == (None, "sensitive")
    assert alone[1:] == with_gazetteer[1:]
    a, b = metrics(examples, alone, models.policy), metrics(examples, with_gazetteer, models.policy)
    report = gazetteer_report.render({"tiny": (a, b)}, 3, 0.5)
    assert "| sensitive leak, overall | 100.00% | 0.00% |" in report
    assert "| leak: sexual_orientation | 100.00% of 1 | 0.00% |" in report


def test_the_hand_written_part_keeps_every_written_query_and_no_public_one() -> None:
    held_out = [e for e in modeldata.load_all() if e.split == "eval"]
    written = gazetteer_report.written(held_out)
    public = ("clinc150:", "hwu64:", "bbq:", "medquad")
    assert not [e for e in written if e.source.startswith(public)]
    assert {e.text.lower() for e in modeldata.held_out()} <= {e.text.lower() for e in written}
    assert len(written) == sum(not e.source.startswith(public) for e in held_out)
    kinds = Counter(
        "sensitive" if e.sensitive != "none" else ("none" if e.interest == "none" else "interest")
        for e in written
    )
    assert min(kinds["interest"], kinds["none"], kinds["sensitive"]) > 0


def test_a_stricter_threshold_drops_at_least_as_much() -> None:
    models = EdgeModels(EdgeConfig(filter=FilterOptions(gazetteer=False)))
    examples = [modeldata.Example("play some jazz in the kitchen", "338", "none", "t", "eval")]
    loose, strict = gazetteer_report.both_decisions(examples, models, Gazetteer.load(), [1.0, 1e-9])
    assert strict[0] == strict[1] == [(None, "sensitive")]
    assert loose[0][0][0] is not None


def test_both_columns_apply_the_models_commercial_gate(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sotto.edge.classifier import ClassifierOutput

    models = EdgeModels(EdgeConfig(filter=FilterOptions(gazetteer=False)))
    gate = models.classifier.meta.max_no_interest
    # Commercial under a gate of 0.5, not under the model's own when it is stricter: the report must
    # decide as the device does.
    no_interest = (gate + 0.5) / 2 if gate < 0.5 else gate - 0.01
    made = ClassifierOutput([("338", 1 - no_interest)], no_interest, 0.0, "health")
    monkeypatch.setattr(models.classifier, "classify", lambda text: made)
    examples = [modeldata.Example("play some jazz in the kitchen", "338", "none", "t", "eval")]
    [(alone, with_gazetteer)] = gazetteer_report.both_decisions(examples, models, Gazetteer.load())
    expected = (None, "no_interest") if no_interest >= gate else ("338", None)
    assert alone == with_gazetteer == [expected]
