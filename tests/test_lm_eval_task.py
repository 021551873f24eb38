"""The ``lm_eval`` task type: lm-eval task files run on the framework's Scorer give lm-eval's own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmexp.data.embedded import build_world
from llmexp.errors import UserError
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.tasks.lm_eval import LM_EVAL, flatten_metrics, task_names_in

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    from llmexp.models.loading import load_model
    from llmexp.plugins.evaluate.harness.scoring import Scorer

    model, tokenizer = load_model(tiny_checkpoint)
    return Scorer(model, tokenizer, batch_size=8, max_new_tokens=40)


@pytest.fixture
def task_dir(tmp_path, monkeypatch) -> Path:
    """Three lm-eval tasks over local files: multiple choice, rolling log-likelihood, generation."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    world = build_world(0)
    documents = world.heldout_documents(12)
    # one document longer than the model's 256 positions, so rolling windows are exercised
    (tmp_path / "documents.jsonl").write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in [" ".join(documents), *documents[:3]])
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "fixture_choices.yaml").write_text(
        f"task: fixture_choices\n{common}dataset_kwargs:\n  data_files:\n    test: {FIXTURE / 'choices_test.jsonl'}\n"
        f"    train: {FIXTURE / 'choices_train.jsonl'}\nfewshot_split: train\nfewshot_config:\n  sampler: first_n\n"
        'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\ntag: fixture_tag\n"
    )
    (tasks / "fixture_rolling.yaml").write_text(
        f"task: fixture_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'documents.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / "fixture_generate.yaml").write_text(
        f"task: fixture_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {FIXTURE / 'choices_test.jsonl'}\n"
        'output_type: generate_until\ndoc_to_text: "{{ctx}}"\ndoc_to_target: "{{endings[0]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return tasks


def test_metrics_are_flattened_per_task_and_filter():
    results = {
        "mytask": {"alias": "mytask", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
        "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": "N/A"},
    }
    assert flatten_metrics(results) == {
        "mytask_acc": 0.5,
        "mytask_acc_stderr": 0.1,
        "mytask_acc_norm": 0.25,
        "gsm8k_exact_match_strict-match": 0.125,
    }


def test_problems_check_the_directory_and_the_task_names(task_dir, tmp_path):
    def problems(**spec):
        return LM_EVAL.problems({"type": "lm_eval", **spec}, "technique.tasks[2]")

    assert task_names_in(task_dir) == (["fixture_choices", "fixture_generate", "fixture_rolling", "fixture_tag"], [])
    assert problems(include_path=str(task_dir), tasks=["fixture_choices", "fixture_tag", "fixture_r*"]) == []
    assert "is not a directory" in problems(include_path=str(tmp_path / "absent"), tasks=["x"])[0]
    assert "must be a list" in problems(include_path=str(task_dir), tasks="fixture_choices")[0]
    assert "num_fewshot=-1" in problems(include_path=str(task_dir), tasks=["fixture_choices"], num_fewshot=-1)[0]
    (task_dir / "broken.yaml").write_text("task: hellaswag\nmetric_list: [\n")
    [unknown] = problems(include_path=str(task_dir), tasks=["hellaswag"])
    assert unknown.startswith("technique.tasks[2].tasks names hellaswag, defined by no YAML file")
    assert "fixture_choices, fixture_generate" in unknown and f"{task_dir / 'broken.yaml'}:" in unknown


def test_a_task_whose_data_is_not_local_is_refused(tmp_path, monkeypatch, scorer):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    (tmp_path / "remote.yaml").write_text(
        "task: remote\ndataset_path: llmexp-test/no-such-dataset\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: ["a", "b"]\ndoc_to_target: 0\n'
    )
    spec = {"type": "lm_eval", "include_path": str(tmp_path), "tasks": ["remote"]}
    assert LM_EVAL.problems(spec, "t") == []
    with pytest.raises(UserError, match="could not be loaded: .* Tasks run from local data only"):
        LM_EVAL.run(spec, TaskInputs(world=build_world(0)), scorer)


@pytest.mark.parametrize("num_fewshot", [None, 2])
def test_equal_to_lm_evaluations_own_hf_model(task_dir, scorer, num_fewshot):
    """lm-eval driving our Scorer and lm-eval driving its HFLM agree on every answer and every metric."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = ["fixture_choices", "fixture_rolling", "fixture_generate"]
    spec = {"type": "lm_eval", "include_path": str(task_dir), "tasks": names, "num_fewshot": num_fewshot}
    ours = LM_EVAL.run(spec, TaskInputs(world=build_world(0)), scorer)
    theirs = simple_evaluate(
        model=HFLM(pretrained=scorer.model, tokenizer=scorer.tokenizer, batch_size=8),
        tasks=names,
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    expected = {
        f"{task}_{key.split(',')[0]}": value
        for task, values in theirs["results"].items()
        for key, value in values.items()
        if key.endswith(",none") and "stderr" not in key
    }
    assert set(expected) == {
        "fixture_choices_acc", "fixture_choices_acc_norm", "fixture_generate_exact_match",
        "fixture_rolling_word_perplexity", "fixture_rolling_byte_perplexity", "fixture_rolling_bits_per_byte",
    }  # fmt: skip
    for key, value in expected.items():
        assert ours.metrics[key] == pytest.approx(value, rel=1e-5), key
    assert ours.metrics["fixture_choices_n"] == 8.0 and ours.metrics["fixture_rolling_n"] == 4.0
    assert ours.metrics["fixture_rolling_word_perplexity"] > 1.0
    longest = max(len(scorer.tokenizer(row["target"]).input_ids) for row in ours.rows if row["task"] == "fixture_rolling")
    assert longest > scorer.model.config.max_position_embeddings  # several rolling windows

    by_sample = {(row["task"], row["doc_id"]): row for row in ours.rows}
    assert len(by_sample) == len(ours.rows) == 8 + 4 + 8
    for task in names:
        for sample in theirs["samples"][task]:
            row = by_sample[(task, sample["doc_id"])]
            assert row["prompt"] == sample["arguments"][0][0]
            if task == "fixture_generate":
                assert row["filtered_resps"] == sample["filtered_resps"]  # the same greedy text
            else:
                mine = [r[0] if isinstance(r, list) else r for r in row["filtered_resps"]]
                reference = [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]
                assert mine == pytest.approx(reference, abs=1e-4)
    generated = [row["filtered_resps"] for row in ours.rows if row["task"] == "fixture_generate"]
    assert any(text.strip() for texts in generated for text in texts)  # the comparison of greedy texts is not between empties
