"""Structured pruning of Llama-architecture models: ``technique=prune``, depth (layers) or width (Minitron).

Depth drops whole decoder layers: the ones named in ``drop_layers`` (numbered from 1, as
NeMo's ``--drop_layers``), or the least important ones on calibration data. Width shrinks
the MLP, the query heads (GQA kept) and the hidden size, keeping the neurons, heads and
channels with the largest activations (Minitron, Muralidharan et al. 2024). The result is a
smaller Hugging Face checkpoint that loads with plain transformers.

This module imports without torch: the planner loads every plugin. Importance lives in
``importance.py``, the cutting and the stage itself in ``surgery.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from llmexp.data.text import raw_text_problems
from llmexp.plugins.prune.sizes import pruned_numbers
from llmexp.sdk import Metric, MetricKind, Technique, TechniqueConfig, UserError, count_parameters, hookimpl, node_path, read_hf_config

METHODS = ("depth", "width")
IMPORTANCES = ("block", "perplexity")  # llmexp.plugins.prune.importance.LAYER_IMPORTANCE
ARCHITECTURES = ("llama", "mistral", "qwen2")  # model types whose modules surgery.py knows
DEPTH_FIELDS = ("drop_layers", "num_layers_to_drop")
# width field -> the architecture number (llmexp.architecture.architecture) it sets
WIDTH_FIELDS = {
    "ffn_hidden_size": "intermediate_size", "num_heads": "num_attention_heads", "hidden_size": "hidden_size",
}


@dataclass
class PruneConfig(TechniqueConfig):
    """What to remove and how importance is measured; see llmexp/plugins/prune/README.md."""

    name: str = "prune"
    method: str = "depth"  # depth: drop decoder layers | width: shrink MLP, query heads, hidden size
    # depth: layer numbers to drop, from 1 (NeMo's --drop_layers); unset: rank layers by `importance`
    drop_layers: Optional[List[int]] = None
    num_layers_to_drop: Optional[int] = None  # depth by importance; unset: a quarter of the layers, rounded
    importance: str = "block"  # block: 1 - cos(layer input, output) | perplexity: rise when the layer is skipped
    contiguous: bool = False  # drop one window of adjacent layers with the least total importance
    # width: the sizes to keep (unset: unchanged); num_heads a multiple of the model's KV heads
    ffn_hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    hidden_size: Optional[int] = None
    target_parameters: Optional[int] = None  # width: choose the sizes above to reach this count instead
    calibration_size: int = 128  # sequences of data.seq_len tokens from the run's data


class Prune(Technique):
    name = "prune"
    schema = PruneConfig
    produces_model = True
    adapts_base = True
    requires = ("torch", "transformers")

    entry = "llmexp.plugins.prune.surgery:prune"

    @classmethod
    def metrics(cls, config, node):
        """The share of parameters kept and what measuring importance took; the model's size is its model stats."""
        return (Metric("parameter_fraction", False, "parameter_fraction", MetricKind.INFO),
                Metric("calibration_time_s", False, "calibration_time_s", MetricKind.COST))

    @classmethod
    def made_architecture(cls, node, numbers: Dict[str, Any]) -> Dict[str, Any]:
        """The pruned sizes (``sizes.pruned_numbers``); an unknown method changes nothing (it is refused)."""
        return pruned_numbers(numbers, node) if node.method in METHODS else numbers

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """The stage against the architecture it receives (an earlier prune stage's output included)."""
        return architecture_problems(config) + stage_problems(config, node, node_path(key), plan.architectures[key][0])


@hookimpl
def llmexp_techniques():
    return [Prune]


def stage_problems(config, node, key: str, numbers: Dict[str, Any]) -> List[str]:
    """Problems of the prune node at ``key`` (its path in the config) for a model with ``numbers``."""
    problems = []
    if node.method not in METHODS:
        problems.append(
            f"{key}.method={node.method} is not known; choose depth (drop whole layers) or width (shrink the MLP, "
            "query heads and hidden size)."
        )
        return problems
    if node.importance not in IMPORTANCES:
        problems.append(
            f"{key}.importance={node.importance} is not known; choose block (1 - cosine similarity of a layer's "
            "input and output) or perplexity (the rise of calibration perplexity when the layer is skipped)."
        )
    if node.calibration_size < 1:
        problems.append(f"{key}.calibration_size={node.calibration_size} must be at least 1 (128 is the default).")
    other_method = "width" if node.method == "depth" else "depth"
    other_fields = (*WIDTH_FIELDS, "target_parameters") if node.method == "depth" else DEPTH_FIELDS
    problems += [
        f"{key}.{name}={node[name]} applies to method={other_method}; remove it, or set {key}.method={other_method}."
        for name in other_fields if node[name] is not None
    ]
    if node.method == "depth":
        problems += depth_problems(node, key, numbers["num_layers"])
    else:
        problems += width_problems(node, key, numbers)
    if calibrates(node):
        problems += data_problems(config, key)
    return problems


def calibrates(node) -> bool:
    """Whether the stage runs the model on calibration data: everything but an explicit ``drop_layers``."""
    return node.method == "width" or node.drop_layers is None


def depth_problems(node, key: str, layers: int) -> List[str]:
    dropped = node.drop_layers
    if dropped is not None:
        if node.num_layers_to_drop is not None:
            return [
                f"{key}.drop_layers and {key}.num_layers_to_drop are both set; set drop_layers to name the layers, "
                "or num_layers_to_drop to drop that many of the least important ones."
            ]
        outside = [n for n in dropped if not 1 <= n <= layers]
        twice = sorted({n for n in dropped if list(dropped).count(n) > 1})
        listed = f"{key}.drop_layers={list(dropped)}"
        if not dropped:
            return [f"{listed} is empty; name the layers to drop, or leave it unset to drop the least important ones."]
        if outside:
            return [
                f"{listed} names {', '.join(map(str, outside))}, outside 1..{layers}: the model has {layers} layers, "
                "numbered from 1 as in NeMo's --drop_layers (layer n is model.layers[n-1])."
            ]
        if twice:
            return [f"{listed} names {', '.join(map(str, twice))} more than once; list each layer once."]
        if len(set(dropped)) >= layers:
            return [f"{listed} drops all {layers} layers of the model; keep at least one."]
        return []
    count = node.num_layers_to_drop
    if layers < 2:
        return [f"{key}: the model has {layers} layer; depth pruning needs at least 2. Use {key}.method=width."]
    if count is not None and not 1 <= count < layers:
        return [f"{key}.num_layers_to_drop={count} must be between 1 and {layers - 1} (the model has {layers} layers)."]
    return []


def width_problems(node, key: str, numbers: Dict[str, Any]) -> List[str]:
    target = node.target_parameters
    sizes = {name: node[name] for name in WIDTH_FIELDS if node[name] is not None}
    if target is not None and sizes:
        return [
            f"{key}.target_parameters and {key}.{', '.join(sizes)} are both set; give the sizes, or the parameter "
            "count to choose them for you, not both."
        ]
    if target is None and not sizes:
        return [
            f"{key}: method=width needs sizes to keep: set {key}.ffn_hidden_size, {key}.num_heads and/or "
            f"{key}.hidden_size, or {key}.target_parameters."
        ]
    problems = []
    for name, value in sizes.items():
        largest = numbers[WIDTH_FIELDS[name]]
        if not 1 <= value <= largest:
            problems.append(
                f"{key}.{name}={value} must be between 1 and the model's {WIDTH_FIELDS[name]}={largest}: pruning "
                "only removes."
            )
    kv_heads, heads = numbers["num_key_value_heads"], numbers["num_attention_heads"]
    if "num_heads" in sizes and sizes["num_heads"] % kv_heads:
        valid = ", ".join(str(n) for n in range(kv_heads, heads + 1, kv_heads))
        problems.append(
            f"{key}.num_heads={sizes['num_heads']} is not a multiple of the model's num_key_value_heads={kv_heads}: "
            f"every KV group keeps the same number of query heads; choose num_heads from {valid}."
        )
    if target is not None:
        whole = count_parameters(numbers)
        if not 1 <= target < whole:
            problems.append(
                f"{key}.target_parameters={target} must be below the model's {whole:,} parameters (and positive)."
            )
        else:
            smallest = pruned_numbers(numbers, node)
            reached = count_parameters(smallest)
            if reached > target:
                problems.append(
                    f"{key}.target_parameters={target} is out of width pruning's reach: it stops at {reached:,} "
                    f"parameters (ffn_hidden_size={smallest['intermediate_size']}, hidden_size="
                    f"{smallest['hidden_size']}: half of each; num_heads={smallest['num_attention_heads']}: one "
                    f"per KV group). Set {key}.target_parameters to {reached} or more, or drop layers first in a "
                    "method=depth stage."
                )
    return problems


def data_problems(config, key: str) -> List[str]:
    """Calibration runs the model on raw text; ``data=text`` files are read now, so a bad one stops the plan."""
    return raw_text_problems(config.data, (
        f"{key}: pruning calibrates on raw text, data=embedded or data=text (data.paths=[...]), and data="
        f"{config.data.name} holds records of another kind; choose one of those, or name the layers to drop "
        f"with {key}.method=depth {key}.drop_layers=[...] (no calibration)."
    ))


def architecture_problems(config) -> List[str]:
    """The model must have the modules surgery.py cuts (Llama-style decoder layers)."""
    if config.model.path:
        try:
            model_type = read_hf_config(config.model.path)["model_type"]
        except UserError:
            return []  # the planner reports a broken model.path itself
    else:
        model_type = config.model.architecture
    if model_type in ARCHITECTURES:
        return []
    where = f"model.path={config.model.path} is a {model_type} model" if config.model.path else (
        f"model.architecture={model_type}")
    return [f"{where}; technique=prune cuts Llama-architecture models only ({', '.join(ARCHITECTURES)})."]
