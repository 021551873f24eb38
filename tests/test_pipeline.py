"""Pipelines with their own nodes and inputs: what the planner accepts and what it refuses."""

from llmexp.config import compose_config
from llmexp.pipeline import input_stage, stage_nodes
from llmexp.planner import make_plan


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
