"""Our configs -> megatron-core's arguments (``llmexp.training.megatron.arguments``), preset by preset, refusals included.

The expected numbers are written out from the models' published config.json files and the
parallelism presets, not read back from the configs under test.
"""

from __future__ import annotations

import pytest

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.training.megatron.arguments import megatron_problems, translate
from llmexp.planning.planner import make_plan

GPU = ["backend=megatron", "hardware=h100", "precision=bf16", "technique=pretrain"]

# model preset -> layers, hidden, ffn, heads, query groups, kv channels, eps, rope base, tied, qkv bias, vocab padded at tp 1
MODELS = {
    "tiny_llama": (8, 128, 384, 4, 2, 32, 1e-5, 10000, True, False, 256),
    "llama3_2_1b": (16, 2048, 8192, 32, 8, 64, 1e-5, 500000, True, False, 128256),
    "llama3_2_3b": (28, 3072, 8192, 24, 8, 128, 1e-5, 500000, True, False, 128256),
    "llama3_1_8b": (32, 4096, 14336, 32, 8, 128, 1e-5, 500000, False, False, 128256),
    "llama3_1_70b": (80, 8192, 28672, 64, 8, 128, 1e-5, 500000, False, False, 128256),
    "llama3_1_405b": (126, 16384, 53248, 128, 8, 128, 1e-5, 500000, False, False, 128256),
    "mistral_7b": (32, 4096, 14336, 32, 8, 128, 1e-5, 10000, False, False, 32000),
    "qwen2_5_7b": (28, 3584, 18944, 28, 4, 128, 1e-6, 1000000, False, True, 152064),
}


@pytest.mark.parametrize("preset", sorted(MODELS))
def test_every_model_preset_becomes_its_transformer_config(preset):
    assert sorted(MODELS) == sorted(_presets("model"))
    layers, hidden, ffn, heads, groups, kv, eps, base, tied, bias, vocab = MODELS[preset]
    args = translate(compose_config([*GPU, f"model={preset}"]))
    t = args.transformer
    assert (t["num_layers"], t["hidden_size"], t["ffn_hidden_size"]) == (layers, hidden, ffn)
    assert (t["num_attention_heads"], t["num_query_groups"], t["kv_channels"]) == (heads, groups, kv)
    assert t["layernorm_epsilon"] == eps and t["add_qkv_bias"] is bias
    assert (t["normalization"], t["gated_linear_unit"], t["activation_func"], t["add_bias_linear"]) == (
        "RMSNorm", True, "silu", False)
    assert args.model == dict(vocab_size=vocab, max_sequence_length=args.model["max_sequence_length"],
                              position_embedding_type="rope", rotary_base=base,
                              share_embeddings_and_output_weights=tied)


# parallelism preset -> tp, pp, micro batch, global batch, micro-batches per step, dp, recompute
LAYOUTS = {
    "single": (1, 1, 16, 16, 1, 1, None),
    "dp2": (1, 1, 8, 16, 1, 2, None),
    "dp8": (1, 1, 2, 16, 1, 8, None),
    "tp2": (2, 1, 8, 16, 2, 1, None),
    "tp2_dp2": (2, 1, 8, 16, 1, 2, None),
    "tp4": (4, 1, 4, 16, 4, 1, None),
    "tp8": (8, 1, 4, 16, 4, 1, None),
    "tp8_dp2": (8, 1, 4, 32, 4, 2, None),
    "tp8_pp2": (8, 2, 2, 16, 8, 1, None),
    "pp2": (1, 2, 8, 16, 2, 1, None),
    "pp2_dp2": (1, 2, 4, 16, 2, 2, None),
    "tp4_pp4_dp4": (4, 4, 1, 64, 16, 4, "full"),
}
FSDP_LAYOUTS = ("fsdp2", "fsdp8", "fsdp16")  # Megatron FSDP is not wired in: refused (see the refusals below)


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_every_parallelism_preset_becomes_parallel_state_batches_and_ddp(preset):
    assert sorted([*LAYOUTS, *FSDP_LAYOUTS]) == sorted(_presets("parallelism"))
    tp, pp, micro, global_batch, microbatches, dp, recompute = LAYOUTS[preset]
    args = translate(compose_config([*GPU, "model=llama3_1_70b", f"parallelism={preset}"]))
    assert args.parallel_state == dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                       virtual_pipeline_model_parallel_size=None)
    assert (args.transformer["tensor_model_parallel_size"], args.transformer["pipeline_model_parallel_size"]) == (tp, pp)
    assert args.batch == dict(micro_batch_size=micro, global_batch_size=global_batch, num_microbatches=microbatches,
                              data_parallel_size=dp, seq_length=64)
    assert args.ddp["use_distributed_optimizer"] is True
    assert args.transformer["recompute_granularity"] == recompute
    # megatron pads the vocabulary so each tensor-parallel rank holds a multiple of 128 rows
    assert args.model["vocab_size"] % (128 * tp) == 0 and 0 <= args.model["vocab_size"] - 128256 < 128 * tp


@pytest.mark.parametrize("precision, hardware, extra, expected", [
    ("bf16", "h100", [], dict(bf16=True, fp16=False, params_dtype="bf16", fp8=None, fp4=None)),
    ("fp16", "v100", [], dict(bf16=False, fp16=True, params_dtype="fp16", fp8=None)),
    ("fp32", "a100_80g", [], dict(bf16=False, fp16=False, params_dtype="fp32", fp8=None)),
    ("fp8", "h100", [], dict(bf16=True, params_dtype="bf16", fp8="hybrid", fp8_recipe="delayed")),
    ("fp8", "b200", ["backend.fp8_recipe=mxfp8"], dict(fp8="hybrid", fp8_recipe="mxfp8")),
    ("fp4", "b200", [], dict(bf16=True, fp4="e2m1", fp4_recipe="nvfp4", fp8=None)),
])
def test_precision_becomes_dtypes_and_recipes(precision, hardware, extra, expected):
    cfg = compose_config(["backend=megatron", f"hardware={hardware}", f"precision={precision}", *extra])
    args = translate(cfg, transformer_engine=True)
    assert {key: args.transformer[key] for key in expected} == expected
    assert args.layer_spec == "transformer_engine"


def test_layer_spec_follows_transformer_engine():
    cfg = compose_config(GPU)
    assert translate(cfg, transformer_engine=True).layer_spec == "transformer_engine"
    assert translate(cfg, transformer_engine=False).layer_spec == "local"
    assert translate(compose_config([*GPU, "backend.transformer_impl=local"]), transformer_engine=True).layer_spec == "local"
    local = translate(cfg, transformer_engine=False).transformer
    assert not (local["bias_activation_fusion"] or local["apply_rope_fusion"] or local["masked_softmax_fusion"])


def test_megatron_only_settings_translate():
    cfg = compose_config([*GPU, "model=llama3_1_70b", "parallelism=tp4_pp4_dp4", "backend.sequence_parallel=true",
                          "backend.virtual_pipeline_stages=5", "backend.distributed_optimizer=false"])
    args = translate(cfg)
    assert args.transformer["sequence_parallel"] is True
    assert args.parallel_state["virtual_pipeline_model_parallel_size"] == 5
    assert args.transformer["virtual_pipeline_model_parallel_size"] == 5
    assert args.ddp["use_distributed_optimizer"] is False


def test_optimizer_follows_the_technique():
    cfg = compose_config([*GPU, "technique=sft", "technique.lr=3e-4", "technique.grad_clip=0.5"])
    optimizer = translate(cfg, cfg.technique).optimizer
    assert optimizer["optimizer"] == "adam" and optimizer["lr"] == 3e-4 and optimizer["clip_grad"] == 0.5
    assert optimizer["min_lr"] == pytest.approx(3e-4 * cfg.technique.min_lr_ratio)
    assert (optimizer["adam_beta1"], optimizer["adam_beta2"], optimizer["weight_decay"]) == (
        cfg.technique.beta1, cfg.technique.beta2, cfg.technique.weight_decay)


@pytest.mark.parametrize("overrides, needle", [
    (["backend.sequence_parallel=true"], "backend.sequence_parallel=true with parallelism.tp=1"),
    (["parallelism=tp2", "backend.virtual_pipeline_stages=2"], "backend.virtual_pipeline_stages=2 with parallelism.pp=1"),
    (["model=llama3_1_70b", "parallelism=tp8_pp2", "backend.virtual_pipeline_stages=3"],
     "model.num_layers=80 is not divisible by parallelism.pp*backend.virtual_pipeline_stages = 2*3"),
    (["model=llama3_1_70b", "parallelism=tp4_pp4_dp4", "parallelism.global_batch=8", "parallelism.micro_batch=1",
      "backend.virtual_pipeline_stages=2"], "needs at least parallelism.pp=4 micro-batches per step"),
    (["hardware=a100_80g", "precision=fp8"], "precision=fp8 is not supported by hardware=a100_80g"),
    (["hardware=h100", "precision=fp8", "backend.fp8_recipe=mxfp8"], "backend.fp8_recipe=mxfp8 needs Blackwell GPUs"),
    (["precision=fp8", "backend.transformer_impl=local"], "precision=fp8 on backend=megatron trains through Transformer"),
    (["hardware=cpu", "precision=fp32"], "backend=megatron with hardware=cpu"),
    *[([f"parallelism={preset}"], f"parallelism.sharding=fsdp (parallelism={preset}) on backend=megatron")
      for preset in FSDP_LAYOUTS],
    (["technique=dpo"], "technique=dpo trains on backend=torch only"),
    (["technique=lora"], "technique=lora trains on backend=torch only"),
])
def test_the_planner_refuses_what_megatron_cannot_run(overrides, needle):
    plan = make_plan(compose_config([*GPU, *overrides]))
    assert any(needle in problem for problem in plan.problems), plan.problems


def test_feasible_megatron_plans_have_no_problems_and_pipeline_training_is_allowed():
    cfg = compose_config([*GPU, "model=llama3_1_70b", "parallelism=tp4_pp4_dp4", "backend.virtual_pipeline_stages=5",
                          "backend.sequence_parallel=true", "technique=sft"])
    assert make_plan(cfg).problems == []
    torch_plan = make_plan(compose_config([*GPU[1:], "model=llama3_1_70b", "parallelism=tp4_pp4_dp4"]))
    assert any("train with backend=megatron" in problem for problem in torch_plan.problems)


def test_distributed_optimizer_splits_optimizer_states_over_dp():
    overrides = ["hardware=h100", "precision=bf16", "technique=pretrain", "model=llama3_1_8b", "parallelism=dp8"]
    torch_plan = make_plan(compose_config(overrides))
    megatron_plan = make_plan(compose_config([*overrides, "backend=megatron"]))
    assert megatron_plan.memory_breakdown["optimizer"] * 8 == pytest.approx(torch_plan.memory_breakdown["optimizer"], abs=8)
    assert megatron_plan.memory_breakdown["weights"] == torch_plan.memory_breakdown["weights"]


def test_translate_raises_every_problem_in_one_error():
    cfg = compose_config(["backend=megatron", "backend.sequence_parallel=true"])
    with pytest.raises(UserError) as error:
        translate(cfg)
    assert "sequence_parallel" in str(error.value) and "hardware=cpu" in str(error.value)
    assert len(megatron_problems(cfg)) == 2


def test_the_arguments_build_real_megatron_core_configs():
    """megatron-core's own dataclasses accept every key (a misspelled one raises TypeError)."""
    pytest.importorskip("megatron.core")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from llmexp.training.megatron.model_chunks import transformer_config

    cfg = compose_config([*GPU, "model=llama3_1_8b", "parallelism=tp8_pp2", "backend.sequence_parallel=true",
                          "backend.virtual_pipeline_stages=2"])
    args = translate(cfg, cfg.technique)
    config = transformer_config(args)
    assert (config.num_query_groups, config.kv_channels, config.sequence_parallel) == (8, 128, True)
    assert config.virtual_pipeline_model_parallel_size == 2
    assert DistributedDataParallelConfig(**args.ddp).use_distributed_optimizer
    assert OptimizerConfig(**args.optimizer).lr == cfg.technique.lr


def _presets(group: str):
    from importlib.resources import files

    return [entry.name[:-5] for entry in files("llmexp.conf").joinpath(group).iterdir() if entry.name.endswith(".yaml")]
