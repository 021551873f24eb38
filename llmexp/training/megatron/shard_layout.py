"""Which weights each rank's model chunk holds: the parallel layout of a model, checked to divide, and the keys on
either side (Hugging Face Llama's, megatron-core GPT's per chunk).

``llmexp.training.megatron.checkpoint_mapping`` moves the tensors along this layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

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
class ShardLayout:
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


def shard_layout(arch: Any, spec: str, tp: int, pp: int, vp: Optional[int], padded_vocab_size: Optional[int]) -> ShardLayout:
    if spec not in LAYER_SPECS:
        raise UserError(f"Megatron layer spec {spec!r} is not one of {', '.join(LAYER_SPECS)}; pick one of those.")
    numbers = architecture(arch)
    if padded_vocab_size is None:
        padded_vocab_size = (arch.get("padded_vocab_size") if isinstance(arch, Mapping)
                             else getattr(arch, "padded_vocab_size", None)) or numbers["vocab_size"]
    layout = ShardLayout(
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


def _check_divisions(layout: ShardLayout) -> None:
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


def check_ranks(layout: ShardLayout, tp_rank: int, pp_rank: int, vp_rank: int) -> None:
    for name, rank, size in (("tp_rank", tp_rank, layout.tp), ("pp_rank", pp_rank, layout.pp),
                             ("vp_rank", vp_rank, layout.chunks_per_stage)):
        if not 0 <= rank < size:
            raise ValueError(f"{name}={rank} is outside 0..{size - 1}")


# --- key names ------------------------------------------------------------------------------

def hf_keys(layout: ShardLayout) -> List[str]:
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
class LayerKeys:
    """One decoder layer's megatron keys, numbered within its chunk."""

    attention_norm: str
    qkv: str
    qkv_bias: str
    proj: str
    mlp_norm: str
    fc1: str
    fc2: str

    @classmethod
    def of(cls, layout: ShardLayout, local: int) -> "LayerKeys":
        prefix = f"decoder.layers.{local}."
        attention_norm, mlp_norm = _NORM_KEYS[layout.spec]
        return cls(*(prefix + name for name in (
            attention_norm, "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
            "self_attention.linear_proj.weight", mlp_norm, "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")))

    def present(self, layout: ShardLayout) -> List[str]:
        biases = [self.qkv_bias] if layout.bias else []
        return [self.attention_norm, self.qkv, *biases, self.proj, self.mlp_norm, self.fc1, self.fc2]


def holds_output_layer(layout: ShardLayout, pp_rank: int, vp_rank: int) -> bool:
    """GPTModel skips the output weight only where it can share the embedding in the same chunk."""
    return layout.is_last(pp_rank, vp_rank) and not (layout.tied and layout.is_first(pp_rank, vp_rank))


def megatron_keys(layout: ShardLayout, pp_rank: int, vp_rank: int) -> List[str]:
    keys = ["embedding.word_embeddings.weight"] if layout.is_first(pp_rank, vp_rank) else []
    for local in range(len(layout.layers(pp_rank, vp_rank))):
        keys += LayerKeys.of(layout, local).present(layout)
    if layout.is_last(pp_rank, vp_rank):
        keys.append("decoder.final_layernorm.weight")
    if holds_output_layer(layout, pp_rank, vp_rank):
        keys.append("output_layer.weight")
    return keys


def iter_chunk_ids(tp_size: int, pp_size: int, vp_size: Optional[int] = None) -> Iterator[ChunkId]:
    """Every (pp_rank, vp_rank, tp_rank) of a layout, in the order megatron_to_hf reads them."""
    for pp_rank in range(pp_size):
        for vp_rank in range(vp_size or 1):
            for tp_rank in range(tp_size):
                yield pp_rank, vp_rank, tp_rank
