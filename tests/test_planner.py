"""The planner on real composed configs: counts, memory per device, and every kind of problem."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import pytest
from safetensors.numpy import save_file

import llmexp.configuration.compose
from llmexp.techniques import plugin_manager
from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.techniques.hookspecs import hookimpl
from llmexp.architecture import count_parameters
from llmexp.planning.hardware import GIB
from llmexp.planning.planner import make_plan
from llmexp.techniques.contract import Technique, TechniqueConfig

REPO = Path(__file__).resolve().parents[1]

LLAMA_3_1_70B_CONFIG = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}


def plan_of(*overrides):
    """The plan of one technique (pretrain unless the overrides choose), not of `llmexp`'s whole pipeline."""
    chosen = any(o.split("=")[0] in ("technique", "pipeline") for o in overrides)
    return make_plan(compose_config(list(overrides) if chosen else ["technique=pretrain", *overrides]))


def only(problems, fragment):
    """The one problem containing ``fragment``."""
    found = [problem for problem in problems if fragment in problem]
    assert len(found) == 1, problems
    return found[0]


def write_checkpoint(directory, hf_config):
    """config.json with the given numbers and a small real safetensors file (the planner reads
    the numbers; it does not compare them with the weights)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    save_file({"placeholder": np.zeros((4,), dtype=np.float16)}, str(directory / "model.safetensors"))
    return directory


# ---------------------------------------------------------------- test-only techniques


@dataclass
class AdapterConfig(TechniqueConfig):
    name: str = "plan_test_adapter"
    rank: int = 16
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class AdapterTechnique(Technique):
    name = "plan_test_adapter"
    schema = AdapterConfig


@dataclass
class StreamingConfig(TechniqueConfig):
    name: str = "plan_test_streaming"
    buffer_mb: int = 64


class StreamingTechnique(Technique):
    """Declares its own memory, trainable parameters and checks: the planner knows it only through them."""

    name = "plan_test_streaming"
    schema = StreamingConfig
    memory = "streaming"

    @classmethod
    def memory_per_device(cls, config, key, node, model, precision, layout):
        return {"weights": layout.weights(count_parameters(model), precision),
                "buffer": node.buffer_mb * 2**20 / layout.tp}

    @classmethod
    def trainable_parameters(cls, config, node, model):
        return model["hidden_size"]

    @classmethod
    def plan_problems(cls, config, key, node, plan):
        buffer = plan.memory_breakdown["buffer"]
        return [f"{key}.buffer_mb={node.buffer_mb} holds {buffer} bytes per device, over 128 MiB."] if buffer > 2**27 else []


class PlanTestPlugin:
    """Registered through the real hooks, as a third-party package would be."""

    @hookimpl
    def llmexp_techniques(self):
        return [AdapterTechnique, StreamingTechnique]

    @hookimpl
    def llmexp_plan_problems(self, config, plan):
        if config.technique.name == "plan_test_adapter" and config.technique.rank > 256:
            return [f"technique.rank={config.technique.rank} is above 256 (plan has {plan.parameters} parameters)."]
        return []


@pytest.fixture
def test_plugin():
    def refresh():
        plugin_manager.techniques.cache_clear()
        llmexp.configuration.compose.register_configs.cache_clear()

    plugin = PlanTestPlugin()
    plugin_manager.plugin_manager().register(plugin)
    refresh()
    yield plugin
    plugin_manager.plugin_manager().unregister(plugin)
    refresh()


# ---------------------------------------------------------------- parameters


def test_count_parameters_by_hand():
    numbers = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": None,
               "tie_word_embeddings": False, "attention_bias": False}
    # head_dim 4: q 8*8, k 8*4, v 8*4, o 8*8, mlp 3*8*16, norms 2*8
    per_layer = 64 + 32 + 32 + 64 + 384 + 16
    assert count_parameters(numbers) == 2 * 10 * 8 + 2 * per_layer + 8
    assert count_parameters({**numbers, "tie_word_embeddings": True}) == 10 * 8 + 2 * per_layer + 8
    # q/k/v biases: 8 + 4 + 4 per layer
    assert count_parameters({**numbers, "attention_bias": True}) == 2 * 10 * 8 + 2 * (per_layer + 16) + 8


@pytest.mark.parametrize("name, published", [
    ("llama3_2_1b", 1.24e9), ("llama3_2_3b", 3.21e9), ("llama3_1_8b", 8.03e9), ("llama3_1_70b", 70.6e9),
    ("llama3_1_405b", 405.9e9), ("mistral_7b", 7.24e9), ("qwen2_5_7b", 7.62e9),
])
def test_plan_parameters_match_published(name, published):
    plan = plan_of(f"model={name}")
    assert abs(plan.parameters - published) / published < 0.01


# ---------------------------------------------------------------- feasible plans and memory


def test_the_embedded_default_plan_is_feasible():
    plan = plan_of()
    assert plan.problems == [] and plan.feasible
    assert plan.parameters == count_parameters(compose_config([]).model)
    assert plan.technique_memory == "full"
    assert set(plan.memory_breakdown) == {"weights", "gradients", "optimizer", "activations"}
    assert plan.memory_per_device_bytes == sum(plan.memory_breakdown.values())
    assert plan.world_size == 1
    # fp32: weights and grads 4 bytes, Adam moments 8, no master copy
    assert plan.memory_breakdown["weights"] == plan.parameters * 4
    assert plan.memory_breakdown["optimizer"] == plan.parameters * 8
    assert plan.to_dict()["feasible"] is True


def test_cpu_memory_is_this_machines_ram_shared_by_its_processes():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert plan_of().device_memory_bytes == ram
    assert plan_of("parallelism=dp2").device_memory_bytes == ram // 2
    assert plan_of("parallelism=dp2").problems == []  # CPU ranks are processes: no gpus_per_node limit


def test_gpu_memory_is_read_as_gib():
    assert plan_of("hardware=a100_80g").device_memory_bytes == 80 * GIB
    assert plan_of("hardware=h200").device_memory_bytes == 141 * GIB


def test_70b_full_training_does_not_fit_one_a100_80g():
    plan = plan_of("model=llama3_1_70b", "hardware=a100_80g", "precision=bf16")
    assert plan.memory_per_device_bytes > 16 * plan.parameters  # 2 + 2 + 12 bytes per parameter
    problem = only(plan.problems, "Memory per device")
    assert "hardware=a100_80g holds 80.0 GiB" in problem
    # no layout of one device holds 2 + 2 + 12 bytes per parameter: the fix is more devices, not a smaller batch
    assert ("GiB short: the weights, gradients and optimizer states alone come to 1051.3 GiB, more than its one "
            "device holds (80.0 GiB); spread them over more devices (e.g. parallelism.nodes=3 "
            "parallelism.devices_per_node=8 parallelism.dp=24 parallelism.sharding=fsdp) or train fewer parameters "
            "(technique=lora).") in problem
    assert "parallelism.micro_batch" not in problem
    assert len(plan.problems) == 1


def test_70b_inference_with_tp8_fits_a100_80g(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "llama-3.1-70b", LLAMA_3_1_70B_CONFIG)
    plan = plan_of("model=llama3_1_70b", "hardware=a100_80g", "parallelism=tp8", "technique=evaluate",
                   "precision=bf16", f"model.path={checkpoint}")
    assert plan.problems == []
    assert plan.technique_memory == "inference"
    assert set(plan.memory_breakdown) == {"weights", "kv_cache"}
    assert plan.memory_breakdown["weights"] == pytest.approx(plan.parameters * 2 / 8, abs=1)
    assert plan.memory_per_device_bytes < 20 * GIB
    # KV cache: 2 * 80 layers * 8 kv heads * 128 * seq 64 * micro batch 4 * 2 bytes, over tp 8
    assert plan.memory_breakdown["kv_cache"] == 2 * 80 * 8 * 128 * 64 * 4 * 2 // 8


def test_70b_inference_on_one_a100_80g_does_not_fit(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "llama-3.1-70b", LLAMA_3_1_70B_CONFIG)
    plan = plan_of("model=llama3_1_70b", "hardware=a100_80g", "technique=evaluate", "precision=bf16",
                   f"model.path={checkpoint}")
    problem = only(plan.problems, "Memory per device")
    assert "hardware=h200, b200" in problem  # the presets that would hold 131 GiB


def test_tp_pp_and_fsdp_divide_the_states():
    single = plan_of("model=llama3_1_8b", "hardware=h100", "precision=bf16").memory_breakdown
    tp8 = plan_of("model=llama3_1_8b", "hardware=h100", "precision=bf16", "parallelism=tp8").memory_breakdown
    fsdp = plan_of("model=llama3_1_8b", "hardware=h100", "precision=bf16", "parallelism=fsdp8").memory_breakdown
    ddp = plan_of("model=llama3_1_8b", "hardware=h100", "precision=bf16", "parallelism=dp8").memory_breakdown
    for kind in ("weights", "gradients", "optimizer"):
        assert tp8[kind] == pytest.approx(single[kind] / 8, abs=1)
        assert fsdp[kind] == pytest.approx(single[kind] / 8, abs=1)
        assert ddp[kind] == single[kind]
    assert single["optimizer"] == pytest.approx(single["weights"] * 6, abs=8)  # 12 bytes vs 2


def test_activation_checkpointing_and_micro_batch_shrink_activations():
    base = ["model=llama3_1_8b", "hardware=h100", "precision=bf16", "data.seq_len=4096",
            "parallelism.micro_batch=2"]
    plain = plan_of(*base).memory_breakdown["activations"]
    checkpointed = plan_of(*base, "parallelism.activation_checkpointing=true").memory_breakdown["activations"]
    smaller = plan_of(*base[:-1], "parallelism.micro_batch=1").memory_breakdown["activations"]
    assert checkpointed < plain / 5
    assert smaller == pytest.approx(plain / 2, rel=1e-6)
    # per token: 32 layers of (9*h + 4.375*I + 2.25*kv) bf16 values, then 3*h bf16 values and
    # 1.125*vocab fp32 logits outside the layers
    tokens, h, i, kv, vocab = 4096 * 2, 4096, 14336, 8 * 128, 128256
    layers = 32 * (9 * h + 4.375 * i + 2.25 * kv) * 2
    assert plain == pytest.approx(tokens * (layers + 3 * h * 2 + 1.125 * vocab * 4), abs=1)


def test_a_named_model_on_far_shorter_data_is_also_planned_at_its_training_length():
    """data=embedded's 64-token sequences on Llama 3.1 8B: the run's own figures stay those of 64 tokens (what it
    trains on), and the plan adds the same job's at 8192 (model.train_seq_len), with a warning that says so."""
    job = ["model=llama3_1_8b", "hardware=h100", "precision=bf16", "parallelism=fsdp8"]
    short, realistic = plan_of(*job), plan_of(*job, "data.seq_len=8192")
    longer = short.at_train_seq_len
    assert longer["seq_len"] == 8192
    assert longer["memory_breakdown"] == realistic.memory_breakdown
    assert longer["memory_per_device_bytes"] == realistic.memory_per_device_bytes
    assert longer["fits"] is (realistic.memory_per_device_bytes <= realistic.device_memory_bytes)
    # activations grow with the tokens of a micro-batch: 128 times the 64-token figure
    assert realistic.memory_breakdown["activations"] == pytest.approx(128 * short.memory_breakdown["activations"],
                                                                      abs=128)
    [warning] = short.warnings
    assert warning.startswith("data.seq_len=64 (data=embedded) is far shorter than the 8192 tokens model=llama3_1_8b "
                              "is trained at (model.train_seq_len), so these figures are those of toy sequences. At "
                              f"8192 tokens the same job needs {realistic.memory_per_device_bytes / GIB:.1f} GiB per "
                              "device (weights ")
    assert warning.endswith("Plan the length your data will have with data.seq_len=<tokens> (data.seq_len=8192 for "
                            "the model's).")
    assert realistic.warnings == [] and realistic.at_train_seq_len is None


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["model=llama3_1_8b", "data.seq_len=1023"], True),
        (["model=llama3_1_8b", "data.seq_len=1024"], False),  # an eighth of 8192: short, but a real job's length
        (["model=qwen2_5_7b", "data.seq_len=511"], True),  # trained at 4096
        (["model=qwen2_5_7b", "data.seq_len=512"], False),
        (["model=llama3_1_8b", "model.train_seq_len=null"], False),  # no length to compare with
        ([], False),  # the embedded default trains at data=embedded's own 64 tokens
    ],
)
def test_which_sequence_lengths_are_far_too_short_for_the_model(overrides, warned):
    plan = plan_of(*overrides)
    assert bool(plan.warnings) is warned
    assert (plan.at_train_seq_len is not None) is warned


def test_adapter_memory():
    plan = plan_of("technique=lora", "technique.target_modules=[q_proj,k_proj,v_proj,o_proj]", "model=llama3_1_8b",
                   "hardware=a100_40g", "precision=bf16")
    assert plan.technique_memory == "adapter"
    # rank 16 on q (4096->4096), k and v (4096->1024), o (4096->4096) in 32 layers
    adapter = 16 * (2 * 8192 + 2 * 5120) * 32
    assert plan.trainable_parameters == adapter == 13_631_488
    assert plan.memory_breakdown["weights"] == plan.parameters * 2
    assert plan.memory_breakdown["adapter"] == adapter * 4
    assert plan.memory_breakdown["gradients"] == adapter * 4
    assert plan.memory_breakdown["optimizer"] == adapter * 8
    assert plan.problems == []
    wider = plan_of("technique=lora", "technique.rank=64", "technique.target_modules=[q_proj,gate_proj]",
                    "model=llama3_1_8b")
    assert wider.trainable_parameters == 64 * (8192 + 4096 + 14336) * 32


def test_adapter_defaults_to_every_linear_layer():
    """The schema's all-linear default is what the plan counts: q, k, v, o, gate, up and down."""
    plan = plan_of("technique=lora", "model=llama3_1_8b", "hardware=a100_40g", "precision=bf16")
    assert plan.trainable_parameters == 16 * (2 * 8192 + 2 * 5120 + 3 * (4096 + 14336)) * 32


def test_adapter_with_an_unknown_target_module():
    plan = plan_of("technique=lora", "technique.target_modules=[q_proj,qkv]")
    problem = only(plan.problems, "technique.target_modules")
    assert "qkv" in problem and "all-linear" in problem


def test_plugins_add_problems_through_the_hook(test_plugin):
    plan = plan_of("technique=plan_test_adapter", "technique.rank=512")
    assert plan.problems == [f"technique.rank=512 is above 256 (plan has {plan.parameters} parameters)."]


def test_a_technique_is_planned_through_what_it_declares(test_plugin):
    plan = plan_of("technique=plan_test_streaming", "model=llama3_1_8b", "hardware=h100", "precision=bf16",
                   "parallelism=tp2", "parallelism.devices_per_node=2")
    assert plan.technique_memory == "streaming"
    assert plan.memory_breakdown == {"weights": plan.parameters * 2 // 2, "buffer": 64 * 2**20 // 2}
    assert plan.memory_per_device_bytes == plan.parameters + 32 * 2**20
    assert plan.trainable_parameters == 4096
    assert plan.problems == []
    assert only(plan_of("technique=plan_test_streaming", "technique.buffer_mb=512").problems,
                "technique.buffer_mb=512") == "technique.buffer_mb=512 holds 536870912 bytes per device, over 128 MiB."


def test_the_planning_package_names_no_technique():
    """What a stage holds and checks comes from its technique; the planner's source names none of them."""
    import llmexp.planning

    names = set(plugin_manager.techniques())
    package = Path(llmexp.planning.__file__).parent
    for module in package.glob("*.py"):
        words = set(re.findall(r"[a-z_0-9]+", module.read_text(encoding="utf-8")))
        assert not names & words, f"{module.name} names {sorted(names & words)}"


# ---------------------------------------------------------------- problems


def test_precision_the_hardware_cannot_compute():
    plan = plan_of("backend=megatron", "hardware=a100_80g", "precision=fp8")
    assert plan.problems == [
        "precision=fp8 is not supported by hardware=a100_80g (ampere: fp32, tf32, fp16, bf16, int8); "
        "FP8 needs Ada/Hopper or newer — choose hardware=h100 or precision=bf16."
    ]
    assert "BF16 needs Ampere or newer — choose hardware=a100_80g or precision=fp16." in only(
        plan_of("hardware=v100", "precision=bf16").problems, "precision=bf16")
    assert "FP4 needs Blackwell — choose hardware=b200 or precision=fp8." in only(
        plan_of("backend=megatron", "hardware=h100", "precision=fp4").problems, "precision=fp4")
    assert plan_of("backend=megatron", "hardware=b200", "precision=fp4").problems == []
    assert plan_of("backend=megatron", "hardware=l40s", "precision=fp8").problems == []


def test_world_size_must_match_the_devices():
    problem = only(plan_of("parallelism=single", "parallelism.tp=2").problems, "parallelism.tp*pp*dp")
    assert "= 2 ranks" in problem and "= 1 devices" in problem
    assert "parallelism.devices_per_node=2" in problem
    problem = only(plan_of("parallelism=tp8_pp2", "parallelism.nodes=4").problems, "parallelism.tp*pp*dp")
    assert "parallelism.dp=2" in problem


def test_more_devices_per_node_than_the_hardware_has():
    plan = plan_of("hardware=l40s", "parallelism=dp8", "precision=bf16")
    problem = only(plan.problems, "devices_per_node=8")
    assert "hardware=l40s has hardware.gpus_per_node=4" in problem
    assert "parallelism.nodes=2 with devices_per_node=4" in problem


def test_heads_not_divisible_by_tp():
    plan = plan_of("model=qwen2_5_7b", "hardware=h100", "parallelism=tp8", "precision=bf16")
    heads = only(plan.problems, "model.num_attention_heads=28")
    kv_heads = only(plan.problems, "model.num_key_value_heads=4")
    for problem in (heads, kv_heads):
        assert "parallelism.tp=8" in problem and "choose parallelism.tp from 1, 2, 4." in problem


def test_layers_not_divisible_by_pp():
    plan = plan_of("model=llama3_1_405b", "hardware=h100", "parallelism=tp4_pp4_dp4", "precision=bf16")
    problem = only(plan.problems, "model.num_layers=126")
    assert "parallelism.pp=4" in problem and "1, 2, 3, 6, 7, 9, 14" in problem


def test_mlp_not_divisible_by_tp():
    problem = only(plan_of("parallelism=tp2", "model.intermediate_size=385").problems, "model.intermediate_size=385")
    assert "parallelism.tp=2" in problem and "an equal share of the MLP" in problem
    assert "choose parallelism.tp from 1." in problem


def test_training_through_pipeline_and_tensor_parallel_stages_is_refused_and_inference_is_not():
    problem = only(plan_of("parallelism=tp8_pp2", "model=llama3_1_8b", "hardware=h100", "precision=bf16").problems,
                   "parallelism.pp=2")
    assert "parallelism=tp8_pp2" in problem and "set parallelism.tp=1" in problem and "backend=megatron" in problem
    assert not [problem for problem in plan_of("parallelism=pp2").problems if "parallelism.pp" in problem]
    evaluation = plan_of("technique=quantize", "parallelism=tp8_pp2", "model=llama3_1_8b", "hardware=h100",
                         "precision=bf16")
    assert not [problem for problem in evaluation.problems if "parallelism.pp" in problem]


def test_compiling_a_split_model_or_a_megatron_step_is_refused_and_data_parallel_is_not():
    problem = only(plan_of("technique.compile=true", "parallelism=tp2").problems, "compile")
    assert "technique.compile=true" in problem and "parallelism tp=2" in problem and "technique.compile=false" in problem
    only(plan_of("technique.compile=true", "parallelism=fsdp2").problems, "sharding=fsdp")
    megatron = only(plan_of("technique.compile=true", "backend=megatron", "hardware=h100", "precision=bf16").problems,
                    "compile")
    assert "backend=megatron runs its own kernels" in megatron
    assert plan_of("technique.compile=true", "parallelism=dp2").problems == []
    assert plan_of("technique.compile=true").problems == []


def test_tensor_parallel_lora_is_refused_and_data_parallel_lora_is_not():
    problem = only(plan_of("technique=lora", "parallelism=tp2").problems, "parallelism.tp=2")
    assert "technique=lora" in problem and "parallelism.tp=1" in problem
    assert plan_of("technique=lora", "parallelism=fsdp2").problems == []
    assert plan_of("technique=sft", "parallelism=tp2").problems == []


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    plan = plan_of("parallelism=dp2", "parallelism.micro_batch=3")
    problem = only(plan.problems, "parallelism.global_batch=16")
    assert "micro_batch*dp = 3*2 = 6" in problem and "(e.g. 18)" in problem


def test_non_positive_counts_are_problems_not_crashes():
    problem = only(plan_of("parallelism.micro_batch=0").problems, "parallelism.micro_batch=0")
    assert "positive" in problem


def test_an_unknown_sharding_does_not_compose():
    with pytest.raises(UserError, match="parallelism.sharding expects one of none, fsdp \\(now none\\), got 'zero3'"):
        plan_of("parallelism.sharding=zero3")


# ---------------------------------------------------------------- model.path


def test_model_path_takes_numbers_from_config_json(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "small", {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    })
    plan = plan_of("model=llama3_1_70b", f"model.path={checkpoint}")
    assert plan.parameters == count_parameters({
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4})
    assert plan.problems == []


def test_a_bad_model_path_is_a_problem(tmp_path):
    plan = plan_of(f"model.path={tmp_path / 'missing'}")
    problem = only(plan.problems, "model.path=")
    assert "no such directory" in problem
    assert plan.parameters == count_parameters(compose_config([]).model)  # the preset's, as a fallback

    checkpoint = write_checkpoint(tmp_path / "cut", LLAMA_3_1_70B_CONFIG)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    plan = plan_of("model=llama3_1_70b", f"model.path={checkpoint}")
    assert "model.safetensors is truncated or corrupt" in only(plan.problems, "model.path=")
    assert plan.parameters == 70_553_706_496  # config.json is fine, so its numbers are used


# ---------------------------------------------------------------- no heavy imports


def test_planning_imports_no_torch(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "llama-3.1-70b", LLAMA_3_1_70B_CONFIG)
    script = (
        "import sys\n"
        "from llmexp.configuration.compose import compose_config\n"
        "from llmexp.planning.planner import make_plan\n"
        "for overrides in ([], ['model=llama3_1_70b', 'hardware=a100_80g', 'parallelism=tp8'],\n"
        f"                  ['technique=evaluate', 'model.path={checkpoint}']):\n"
        "    make_plan(compose_config(overrides))\n"
        "heavy = ('torch', 'transformers', 'lightning', 'pytorch_lightning')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- refusals a stage would make at its start


@pytest.mark.parametrize("overrides, refusal", [
    (["hardware=h100", "precision=fp8"], "precision=fp8 is not available for training on the torch backend"),
    (["precision=fp16"], "precision=fp16 is not available for training on hardware=cpu: a CPU has no FP16 mixed "
                         "precision (Lightning would train in bf16 instead); train with precision=bf16 or "
                         "precision=fp32, or in fp16 on a GPU preset."),
    (["data=jsonl", "data.path=x.jsonl"], "technique=pretrain trains on raw text: data=embedded or data=text"),
    (["technique.val_every=10"], "technique.val_every=10 asks for validation, but pretrain has no validation examples"),
    (["data.num_people=100"], "model.vocab_size=256 is smaller than the embedded tokenizer's 321 tokens; set "
                              "model.vocab_size=384 or more."),
    (["pipeline=compress", "pipeline.nodes.width_prune.hidden_size=96", "pipeline.nodes.width_distill.hidden_weight=1"],
     "pipeline.nodes.width_distill.hidden_weight=1.0 compares last hidden states, but the teacher's hidden size is "
     "128 and the student's 96"),
    (["pipeline=compress", "pipeline.nodes.prune.method=width", "pipeline.nodes.prune.hidden_size=96",
      "pipeline.nodes.distill_fp8.format=int4_awq", "pipeline.nodes.distill_fp8.group_size=64"],
     "pipeline.nodes.distill_fp8.group_size=64 does not divide the input width of every linear layer of the model "
     "(hidden_size=96,"),
])
def test_what_a_stage_refuses_at_its_start_the_plan_refuses(overrides, refusal):
    assert refusal in " ".join(plan_of(*overrides).problems)


def test_validation_without_validation_records_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    base = write_checkpoint(tmp_path / "base", {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    lora = ["technique=lora", f"model.path={base}", "data=jsonl", f"data.path={data}"]
    assert plan_of(*lora, "data.validation_split=0").problems == [
        "technique.val_every=50 asks for validation, but lora has no validation examples: sft, lora and dpo validate "
        "on data.validation_path or a data.validation_split share of their records, while pretrain, cpt and distill "
        "read no validation set; give it validation data or set technique.val_every=0."]
    assert plan_of(*lora, "data.validation_split=0.25").problems == []
    # the customize pipeline's base is pretrained on raw text, which data=jsonl is not
    assert "technique=pretrain trains on raw text" in only(
        plan_of("pipeline=customize", "data=jsonl", f"data.path={data}").problems, "raw text")


def test_fp16_training_is_refused_only_where_it_would_not_be_fp16(tmp_path):
    model = write_checkpoint(tmp_path / "model", {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2})
    assert plan_of("precision=fp16", "hardware=v100").problems == []  # a GPU trains in FP16 mixed precision
    # evaluation runs the model in its weights' dtype, which precision does not change on any hardware
    assert plan_of("technique=evaluate", "precision=fp16", f"model.path={model}").problems == []


@pytest.mark.parametrize("overrides, refusal", [
    (["technique=pretrain", "hardware=h100", "precision=fp8"],
     "precision=fp8 is not available for training on the torch backend"),
    (["precision=fp16"], "precision=fp16 is not available for training on hardware=cpu"),
])
def test_a_training_precision_the_backend_would_not_honour_stops_before_anything_is_written(overrides, refusal,
                                                                                            tmp_path):
    from .conftest import run_llmexp

    result = run_llmexp(*overrides, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {refusal}") and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_text_perplexity_window_longer_than_the_model_context_is_refused(tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("a few words of text\n")
    model = write_checkpoint(tmp_path / "model", {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256})
    task = f"technique.tasks=[{{type: text_perplexity, path: {document}, max_length: 512}}]"
    assert plan_of("technique=evaluate", f"model.path={model}", task).problems == [
        f"max_length=512 of the text_perplexity task on {document} exceeds the model's context of 256 tokens; lower "
        "it to 256 or less (or leave it out: the model's context)."]


@pytest.mark.parametrize("overrides, offered, not_offered", [
    (["model=llama3_1_70b", "technique=lora", "hardware=a100_80g", "parallelism=fsdp8", "precision=bf16",
      "data.seq_len=8192"], "set parallelism.activation_checkpointing=true", "use parallelism.sharding=fsdp"),
    (["model=llama3_1_8b", "hardware=a100_40g", "parallelism=dp8", "precision=bf16"],
     "use parallelism.sharding=fsdp", "activation_checkpointing"),
], ids=["activations-of-sharded-lora", "states-of-unsharded-dp"])
def test_memory_advice_offers_only_switches_that_are_off_and_would_help(overrides, offered, not_offered):
    problem = only(plan_of(*overrides).problems, "Memory per device")
    assert offered in problem
    assert not_offered not in problem
