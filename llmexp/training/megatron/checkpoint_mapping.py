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
without megatron-core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from llmexp.architecture import architecture
from llmexp.errors import UserError

LAYER_SPECS = ("local", "transformer_engine")

# What the norms are called in each spec (a decoder layer's keys, after ``decoder.layers.{i}.``).
_NORM_KEYS = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "transformer_engine": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}

ChunkId = Tuple[int, int, int]  # (pp_rank, vp_rank, tp_rank): one model chunk of one rank


def layer_numbers(num_layers: int, pp_size: int, pp_rank: int, vp_size: Optional[int] = None,
                  vp_rank: int = 0) -> range:
    """The global decoder layers one model chunk holds, as megatron-core places them.

    Without interleaving, stage ``p`` holds a contiguous run. With ``vp_size`` chunks per stage
    the model is cut into ``pp_size * vp_size`` runs dealt out round-robin: chunk ``v`` of stage
    ``p`` holds run ``v * pp_size + p`` (8 layers, pp 2, vp 2: stage 0 holds [0, 1] and [4, 5]).
    """
    chunks = vp_size or 1
    _check_layer_split(num_layers, pp_size, vp_size)
    per_chunk = num_layers // (pp_size * chunks)
    start = vp_rank * (num_layers // chunks) + pp_rank * per_chunk
    return range(start, start + per_chunk)


@dataclass(frozen=True)
class _Layout:
    """The architecture numbers and the parallel layout, checked to divide."""

    vocab_size: int
    padded_vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    heads: int
    groups: int
    head_dim: int
    tied: bool
    bias: bool
    spec: str
    tp: int
    pp: int
    vp: Optional[int]

    @property
    def chunks_per_stage(self) -> int:
        return self.vp or 1

    def is_first(self, pp_rank: int, vp_rank: int) -> bool:
        return pp_rank == 0 and vp_rank == 0

    def is_last(self, pp_rank: int, vp_rank: int) -> bool:
        return pp_rank == self.pp - 1 and vp_rank == self.chunks_per_stage - 1

    def layers(self, pp_rank: int, vp_rank: int) -> range:
        return layer_numbers(self.num_layers, self.pp, pp_rank, self.vp, vp_rank)

    def chunk_ids(self) -> List[ChunkId]:
        return list(iter_chunk_ids(self.tp, self.pp, self.vp))


def _layout(arch: Any, spec: str, tp: int, pp: int, vp: Optional[int], padded_vocab_size: Optional[int]) -> _Layout:
    if spec not in LAYER_SPECS:
        raise UserError(f"Megatron layer spec {spec!r} is not one of {', '.join(LAYER_SPECS)}; pick one of those.")
    numbers = architecture(arch)
    if padded_vocab_size is None:
        padded_vocab_size = (arch.get("padded_vocab_size") if isinstance(arch, Mapping)
                             else getattr(arch, "padded_vocab_size", None)) or numbers["vocab_size"]
    layout = _Layout(
        vocab_size=numbers["vocab_size"], padded_vocab_size=padded_vocab_size, hidden_size=numbers["hidden_size"],
        intermediate_size=numbers["intermediate_size"], num_layers=numbers["num_layers"],
        heads=numbers["num_attention_heads"], groups=numbers["num_key_value_heads"], head_dim=numbers["head_dim"],
        tied=numbers["tie_word_embeddings"], bias=numbers["attention_bias"], spec=spec, tp=tp, pp=pp,
        vp=None if vp in (None, 1) else vp,
    )
    _check_divisions(layout)
    return layout


def _check_layer_split(num_layers: int, pp_size: int, vp_size: Optional[int]) -> None:
    if pp_size < 1 or (vp_size is not None and vp_size < 1):
        raise UserError(f"parallelism.pp={pp_size} and backend.virtual_pipeline_stages={vp_size}: "
                        "both must be at least 1 (or the stages null).")
    if vp_size not in (None, 1) and pp_size == 1:
        raise UserError(
            f"backend.virtual_pipeline_stages={vp_size} interleaves pipeline stages, and parallelism.pp=1 has one "
            "stage: megatron-core would build every layer in each chunk. Raise parallelism.pp or set "
            "backend.virtual_pipeline_stages=null."
        )
    chunks = pp_size * (vp_size or 1)
    if num_layers % chunks:
        over = f"parallelism.pp={pp_size}" + (f" x backend.virtual_pipeline_stages={vp_size}" if vp_size else "")
        raise UserError(
            f"model.num_layers={num_layers} does not split evenly over {over} = {chunks} model chunks; pick a pp "
            f"(and virtual pipeline stages) whose product divides {num_layers}."
        )


def _check_divisions(layout: _Layout) -> None:
    tp = layout.tp
    if tp < 1:
        raise UserError(f"parallelism.tp={tp}: it must be at least 1.")
    if layout.heads % layout.groups:
        raise UserError(
            f"model.num_attention_heads={layout.heads} is not a multiple of model.num_key_value_heads="
            f"{layout.groups}: every key/value head must serve the same number of query heads."
        )
    for field, value in (("model.num_attention_heads", layout.heads), ("model.intermediate_size",
                                                                         layout.intermediate_size)):
        if value % tp:
            raise UserError(
                f"{field}={value} does not split over parallelism.tp={tp}: megatron-core gives each tensor-"
                f"parallel rank an equal share of whole heads and MLP columns. Pick a tp that divides {value}."
            )
    fused_rows = (layout.heads + 2 * layout.groups) * layout.head_dim
    if (layout.groups % tp and tp % layout.groups) or fused_rows % tp:
        raise UserError(
            f"model.num_key_value_heads={layout.groups} and parallelism.tp={tp}: megatron-core needs the "
            "key/value heads to be a multiple or a divisor of tp (beyond that, ranks share a key/value head). "
            f"Pick a tp that divides {layout.groups} or that {layout.groups} divides."
        )
    if layout.padded_vocab_size < layout.vocab_size or layout.padded_vocab_size % tp:
        raise UserError(
            f"The padded vocabulary ({layout.padded_vocab_size} rows for model.vocab_size={layout.vocab_size}) "
            f"must hold the vocabulary and split over parallelism.tp={tp}; pass padded_vocab_size="
            f"padded_vocab({layout.vocab_size}, {tp}) (megatron's make_vocab_size_divisible_by rounding)."
        )
    _check_layer_split(layout.num_layers, layout.pp, layout.vp)


def _check_ranks(layout: _Layout, tp_rank: int, pp_rank: int, vp_rank: int) -> None:
    for name, rank, size in (("tp_rank", tp_rank, layout.tp), ("pp_rank", pp_rank, layout.pp),
                             ("vp_rank", vp_rank, layout.chunks_per_stage)):
        if not 0 <= rank < size:
            raise ValueError(f"{name}={rank} is outside 0..{size - 1}")


# --- key names ------------------------------------------------------------------------------

def _hf_keys(layout: _Layout) -> List[str]:
    """LlamaForCausalLM's state-dict keys, in its order (lm_head.weight is there even when tied)."""
    keys = ["model.embed_tokens.weight"]
    for i in range(layout.num_layers):
        attention = [f"model.layers.{i}.self_attn.{name}_proj.weight" for name in ("q", "k", "v")]
        if layout.bias:
            attention = [key for name in ("q", "k", "v")
                         for key in (f"model.layers.{i}.self_attn.{name}_proj.weight",
                                     f"model.layers.{i}.self_attn.{name}_proj.bias")]
        keys += attention + [f"model.layers.{i}.{name}" for name in (
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight", "post_attention_layernorm.weight")]
    return keys + ["model.norm.weight", "lm_head.weight"]


@dataclass(frozen=True)
class _LayerKeys:
    """One decoder layer's megatron keys, numbered within its chunk."""

    attention_norm: str
    qkv: str
    qkv_bias: str
    proj: str
    mlp_norm: str
    fc1: str
    fc2: str

    @classmethod
    def of(cls, layout: _Layout, local: int) -> "_LayerKeys":
        prefix = f"decoder.layers.{local}."
        attention_norm, mlp_norm = _NORM_KEYS[layout.spec]
        return cls(*(prefix + name for name in (
            attention_norm, "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
            "self_attention.linear_proj.weight", mlp_norm, "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")))

    def present(self, layout: _Layout) -> List[str]:
        biases = [self.qkv_bias] if layout.bias else []
        return [self.attention_norm, self.qkv, *biases, self.proj, self.mlp_norm, self.fc1, self.fc2]


def _holds_output_layer(layout: _Layout, pp_rank: int, vp_rank: int) -> bool:
    """GPTModel skips the output weight only where it can share the embedding in the same chunk."""
    return layout.is_last(pp_rank, vp_rank) and not (layout.tied and layout.is_first(pp_rank, vp_rank))


def _megatron_keys(layout: _Layout, pp_rank: int, vp_rank: int) -> List[str]:
    keys = ["embedding.word_embeddings.weight"] if layout.is_first(pp_rank, vp_rank) else []
    for local in range(len(layout.layers(pp_rank, vp_rank))):
        keys += _LayerKeys.of(layout, local).present(layout)
    if layout.is_last(pp_rank, vp_rank):
        keys.append("decoder.final_layernorm.weight")
    if _holds_output_layer(layout, pp_rank, vp_rank):
        keys.append("output_layer.weight")
    return keys


# --- tensor pieces ----------------------------------------------------------------------------

def _shard(tensor: torch.Tensor, parts: int, rank: int, dim: int = 0) -> torch.Tensor:
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, rank * size, size).clone()


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q heads of group 0, k 0, v 0, q heads of group 1, k 1, v 1, ...] along dim 0 (weights or biases)."""
    rest = q.shape[1:]
    grouped = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def _unfuse_qkv(qkv: torch.Tensor, layout: _Layout) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = qkv.shape[1:]
    per_group = layout.heads // layout.groups
    grouped = qkv.reshape(layout.groups, (per_group + 2) * layout.head_dim, *rest)
    q, k, v = grouped.split([per_group * layout.head_dim, layout.head_dim, layout.head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def _pad_vocab(weight: torch.Tensor, layout: _Layout) -> torch.Tensor:
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
    layout = _layout(arch, spec, tp_size, pp_size, vp_size, padded_vocab_size)
    _check_ranks(layout, tp_rank, pp_rank, vp_rank)
    _check_hf_keys(hf_state, layout)
    tp, first = layout.tp, layout.is_first(pp_rank, vp_rank)
    state: Dict[str, torch.Tensor] = {}
    if first:
        state["embedding.word_embeddings.weight"] = _shard(_pad_vocab(hf_state["model.embed_tokens.weight"], layout),
                                                           tp, tp_rank)
    for local, number in enumerate(layout.layers(pp_rank, vp_rank)):
        state.update(_layer_to_megatron(hf_state, layout, number, local, tp_rank))
    if layout.is_last(pp_rank, vp_rank):
        state["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"].clone()
    if _holds_output_layer(layout, pp_rank, vp_rank):
        head = hf_state["model.embed_tokens.weight" if layout.tied else "lm_head.weight"]
        state["output_layer.weight"] = _shard(_pad_vocab(head, layout), tp, tp_rank)
    return state


def _check_hf_keys(hf_state: Mapping[str, torch.Tensor], layout: _Layout) -> None:
    expected = set(_hf_keys(layout))
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


def _layer_to_megatron(hf_state: Mapping[str, torch.Tensor], layout: _Layout, number: int, local: int,
                       tp_rank: int) -> Dict[str, torch.Tensor]:
    hf, tp, keys = f"model.layers.{number}.", layout.tp, _LayerKeys.of(layout, local)
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
    layout = _layout(arch, spec, tp_size, pp_size, vp_size, padded)
    _check_chunks(chunks, layout)
    hf: Dict[str, torch.Tensor] = {}
    for pp_rank in range(layout.pp):
        for vp_rank in range(layout.chunks_per_stage):
            shards = [chunks[(pp_rank, vp_rank, tp_rank)] for tp_rank in range(layout.tp)]
            hf.update(_chunk_to_hf(shards, layout, pp_rank, vp_rank))
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] if layout.tied else hf["lm_head.weight"]
    return {key: hf[key] for key in _hf_keys(layout)}


def _check_chunks(chunks: Mapping[ChunkId, Mapping[str, torch.Tensor]], layout: _Layout) -> None:
    expected = layout.chunk_ids()
    missing_chunks = sorted(set(expected) - chunks.keys())
    unknown_chunks = sorted(chunks.keys() - set(expected))
    if missing_chunks or unknown_chunks:
        raise ValueError(f"Model chunks (pp_rank, vp_rank, tp_rank) for tp={layout.tp}, pp={layout.pp}, "
                         f"vp={layout.vp}: missing {missing_chunks or 'none'}, unknown {unknown_chunks or 'none'}.")
    problems = []
    for chunk_id in expected:
        wanted = set(_megatron_keys(layout, chunk_id[0], chunk_id[1]))
        present = {key for key in chunks[chunk_id] if not key.endswith("_extra_state")}
        if wanted != present:
            problems.append(f"chunk {chunk_id}: missing {sorted(wanted - present) or 'none'}, "
                            f"unknown {sorted(present - wanted) or 'none'}")
    if problems:
        raise ValueError("The Megatron states do not match the architecture and layout:\n" + "\n".join(problems))


def _chunk_to_hf(shards: List[Mapping[str, torch.Tensor]], layout: _Layout, pp_rank: int,
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


def _layer_to_hf(shards, joined, layout: _Layout, number: int, local: int) -> Dict[str, torch.Tensor]:
    hf, keys = f"model.layers.{number}.", _LayerKeys.of(layout, local)
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


def iter_chunk_ids(tp_size: int, pp_size: int, vp_size: Optional[int] = None) -> Iterator[ChunkId]:
    """Every (pp_rank, vp_rank, tp_rank) of a layout, in the order megatron_to_hf reads them."""
    for pp_rank in range(pp_size):
        for vp_rank in range(vp_size or 1):
            for tp_rank in range(tp_size):
                yield pp_rank, vp_rank, tp_rank
