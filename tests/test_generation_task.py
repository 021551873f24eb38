"""The ``generation`` task type (regex answer filters, GSM8K prompts, maj@k) and sampled decoding in scoring.py."""

import json
from pathlib import Path

import pytest
import torch

from llmexp.data.gsm8k import AnswerFilter
from llmexp.plugins.evaluate.harness import scoring
from llmexp.plugins.evaluate.harness.registry import Task, resolve_tasks, run_task
from llmexp.plugins.evaluate.harness.scoring import Sampling, Scorer
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.tasks.generation import GENERATION
from llmexp.plugins.evaluate.tasks.generation_spec import DEFAULT_FILTERS, DEFAULTS

FIXTURES = Path(__file__).parent / "fixtures"
TEST = FIXTURES / "gsm8k_sample_test.jsonl"
TRAIN = FIXTURES / "gsm8k_sample_train.jsonl"
LINES = [json.loads(line) for line in TEST.read_text().splitlines()]
SHOTS = [json.loads(line) for line in TRAIN.read_text().splitlines()]


class CannedScorer:
    """Answers ``generate`` with given texts (one list per call) and records each call's arguments."""

    def __init__(self, *answers):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, stop, max_new_tokens=None, sampling=None):
        self.calls.append({"prompts": list(prompts), "stop": list(stop), "max_new_tokens": max_new_tokens, "sampling": sampling})
        return list(self.answers[len(self.calls) - 1][: len(prompts)])


def write_problems(path, pairs):
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": answer}) + "\n" for i, (answer, _) in enumerate(pairs)))
    return [generated for _, generated in pairs]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from llmexp.models.loading import load_model

    return load_model(tiny_checkpoint)


# --- prompts --------------------------------------------------------------------------------


def test_zero_shot_prompt_stop_strings_and_decoding_are_lm_eval_gsm8k():
    scorer = CannedScorer(["#### 7"] * 4)
    GENERATION.run({"type": "generation", "path": str(TEST)}, TaskInputs(None), scorer)
    (call,) = scorer.calls
    assert call["prompts"] == [f"Question: {line['question']}\nAnswer:" for line in LINES]
    assert call["stop"] == ["Question:", "</s>", "<|im_end|>"]
    assert call["sampling"] is None and call["max_new_tokens"] is None


def test_few_shot_prompt_is_the_first_k_solved_examples():
    scorer = CannedScorer(["#### 7"])
    spec = {"path": str(TEST), "fewshot_path": str(TRAIN), "num_fewshot": 2, "max_new_tokens": 256}
    GENERATION.run(spec, TaskInputs(None, limit=1), scorer)
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in SHOTS[:2])
    assert scorer.calls[0]["prompts"] == [shots + f"Question: {LINES[0]['question']}\nAnswer:"]
    assert scorer.calls[0]["max_new_tokens"] == 256


def test_random_few_shot_is_one_seeded_sample_for_every_question():
    def prompts(seed):
        scorer = CannedScorer(["#### 7"] * 4)
        spec = {"path": str(TEST), "fewshot_path": str(TRAIN), "num_fewshot": 2, "fewshot_sampling": "random", "fewshot_seed": seed}
        GENERATION.run(spec, TaskInputs(None), scorer)
        return scorer.calls[0]["prompts"]

    first = prompts(1234)
    assert first == prompts(1234)
    prefixes = {p[: p.rindex("Question: ")] for p in first}
    assert len(prefixes) == 1
    (prefix,) = prefixes
    used = [s for s in SHOTS if f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" in prefix]
    assert len(used) == 2
    assert any(prompts(seed) != first for seed in range(5))


def test_custom_template_and_fields(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "What is 2+2?", "solution": "2+2=4 #### 4"}) + "\n")
    scorer = CannedScorer(["so #### 4"])
    spec = {"path": str(path), "question_field": "q", "answer_field": "solution", "template": "Q: {question}\nA:", "stop": ["\n\n"]}
    result = GENERATION.run(spec, TaskInputs(None), scorer)
    assert scorer.calls[0]["prompts"] == ["Q: What is 2+2?\nA:"] and scorer.calls[0]["stop"] == ["\n\n"]
    assert result.rows[0]["expected"] == "4" and result.rows[0]["correct"] is True


# --- filters and grading ---------------------------------------------------------------------

# (reference answer, generated solution): cases where strict and flexible extraction disagree
CASES = [
    ("3+4=7\n#### 7", "3+4=7\n#### 7"),
    ("3+4=7\n#### 7", "Tom has 7 apples.\n#### 7."),
    ("3+4=7\n#### 7", "The answer is 7"),
    ("1,000-766=234\n#### 234", "#### 1,000 - 766 = 234"),
    ("2-7=-5\n#### -5", "2 - 7 = -5\n#### -5"),
    ("2-7=-5\n#### -5", "It gets 5 degrees colder, so #### 5"),
    ("2*1,250=2500\n#### 2,500", "She pays #### $2,500"),
    ("2*1,250=2500\n#### 2,500", "2 * 1250 = 2500\n#### 2500"),
    ("12/4=3\n#### 3", "I cannot tell."),
]


def lm_eval_exact_match(filter_spec, generated, reference):
    """lm-evaluation-harness's own gsm8k grading of one answer by one filter."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    select = {"first": 0, "last": -1}[filter_spec["select"]]
    (extracted,) = RegexFilter(regex_pattern=filter_spec["regex"], group_select=select).apply([[generated]], [None])[0]
    return exact_match_hf_evaluate(
        predictions=[extracted], references=[reference], regexes_to_ignore=DEFAULTS["regexes_to_ignore"], ignore_case=True
    )["exact_match"]


def test_default_filters_grade_as_lm_eval_gsm8k(tmp_path):
    path = tmp_path / "cases.jsonl"
    generated = write_problems(path, CASES)
    result = GENERATION.run({"path": str(path)}, TaskInputs(None), CannedScorer(generated))
    for (reference, text), row in zip(CASES, result.rows):
        for filter_spec in DEFAULT_FILTERS:
            assert row["correct_by_filter"][filter_spec["name"]] == bool(lm_eval_exact_match(filter_spec, text, reference)), (
                filter_spec["name"], text
            )
    strict = [row["correct_by_filter"]["strict-match"] for row in result.rows]
    flexible = [row["correct_by_filter"]["flexible-extract"] for row in result.rows]
    assert strict == [True, True, False, False, True, False, False, True, False]
    assert flexible == [True, True, True, True, True, False, True, True, False]
    assert result.metrics["exact_match_strict-match"] == pytest.approx(4 / 9)
    assert result.metrics["exact_match_flexible-extract"] == pytest.approx(7 / 9)
    assert result.metrics["exact_match"] == result.metrics["exact_match_strict-match"]
    assert [row["correct"] for row in result.rows] == strict
    assert [row["predicted"] for row in result.rows][:4] == ["7", "7.", None, "1,000"]
    assert all(isinstance(value, float) for value in result.metrics.values())


def test_numbers_compare_as_numbers(tmp_path):
    # where lm-eval compares strings ("7.00" != "7") numbers compare as numbers here
    pairs = [("#### 7", "#### 7.00"), ("#### 1000", "#### 1,000"), ("#### -3", "#### -3.0"), ("#### 0.5", "#### .5")]
    path = tmp_path / "numbers.jsonl"
    result = GENERATION.run({"path": str(path)}, TaskInputs(None), CannedScorer(write_problems(path, pairs)))
    assert [row["correct"] for row in result.rows] == [True, True, True, True]


def test_custom_filters_and_normalisation(tmp_path):
    pairs = [("The capital is Paris.\n#### Paris", "I think the answer is paris."), ("#### 12", "The answer is 12, not 13")]
    path = tmp_path / "words.jsonl"
    generated = write_problems(path, pairs)
    filters = [
        {"name": "answer-is", "regex": r"answer is (\w+)"},
        {"regex": r"(?P<number>\d+)", "group": "number", "select": -1},
        {"name": "first-word", "regex": r"\w+", "select": 0},
    ]
    result = GENERATION.run({"path": str(path), "filters": filters}, TaskInputs(None), CannedScorer(generated))
    assert result.rows[0]["extracted"] == {"answer-is": "paris", "filter_2": None, "first-word": "I"}
    assert result.rows[1]["extracted"] == {"answer-is": "12", "filter_2": "13", "first-word": "The"}
    assert result.metrics["exact_match_answer-is"] == 1.0  # case ignored by default
    assert result.metrics["exact_match_filter_2"] == 0.0
    assert set(result.metrics) == {"exact_match", "exact_match_answer-is", "exact_match_filter_2", "exact_match_first-word"}

    strict_case = GENERATION.run(
        {"path": str(path), "filters": filters[:1], "ignore_case": False}, TaskInputs(None), CannedScorer(generated)
    )
    assert [row["correct"] for row in strict_case.rows] == [False, True]

    no_ignores = GENERATION.run(
        {"path": str(path), "filters": [{"regex": r"answer is ([\w.,]+)"}], "regexes_to_ignore": []},
        TaskInputs(None),
        CannedScorer(generated),
    )
    assert [row["extracted"]["filter_1"] for row in no_ignores.rows] == ["paris.", "12,"]
    assert [row["correct"] for row in no_ignores.rows] == [False, True]  # "12," still reads as the number 12
    punctuation = GENERATION.run(
        {"path": str(path), "filters": [{"regex": r"answer is ([\w.,]+)"}], "regexes_to_ignore": [], "ignore_punctuation": True},
        TaskInputs(None),
        CannedScorer(generated),
    )
    assert [row["correct"] for row in punctuation.rows] == [True, True]


def test_filter_group_and_select_semantics():
    two_groups = AnswerFilter.from_spec({"regex": r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "select": "last"}, 0)
    assert two_groups.name == "filter_1"
    assert two_groups.extract("I had $12 and 3") == "3"  # the first non-empty group of the last match
    assert two_groups.extract("no digits") is None
    assert AnswerFilter.from_spec({"regex": r"(\d+)-(\d+)", "group": 2}, 0).extract("5-6 and 7-8") == "6"
    assert AnswerFilter.from_spec({"regex": r"\d+", "select": 1}, 0).extract("5 6 7") == "6"
    assert AnswerFilter.from_spec({"regex": r"\d+", "select": 3}, 0).extract("5 6 7") is None
    assert AnswerFilter.from_spec({"regex": r"x(\d*)", "group": 1}, 0).extract("x") == ""


def test_repeats_grade_the_first_sample_a_majority_and_a_mean(tmp_path):
    pairs = [("#### 7", None), ("#### 234", None)]
    path = tmp_path / "two.jsonl"
    write_problems(path, pairs)
    samples = [["#### 7", "#### 1"], ["#### 8", "#### 234"], ["#### 7", "#### 234"]]
    scorer = CannedScorer(*samples)
    spec = {"path": str(path), "do_sample": True, "temperature": 0.7, "top_p": 0.95, "seed": 10, "repeats": 3}
    result = GENERATION.run(spec, TaskInputs(None), scorer)
    assert [call["sampling"] for call in scorer.calls] == [Sampling(0.7, 0.95, 10), Sampling(0.7, 0.95, 11), Sampling(0.7, 0.95, 12)]
    metrics = result.metrics
    assert metrics["exact_match_strict-match"] == 0.5  # first samples: 7 right, 1 wrong
    assert metrics["maj_at_3_strict-match"] == 1.0  # 7 of (7, 8, 7); 234 of (1, 234, 234)
    assert metrics["mean_at_3_strict-match"] == pytest.approx(2 / 3)
    assert result.rows[1]["samples"] == ["#### 1", "#### 234", "#### 234"] and result.rows[1]["majority"]["strict-match"] == 234


# --- on the tiny model -----------------------------------------------------------------------


def test_greedy_run_generates_what_greedy_generate_does(loaded):
    model, tokenizer = loaded
    result = GENERATION.run({"path": str(TEST), "max_new_tokens": 6}, TaskInputs(None), Scorer(model, tokenizer, batch_size=3))
    prompts = [f"Question: {line['question']}\nAnswer:" for line in LINES]
    expected = scoring.greedy_generate(model, tokenizer, prompts, max_new_tokens=6, stop=DEFAULTS["stop"])
    assert [row["generated"] for row in result.rows] == expected


def test_sampled_runs_are_reproducible_per_seed(loaded):
    model, tokenizer = loaded
    scorer = Scorer(model, tokenizer, batch_size=2, max_new_tokens=8)

    def generated(seed):
        spec = {"path": str(TEST), "do_sample": True, "seed": seed, "repeats": 2}
        return [row["samples"] for row in GENERATION.run(spec, TaskInputs(None), scorer).rows]

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = generated(0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is untouched
    assert generated(0) == first
    assert generated(1) != first
    assert any(samples[0] != samples[1] for samples in first)  # the repeats are different draws


def test_sampling_with_a_vanishing_nucleus_is_greedy(loaded):
    model, tokenizer = loaded
    prompts = [f"Question: {line['question']}\nAnswer:" for line in LINES]
    greedy = scoring.greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, stop=())
    # top-p keeps at least the most likely token: a tiny p leaves only it
    nucleus = scoring.sampled_generate(model, tokenizer, prompts, Sampling(1.0, 1e-9, 5), max_new_tokens=8, batch_size=3, stop=())
    assert nucleus == greedy
    wide = scoring.sampled_generate(model, tokenizer, prompts, Sampling(1.0, 1.0, 5), max_new_tokens=8, batch_size=3, stop=())
    assert wide != greedy
    with pytest.raises(ValueError):
        scoring.sampled_generate(model, tokenizer, prompts, Sampling(0.0, 1.0, 5))


# --- problems --------------------------------------------------------------------------------


def test_problems_name_the_field_and_the_fix(tmp_path):
    field = "technique.tasks[0]"

    def problems(**spec):
        return GENERATION.problems({"type": "generation", "path": str(TEST), **spec}, field)

    assert problems() == []
    assert problems(fewshot_path=str(TRAIN), num_fewshot=4, do_sample=True, repeats=4, temperature=0.6) == []
    found = problems(filters=[{"name": "bad", "regex": "#### (\\d+"}])
    assert len(found) == 1 and found[0].startswith(f"{field}.filters[0].regex='#### (\\\\d+' is not a valid regular expression")
    assert f"{field}.filters[0].select='middle'" in problems(filters=[{"regex": "x", "select": "middle"}])[0]
    assert f"{field}.filters[0].group=2 must be a group of its regex: 0 (the whole match) to 1" in problems(
        filters=[{"regex": "(x)", "group": 2}]
    )[0]
    assert "not a named group" in problems(filters=[{"regex": "(?P<n>x)", "group": "m"}])[0]
    assert "unknown key(s) pattern" in problems(filters=[{"pattern": "x", "regex": "x"}])[0]
    assert "used by an earlier filter" in problems(filters=[{"name": "a", "regex": "x"}, {"name": "a", "regex": "y"}])[0]
    assert f"{field}.filters=[] must be a non-empty list" in problems(filters=[])[0]
    assert f"{field}.num_fewshot=2 needs fewshot_path" in problems(num_fewshot=2)[0]
    assert "holds 4 examples" in problems(num_fewshot=5, fewshot_path=str(TRAIN))[0]
    assert f"{field}.repeats=3 with do_sample: false" in problems(repeats=3)[0]
    assert f"{field}.top_p=0 must be" in problems(top_p=0)[0]
    assert f"{field}.temperature=0 must be a number above 0" in problems(do_sample=True, temperature=0)[0]
    assert problems(temperature=0.0) == []  # lm-eval's greedy configs say temperature: 0.0
    assert "exactly the placeholder {question}" in problems(template="Q: {q}\nA:")[0]
    assert "not a format string" in problems(template="Q: {question\nA:")[0]
    assert f"{field}.regexes_to_ignore[1]='[' is not a valid regular expression" in problems(regexes_to_ignore=[",", "["])[0]
    assert f"{field}.fewshot_sampling='all'" in problems(fewshot_sampling="all")[0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "solution": "#### 2"}\n')
    found = GENERATION.problems({"path": str(bad)}, field)
    assert len(found) == 1 and f"{field}.path: {bad}:2: the 'answer' field is missing" in found[0]
    found = GENERATION.problems({"path": str(TEST), "num_fewshot": 1, "fewshot_path": str(bad)}, field)
    assert f"{field}.fewshot_path: {bad}:2" in found[0]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    assert f"{broken}:2: not valid JSON" in GENERATION.problems({"path": str(broken)}, field)[0]
    assert GENERATION.problems({}, field) == [f"{field}.path=None: give a GSM8K-format JSONL test file."]
    # every problem at once, not the first only
    found = GENERATION.problems({"path": str(bad), "num_fewshot": 2, "filters": [{"regex": "(", "select": "middle"}]}, field)
    assert [p.split("=")[0].split(":")[0] for p in found] == [f"{field}.filters[0].regex", f"{field}.num_fewshot", f"{field}.path"]
    assert f"{bad}:2" in found[2]


def test_through_the_registry_metrics_are_prefixed_with_the_task_name():
    entries = [{"type": "generation", "name": "gsm8k_sample", "path": str(TEST), "limit": 2}]
    tasks, problems = resolve_tasks(entries, None, "technique.tasks")
    assert problems == [] and tasks[0].headline == "gsm8k_sample_exact_match"
    result = run_task(tasks[0], TaskInputs(None), CannedScorer(["#### 7", "#### 234"]))
    assert result.metrics == {
        "gsm8k_sample_exact_match": 1.0,
        "gsm8k_sample_exact_match_strict-match": 1.0,
        "gsm8k_sample_exact_match_flexible-extract": 1.0,
    }
    _, problems = resolve_tasks([{"type": "generation", "path": str(TEST), "filters": [{"regex": "("}]}], None, "technique.tasks")
    assert problems and problems[0].startswith("technique.tasks[0].filters[0].regex='('")
    assert isinstance(tasks[0], Task)
