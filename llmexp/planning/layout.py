"""How a job's devices split a model and its step, and so how many bytes of each part one device holds.

``Layout`` is what ``Technique.memory_per_device`` receives: its methods are the building blocks
every technique's estimate is made of (weights, gradients and optimizer states split over the
model-parallel ranks, a KV cache, the activations kept for backward), so a technique adds only
what is its own (an adapter, a teacher) and the planner names none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

from llmexp.architecture import count_parameters
from llmexp.planning.hardware import (
    ACTIVATION_BYTES, ADAM_MOMENT_BYTES, FP32_BYTES, KV_CACHE_BYTES, MASTER_WEIGHT_BYTES, WEIGHT_BYTES,
)

LAYOUT_FIELDS = ("tp", "pp", "dp", "nodes", "devices_per_node", "micro_batch", "global_batch")

# Activations the torch backend keeps for backward, per token, in values of the activation
# dtype: counted with torch.autograd.graph.saved_tensors_hooks on transformers'
# LlamaForCausalLM (SDPA attention, which keeps no s-by-s scores) at several hidden,
# intermediate, kv and vocabulary sizes, and fitted to within 5%. A decoder layer keeps
# ~9 per hidden unit (norm inputs and outputs, q, rotated q and k, attention output,
# residuals), ~4.4 per MLP unit (gate, up, SiLU, their product) and ~2.25 per k/v unit;
# outside the layers, ~3 per hidden unit (embeddings, final norm) and ~1.1 per vocabulary
# entry (the fp32 logits the loss reads). With activation checkpointing a layer keeps its
# input (1 per hidden unit) and one layer at a time is recomputed in full. Of the 3 outside
# the layers, the embeddings' output is the first pipeline stage's, the final norm's the last's.
LAYER_VALUES_PER_HIDDEN = 9
LAYER_VALUES_PER_INTERMEDIATE = 4.375
LAYER_VALUES_PER_KV = 2.25
CHECKPOINTED_VALUES_PER_HIDDEN = 1
EMBEDDING_VALUES_PER_HIDDEN = 1
FINAL_NORM_VALUES_PER_HIDDEN = 2
LOGIT_VALUES_PER_VOCAB = 1.125

PIPELINE_SCHEDULES = ("1f1b", "gpipe")


def stage_layers(num_layers: int, pp: int) -> List[range]:
    """The decoder layers of each pipeline stage: equal contiguous blocks, stage ``i`` holding ``result[i]``.

    The split must be exact (``llmexp.planning.feasibility.divisibility_problems`` refuses
    ``num_layers % pp`` at plan time), so every stage does the same work and none sets the pace alone.
    """
    if pp < 1 or num_layers % pp:
        raise ValueError(f"num_layers={num_layers} does not split into pp={pp} equal stages")
    per_stage = num_layers // pp
    return [range(i * per_stage, (i + 1) * per_stage) for i in range(pp)]


def stage_ranks(tp: int, pp: int, dp: int, stage: int, stages_outermost: bool) -> List[int]:
    """The global ranks that hold pipeline stage ``stage``, tp innermost.

    ``stages_outermost`` is Megatron's order (tp, then dp, then pp: a stage's ranks are consecutive, so
    consecutive stages sit on different nodes and only the small activations cross between them). The torch
    backend lays out one whole pipeline per data-parallel replica instead (rank = replica*pp*tp + stage*tp + t):
    a replica's stages are consecutive ranks.
    """
    if stages_outermost:
        return list(range(stage * tp * dp, (stage + 1) * tp * dp))
    return [replica * pp * tp + stage * tp + t for replica in range(dp) for t in range(tp)]


def stage_parameters(model: Dict[str, Any], pp: int, stage: int) -> int:
    """Parameters pipeline stage ``stage`` holds: its layers, the embeddings on the first stage, the final
    norm and LM head on the last. Tied embeddings are held by both the first and the last stage (their
    gradients summed between the two), so over all stages they count twice."""
    h, vocab = model["hidden_size"], model["vocab_size"]
    outside = count_parameters({**model, "num_layers": 0})  # embeddings (and an untied head), final norm
    per_layer = (count_parameters(model) - outside) // model["num_layers"]
    held = len(stage_layers(model["num_layers"], pp)[stage]) * per_layer
    if stage == 0:
        held += vocab * h
    if stage == pp - 1:
        held += outside - vocab * h + (vocab * h if model["tie_word_embeddings"] and pp > 1 else 0)
    return held


@dataclass(frozen=True)
class Layout:
    """The parallel layout of a job (``parallelism``) and the shape of its step (micro-batch, sequence length).

    Every count is at least 1, so the arithmetic stays defined where the config's is not
    (``llmexp.planning.feasibility.layout_problems`` refuses those).
    """

    tp: int
    pp: int
    dp: int
    nodes: int
    devices_per_node: int
    micro_batch: int
    global_batch: int
    seq_len: int
    fsdp: bool = False  # weights, grads and optimizer states split over dp too
    distributed_optimizer: bool = False  # megatron's: optimizer states split over dp
    activation_checkpointing: bool = False
    schedule: str = "1f1b"  # the pipeline schedule: how many micro-batches' activations a stage keeps
    stages_outermost: bool = False  # the ranks' order (``stage_ranks``): Megatron's, or the torch backend's
    # The pipeline stage sized and its share of the model's parameters (``for_stage``); None: the busiest
    # stage's activations, with every part of the model split evenly over pp.
    stage: Optional[int] = None
    stage_share: Optional[float] = None

    @classmethod
    def of(cls, cfg) -> "Layout":
        parallelism, backend = cfg.parallelism, cfg.backend
        megatron = backend.name == "megatron"
        return cls(
            **{name: max(1, int(parallelism[name])) for name in LAYOUT_FIELDS},
            seq_len=int(cfg.data.seq_len),
            fsdp=getattr(parallelism.sharding, "value", parallelism.sharding) == "fsdp",
            distributed_optimizer=megatron and bool(backend.get("distributed_optimizer")),
            activation_checkpointing=bool(parallelism.activation_checkpointing),
            stages_outermost=megatron,
            # megatron runs 1F1B whatever the key says; the torch backend runs the one named
            schedule="1f1b" if megatron else parallelism.get("pipeline_schedule", "1f1b"),
        )

    def for_stage(self, model: Dict[str, Any], stage: int) -> "Layout":
        """This layout sizing pipeline stage ``stage`` of ``model`` (its layers must split evenly over pp)."""
        return replace(self, stage=stage, stage_share=stage_parameters(model, self.pp, stage) / count_parameters(model))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch: what a step's activations and caches scale with."""
        return self.seq_len * self.micro_batch

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimiser step on each data-parallel rank: what a pipeline is filled with."""
        return max(1, self.global_batch // (self.micro_batch * self.dp))

    @property
    def bubble_fraction(self) -> float:
        """The share of a step each stage idles while the pipeline fills and drains: (pp-1)/(m+pp-1),
        the same for GPipe and 1F1B (1F1B reorders the backward passes to hold fewer activations)."""
        return (self.pp - 1) / (self.micro_batches + self.pp - 1)

    def ranks_of(self, stage: int) -> List[int]:
        """The global ranks holding pipeline stage ``stage`` (``stage_ranks``)."""
        return stage_ranks(self.tp, self.pp, self.dp, stage, self.stages_outermost)

    @property
    def state_shards(self) -> int:
        """How many ways weights, grads and optimizer states are split: tp*pp, times dp under FSDP."""
        return self.tp * self.pp * (self.dp if self.fsdp else 1)

    def held(self, parameters: int) -> float:
        """The part of a model of ``parameters`` one device holds: the stage's share (``for_stage``, else
        1/pp) split over tp, and over dp under FSDP. Every model a stage holds is split as the trained one."""
        share = 1 / self.pp if self.stage_share is None else self.stage_share
        return parameters * share / (self.tp * (self.dp if self.fsdp else 1))

    def weights(self, parameters: int, precision: str) -> float:
        """``parameters`` held in the run's precision (weights, or their gradients)."""
        return self.held(parameters) * WEIGHT_BYTES[precision]

    def optimizer(self, parameters: int, precision: str) -> float:
        """Adam's two fp32 moments per trained parameter, and an fp32 master copy unless the run is already fp32."""
        per_parameter = ADAM_MOMENT_BYTES + (0 if precision == "fp32" else MASTER_WEIGHT_BYTES)
        return self.held(parameters) * per_parameter / (self.dp if self.distributed_optimizer and not self.fsdp else 1)

    def fp32_values(self, parameters: int) -> float:
        """``parameters`` kept in fp32 whatever the precision (an adapter and its gradients, say)."""
        return self.held(parameters) * FP32_BYTES

    def adam_moments(self, parameters: int) -> float:
        """Adam's two fp32 moments of ``parameters`` trained in fp32 (no master copy to keep)."""
        return self.held(parameters) * ADAM_MOMENT_BYTES

    def kv_cache(self, model: Dict[str, Any], precision: str) -> float:
        """2 (k and v) * layers * kv_heads * head_dim values per token, split over tp (by kv head) and pp (by layer)."""
        return (2 * model["num_layers"] * model["num_key_value_heads"] * model["head_dim"] * self.tokens
                * KV_CACHE_BYTES[precision] / (self.tp * self.pp))

    def activations(self, model: Dict[str, Any], precision: str, sequences_per_example: int = 1) -> float:
        """Activations kept for backward on this layout's pipeline stage (``stage``; None: the busiest).

        Per layer and token the values of ``LAYER_VALUES_PER_*`` in the activation dtype, split
        over tp as sequence parallelism does. A stage keeps the activations of the micro-batches
        it has run forward and not yet backward (``stage_micro_batches``); the first stage's
        include the embeddings' output, the last's the final norm and fp32 logits.
        ``sequences_per_example``: DPO runs a chosen and a rejected sequence per example.
        """
        tokens = self.tokens * sequences_per_example
        h, kv = model["hidden_size"], model["num_key_value_heads"] * model["head_dim"]
        value_bytes = ACTIVATION_BYTES[precision]
        layer_values = (LAYER_VALUES_PER_HIDDEN * h + LAYER_VALUES_PER_INTERMEDIATE * model["intermediate_size"]
                        + LAYER_VALUES_PER_KV * kv)
        full_layer = tokens * layer_values * value_bytes / self.tp
        if self.activation_checkpointing:
            kept_layer = tokens * CHECKPOINTED_VALUES_PER_HIDDEN * h * value_bytes / self.tp
            recompute = full_layer
        else:
            kept_layer, recompute = full_layer, 0
        first = tokens * EMBEDDING_VALUES_PER_HIDDEN * h * value_bytes / self.tp
        last = tokens * (FINAL_NORM_VALUES_PER_HIDDEN * h * value_bytes
                         + LOGIT_VALUES_PER_VOCAB * model["vocab_size"] * FP32_BYTES) / self.tp

        def kept(stage: int) -> float:
            one = (model["num_layers"] / self.pp * kept_layer + (first if stage == 0 else 0)
                   + (last if stage == self.pp - 1 else 0))
            return self.stage_micro_batches(stage) * one

        stages = range(self.pp) if self.stage is None else [self.stage]
        return max(kept(stage) for stage in stages) + recompute

    def stage_micro_batches(self, stage: int) -> int:
        """Micro-batches whose activations pipeline stage ``stage`` holds at once: one without a pipeline;
        under GPipe all of a step's (every forward runs before the first backward); under 1F1B the
        pp - stage a stage runs forward before its first backward, at most the step's micro-batches."""
        if self.pp == 1:
            return 1
        if self.schedule == "gpipe":
            return self.micro_batches
        return min(self.pp - stage, self.micro_batches)

    def inference_memory(self, model: Dict[str, Any], precision: str) -> Dict[str, float]:
        """Weights in the run's precision plus the KV cache; forward activations are transient."""
        return {"weights": self.weights(count_parameters(model), precision),
                "kv_cache": self.kv_cache(model, precision)}

    def training_memory(self, model: Dict[str, Any], precision: str) -> Dict[str, float]:
        """Full training: weights and grads in the run's precision, Adam states, activations of the busiest stage."""
        parameters = count_parameters(model)
        return {
            "weights": self.weights(parameters, precision),
            "gradients": self.weights(parameters, precision),
            "optimizer": self.optimizer(parameters, precision),
            "activations": self.activations(model, precision),
        }
