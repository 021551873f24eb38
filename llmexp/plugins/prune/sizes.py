"""The architecture numbers a prune node makes of a model: what the plan follows through the pipeline and what
the surgery cuts to. Pure Python."""

from __future__ import annotations

import math
from typing import Any, Dict

from llmexp.sdk import architecture, count_parameters


def pruned_numbers(model_numbers: Any, node: Any) -> Dict[str, Any]:
    """Architecture numbers (``llmexp.architecture.architecture``) of what a prune node makes of a model with
    ``model_numbers``.

    ``method=depth``: fewer layers, by the length of ``drop_layers`` or by ``num_layers_to_drop``
    (unset: a quarter of them, rounded half up). ``method=width``: ``ffn_hidden_size``,
    ``num_heads`` and ``hidden_size`` where set; with ``target_parameters``, the sizes this rule
    reaches: shrink the MLP, then the hidden size (each to the next lower multiple of 8, down
    to half its size), then the query heads (one per KV group at a time, down to one per
    group), each only until the count is at or below the target. MLP and hidden channels go
    first because Minitron (Muralidharan et al. 2024) found them cheaper to prune than heads.
    Where the rule cannot reach the target, the smallest sizes it allows are returned.
    """
    numbers = architecture(model_numbers)
    if node.get("method", "depth") == "depth":
        dropped = node.get("drop_layers")
        count = len(set(dropped)) if dropped else node.get("num_layers_to_drop")
        if count is None:
            count = math.floor(numbers["num_layers"] / 4 + 0.5)
        return {**numbers, "num_layers": numbers["num_layers"] - count}
    target = node.get("target_parameters")
    if target is None:
        sizes = {"intermediate_size": "ffn_hidden_size", "num_attention_heads": "num_heads",
                 "hidden_size": "hidden_size"}
        return {**numbers, **{ours: node[key] for ours, key in sizes.items() if node.get(key) is not None}}
    kv_heads = numbers["num_key_value_heads"]
    steps = (("intermediate_size", 8, numbers["intermediate_size"] // 2),
             ("hidden_size", 8, numbers["hidden_size"] // 2),
             ("num_attention_heads", kv_heads, kv_heads))
    for name, step, floor in steps:
        while count_parameters(numbers) > target and (numbers[name] - 1) // step * step >= max(floor, step):
            numbers[name] = (numbers[name] - 1) // step * step
    return numbers
