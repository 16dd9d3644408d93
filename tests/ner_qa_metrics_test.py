"""Entity-level F1 and SQuAD EM/F1 against hand-computed values (and seqeval)."""

import numpy as np
import pytest

from klora.metrics import (best_null_threshold, entities, entity_scores, exact_match, f1_score,
                           normalize_answer, squad_scores, squad_v2_scores)


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["I-PER", "I-PER", "O"], [("PER", 0, 1)]),                  # IOB1-style start
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # type change splits
    (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),
    (["S-ORG", "B-LOC", "E-LOC", "O"], [("ORG", 0, 0), ("LOC", 1, 2)]),  # IOBES
    (["O", "O"], []),
])
def test_entities(tags, expected):
    assert entities(tags) == expected


def test_entity_scores_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-LOC", "O"]]
    # reference: PER(0-1) LOC(3) | ORG(0) LOC(2-3); predicted: PER(0-1) ORG(3) | ORG(0) LOC(2)
    scores = entity_scores(true, pred)
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(0.5)
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    org = scores["per_type"]["ORG"]
    assert (org["precision"], org["recall"], org["support"]) == (0.5, 1.0, 1)
    assert org["f1"] == pytest.approx(2 / 3)


def test_entity_scores_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="Sequence 0: 2 reference tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


def test_matches_seqeval_on_random_sequences():
    metrics = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-MISC", "I-MISC"]
    for trial in range(30):
        lengths = rng.integers(1, 12, size=8)
        true = [[tags[i] for i in rng.integers(0, len(tags), n)] for n in lengths]
        pred = [[tags[i] for i in rng.integers(0, len(tags), n)] for n in lengths]
        ours = entity_scores(true, pred)
        report = metrics.classification_report(true, pred, output_dict=True, zero_division=0)
        assert ours["f1"] == pytest.approx(metrics.f1_score(true, pred, zero_division=0))
        assert ours["precision"] == pytest.approx(metrics.precision_score(true, pred, zero_division=0))
        assert ours["recall"] == pytest.approx(metrics.recall_score(true, pred, zero_division=0))
        for type_, s in ours["per_type"].items():
            if s["support"]:
                assert s["f1"] == pytest.approx(report[type_]["f1-score"]), (trial, type_)


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an  apple, a pear ", "apple pear"),
    ("Theatre", "theatre"),                   # only whole-word articles go
    ("U.S.", "us"),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert f1_score("in the garden room", "the garden") == pytest.approx(2 * (1 / 3) * 1 / (4 / 3))
    # "at nine in evening": 4 tokens after normalization, 1 shared
    assert f1_score("nine", "at nine in the evening") == pytest.approx(2 * 1 * (1 / 4) / (5 / 4))
    assert f1_score("blue", "red") == 0.0
    # Maximum over the references; a missing prediction scores 0.
    scores = squad_scores({"a": "1992", "b": "garden room"},
                          {"a": ["in 1992", "1992"], "b": ["the garden room", "garden"],
                           "c": ["x"]})
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(200 / 3)


def test_squad_v2_scores_by_hand():
    references = {"a": ["Eiffel Tower"], "b": ["Paris", "in Paris"], "n1": [], "n2": []}
    predictions = {"a": "the tower", "b": "Paris", "n1": "", "n2": "Lyon"}
    scores = squad_v2_scores(predictions, references)
    # a: EM 0, F1 2 * (1/1 * 1/2) / 1.5 = 2/3; b: 1, 1; n1: 1, 1; n2: 0, 0.
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1 + 1 + 0) / 4)
    assert scores["HasAns_exact_match"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert scores["NoAns_exact_match"] == scores["NoAns_f1"] == pytest.approx(50.0)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (4, 2, 2)
    assert "NoAns_f1" not in squad_v2_scores({"a": "x"}, {"a": ["x"]})


def official_best_f1_thresh(texts, margins, references):
    """The official evaluate-v2.0.py `find_best_thresh`, F1 version, written out."""
    f1 = {q: (f1_score(texts[q], references[q][0]) if references[q] else 0.0)
          for q in references}
    score = best = sum(1 for a in references.values() if not a)
    threshold = None
    for q in sorted(margins, key=margins.get):
        score += f1[q] if references[q] else (-1 if texts[q] else 0)
        if score > best:
            best, threshold = score, margins[q]
    return threshold, 100.0 * best / len(references)


def test_best_null_threshold_matches_the_official_search():
    rng = np.random.default_rng(0)
    words = ["paris", "lyon", "the tower", "river", "old town"]
    for _ in range(50):
        n = int(rng.integers(2, 12))
        references = {f"q{i}": ([] if rng.random() < 0.4 else [str(rng.choice(words))])
                      for i in range(n)}
        texts = {q: str(rng.choice(words)) for q in references}
        margins = {q: float(rng.normal()) for q in references}
        threshold, f1 = best_null_threshold(texts, margins, references)
        expected_threshold, expected_f1 = official_best_f1_thresh(texts, margins, references)
        assert f1 == pytest.approx(expected_f1)
        if expected_threshold is not None:
            assert threshold == expected_threshold
        answers = {q: "" if margins[q] > threshold else t for q, t in texts.items()}
        assert squad_v2_scores(answers, references)["f1"] == pytest.approx(f1)
