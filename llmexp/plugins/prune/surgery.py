"""The prune stage, and the cutting itself: whole decoder layers, or MLP neurons, query heads and hidden channels.

Cuts happen in place on the stage's own copy of the model (``llmexp.models.loading.starting_model``
deep-copies a model an earlier stage made; other stages may still use that one). The config
and every module attribute read in ``forward`` are updated with the weights, so the model
runs as it is and its ``save_pretrained`` checkpoint loads with plain transformers.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from llmexp.sdk import model_numbers_from_hf_config
from llmexp.data.blocks import calibration_blocks
from llmexp.sdk import base_model, model_stats, trained_model_result
from llmexp.sdk import stage_node_path
from llmexp.sdk import write_json_atomic
from llmexp.sdk import architecture
from llmexp.plugins.prune import calibrates
from llmexp.plugins.prune.sizes import pruned_numbers
from llmexp.plugins.prune.importance import (
    LAYER_IMPORTANCE,
    WidthImportance,
    decoder_layers,
    forward_passes,
    layers_to_drop,
    width_importance,
)
from llmexp.sdk import Progress
from llmexp.sdk import StageContext, StageResult

# Config lists with one entry per layer (Qwen2's sliding-window pattern); they lose the dropped layers' entries.
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def prune(ctx: StageContext) -> StageResult:
    """Prune the stage's input model as its node says; save it to ``<stage dir>/model``, scores to importance.json."""
    node = ctx.stage_config
    start = base_model(ctx)
    model = start.model
    before = model_stats(model)
    target = pruned_numbers(architecture(model_numbers_from_hf_config(model.config.to_dict())), node)
    scores, seconds = None, 0.0
    if calibrates(node):
        field = f"{stage_node_path(ctx)}.calibration_size"
        blocks = calibration_blocks(ctx.config, start.tokenizer, node.calibration_size, field)
        depth = node.method == "depth"
        measure = LAYER_IMPORTANCE[node.importance] if depth else width_importance
        batch_size = ctx.config.parallelism.micro_batch
        passes = forward_passes(node.importance, len(decoder_layers(model))) if depth else 1
        clock = time.perf_counter()
        with Progress(ctx.stage_name, unit="batch", transient=True) as bars:
            task = bars.add_task("importance", total=passes * -(-len(blocks) // batch_size))
            scores = measure(model, blocks, batch_size, lambda: bars.advance(task))
        seconds = time.perf_counter() - clock
    if node.method == "depth":
        record = _prune_depth(model, node, target, scores)
    else:
        record = _prune_width(model, target, scores)
    importance_file = ctx.stage_dir / "importance.json"
    write_json_atomic(importance_file, record)

    after = model_stats(model)
    metrics = {
        "parameters_before": before["parameters"],
        "parameters_after": after["parameters"],
        "parameter_fraction": round(after["parameters"] / before["parameters"], 6),
        "layers_before": before["layers"],
        "layers_after": after["layers"],
        "layers_dropped": before["layers"] - after["layers"],
        "ffn_hidden_size": model.config.intermediate_size,
        "num_heads": model.config.num_attention_heads,
        "hidden_size": model.config.hidden_size,
        "calibration_time_s": round(seconds, 3),
    }
    if node.method == "width" and node.target_parameters is not None:
        metrics["target_parameters"] = node.target_parameters
    return trained_model_result(ctx, model, start.tokenizer, metrics, {"importance": str(importance_file)})


def _prune_depth(model, node, target: Dict[str, Any], scores: Optional[List[float]]) -> Dict[str, Any]:
    """Drop ``node.drop_layers``, or the least important layers down to the target; return importance.json's record."""
    if scores is None:
        dropped = sorted(n - 1 for n in set(node.drop_layers))
    else:
        dropped = layers_to_drop(scores, len(scores) - target["num_layers"], node.contiguous)
    drop_layers(model, dropped)
    return {
        "method": "depth",
        "importance": None if scores is None else node.importance,
        "contiguous": node.contiguous,
        # layers numbered from 1, as drop_layers takes them
        "layer_importance": None if scores is None else {str(i + 1): score for i, score in enumerate(scores)},
        "dropped_layers": [i + 1 for i in dropped],
    }


def _prune_width(model, target: Dict[str, Any], scores: WidthImportance) -> Dict[str, Any]:
    kept_heads = prune_width(
        model, scores, target["intermediate_size"], target["num_attention_heads"], target["hidden_size"]
    )
    return {
        "method": "width",
        "ffn_hidden_size": target["intermediate_size"],
        "num_heads": target["num_attention_heads"],
        "hidden_size": target["hidden_size"],
        "head_importance": scores.heads.tolist(),  # per layer, per query head of the input model
        "kept_heads": kept_heads,
        "channel_importance": scores.channels.tolist(),
    }


def drop_layers(model, indices: List[int]) -> None:
    """Remove the decoder layers at ``indices`` (from 0); renumber the rest and fix the config."""
    layers = decoder_layers(model)
    gone = set(indices)
    kept = [layer for i, layer in enumerate(layers) if i not in gone]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # the attention's KV-cache slot
                module.layer_idx = new_index
    model.model.layers = nn.ModuleList(kept)
    config = model.config
    for key in PER_LAYER_CONFIG_KEYS:
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, [value for i, value in enumerate(getattr(config, key)) if i not in gone])
    config.num_hidden_layers = len(kept)


def prune_width(
    model, scores: WidthImportance, ffn_hidden_size: int, num_heads: int, hidden_size: int
) -> List[List[int]]:
    """Keep the highest-scoring MLP neurons and query heads of each layer and hidden channels of the model.

    Every KV group keeps ``num_heads / num_key_value_heads`` of its query heads, so grouped-query
    attention stays intact; head_dim stays. Returns the query heads kept in each layer.
    """
    config = model.config
    layers = decoder_layers(model)
    head_dim = layers[0].self_attn.head_dim
    kv_heads = config.num_key_value_heads
    group = config.num_attention_heads // kv_heads
    kept_heads = []
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        neurons = _top(scores.neurons[index], ffn_hidden_size)
        _select(mlp.gate_proj, 0, neurons)
        _select(mlp.up_proj, 0, neurons)
        _select(mlp.down_proj, 1, neurons)
        per_group = scores.heads[index].view(kv_heads, group).topk(num_heads // kv_heads, dim=1).indices
        heads = (per_group.sort(dim=1).values + torch.arange(kv_heads)[:, None] * group).flatten()
        kept_heads.append(heads.tolist())
        rows = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        _select(attention.q_proj, 0, rows)
        _select(attention.o_proj, 1, rows)
        attention.num_key_value_groups = num_heads // kv_heads
    channels = _top(scores.channels, hidden_size)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embeddings.weight
    _select(embeddings, 1, channels)
    if tied:
        head.weight, head.in_features = embeddings.weight, hidden_size
    else:
        _select(head, 1, channels)
    _select(model.model.norm, 0, channels)
    for layer in layers:
        _select(layer.input_layernorm, 0, channels)
        _select(layer.post_attention_layernorm, 0, channels)
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj):
            _select(linear, 1, channels)
        _select(layer.self_attn.o_proj, 0, channels)
        _select(layer.mlp.down_proj, 0, channels)
    config.intermediate_size, config.num_attention_heads = ffn_hidden_size, num_heads
    config.hidden_size, config.head_dim = hidden_size, head_dim  # head_dim stays, whatever hidden / heads now is
    return kept_heads


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in their original order."""
    return scores.topk(count).indices.sort().values


def _select(module: nn.Module, dim: int, index: torch.Tensor) -> None:
    """Keep ``index`` along ``dim`` of the module's weight (and of its bias, along dim 0), updating its size attributes.

    In place rather than transformers' ``prune_linear_layer``, which builds a new fp32 layer
    (losing bf16 weights and tied embeddings) and handles neither embeddings nor norms.
    """
    index = index.to(module.weight.device)
    module.weight = nn.Parameter(module.weight.index_select(dim, index).clone(), module.weight.requires_grad)
    if dim == 0 and getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.index_select(0, index).clone(), module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
