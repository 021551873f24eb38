"""How much each decoder layer, MLP neuron, query head and hidden channel matters, measured on calibration data.

Layers (depth): ``block`` is 1 - cosine similarity between a layer's input and output
hidden states, the mean over tokens (ShortGPT's block influence, Minitron's depth metric): a
layer that barely changes the residual stream can go. ``perplexity`` is the rise of the
calibration perplexity when that one layer is skipped: slower (a pass per layer), but it
measures the loss directly.

Width (Minitron, Muralidharan et al. 2024): one forward pass with hooks. MLP neurons are
scored by the down_proj input, query heads by the norm of their slice of the o_proj input,
hidden channels by the outputs of every RMSNorm (each layer's two and the final one),
summed over the norms. Activations are aggregated as the paper's best choice: the mean of
|value| over the sequence, then the L2 norm over the batch.

Written here rather than taken from ModelOpt: ``mcore_minitron`` scores Megatron-core models
only (GPU, Transformer Engine), and the hooks in ``modelopt.torch.prune.importance_hooks``
read Megatron's sequence-first layout, score KV groups rather than query heads and cost ~10 s
to import.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

import torch
import torch.nn.functional as F

from llmexp.sdk import evaluating



def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` of the Llama family."""
    return model.model.layers


# Called after each batch of calibration blocks a measure runs through the model: the stage's progress.
OnBatch = Callable[[], None]


def _nothing() -> None:
    pass


def forward_passes(importance: str, layers: int) -> int:
    """Passes over the calibration blocks a depth ``importance`` takes (width scores take one)."""
    return layers + 1 if importance == "perplexity" else 1


def block_importance(model, blocks: torch.Tensor, batch_size: int, on_batch: OnBatch = _nothing) -> List[float]:
    """Per layer, 1 - cosine similarity of its input and output hidden states, the mean over tokens.

    Forward hooks, not ``output_hidden_states``: transformers puts the final norm's output in
    place of the last layer's.
    """
    layers = decoder_layers(model)
    distance = torch.zeros(len(layers), dtype=torch.float64)

    def measure(index: int):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            distance[index] += (1 - F.cosine_similarity(before.float(), after.float(), dim=-1)).sum().item()

        return hook

    with _hooks([layer.register_forward_hook(measure(i), with_kwargs=True) for i, layer in enumerate(layers)]):
        _run(model, blocks, batch_size, on_batch)
    return (distance / blocks.numel()).tolist()


def perplexity_importance(model, blocks: torch.Tensor, batch_size: int, on_batch: OnBatch = _nothing) -> List[float]:
    """Per layer, the calibration perplexity with the layer skipped (output := input) minus the perplexity without."""

    def skip(module, args, kwargs, output):
        before = args[0] if args else kwargs["hidden_states"]
        return (before, *output[1:]) if isinstance(output, tuple) else before

    base = perplexity(model, blocks, batch_size, on_batch)
    rises = []
    for layer in decoder_layers(model):
        with _hooks([layer.register_forward_hook(skip, with_kwargs=True)]):
            rises.append(perplexity(model, blocks, batch_size, on_batch) - base)
    return rises


LAYER_IMPORTANCE: Dict[str, Callable[[torch.nn.Module, torch.Tensor, int, OnBatch], List[float]]] = {
    "block": block_importance,
    "perplexity": perplexity_importance,
}


def perplexity(model, blocks: torch.Tensor, batch_size: int, on_batch: OnBatch = _nothing) -> float:
    """exp of the mean next-token loss over the blocks (all of one length, so rows weigh alike)."""
    total = 0.0
    with evaluating(model):
        for batch in _batches(model, blocks, batch_size, on_batch):
            total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
    return math.exp(total / len(blocks))


def layers_to_drop(importance: List[float], count: int, contiguous: bool) -> List[int]:
    """Indices (from 0) of the ``count`` least important layers, or of the adjacent ``count`` least important in sum."""
    if not contiguous:
        return sorted(sorted(range(len(importance)), key=importance.__getitem__)[:count])
    windows = range(len(importance) - count + 1)
    start = min(windows, key=lambda s: sum(importance[s : s + count]))
    return list(range(start, start + count))


@dataclass
class WidthImportance:
    """Minitron's activation scores: ``neurons`` [layers, ffn], ``heads`` [layers, heads], ``channels`` [hidden]."""

    neurons: torch.Tensor
    heads: torch.Tensor
    channels: torch.Tensor


def width_importance(model, blocks: torch.Tensor, batch_size: int, on_batch: OnBatch = _nothing) -> WidthImportance:
    """Scores of every MLP neuron, query head and hidden channel from one pass over ``blocks``."""
    layers = decoder_layers(model)
    norms = [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    head_dim = layers[0].self_attn.head_dim
    # sums over the batch of squared per-sequence means; their square roots are the scores
    neurons = torch.zeros(len(layers), layers[0].mlp.down_proj.in_features, dtype=torch.float64)
    heads = torch.zeros(len(layers), layers[0].self_attn.o_proj.in_features // head_dim, dtype=torch.float64)
    channels = torch.zeros(len(norms), model.config.hidden_size, dtype=torch.float64)

    def accumulate(into: torch.Tensor, values: torch.Tensor) -> None:
        """``values`` [batch, seq, n]: add the batch's squared means over the sequence of |value|."""
        into += values.float().abs().mean(dim=1).pow(2).sum(dim=0).double().cpu()

    def neuron_hook(index: int):
        return lambda module, args: accumulate(neurons[index], args[0])

    def head_hook(index: int):
        def hook(module, args):
            attention = args[0]
            per_head = attention.reshape(*attention.shape[:-1], -1, head_dim).float().norm(dim=-1)
            accumulate(heads[index], per_head)

        return hook

    def channel_hook(index: int):
        return lambda module, args, output: accumulate(channels[index], output)

    handles = [layer.mlp.down_proj.register_forward_pre_hook(neuron_hook(i)) for i, layer in enumerate(layers)]
    handles += [layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)) for i, layer in enumerate(layers)]
    handles += [norm.register_forward_hook(channel_hook(i)) for i, norm in enumerate(norms)]
    with _hooks(handles):
        _run(model, blocks, batch_size, on_batch)
    return WidthImportance(neurons.sqrt(), heads.sqrt(), channels.sqrt().sum(dim=0))


def _run(model, blocks: torch.Tensor, batch_size: int, on_batch: OnBatch) -> None:
    with evaluating(model):
        for batch in _batches(model, blocks, batch_size, on_batch):
            model(input_ids=batch, use_cache=False)


def _batches(model, blocks: torch.Tensor, batch_size: int, on_batch: OnBatch) -> Iterator[torch.Tensor]:
    """The blocks in batches on the model's device; ``on_batch`` after the caller is done with each."""
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        yield blocks[start : start + batch_size].to(device)
        on_batch()


@contextlib.contextmanager
def _hooks(handles) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
