"""sotto.edge.gazetteer: whole-word lookup of reviewed sensitive terms, its data files, and the privacy
filter's use of it as a second recall path beside the model."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from edge_testkit import MUSIC, TODAY, output

from sotto.edge.gazetteer import COLUMNS, Gazetteer, GazetteerMatch
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.privacy import Dropped, FilterOptions, PrivacyFilter
from sotto.policy import SENSITIVE_CLASSES, Policy, PolicyError, bundled_models_dir

SHIPPED = bundled_models_dir() / "gazetteer"
ROWS = [
    ("Zoloft", "mental_health", "test"),
    ("I-589", "immigration", "test"),
    ("eid", "religion", "test"),
    ("snap benefits", "financial_hardship", "test"),
    ("seiu local", "trade_union", "test"),
    ("seiu", "trade_union", "test2"),
    ("crohn's", "health", "test"),
]


@pytest.fixture
def gazetteer() -> Gazetteer:
    return Gazetteer.from_terms(ROWS)


# --- matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "term", "cls"),
    [
        ("Is Zoloft OK with coffee?", "zoloft", "mental_health"),
        ("where do I mail my I-589", "i 589", "immigration"),
        ("where do i mail my i 589", "i 589", "immigration"),
        ("Eid gifts for the kids", "eid", "religion"),
        ("do my SNAP benefits cover this", "snap benefits", "financial_hardship"),
        ("crohn's friendly snacks", "crohn's", "health"),
    ],
)
def test_terms_and_phrases_match_on_normalised_text(
    gazetteer: Gazetteer, text: str, term: str, cls: str
) -> None:
    hit = gazetteer.match(text)
    assert hit is not None and (hit.term, hit.sensitive_class) == (term, cls)


@pytest.mark.parametrize(
    "text",
    [
        "a warm eiderdown for winter",  # "eid" inside another word
        "reid's bakery opening hours",
        "snap peas recipe",  # only one word of a phrase
        "benefits of a standing desk",
        "i 5 traffic to portland",  # a form number's prefix alone
        "i 5890 product code",
        "",
    ],
)
def test_no_match_inside_words_or_for_part_of_a_phrase(gazetteer: Gazetteer, text: str) -> None:
    assert gazetteer.match(text) is None


def test_the_longest_term_wins(gazetteer: Gazetteer) -> None:
    assert gazetteer.match("when does the seiu local meet") == GazetteerMatch(
        "seiu local", "trade_union", "test"
    )
    assert gazetteer.match("join the seiu") == GazetteerMatch("seiu", "trade_union", "test2")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("prozac", "feelings", "x"), "unknown class 'feelings'"),
        (("prozac", "health", ""), "has no source"),
        (("?!", "health", "x"), "empty once normalised"),
    ],
)
def test_bad_rows_are_refused(row: tuple[str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Gazetteer.from_terms([row])


def test_a_bad_file_names_file_and_line(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "gazetteer").mkdir(parents=True)
    (models / "iab_content_taxonomy_3.1.tsv").write_text("")
    with pytest.raises(PolicyError, match="no gazetteer lists"):
        Gazetteer.load(models)
    (models / "gazetteer" / "bad.tsv").write_text("term\tclass\tsource\nprozac\thealth\tx\nzoloft\tmood\tx\n")
    with pytest.raises(PolicyError, match=r"bad\.tsv:3: .*unknown class 'mood'"):
        Gazetteer.load(models)
    (models / "gazetteer" / "bad.tsv").write_text("term\tclass\nprozac\thealth\n")
    with pytest.raises(PolicyError, match="columns must be term, class, source"):
        Gazetteer.load(models)


# --- the shipped lists ------------------------------------------------------------------------------


def _source_keys() -> set[str]:
    """Keys of the table in SOURCES.md: rows that start with | `key` |."""
    text = (SHIPPED / "SOURCES.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.MULTILINE))


def test_every_shipped_term_has_a_known_class_and_a_documented_source() -> None:
    keys = _source_keys()
    files = sorted(SHIPPED.glob("*.tsv"))
    assert files and keys
    used: set[str] = set()
    for path in files:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            assert tuple(reader.fieldnames or ()) == COLUMNS, path
            for row in reader:
                assert row["class"] in SENSITIVE_CLASSES, (path.name, row)
                assert row["source"] in keys, (path.name, row)
                used.add(row["source"])
    assert used == keys, "SOURCES.md lists a source no file uses, or the reverse"


def test_the_shipped_gazetteer_loads_and_knows_the_issue_examples() -> None:
    shipped = Gazetteer.load()
    assert len(shipped) > 500
    for text, cls in [
        ("is lexapro making me tired", "mental_health"),
        ("can i use my ebt card at costco", "financial_hardship"),
        ("how long does the i-589 take", "immigration"),
        ("when is the next seiu local meeting", "trade_union"),
        ("what time is fajr tomorrow", "religion"),
        ("grindr keeps crashing", "sexual_orientation"),
        ("what does brca2 positive mean", "genetic"),
    ]:
        hit = shipped.match(text)
        assert hit is not None and hit.sensitive_class == cls, text


@pytest.mark.parametrize(
    "text",
    [
        "traffic on i 90 into seattle",  # a form number that is also a highway
        "is i-485 backed up near charlotte",
        "i lent my drill to the neighbour",
        "a platform agnostic note taking app",
        "green juice detox recipe",
        "lake with plenty of fish near me",
        "order of orleans parish court house hours",
        "advil and a heating pad, add to cart",  # everyday remedies are not listed
    ],
)
def test_the_shipped_gazetteer_leaves_everyday_meanings_alone(text: str) -> None:
    assert Gazetteer.load().match(text) is None


# --- the privacy filter ------------------------------------------------------------------------------


def test_filter_drops_a_gazetteer_term_the_model_missed_with_its_class(
    policy: Policy, gazetteer: Gazetteer
) -> None:
    privacy = PrivacyFilter(policy, 0.8, FilterOptions(gazetteer=True), gazetteer, max_no_interest=0.5)
    benign_looking = output([(MUSIC, 0.9)], sensitive=0.1)
    assert privacy.decide(benign_looking, TODAY, "play songs for my zoloft playlist") == Dropped(
        "sensitive", "mental_health"
    )
    assert isinstance(privacy.decide(benign_looking, TODAY, "play some jazz"), list)


def test_the_models_class_is_reported_when_both_fire(policy: Policy, gazetteer: Gazetteer) -> None:
    privacy = PrivacyFilter(policy, 0.8, FilterOptions(gazetteer=True), gazetteer, max_no_interest=0.5)
    flagged = output([(MUSIC, 0.9)], sensitive=0.9, sensitive_class="health")
    assert privacy.decide(flagged, TODAY, "zoloft") == Dropped("sensitive", "health")


def test_filter_refuses_to_decide_without_the_text_when_the_gazetteer_is_on(
    policy: Policy, gazetteer: Gazetteer
) -> None:
    privacy = PrivacyFilter(policy, 0.8, FilterOptions(gazetteer=True), gazetteer, max_no_interest=0.5)
    with pytest.raises(ValueError, match="needs the utterance's text"):
        privacy.decide(output([(MUSIC, 0.9)], sensitive=0.1), TODAY)


def test_the_option_off_ignores_the_gazetteer(policy: Policy, gazetteer: Gazetteer) -> None:
    privacy = PrivacyFilter(policy, 0.8, FilterOptions(gazetteer=False), gazetteer, max_no_interest=0.5)
    assert isinstance(privacy.decide(output([(MUSIC, 0.9)], sensitive=0.1), TODAY, "zoloft"), list)


def test_pipeline_yields_no_signal_for_a_gazetteer_term(edge_models: EdgeModels) -> None:
    """End to end through the shipped model: a query the model alone lets through is stopped."""
    text = "playlist for my grindr date"
    alone = Pipeline(EdgeModels(EdgeConfig(filter=FilterOptions(gazetteer=False)))).analyze_text(
        text, today=TODAY
    )
    assert alone.signals and alone.dropped is None
    with_gazetteer = Pipeline(edge_models).analyze_text(text, today=TODAY)
    assert with_gazetteer.signals == []
    assert with_gazetteer.dropped == Dropped("sensitive", "sexual_orientation")
