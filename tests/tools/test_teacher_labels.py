"""The teacher's soft labels as data (tools/teacher_labels.py) and how the device build reads them
(tools/build_models.py --teacher-labels). No torch needed: the teacher itself never runs here; its whole
path is checked by ``python -m tools.teacher smoke`` (see models/MODEL_CARD.md, "Teacher")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools import build_models, modeldata, teacher_labels
from tools.teacher_labels import SoftLabels, read_soft_labels, text_key, write_soft_labels

INTEREST = ["IAB1", "IAB2", "none"]
SENSITIVE = ["none", "health"]


def _labels(keys: list[str], seed: int = 3) -> SoftLabels:
    rng = np.random.default_rng(seed)
    return SoftLabels(
        keys=np.array(keys),
        groups=np.array(["handwritten"] * len(keys)),
        interest=rng.normal(size=(len(keys), len(INTEREST))).astype(np.float32),
        sensitive=rng.normal(size=(len(keys), len(SENSITIVE))).astype(np.float32),
        interest_labels=INTEREST,
        sensitive_labels=SENSITIVE,
        meta={"encoder": "test"},
    )


def test_the_key_is_the_normalised_text_s() -> None:
    assert text_key("Pizza near me?") == text_key("pizza near me")
    assert text_key("pizza near me") != text_key("pizza near you")
    assert len(text_key("x")) == 16


def test_written_labels_read_back_sorted_in_float16(tmp_path: Path) -> None:
    keys = [text_key(t) for t in ("b query", "a query", "c query")]
    labels = _labels(keys)
    path = tmp_path / "soft.npz"
    write_soft_labels(path, labels)
    back = read_soft_labels(path, INTEREST, SENSITIVE)
    assert list(back.keys) == sorted(keys)
    assert back.interest.dtype == np.float16 and back.meta == {"encoder": "test"}
    row = back.rows()[keys[0]]
    np.testing.assert_allclose(back.interest[row], labels.interest[0], atol=2e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["soft.npz"]  # no temporary file left


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_soft_labels(tmp_path / "missing.npz")
    path = tmp_path / "soft.npz"
    with pytest.raises(ValueError, match="duplicate"):
        write_soft_labels(path, _labels(["k1", "k1"]))
    assert not path.exists()
    write_soft_labels(path, _labels(["k1", "k2"]))
    with pytest.raises(ValueError, match="labels differ"):
        read_soft_labels(path, [*INTEREST, "IAB3"], SENSITIVE)
    bad = _labels(["k1", "k2"])
    bad.sensitive[0, 0] = np.inf
    write_soft_labels(path, bad)
    with pytest.raises(ValueError, match="non-finite"):
        read_soft_labels(path)
    np.savez(tmp_path / "other.npz", keys=np.array(["k1"]))
    with pytest.raises(ValueError, match="not a soft-label file"):
        read_soft_labels(tmp_path / "other.npz")


def test_the_build_finds_its_examples_soft_labels_by_text() -> None:
    fit = [
        modeldata.Example("Pizza near me?", "IAB1", "none", "x", "train"),
        modeldata.Example("never labelled", None, "health", "x", "train"),
    ]
    labels = _labels([text_key("pizza near me")])
    got = build_models.soft_targets(fit, labels)
    assert got is not None
    interest, sensitive, has = got
    assert has.tolist() == [True, False]
    np.testing.assert_array_equal(interest[0], labels.interest[0])
    np.testing.assert_array_equal(sensitive[0], labels.sensitive[0])
    assert build_models.soft_targets(fit, None) is None


@pytest.fixture(scope="module")
def examples() -> list[modeldata.Example]:
    return modeldata.load_all()


@pytest.fixture(scope="module")
def transfer_rows() -> list[tuple[str, str, str]]:
    return teacher_labels.transfer_set()


def test_transfer_set_reads_no_final_exam_and_holds_every_example_of_the_recipe(
    monkeypatch: pytest.MonkeyPatch, examples: list[modeldata.Example]
) -> None:
    read: list[Path] = []
    original = modeldata._read_tsv

    def recording(path: Path) -> list[dict[str, str]]:
        read.append(path)
        return original(path)

    monkeypatch.setattr(modeldata, "_read_tsv", recording)
    rows = teacher_labels.transfer_set()
    assert read and not any("final_exam" in p.parts for p in read)
    assert any("round4" in p.parts for p in read)
    assert not any("heldout" in p.parts for p in read)
    keys = [k for k, _, _ in rows]
    assert keys == sorted(set(keys))
    held_out_only = {e.source.split(":")[0] for e in modeldata.held_out()}
    assert held_out_only == set(modeldata.HELD_OUT_FOLDERS)
    recipe = [e for e in examples if e.source.split(":")[0] not in held_out_only]
    assert {text_key(e.text) for e in recipe} <= set(keys)
    # The held-out-only queries are never distilled on: the teacher has no label for them.
    assert not {text_key(e.text) for e in modeldata.held_out()} & set(keys)
    with pytest.raises(ValueError, match="final_exam"):
        teacher_labels.transfer_set(folders=("handwritten", "final_exam"))


def test_transfer_examples_are_outside_every_split_and_capped(
    examples: list[modeldata.Example], transfer_rows: list[tuple[str, str, str]]
) -> None:
    rows = transfer_rows
    labels = _labels([k for k, _, _ in rows])
    extra = build_models.transfer_examples(examples, labels, limit=3000, rows=rows)
    known = {text_key(e.text) for e in examples}
    assert len(extra) == 3000
    assert not {text_key(e.text) for e in extra} & known
    assert all(e.sensitive == "" and e.interest is None for e in extra)
    assert not any(e.source == "transfer:handwritten" for e in extra)
    # A build without round 4 still learns none of its texts from the teacher alone.
    shipped = build_models.transfer_examples(modeldata.load_all(), labels, limit=100_000, rows=rows)
    assert not any(e.source == "transfer:handwritten" for e in shipped)
    medquad = sum(e.source == "transfer:medquad" for e in extra)
    assert medquad <= build_models.TRANSFER_CAPS["medquad"]
    # The same choice whatever the order the transfer set comes in.
    assert extra == build_models.transfer_examples(examples, labels, limit=3000, rows=rows[::-1])


def test_one_teacher_process_per_run_folder(tmp_path: Path) -> None:
    from tools.teacher import run_lock

    with (
        run_lock(tmp_path),
        pytest.raises(SystemExit, match="another teacher process"),
        run_lock(tmp_path),
    ):
        pass
    with run_lock(tmp_path):  # free again once the first is done
        pass


def test_the_run_folder_stays_outside_the_repository() -> None:
    from tools.teacher import main

    with pytest.raises(SystemExit, match="outside the repository"):
        main(["install", "--run-dir", str(build_models.ROOT / "build" / "teacher-run")])
    assert not (build_models.ROOT / "build" / "teacher-run").exists()


def test_held_out_report_counts_misses_and_benign_flags(
    tmp_path: Path, examples: list[modeldata.Example], capsys: pytest.CaptureFixture[str]
) -> None:
    held = [
        e for e in examples if e.split == "eval" and e.source.split(":")[0] not in modeldata.HELD_OUT_FOLDERS
    ]
    sensitive = [e for e in held if e.sensitive != "none"][:2]
    interest = [e for e in held if e.sensitive == "none" and e.interest not in (None, "none")][:2]
    labels = _labels([text_key(e.text) for e in sensitive + interest])
    # Logits of the sensitivity head: P(none) from softmax. One sensitive query is missed at 0.5 (its
    # P(none) is high), one benign interest query is flagged (its P(none) is low).
    confident = np.full(labels.sensitive.shape[1], -9.0)
    rows = labels.rows()
    for e, p_none_high in zip(sensitive + interest, (True, False, True, False), strict=True):
        logits = confident.copy()
        logits[0 if p_none_high else 1] = 9.0
        labels.sensitive[rows[text_key(e.text)]] = logits
    report = teacher_labels.held_out_report(labels, thresholds=(0.5,))
    assert "4 (2 sensitive, 2 benign interest)" in report
    assert report.splitlines()[-1] == "0.5 | 50.00% | 50.00%"
    path = tmp_path / "labels.npz"
    write_soft_labels(path, labels)
    assert teacher_labels.main([str(path)]) == 0 and "0.2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        teacher_labels.main([str(tmp_path / "missing.npz")])
