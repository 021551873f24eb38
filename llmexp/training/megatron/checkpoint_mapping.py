"""Hugging Face Llama weights <-> megatron-core ``GPTModel`` state dicts, one per rank and model chunk.

A megatron-core GPT model splits what a Llama keeps apart and stores it per rank:

- q, k and v are one ``linear_qkv`` weight, grouped per query group: for each of the
  ``num_key_value_heads`` groups, that group's query heads, then its key head, then its value
  head (the layout ``SelfAttention.get_query_key_value_tensors`` splits). Tensor parallelism
  gives each rank a contiguous slice of it: whole groups, or, with more ranks than key/value
  heads, part of one group (megatron then gathers the group); the biases (``attention_bias``,
  Qwen2) follow.
- gate and up are one ``linear_fc1`` = [gate; up]. Each rank holds [its slice of gate; its slice
  of up], not a contiguous slice of the fused weight: splitting [gate; up] in halves would hand
  rank 0 all of gate and rank 1 all of up, and SiLU(gate) * up would pair the wrong columns.
- column-parallel weights (``linear_qkv``, ``linear_fc1``) split their output rows,
  row-parallel ones (``linear_proj``, ``linear_fc2``) their input columns; embedding and output
  layer split vocabulary rows, after padding the vocabulary with zero rows to
  ``padded_vocab_size`` (megatron rounds it up to a multiple of
  ``make_vocab_size_divisible_by * tp``; see ``llmexp.training.megatron.arguments.padded_vocab``); norms are whole on every rank.
- pipeline stages (and, interleaved, virtual stages) hold runs of layers numbered from 0 in
  each chunk; the embedding lives in the very first chunk, the final norm and output layer in
  the very last. With tied embeddings a model on one stage has no output layer weight; with
  several stages the last one keeps a copy of the embedding as its output layer weight.
- the ``transformer_engine`` layer spec fuses each RMSNorm into the linear layer after it
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); the ``local`` spec keeps
  ``input_layernorm`` and ``pre_mlp_layernorm`` modules.

RoPE needs no permutation: megatron's non-interleaved rotary embedding rotates halves, as
transformers' Llama does. Only torch is imported here, so the mapping can run (and be tested)
without megatron-core. Which keys each chunk holds, and the checks that the layout divides, are
``llmexp.training.megatron.shard_layout``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch

from llmexp.training.megatron.shard_layout import (
    ChunkId, LayerKeys, ShardLayout, check_ranks, hf_keys, holds_output_layer, megatron_keys, shard_layout,
)

# --- tensor pieces ----------------------------------------------------------------------------

def _shard(tensor: torch.Tensor, parts: int, rank: int, dim: int = 0) -> torch.Tensor:
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, rank * size, size).clone()


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q heads of group 0, k 0, v 0, q heads of group 1, k 1, v 1, ...] along dim 0 (weights or biases)."""
    rest = q.shape[1:]
    grouped = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def _unfuse_qkv(qkv: torch.Tensor, layout: ShardLayout) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = qkv.shape[1:]
    per_group = layout.heads // layout.groups
    grouped = qkv.reshape(layout.groups, (per_group + 2) * layout.head_dim, *rest)
    q, k, v = grouped.split([per_group * layout.head_dim, layout.head_dim, layout.head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def _pad_vocab(weight: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    missing = layout.padded_vocab_size - weight.shape[0]
    return torch.cat([weight, weight.new_zeros(missing, *weight.shape[1:])]) if missing else weight


# --- HF -> megatron -------------------------------------------------------------------------

def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], arch: Any, *, spec: str = "local", tp_size: int = 1,
                   tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0, vp_size: Optional[int] = None,
                   vp_rank: int = 0, padded_vocab_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The state dict of model chunk ``vp_rank`` of rank (``tp_rank``, ``pp_rank``), from a LlamaForCausalLM's.

    ``arch``: our model numbers (a ModelConfig or mapping); ``padded_vocab_size`` (else
    ``arch["padded_vocab_size"]``, else the vocabulary itself) is the embedding's row count in megatron.
    Layers are numbered from 0 within the chunk, as its ``GPTModel`` numbers them.
    """
    layout = shard_layout(arch, spec, tp_size, pp_size, vp_size, padded_vocab_size)
    check_ranks(layout, tp_rank, pp_rank, vp_rank)
    _checkhf_keys(hf_state, layout)
    tp, first = layout.tp, layout.is_first(pp_rank, vp_rank)
    state: Dict[str, torch.Tensor] = {}
    if first:
        state["embedding.word_embeddings.weight"] = _shard(_pad_vocab(hf_state["model.embed_tokens.weight"], layout),
                                                           tp, tp_rank)
    for local, number in enumerate(layout.layers(pp_rank, vp_rank)):
        state.update(_layer_to_megatron(hf_state, layout, number, local, tp_rank))
    if layout.is_last(pp_rank, vp_rank):
        state["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"].clone()
    if holds_output_layer(layout, pp_rank, vp_rank):
        head = hf_state["model.embed_tokens.weight" if layout.tied else "lm_head.weight"]
        state["output_layer.weight"] = _shard(_pad_vocab(head, layout), tp, tp_rank)
    return state


def _checkhf_keys(hf_state: Mapping[str, torch.Tensor], layout: ShardLayout) -> None:
    expected = set(hf_keys(layout))
    optional = {"lm_head.weight"} if layout.tied else set()
    missing = sorted(expected - optional - hf_state.keys())
    unknown = sorted(hf_state.keys() - expected)
    if missing or unknown:
        hint = ""
        if any(key.endswith("o_proj.bias") for key in unknown):
            hint = (" (megatron-core's GPT layer takes q/k/v biases through add_qkv_bias, but an o_proj bias "
                    "only with biases on every linear layer, which Llama does not have)")
        raise ValueError(f"The Hugging Face state does not match the architecture: missing {missing or 'none'}, "
                         f"unknown {unknown or 'none'}{hint}.")


def _layer_to_megatron(hf_state: Mapping[str, torch.Tensor], layout: ShardLayout, number: int, local: int,
                       tp_rank: int) -> Dict[str, torch.Tensor]:
    hf, tp, keys = f"model.layers.{number}.", layout.tp, LayerKeys.of(layout, local)
    q, k, v = (hf_state[f"{hf}self_attn.{name}_proj.weight"] for name in ("q", "k", "v"))
    state = {
        keys.attention_norm: hf_state[hf + "input_layernorm.weight"].clone(),
        keys.qkv: _shard(_fuse_qkv(q, k, v, layout.groups), tp, tp_rank),
        keys.proj: _shard(hf_state[hf + "self_attn.o_proj.weight"], tp, tp_rank, dim=1),
        keys.mlp_norm: hf_state[hf + "post_attention_layernorm.weight"].clone(),
        keys.fc1: torch.cat([_shard(hf_state[hf + "mlp.gate_proj.weight"], tp, tp_rank),
                             _shard(hf_state[hf + "mlp.up_proj.weight"], tp, tp_rank)]),
        keys.fc2: _shard(hf_state[hf + "mlp.down_proj.weight"], tp, tp_rank, dim=1),
    }
    if layout.bias:
        biases = (hf_state[f"{hf}self_attn.{name}_proj.bias"] for name in ("q", "k", "v"))
        state[keys.qkv_bias] = _shard(_fuse_qkv(*biases, layout.groups), tp, tp_rank)
    return {key: state[key] for key in keys.present(layout)}


# --- megatron -> HF -------------------------------------------------------------------------

def megatron_to_hf(chunks: Mapping[ChunkId, Mapping[str, torch.Tensor]], arch: Any, *, spec: str = "local",
                   tp_size: int, pp_size: int, vp_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict from every model chunk's, keyed by (pp_rank, vp_rank, tp_rank).

    ``vp_rank`` is 0 without interleaving. ``_extra_state`` entries are ignored; the vocabulary
    padding is cut off. Keys and order are LlamaForCausalLM.state_dict()'s: with tied embeddings
    ``lm_head.weight`` is the embedding tensor itself, as there.
    """
    first = chunks.get((0, 0, 0), {}).get("embedding.word_embeddings.weight")
    padded = first.shape[0] * tp_size if first is not None else None  # else _check_chunks names the missing key
    layout = shard_layout(arch, spec, tp_size, pp_size, vp_size, padded)
    _check_chunks(chunks, layout)
    hf: Dict[str, torch.Tensor] = {}
    for pp_rank in range(layout.pp):
        for vp_rank in range(layout.chunks_per_stage):
            shards = [chunks[(pp_rank, vp_rank, tp_rank)] for tp_rank in range(layout.tp)]
            hf.update(_chunk_to_hf(shards, layout, pp_rank, vp_rank))
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] if layout.tied else hf["lm_head.weight"]
    return {key: hf[key] for key in hf_keys(layout)}


def _check_chunks(chunks: Mapping[ChunkId, Mapping[str, torch.Tensor]], layout: ShardLayout) -> None:
    expected = layout.chunk_ids()
    missing_chunks = sorted(set(expected) - chunks.keys())
    unknown_chunks = sorted(chunks.keys() - set(expected))
    if missing_chunks or unknown_chunks:
        raise ValueError(f"Model chunks (pp_rank, vp_rank, tp_rank) for tp={layout.tp}, pp={layout.pp}, "
                         f"vp={layout.vp}: missing {missing_chunks or 'none'}, unknown {unknown_chunks or 'none'}.")
    problems = []
    for chunk_id in expected:
        wanted = set(megatron_keys(layout, chunk_id[0], chunk_id[1]))
        present = {key for key in chunks[chunk_id] if not key.endswith("_extra_state")}
        if wanted != present:
            problems.append(f"chunk {chunk_id}: missing {sorted(wanted - present) or 'none'}, "
                            f"unknown {sorted(present - wanted) or 'none'}")
    if problems:
        raise ValueError("The Megatron states do not match the architecture and layout:\n" + "\n".join(problems))


def _chunk_to_hf(shards: List[Mapping[str, torch.Tensor]], layout: ShardLayout, pp_rank: int,
                 vp_rank: int) -> Dict[str, torch.Tensor]:
    def joined(key: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([shard[key] for shard in shards], dim=dim)

    hf: Dict[str, torch.Tensor] = {}
    if layout.is_first(pp_rank, vp_rank):
        hf["model.embed_tokens.weight"] = joined("embedding.word_embeddings.weight")[:layout.vocab_size].clone()
    for local, number in enumerate(layout.layers(pp_rank, vp_rank)):
        hf.update(_layer_to_hf(shards, joined, layout, number, local))
    if layout.is_last(pp_rank, vp_rank):
        hf["model.norm.weight"] = shards[0]["decoder.final_layernorm.weight"].clone()
        if not layout.tied:
            hf["lm_head.weight"] = joined("output_layer.weight")[:layout.vocab_size].clone()
    return hf


def _layer_to_hf(shards, joined, layout: ShardLayout, number: int, local: int) -> Dict[str, torch.Tensor]:
    hf, keys = f"model.layers.{number}.", LayerKeys.of(layout, local)
    q, k, v = _unfuse_qkv(joined(keys.qkv), layout)
    gates, ups = zip(*(shard[keys.fc1].chunk(2) for shard in shards))
    state = {
        hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v,
        hf + "self_attn.o_proj.weight": joined(keys.proj, dim=1),
        hf + "mlp.gate_proj.weight": torch.cat(gates), hf + "mlp.up_proj.weight": torch.cat(ups),
        hf + "mlp.down_proj.weight": joined(keys.fc2, dim=1),
        hf + "input_layernorm.weight": shards[0][keys.attention_norm].clone(),
        hf + "post_attention_layernorm.weight": shards[0][keys.mlp_norm].clone(),
    }
    if layout.bias:
        q_bias, k_bias, v_bias = _unfuse_qkv(joined(keys.qkv_bias), layout)
        state.update({hf + "self_attn.q_proj.bias": q_bias, hf + "self_attn.k_proj.bias": k_bias,
                      hf + "self_attn.v_proj.bias": v_bias})
    return state


def check_against_model(mapped: Mapping[str, torch.Tensor], model_state: Mapping[str, Any]) -> None:
    """Raise ValueError listing every key missing, unexpected or shaped differently from ``model_state``.

    ``model_state`` is a megatron model's ``state_dict()``; its ``_extra_state`` entries
    (Transformer Engine's FP8 metadata, None in local layers) carry no weights and are skipped.
    """
    model = {key: value for key, value in model_state.items() if not key.endswith("_extra_state")}
    missing = sorted(model.keys() - mapped.keys())
    unexpected = sorted(mapped.keys() - model.keys())
    shapes = [f"{key}: mapped {tuple(mapped[key].shape)}, model {tuple(model[key].shape)}"
              for key in model if key in mapped and tuple(mapped[key].shape) != tuple(model[key].shape)]
    if missing or unexpected or shapes:
        lines = [f"missing (in the model, not mapped): {key}" for key in missing]
        lines += [f"unexpected (mapped, not in the model): {key}" for key in unexpected]
        lines += [f"shape differs: {line}" for line in shapes]
        raise ValueError("The mapped state does not fit the model:\n" + "\n".join(lines))
