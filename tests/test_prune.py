"""technique=prune: depth and width (Minitron) pruning of HF Llama models, its plan checks and its CLI."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from llmexp.configuration.compose import compose_config
from llmexp.data.embedded import build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError
from llmexp.models.loading import build_model, model_stats
from llmexp.architecture import architecture, count_parameters
from llmexp.planning.planner import make_plan
from llmexp.plugins.prune.sizes import pruned_numbers
from llmexp.plugins.prune.importance import (
    WidthImportance,
    block_importance,
    layers_to_drop,
    perplexity_importance,
    width_importance,
)
from llmexp.plugins.prune.surgery import prune, prune_width
from llmexp.techniques.contract import ModelArtifact, StageContext
from tests.conftest import REPO, read_results, run_llmexp

TINY = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")


def tiny_model(layers: int):
    torch.manual_seed(0)
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    return build_model(OmegaConf.merge(TINY, {"num_layers": layers}), tokenizer).eval(), tokenizer


def numbers(layers: int):
    return architecture(OmegaConf.merge(TINY, {"num_layers": layers}))


def run_stage(tmp_path, model, tokenizer, *overrides):
    """The prune stage in-process, on ``model`` as an earlier stage's output."""
    cfg = compose_config(["technique=prune", "data.seq_len=32", "technique.calibration_size=8", *overrides])
    ctx = StageContext(cfg, cfg.technique, tmp_path, ModelArtifact(model, tokenizer), tracker=None, stage_name="prune")
    return prune(ctx)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
BLOCKS = torch.randint(3, 200, (8, 16), generator=torch.Generator().manual_seed(1))


def test_depth_by_list_drops_those_layers_and_saves_a_checkpoint_plain_transformers_loads(tmp_path):
    model, tokenizer = tiny_model(4)
    fourth = model.model.layers[3].mlp.down_proj.weight.clone()
    result = run_stage(tmp_path, model, tokenizer, "technique.drop_layers=[2,3]")

    pruned = result.model.model
    assert len(model.model.layers) == 4  # the input model is untouched: the stage cut a copy
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert torch.equal(pruned.model.layers[1].mlp.down_proj.weight, fourth)  # layer 4 is now the second
    assert json.loads((tmp_path / "importance.json").read_text())["dropped_layers"] == [2, 3]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.num_hidden_layers == 2
    assert torch.allclose(logits(loaded, IDS), logits(pruned, IDS), atol=1e-6)
    # the KV cache indexes layers by layer_idx: generation works only if they were renumbered
    assert torch.equal(loaded.generate(IDS[:1], max_new_tokens=5, do_sample=False),
                       pruned.generate(IDS[:1], max_new_tokens=5, do_sample=False))
    expected = count_parameters(pruned_numbers(numbers(4), {"method": "depth", "drop_layers": [2, 3]}))
    assert result.model_stats["parameters"] == model_stats(loaded)["parameters"] == expected
    assert result.model_stats["layers"] == 2 and result.model_stats["precision"] == "fp32"
    assert result.model_stats["bits_per_weight"] == pytest.approx(32, rel=0.01)
    assert result.metrics["layers_dropped"] == 2
    assert result.metrics["parameter_fraction"] == pytest.approx(expected / count_parameters(numbers(4)), abs=1e-6)


def test_a_layer_made_an_identity_is_the_least_important_block_and_skipping_it_costs_nothing():
    model, _ = tiny_model(4)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    block = block_importance(model, BLOCKS, 4)
    rise = perplexity_importance(model, BLOCKS, 4)
    assert block[2] == pytest.approx(0, abs=1e-6) and min(block[:2] + block[3:]) > 0.05
    assert layers_to_drop(block, 1, contiguous=False) == [2]
    assert rise[2] == 0.0 and all(abs(other) > 0.01 for other in rise[:2] + rise[3:])  # skipping it changes nothing


def test_depth_by_importance_drops_the_least_important_layers_or_the_cheapest_window():
    scores = [0.9, 0.1, 0.5, 0.05, 0.6, 0.2]
    assert layers_to_drop(scores, 2, contiguous=False) == [1, 3]
    assert layers_to_drop(scores, 2, contiguous=True) == [2, 3]  # 0.55: the least of the adjacent pairs
    assert layers_to_drop(scores, 3, contiguous=True) == [1, 2, 3]


def test_depth_by_importance_records_every_layer_and_drops_a_quarter_by_default(tmp_path):
    model, tokenizer = tiny_model(4)
    result = run_stage(tmp_path, model, tokenizer, "technique.importance=perplexity")
    record = json.loads((tmp_path / "importance.json").read_text())
    scores = [record["layer_importance"][str(n)] for n in range(1, 5)]
    assert record["dropped_layers"] == [scores.index(min(scores)) + 1]
    assert result.metrics["layers_after"] == 3 and result.metrics["calibration_time_s"] > 0


def test_width_pruning_keeps_every_kv_group_whole_and_saves_a_loadable_checkpoint(tmp_path):
    model, tokenizer = tiny_model(2)
    result = run_stage(tmp_path, model, tokenizer, "technique.method=width", "technique.ffn_hidden_size=200",
                       "technique.num_heads=2", "technique.hidden_size=96")
    pruned = result.model.model
    attention, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (2 * 32, 96) and attention.k_proj.weight.shape == (2 * 32, 96)
    assert attention.o_proj.weight.shape == (96, 64) and mlp.down_proj.weight.shape == (96, 200)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied
    record = json.loads((tmp_path / "importance.json").read_text())
    for heads in record["kept_heads"]:  # one query head from each of the 2 KV groups (heads 0-1, 2-3)
        assert [head // 2 for head in heads] == [0, 1]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.head_dim == 32 and loaded.config.hidden_size == 96
    assert logits(loaded, IDS).shape == (2, 12, 256)
    assert torch.allclose(logits(loaded, IDS), logits(pruned, IDS), atol=1e-6)
    node = {"method": "width", "ffn_hidden_size": 200, "num_heads": 2, "hidden_size": 96}
    expected = pruned_numbers(numbers(2), node)
    assert result.metrics["parameters_after"] == model_stats(loaded)["parameters"] == count_parameters(expected)


def test_width_pruning_to_the_model_s_own_sizes_changes_nothing():
    model, _ = tiny_model(2)
    before = logits(model, IDS)
    prune_width(model, width_importance(model, BLOCKS, 4), ffn_hidden_size=384, num_heads=4, hidden_size=128)
    assert torch.equal(logits(model, IDS), before)


def test_width_importance_ranks_the_neurons_and_channels_with_the_largest_activations_first():
    neurons, channels = [5, 17, 300], [3, 64, 127]
    model, _ = tiny_model(2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[neurons] *= 50
    scores = width_importance(model, BLOCKS, 4)
    assert [sorted(scores.neurons[layer].topk(3).indices.tolist()) for layer in range(2)] == [neurons, neurons]
    model, _ = tiny_model(2)
    with torch.no_grad():
        for norm in [model.model.norm] + [layer.post_attention_layernorm for layer in model.model.layers]:
            norm.weight[channels] *= 50
    assert sorted(width_importance(model, BLOCKS, 4).channels.topk(3).indices.tolist()) == channels


def test_width_pruning_keeps_the_highest_scored_neurons_heads_and_channels():
    model, _ = tiny_model(1)
    layer = model.model.layers[0]
    q, gate = layer.self_attn.q_proj.weight.clone(), layer.mlp.gate_proj.weight.clone()
    embed = model.model.embed_tokens.weight.clone()
    neurons, channels = torch.zeros(1, 384, dtype=torch.float64), torch.zeros(128, dtype=torch.float64)
    neurons[0, [7, 90, 200]], channels[[1, 50, 99, 120]] = 1.0, 1.0
    heads = torch.tensor([[0.1, 0.9, 0.8, 0.2]], dtype=torch.float64)  # groups (0, 1) and (2, 3)
    kept = prune_width(model, WidthImportance(neurons, heads, channels), ffn_hidden_size=3, num_heads=2, hidden_size=4)
    assert kept == [[1, 2]]
    rows = torch.cat([torch.arange(32, 64), torch.arange(64, 96)])
    assert torch.equal(layer.self_attn.q_proj.weight, q[rows][:, [1, 50, 99, 120]])
    assert torch.equal(layer.mlp.gate_proj.weight, gate[[7, 90, 200]][:, [1, 50, 99, 120]])
    assert torch.equal(model.model.embed_tokens.weight, embed[:, [1, 50, 99, 120]])
    assert logits(model, IDS).shape == (2, 12, 256)


def test_target_parameters_shrinks_the_mlp_first_then_hidden_then_heads():
    base = numbers(8)
    mlp_only = pruned_numbers(base, {"method": "width", "target_parameters": 1_200_000})
    one_step_less = {**mlp_only, "intermediate_size": mlp_only["intermediate_size"] + 8}
    assert count_parameters(mlp_only) <= 1_200_000 < count_parameters(one_step_less)
    assert mlp_only["hidden_size"] == 128 and mlp_only["num_attention_heads"] == 4
    deeper = pruned_numbers(base, {"method": "width", "target_parameters": 600_000})
    assert deeper["intermediate_size"] == 192 and deeper["hidden_size"] < 128 and count_parameters(deeper) <= 600_000
    assert pruned_numbers(base, {"method": "depth"})["num_layers"] == 6  # a quarter of 8 layers by default


def test_width_pruning_to_a_parameter_count_reports_the_count_reached(tmp_path):
    model, tokenizer = tiny_model(2)
    result = run_stage(tmp_path, model, tokenizer, "technique.method=width", "technique.target_parameters=300000")
    assert result.metrics["parameters_after"] == count_parameters(
        pruned_numbers(numbers(2), {"method": "width", "target_parameters": 300000})) <= 300000
    assert result.metrics["target_parameters"] == 300000


def test_too_little_text_for_the_calibration_size_is_refused_naming_the_field(tmp_path):
    (tmp_path / "notes.txt").write_text("alice lives in rome .\n\nbob has a cat .\n" * 40)
    model, tokenizer = tiny_model(2)
    with pytest.raises(UserError, match=r"technique\.calibration_size=500 asks for more"):
        run_stage(tmp_path, model, tokenizer, "data=text", f"data.paths=[{tmp_path / 'notes.txt'}]",
                  "technique.calibration_size=500")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["technique.drop_layers=[0,9]"], "technique.drop_layers=[0, 9] names 0, 9, outside 1..8"),
        (["technique.drop_layers=[2,2]"], "technique.drop_layers=[2, 2] names 2 more than once"),
        (["technique.drop_layers=[1,2,3,4,5,6,7,8]"], "drops all 8 layers"),
        (["technique.num_layers_to_drop=8"], "technique.num_layers_to_drop=8 must be between 1 and 7"),
        (["technique.method=wide"], "technique.method=wide is not known"),
        (["technique.importance=loss"], "technique.importance=loss is not known"),
        (["technique.calibration_size=0"], "technique.calibration_size=0 must be at least 1"),
        (["technique.hidden_size=64"], "technique.hidden_size=64 applies to method=width"),
        (["data=jsonl"], "pruning calibrates on raw text"),
        (["technique.method=width"], "method=width needs sizes to keep"),
        (["technique.method=width", "technique.ffn_hidden_size=500"],
         "technique.ffn_hidden_size=500 must be between 1 and the model's intermediate_size=384"),
        (["technique.method=width", "technique.num_heads=3"], "choose num_heads from 2, 4"),
        (["technique.method=width", "technique.target_parameters=2000000"], "must be below the model's 1,607,808"),
        (["technique.method=width", "technique.target_parameters=100000"], "out of width pruning's reach"),
        (["+technique@pipeline.nodes.cut=prune", "pipeline.stages=[technique,cut]", "technique.num_layers_to_drop=2",
          "pipeline.nodes.cut.num_layers_to_drop=6"],  # the second stage receives 6 layers
         "pipeline.nodes.cut.num_layers_to_drop=6 must be between 1 and 5"),
    ],
)
def test_bad_settings_are_plan_problems_naming_the_field(args, fragment):
    problems = make_plan(compose_config(["technique=prune", *args])).problems
    assert any(fragment in problem for problem in problems), problems


def test_the_cli_refuses_bad_settings_before_writing_anything(tmp_path):
    result = run_llmexp("technique=prune", "technique.method=width", "technique.num_heads=3", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "technique.num_heads=3 is not a multiple" in " ".join(result.stderr.split())
    assert not (tmp_path / "outputs").exists()


def test_depth_pruning_a_checkpoint_through_the_cli(tmp_path, tiny_checkpoint):
    result = run_llmexp("technique=prune", f"model.path={tiny_checkpoint}", "pipeline=technique_only", "data.seq_len=32",
                        "technique.calibration_size=16", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = read_results(tmp_path / "run")["stages"]["prune"]
    assert stage["metrics"]["layers_before"] == 2 and stage["metrics"]["layers_after"] == 1
    record = json.loads((tmp_path / "run/prune/importance.json").read_text())
    assert set(record["layer_importance"]) == {"1", "2"} and len(record["dropped_layers"]) == 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run/prune/model")
    assert stage["model_stats"]["parameters"] == model_stats(loaded)["parameters"] == count_parameters(numbers(1))
