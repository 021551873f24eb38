"""``technique=bridge_recipe``: what our config changes in a Megatron-Bridge recipe, and the refusals before it runs.

Bridge itself needs Transformer Engine and CUDA; the settings are applied here to megatron-core's
own config dataclasses, which Bridge's ConfigContainer holds (its model provider is a TransformerConfig).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.planning.planner import make_plan
from llmexp.plugins.megatron_bridge.recipe import apply_settings, resolve_recipe, run_settings

GPU = ["technique=bridge_recipe", "technique.recipe=llama.llama32_1b_sft_config", "hardware=h100", "precision=bf16",
       "model=llama3_2_1b"]


def test_our_layout_precision_batch_and_steps_become_recipe_settings(tmp_path):
    cfg = compose_config([*GPU, "parallelism=tp8_pp2", "backend=megatron", "backend.sequence_parallel=true",
                          "technique.max_steps=50", "technique.lr=2e-5", "seed=3",
                          "+technique.overrides={train.eval_iters: 0, model.tensor_model_parallel_size: 4}"])
    settings = run_settings(cfg, cfg.technique, tmp_path)
    assert settings == {
        "model.tensor_model_parallel_size": 4,  # the explicit override wins over parallelism.tp
        "model.pipeline_model_parallel_size": 2,
        "model.virtual_pipeline_model_parallel_size": None,
        "model.sequence_parallel": True,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 2,
        "ddp.use_distributed_optimizer": True,
        "rng.seed": 3,
        "checkpoint.save": str(tmp_path / "megatron"),
        "mixed_precision": "bf16_mixed",
        "train.train_iters": 50,
        "optimizer.lr": 2e-5,
        "scheduler.max_lr": 2e-5,
        "train.eval_iters": 0,
    }
    fp8 = compose_config([*GPU, "precision=fp8"])
    assert run_settings(fp8, fp8.technique, tmp_path)["mixed_precision"] == "bf16_with_fp8_delayed_scaling_mixed"


def test_settings_land_on_megatron_core_configs_and_unknown_paths_are_refused():
    pytest.importorskip("megatron.core")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    container = SimpleNamespace(
        model=TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4),
        ddp=DistributedDataParallelConfig(),
    )
    apply_settings(container, {"model.tensor_model_parallel_size": 2, "ddp.use_distributed_optimizer": True})
    assert container.model.tensor_model_parallel_size == 2 and container.ddp.use_distributed_optimizer is True
    with pytest.raises(UserError, match=r"model.tensor_paralel_size is not a field"):
        apply_settings(container, {"model.tensor_paralel_size": 2})
    with pytest.raises(UserError, match=r"trian is not a field"):
        apply_settings(container, {"trian.train_iters": 2})


def test_recipe_names_resolve_or_say_what_exists():
    assert resolve_recipe("json:dumps").__name__ == "dumps"
    with pytest.raises(UserError, match="cannot be imported"):
        resolve_recipe("no_such_family.some_config") if not _bridge_installed() else resolve_recipe("nope:x_config")
    with pytest.raises(UserError, match="has no recipe 'missing_config'"):
        resolve_recipe("json:missing_config")


@pytest.mark.parametrize("overrides, needle", [
    (["technique.recipe="], "technique.recipe is empty"),
    (["technique.mode=train"], "technique.mode=train is not known"),
    (["hardware=cpu", "precision=fp32"], "Megatron-Bridge trains on CUDA GPUs and hardware=cpu"),
    (["technique.max_steps=0"], "technique.max_steps=0 must be 1 or more"),
])
def test_the_planner_refuses_what_bridge_cannot_run(overrides, needle):
    plan = make_plan(compose_config([*GPU, *overrides]))
    assert any(needle in problem for problem in plan.problems), plan.problems


def _bridge_installed() -> bool:
    from llmexp.machine.backends import importable

    return importable("megatron.bridge")


def test_a_machine_without_bridge_or_a_gpu_stops_the_run_before_any_stage(tmp_path):
    from llmexp.machine.backends import gpu_driver_present, importable
    from llmexp.running.runner import run_experiment

    if importable("megatron.bridge") and gpu_driver_present():
        pytest.skip("this machine has Megatron-Bridge and a GPU")
    cfg = compose_config(GPU)
    assert make_plan(cfg).problems == []  # the plan (for an H100) is fine: a login node can plan a cluster job
    with pytest.raises(UserError, match="technique=bridge_recipe"):
        run_experiment(cfg, tmp_path / "run", multirun=False)
    assert not (tmp_path / "run" / "bridge_recipe").exists()
