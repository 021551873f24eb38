"""Pipelines with their own nodes and inputs: what the planner accepts and what it refuses."""

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.configuration.pipeline import input_stage, model_sources, stage_nodes
from llmexp.planning.data_flow import data_flow_problems
from llmexp.planning.planner import make_plan
from llmexp.techniques.contract import Consumed, Reads
from llmexp.techniques.plugin_manager import technique

from .conftest import run_llmexp


def test_the_customize_pipeline_resolves_its_nodes_and_inputs():
    cfg = compose_config(["pipeline=customize", "pipeline.nodes.lora.rank=4"])
    stages = stage_nodes(cfg)
    assert [key for key, _ in stages] == ["base", "zero_shot", "few_shot", "lora", "lora_eval", "sft", "sft_eval"]
    assert [node.name for _, node in stages] == ["pretrain", "evaluate", "evaluate", "lora", "evaluate", "sft", "evaluate"]
    assert dict(stages)["lora"].rank == 4 and dict(stages)["few_shot"].num_fewshot == 3
    assert input_stage(cfg, "sft") == "base" and input_stage(cfg, "lora") is None


def test_a_pipeline_is_planned_by_its_heaviest_stage():
    plan = make_plan(compose_config(["pipeline=customize", "technique=evaluate"]))
    assert plan.technique_memory == "full" and plan.trainable_parameters == plan.parameters  # the base's pretraining
    lora_only = make_plan(compose_config(["pipeline=customize", "pipeline.stages=[lora,lora_eval]", "~pipeline.inputs.sft",
                                          "model.path=null"]))
    assert lora_only.technique_memory == "adapter"


def test_unknown_stage_keys_and_inputs_are_problems():
    unknown = make_plan(compose_config(["pipeline=customize", "pipeline.stages=[base,nope]"]))
    assert any("pipeline.stages names 'nope'" in problem for problem in unknown.problems)
    backwards = make_plan(compose_config(["pipeline=customize", "pipeline.inputs.sft=sft_eval"]))
    assert any("'sft_eval' must come before 'sft'" in problem for problem in backwards.problems)


PAIRED = {  # pipeline preset -> its evaluations compared item by item with baseline_eval
    "compress": ["fp8_eval", "prune_eval", "distill_eval", "distill_fp8_eval", "width_prune_eval", "width_distill_eval"],
    "compress_study": ["fp8_eval", "int4_awq_eval", "int4_rtn_eval", "prune_eval", "prune_last_eval", "distill_eval",
                       "lm_finetune_eval", "distill_fp8_eval", "width_prune_eval", "width_distill_eval"],
    "prune_distill": ["prune_eval", "distill_eval"],
    "gpu_formats": ["fp8_eval", "nvfp4_eval", "mxfp8_eval"],
    "grpo_word_problems": ["grpo_eval", "sft_eval"],
}


@pytest.mark.parametrize("pipeline", sorted(PAIRED))
def test_an_override_of_the_baseline_evaluation_reaches_every_comparison(pipeline):
    cfg = compose_config([f"pipeline={pipeline}", "pipeline.nodes.baseline_eval.tasks=[perplexity]",
                          "pipeline.nodes.baseline_eval.limit=7"])
    nodes = cfg.pipeline.nodes
    compared = [key for key, node in nodes.items() if node.get("baseline") == "baseline_eval"]
    assert sorted(compared) == sorted(PAIRED[pipeline])
    assert all(nodes[key].tasks == ["perplexity"] and nodes[key].limit == 7 for key in compared)
    # a comparison may still be narrowed on its own
    narrowed = compose_config([f"pipeline={pipeline}", f"pipeline.nodes.{compared[0]}.tasks=[perplexity]"])
    assert narrowed.pipeline.nodes[compared[0]].tasks == ["perplexity"]
    assert narrowed.pipeline.nodes[compared[-1]].tasks == narrowed.pipeline.nodes.baseline_eval.tasks != ["perplexity"]


def test_the_customize_evaluations_score_the_zero_shot_tasks():
    nodes = compose_config(["pipeline=customize", "pipeline.nodes.zero_shot.tasks=[free_answer]"]).pipeline.nodes
    assert [nodes[key].tasks for key in ("few_shot", "lora_eval", "sft_eval")] == [["free_answer"]] * 3


def test_the_conditions_pipeline_asks_closed_books_tasks_three_ways():
    cfg = compose_config(["pipeline=conditions", "pipeline.nodes.closed_book.tasks=[free_answer]"])
    nodes = cfg.pipeline.nodes
    assert [(key, nodes[key].condition, nodes[key].tasks, nodes[key].baseline) for key in cfg.pipeline.stages] == [
        ("closed_book", "closed_book", ["free_answer"], None), ("few_shot", "few_shot", ["free_answer"], "closed_book"),
        ("rag", "rag", ["free_answer"], "closed_book")]
    assert cfg.retriever.name == "bm25" and make_plan(cfg).problems == []


def test_a_comparison_needs_its_tasks_in_the_baseline_evaluation():
    plan = make_plan(compose_config(["pipeline=compress", "pipeline.nodes.baseline_eval.tasks=[perplexity]",
                                     "pipeline.nodes.prune_eval.tasks=[perplexity,multiple_choice]"]))
    assert plan.problems == [
        "pipeline.nodes.prune_eval.baseline=baseline_eval: pipeline.nodes.prune_eval runs task(s) multiple_choice, "
        "which pipeline.nodes.baseline_eval does not, so they cannot be compared item by item; add them to "
        "pipeline.nodes.baseline_eval.tasks or remove them from pipeline.nodes.prune_eval.tasks."
    ]


def test_a_stage_starts_only_from_a_stage_that_makes_a_model():
    plan = make_plan(compose_config(["pipeline=compress", "pipeline.inputs.fp8=baseline_eval"]))
    assert plan.problems == [
        "pipeline.inputs.fp8=baseline_eval: 'fp8' starts from the model 'baseline_eval' makes, and "
        "pipeline.nodes.baseline_eval (technique=evaluate) makes none; name a stage before it that makes a model "
        "(baseline)."
    ]
    teacher = make_plan(compose_config(["pipeline=compress", "pipeline.nodes.distill.teacher.stage=baseline_eval"]))
    assert any("pipeline.nodes.distill.teacher.stage=baseline_eval is not a stage before this one that makes a model"
               in problem for problem in teacher.problems)


def test_a_stage_reads_a_corpus_only_from_an_earlier_stage_that_makes_one():
    plan = make_plan(compose_config(["pipeline=compress", "+pipeline.data_inputs.distill=baseline"]))
    assert plan.problems == [
        "pipeline.data_inputs.distill=baseline: 'distill' reads the corpus 'baseline' makes, and "
        "pipeline.nodes.baseline (technique=pretrain) makes none; name a stage before it that makes a corpus "
        "(there is none)."
    ]
    later = make_plan(compose_config(["pipeline=compress", "+pipeline.data_inputs.baseline=distill"]))
    assert later.problems == [
        "pipeline.data_inputs.baseline=distill: both must be stages of pipeline.stages ("
        + ", ".join(compose_config(["pipeline=compress"]).pipeline.stages) + ") and 'distill' must come before 'baseline'."
    ]


def test_narrowing_the_stages_leaves_the_inputs_of_those_left_out_unread():
    narrowed = make_plan(compose_config(["pipeline=grpo_word_problems", "pipeline.stages=[baseline_eval,grpo,grpo_eval]"]))
    assert narrowed.problems == []
    typo = make_plan(compose_config(["pipeline=grpo_word_problems", "+pipeline.inputs.sfft=none"]))
    assert typo.problems == ["pipeline.inputs.sfft=none: 'sfft' is not a stage of pipeline.stages (baseline_eval, "
                             "grpo, grpo_eval, sft, sft_eval); name one of them."]


def test_a_pipeline_input_outside_the_stages_is_one_problem_not_a_crash():
    plan = make_plan(compose_config(["pipeline=compress", "pipeline.stages=[baseline_eval,fp8,fp8_eval]",
                                     "model.baseline=null"]))
    assert plan.problems[0].startswith("pipeline.inputs.fp8=baseline: both must be stages of pipeline.stages")
    assert any(problem.startswith("baseline_eval: nothing to evaluate") for problem in plan.problems)


def test_each_stage_declares_the_earlier_stages_it_reads():
    cfg = compose_config(["pipeline=compress"])
    reads = {key: technique(node.name).consumes(cfg, key, node) for key, node in stage_nodes(cfg)}
    assert reads["distill"] == (Consumed("pipeline.nodes.distill.teacher.stage", "baseline", Reads.MODEL,
                                         fix=", or give a checkpoint with pipeline.nodes.distill.teacher.path instead"),)
    assert [(read.stage, read.reads, read.technique) for read in reads["prune_eval"]] == [
        ("baseline_eval", Reads.RESULTS, "evaluate")]
    assert reads["baseline"] == reads["baseline_eval"] == reads["fp8"] == ()
    assert data_flow_problems(cfg) == []


def test_every_read_that_cannot_happen_is_one_problem_naming_its_field():
    cfg = compose_config(["pipeline=compress", "pipeline.inputs.fp8=fp8_eval", "pipeline.inputs.prune=fp8_eval",
                          "pipeline.nodes.distill.teacher.stage=distill_eval", "pipeline.nodes.prune_eval.baseline=fp8"])
    assert data_flow_problems(cfg) == [
        "pipeline.inputs.fp8=fp8_eval: both must be stages of pipeline.stages (baseline, baseline_eval, fp8, fp8_eval, "
        "prune, prune_eval, distill, distill_eval, distill_fp8, distill_fp8_eval, width_prune, width_prune_eval, "
        "width_distill, width_distill_eval) and 'fp8_eval' must come before 'fp8'.",
        "pipeline.inputs.prune=fp8_eval: 'prune' starts from the model 'fp8_eval' makes, and pipeline.nodes.fp8_eval "
        "(technique=evaluate) makes none; name a stage before it that makes a model (baseline, fp8).",
        "pipeline.nodes.prune_eval.baseline=fp8 must name an evaluate stage that runs before 'prune_eval' "
        "(baseline_eval, fp8_eval): the evaluation of the baseline model, with the same tasks.",
        "pipeline.nodes.distill.teacher.stage=distill_eval is not a stage before this one that makes a model; name one "
        "of baseline, fp8, prune, or give a checkpoint with pipeline.nodes.distill.teacher.path instead.",
    ]


def test_a_pipeline_whose_data_cannot_flow_is_refused_by_the_command_before_anything_is_written(tmp_path):
    result = run_llmexp("pipeline=compress", "pipeline.nodes.width_distill.teacher.stage=width_distill_eval",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert ("pipeline.nodes.width_distill.teacher.stage=width_distill_eval is not a stage before this one that makes a "
            "model; name one of baseline, fp8, prune, distill, distill_fp8, width_prune, or give a checkpoint with "
            "pipeline.nodes.width_distill.teacher.path instead.") in " ".join(result.stderr.split())
    assert list(tmp_path.iterdir()) == []


def test_pipeline_inputs_none_starts_a_stage_as_a_first_stage_would():
    config = compose_config(["pipeline=customize", "pipeline.inputs.sft=none"])
    assert make_plan(config).problems == []
    assert model_sources(config) == {"base": None, "zero_shot": "base", "few_shot": "base", "lora": "base",
                                      "lora_eval": "lora", "sft": None, "sft_eval": "sft"}
