"""The architecture numbers of a model, and the counts that follow from them alone.

A Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm) is described by a handful of
numbers (``ARCHITECTURE_NUMBERS``); the planner sizes memory from them, pruning changes them,
megatron's checkpoint mapping checks its layout against them. This module imports nothing of
llmexp, so every layer may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Sequence, Tuple

ARCHITECTURE_NUMBERS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")

# (in_features, out_features) of each linear layer of a Llama-style decoder layer, as PEFT
# names them in ``target_modules``; "all-linear" targets every one.
LINEAR_SHAPES: Dict[str, Callable[[Dict[str, Any]], Tuple[int, int]]] = {
    "q_proj": lambda m: (m["hidden_size"], m["num_attention_heads"] * m["head_dim"]),
    "k_proj": lambda m: (m["hidden_size"], m["num_key_value_heads"] * m["head_dim"]),
    "v_proj": lambda m: (m["hidden_size"], m["num_key_value_heads"] * m["head_dim"]),
    "o_proj": lambda m: (m["num_attention_heads"] * m["head_dim"], m["hidden_size"]),
    "gate_proj": lambda m: (m["hidden_size"], m["intermediate_size"]),
    "up_proj": lambda m: (m["hidden_size"], m["intermediate_size"]),
    "down_proj": lambda m: (m["intermediate_size"], m["hidden_size"]),
}


def architecture(model: Any) -> Dict[str, Any]:
    """Architecture numbers from a dict or a ModelConfig-like object, ``head_dim`` resolved."""
    if isinstance(model, Mapping):
        numbers = {name: model.get(name) for name in ARCHITECTURE_NUMBERS}
    else:
        numbers = {name: getattr(model, name, None) for name in ARCHITECTURE_NUMBERS}
    if numbers["num_key_value_heads"] is None:
        numbers["num_key_value_heads"] = numbers["num_attention_heads"]
    if numbers["head_dim"] is None:
        numbers["head_dim"] = numbers["hidden_size"] // numbers["num_attention_heads"]
    numbers["tie_word_embeddings"] = bool(numbers["tie_word_embeddings"])
    numbers["attention_bias"] = bool(numbers["attention_bias"])
    return numbers


def count_parameters(model_numbers: Any) -> int:
    """Parameters of a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm).

    Embeddings V*H, the LM head V*H unless tied, and per layer: q H*(nh*hd), k and v
    H*(nkv*hd) each, o (nh*hd)*H, biases on q/k/v when ``attention_bias``, the gate/up/down
    MLP 3*H*I and two RMSNorm weights 2*H; then the final norm H.
    """
    m = architecture(model_numbers)
    h, heads, kv_heads, head_dim = (m["hidden_size"], m["num_attention_heads"],
                                    m["num_key_value_heads"], m["head_dim"])
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    if m["attention_bias"]:
        attention += heads * head_dim + 2 * kv_heads * head_dim
    per_layer = attention + 3 * h * m["intermediate_size"] + 2 * h
    embeddings = m["vocab_size"] * h * (1 if m["tie_word_embeddings"] else 2)
    return embeddings + m["num_layers"] * per_layer + h


def matmul_parameters(model_numbers: Any) -> int:
    """Weights that multiply activations: every linear layer of every decoder layer and the LM head (tied or not)."""
    m = architecture(model_numbers)
    per_layer = sum(inputs * outputs for inputs, outputs in (shape(m) for shape in LINEAR_SHAPES.values()))
    return m["num_layers"] * per_layer + m["vocab_size"] * m["hidden_size"]


def training_flops_per_token(model_numbers: Any, seq_len: int) -> int:
    """Training FLOPs per token: ``6·N + 12·L·(heads·head_dim)·T`` (PaLM, Chowdhery et al. 2022, appendix B).

    N: ``matmul_parameters`` (2 FLOPs per weight forward, 4 backward); the second term the
    attention scores and their weighted sum over T positions, which no weight counts. Norms,
    activations and the optimiser are not model FLOPs: MFU counts them as overhead.
    """
    m = architecture(model_numbers)
    return 6 * matmul_parameters(m) + 12 * m["num_layers"] * m["num_attention_heads"] * m["head_dim"] * seq_len


def lora_targets(target_modules: Sequence[str]) -> List[str]:
    """The linear layers a LoRA adapter wraps, by PEFT's names: ``[all-linear]`` is every one of a layer."""
    targets = list(target_modules)
    return list(LINEAR_SHAPES) if targets == ["all-linear"] else targets


def lora_parameters(model: Mapping[str, Any], rank: int, target_modules: Sequence[str]) -> int:
    """LoRA's trainable parameters: rank * (in + out) per adapted linear layer, in every layer (unknown names add none)."""
    widths = sum(sum(LINEAR_SHAPES[name](model)) for name in lora_targets(target_modules) if name in LINEAR_SHAPES)
    return rank * widths * model["num_layers"]
