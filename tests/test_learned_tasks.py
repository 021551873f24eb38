"""An evaluation scores what its model was trained for besides its own tasks (Technique.measured_by): text2sql after
sft, lora or dpo on the package's data, in the comparison's baseline too, never in the compress pipeline's tables."""

from __future__ import annotations

import json

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.planning.planner import make_plan
from llmexp.plugins.evaluate.harness.learned_tasks import added_tasks, learned_tasks
from llmexp.plugins.evaluate.harness.registry import resolve_tasks

from .conftest import read_results, run_llmexp

SMALL = ["parallelism.micro_batch=8", "parallelism.global_batch=8", "data.seq_len=32", "model.baseline.max_steps=12",
         "model.baseline.warmup_steps=2"]
TEXT2SQL = ("text2sql_em", "text2sql_exec_acc", "text2sql_rougeL", "text2sql_bleu", "text2sql_f1")


def test_lora_on_the_embedded_default_is_evaluated_on_the_text2sql_it_learned_unless_turned_off(tmp_path):
    lora = ["technique=lora", "technique.max_steps=3", "technique.val_every=0", "evaluation.limit=4", *SMALL]
    env = {"LLMEXP_CACHE_DIR": str(tmp_path / "cache")}
    result = run_llmexp(*lora, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = " ".join(result.stderr.split())
    assert stderr.startswith("running: technique=lora then evaluate (+text2sql: what its model was trained for) "
                             "(pipeline=technique_then_evaluation, implied by technique=lora;")
    assert ("evaluate: also scoring text2sql, what its model (or one compared with it) was trained for; "
            "evaluation.add_learned_tasks=false scores evaluation.tasks alone") in stderr
    evaluation = read_results(tmp_path / "run")["stages"]["evaluate"]
    metrics = evaluation["metrics"]
    assert metrics["text2sql_n"] == 4 and all(0 <= metrics[name] <= 100 for name in TEXT2SQL)
    assert 0 <= metrics["text2sql_em"] <= 1 and metrics["perplexity_n"] == 4  # the evaluation's own tasks stay
    rows = [json.loads(line) for line in (tmp_path / "run/evaluate/text2sql.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and metrics["text2sql_em"] == sum(row["correct"] for row in rows) / 4

    off = run_llmexp(*lora, "evaluation.add_learned_tasks=false", f"hydra.run.dir={tmp_path / 'off'}", cwd=tmp_path,
                     env=env)
    assert off.returncode == 0, off.stderr[-3000:]
    assert "also scoring" not in off.stderr
    assert not any(key.startswith("text2sql") for key in read_results(tmp_path / "off")["stages"]["evaluate"]["metrics"])


def test_a_comparisons_learned_tasks_are_scored_by_its_baseline_too(tmp_path):
    """lora_eval compares with zero_shot, which scores perplexity alone by its tasks: both score text2sql as well."""
    pipeline = ["pipeline=customize", "pipeline.stages=[base,zero_shot,lora,lora_eval]", "~pipeline.inputs.sft",
                "pipeline.nodes.zero_shot.tasks=[perplexity]", "pipeline.nodes.lora_eval.baseline=zero_shot",
                "pipeline.nodes.zero_shot.limit=4", "pipeline.nodes.lora_eval.limit=4",
                "pipeline.nodes.base.max_steps=5", "pipeline.nodes.base.warmup_steps=1",
                "pipeline.nodes.lora.max_steps=3", "pipeline.nodes.lora.val_every=0", *SMALL]
    assert learned_tasks(compose_config(pipeline)) == {"zero_shot": ["text2sql"], "lora_eval": ["text2sql"]}
    result = run_llmexp(*pipeline, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = read_results(tmp_path / "run")["stages"]
    for name in ("zero_shot", "lora_eval"):
        assert stages[name]["metrics"]["text2sql_n"] == 4 and stages[name]["metrics"]["perplexity_n"] == 4, name
    compared = stages["lora_eval"]["metrics"]
    assert compared["text2sql_em_delta"] == compared["text2sql_em"] - stages["zero_shot"]["metrics"]["text2sql_em"]
    assert 0 <= compared["flip_rate_text2sql"] <= 1


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["technique=sft"], ["text2sql"]),
        (["technique=dpo"], ["text2sql"]),
        (["technique=dpo", "data=preference"], ["text2sql"]),  # no path: the package's Text2SQL pairs
        (["technique=dpo", "data=preference", "data.path=pairs.jsonl"], []),  # the user's pairs: unknown to us
        (["technique=sft", "data=jsonl", "data.path=train.jsonl"], []),
        (["technique=pretrain"], []),
        (["technique=cpt"], []),
        (["technique=lora", "evaluation.add_learned_tasks=false"], []),
    ],
)
def test_what_each_technique_is_measured_by(overrides, expected):
    assert learned_tasks(compose_config([*overrides, "pipeline=technique_then_evaluation"])) == {"evaluation": expected}


def test_a_quantized_lora_model_is_still_scored_on_what_the_lora_stage_taught():
    """The lineage counts: the model quantize_eval scores was made by quantize from lora's."""
    config = compose_config(["pipeline=customize", "pipeline.stages=[base,lora,quantize,quantize_eval]",
                             "~pipeline.inputs.sft", "+technique@pipeline.nodes.quantize=quantize",
                             "+technique@pipeline.nodes.quantize_eval=evaluate"])
    assert learned_tasks(config) == {"quantize_eval": ["text2sql"]}
    assert not make_plan(config).problems


def test_the_compress_pipelines_evaluations_keep_their_tasks():
    """The default run's table (README) is unchanged: nothing it trains is measured by an extra task."""
    config = compose_config(["pipeline=compress"])
    added = learned_tasks(config)
    assert set(added) == {"baseline_eval", "fp8_eval", "prune_eval", "distill_eval", "distill_fp8_eval",
                          "width_prune_eval", "width_distill_eval"}
    assert not any(added.values())
    assert list(config.pipeline.nodes.baseline_eval.tasks) == ["multiple_choice", "word_problems", "perplexity",
                                                               "throughput"]
    assert not make_plan(config).problems


def test_the_customize_pipelines_evaluations_already_score_what_its_fine_tunings_learned():
    config = compose_config(["pipeline=customize"])
    for key, learned in learned_tasks(config).items():
        node = config.pipeline.nodes[key]
        tasks = resolve_tasks(node.tasks, node.gsm8k_path, key)[0]
        assert [task.name for task in tasks] == ["text2sql"] and not added_tasks(tasks, learned), key
    assert learned_tasks(config)["lora_eval"] == ["text2sql"]


def test_a_technique_measured_by_a_task_the_evaluation_lacks_is_refused_by_the_plan(monkeypatch):
    from llmexp.plugins.customize import LoRA

    monkeypatch.setattr(LoRA, "measured_by", classmethod(lambda cls, config: ("sql_quiz",)))
    problems = make_plan(compose_config(["technique=lora", "pipeline=technique_then_evaluation"])).problems
    assert problems == [
        "evaluation: a technique that made its model names 'sql_quiz' as what measures its training (measured_by), "
        "which is not an embedded evaluation task (multiple_choice, free_answer, word_problems, perplexity, gsm8k, "
        "text2sql, throughput, retrieval); set evaluation.add_learned_tasks=false, and tell the technique's author."]
    assert not make_plan(compose_config(["technique=lora", "pipeline=technique_then_evaluation", "evaluation.add_learned_tasks=false"])
                         ).problems
