"""The similarity metrics against hand-computed values, and the ``similarity`` task type."""

import json
import math
from pathlib import Path

import pytest

from llmexp.errors import UserError
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.tasks.similarity import (
    SIMILARITY,
    exact_match,
    normalise_squad,
    row_scores,
    similarity_scores,
    token_f1,
)

FIXTURES = Path(__file__).parent / "fixtures"
SUMMARIES = FIXTURES / "summaries_sample.jsonl"


def test_identical_texts_score_one_and_bleu_100():
    text = ["the court held that the contract was void", "the appeal was dismissed"]
    scores = similarity_scores(text, text)
    assert {key: scores[key] for key in ("rouge1", "rouge2", "rougeL", "f1", "exact_match")} == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "f1": 1.0, "exact_match": 1.0
    }
    assert scores["bleu"] == pytest.approx(100.0)


def test_disjoint_texts_score_zero():
    scores = similarity_scores(["dogs run fast"], ["cats sleep all day"])
    assert scores == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu": 0.0, "f1": 0.0, "exact_match": 0.0}


def test_partial_overlap_matches_hand_counts():
    # SQuAD normalisation drops the articles: [cat sat on mat] vs [cat sat on hat], 3 shared of 4 each
    assert token_f1("The cat sat on the mat.", "A cat sat on a hat") == pytest.approx(0.75)
    scores = row_scores("the cat sat on the mat", "a cat sat on a hat")
    # ROUGE keeps articles: 3 of 6 unigrams shared each way, 2 of 5 bigrams, LCS "cat sat on" = 3
    assert scores["rouge1"] == pytest.approx(0.5)
    assert scores["rouge2"] == pytest.approx(0.4)
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["exact_match"] == 0.0


def test_rouge_stems_words():
    # Porter stemming: "sitting" ~ "sit", "cats" ~ "cat"; precision 2/2, recall 2/3
    assert row_scores("cats sitting", "the cat sits")["rouge1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_corpus_bleu_matches_hand_computation():
    # every n-gram of the prediction is in the reference: precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty
    longer = similarity_scores(["the cat sat on the mat today"], ["the cat sat on the mat"])["bleu"]
    assert longer == pytest.approx(100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    # all precisions 1, but 5 tokens for 6: brevity penalty exp(1 - 6/5)
    shorter = similarity_scores(["the cat sat on the"], ["the cat sat on the mat"])["bleu"]
    assert shorter == pytest.approx(100 * math.exp(1 - 6 / 5))
    # corpus BLEU pools the counts of both rows: not the mean of the two sentence scores
    both = similarity_scores(["the cat sat on the mat today", "the cat sat on the"], ["the cat sat on the mat"] * 2)
    pooled = (11 / 12 * 9 / 10 * 7 / 8 * 5 / 6) ** 0.25  # matches / candidate n-grams over both rows, 12 vs 12 tokens
    assert both["bleu"] == pytest.approx(100 * pooled)


def test_squad_normalisation_and_exact_match():
    assert normalise_squad("  The  Cat, an owl!") == "cat owl"
    assert exact_match("The cat!", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "") == 1.0  # both normalise to nothing
    assert token_f1("cat", "") == 0.0


def test_scores_predictions_in_the_file_without_a_model():
    result = SIMILARITY.run({"type": "similarity", "path": str(SUMMARIES), "prediction_field": "prediction"}, TaskInputs(world=None), None)
    lines = [json.loads(line) for line in SUMMARIES.read_text().splitlines()]
    assert [row["predicted"] for row in result.rows] == [line["prediction"] for line in lines]
    assert result.metrics == pytest.approx(
        similarity_scores([line["prediction"] for line in lines], [line["reference"] for line in lines])
    )
    assert result.rows[0]["exact_match"] == 1.0 and result.rows[2]["rouge1"] == 0.0
    assert result.metrics["exact_match"] == pytest.approx(1 / 3)
    assert all(isinstance(value, float) for value in result.metrics.values())


def test_limit_keeps_the_first_rows():
    spec = {"type": "similarity", "path": str(SUMMARIES), "prediction_field": "prediction"}
    result = SIMILARITY.run(spec, TaskInputs(world=None, limit=1), None)
    assert len(result.rows) == 1 and result.metrics["bleu"] == pytest.approx(100.0)


def test_generates_greedily_and_scores_the_generations(tiny_checkpoint):
    from llmexp.models.loading import load_model
    from llmexp.plugins.evaluate.harness.decoding import greedy_generate
    from llmexp.plugins.evaluate.harness.scoring import Scorer

    model, tokenizer = load_model(tiny_checkpoint)
    spec = {"type": "similarity", "path": str(SUMMARIES), "max_new_tokens": 6, "stop": ["\n\n"]}
    result = SIMILARITY.run(spec, TaskInputs(world=None), Scorer(model, tokenizer, batch_size=2, max_new_tokens=40))
    prompts = [json.loads(line)["prompt"] for line in SUMMARIES.read_text().splitlines()]
    expected = [text.strip() for text in greedy_generate(model, tokenizer, prompts, max_new_tokens=6, stop=["\n\n"])]
    assert [row["predicted"] for row in result.rows] == expected
    assert result.metrics == pytest.approx(similarity_scores(expected, [row["expected"] for row in result.rows]))


def test_problems_name_the_line_and_the_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n')
    found = SIMILARITY.problems({"type": "similarity", "path": str(bad)}, "technique.tasks[0]")
    assert len(found) == 1 and f"{bad}:2" in found[0] and "'reference'" in found[0]

    # with prediction_field the prompt is not needed, the prediction is
    found = SIMILARITY.problems({"path": str(bad), "prediction_field": "prediction"}, "t")
    assert f"{bad}:1" in found[0] and "'prediction'" in found[0]

    found = SIMILARITY.problems({"path": str(tmp_path / "none.jsonl"), "max_new_tokens": 0, "stop": "x"}, "t")
    assert any("t.max_new_tokens=0" in p for p in found) and any("t.stop='x'" in p for p in found)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no lines" in SIMILARITY.problems({"path": str(empty)}, "t")[0]
    assert "does not exist" in SIMILARITY.problems({"path": str(tmp_path / "none.jsonl")}, "t")[0]
    assert SIMILARITY.problems({"path": str(SUMMARIES)}, "t") == []


def test_run_on_a_bad_line_raises_a_user_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: the 'reference' field is number, not text"):
        SIMILARITY.run({"path": str(bad), "prediction_field": "prompt"}, TaskInputs(world=None), None)
