"""How a job's devices split a model and its step, and so how many bytes of each part one device holds.

``Layout`` is what ``Technique.memory_per_device`` receives: its methods are the building blocks
every technique's estimate is made of (weights, gradients and optimizer states split over the
model-parallel ranks, a KV cache, the activations kept for backward), so a technique adds only
what is its own (an adapter, a teacher) and the planner names none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

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
# input (1 per hidden unit) and one layer at a time is recomputed in full.
LAYER_VALUES_PER_HIDDEN = 9
LAYER_VALUES_PER_INTERMEDIATE = 4.375
LAYER_VALUES_PER_KV = 2.25
CHECKPOINTED_VALUES_PER_HIDDEN = 1
OUTSIDE_VALUES_PER_HIDDEN = 3
LOGIT_VALUES_PER_VOCAB = 1.125


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

    @classmethod
    def of(cls, cfg) -> "Layout":
        parallelism, backend = cfg.parallelism, cfg.backend
        return cls(
            **{name: max(1, int(parallelism[name])) for name in LAYOUT_FIELDS},
            seq_len=int(cfg.data.seq_len),
            fsdp=getattr(parallelism.sharding, "value", parallelism.sharding) == "fsdp",
            distributed_optimizer=backend.name == "megatron" and bool(backend.get("distributed_optimizer")),
            activation_checkpointing=bool(parallelism.activation_checkpointing),
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch: what a step's activations and caches scale with."""
        return self.seq_len * self.micro_batch

    @property
    def state_shards(self) -> int:
        """How many ways weights, grads and optimizer states are split: tp*pp, times dp under FSDP."""
        return self.tp * self.pp * (self.dp if self.fsdp else 1)

    def weights(self, parameters: int, precision: str) -> float:
        """``parameters`` held in the run's precision (weights, or their gradients)."""
        return parameters * WEIGHT_BYTES[precision] / self.state_shards

    def optimizer(self, parameters: int, precision: str) -> float:
        """Adam's two fp32 moments per trained parameter, and an fp32 master copy unless the run is already fp32."""
        per_parameter = ADAM_MOMENT_BYTES + (0 if precision == "fp32" else MASTER_WEIGHT_BYTES)
        shards = self.state_shards * (self.dp if self.distributed_optimizer and not self.fsdp else 1)
        return parameters * per_parameter / shards

    def fp32_values(self, parameters: int) -> float:
        """``parameters`` kept in fp32 whatever the precision (an adapter and its gradients, say)."""
        return parameters * FP32_BYTES / self.state_shards

    def adam_moments(self, parameters: int) -> float:
        """Adam's two fp32 moments of ``parameters`` trained in fp32 (no master copy to keep)."""
        return parameters * ADAM_MOMENT_BYTES / self.state_shards

    def kv_cache(self, model: Dict[str, Any], precision: str) -> float:
        """2 (k and v) * layers * kv_heads * head_dim values per token, split over tp (by kv head) and pp (by layer)."""
        return (2 * model["num_layers"] * model["num_key_value_heads"] * model["head_dim"] * self.tokens
                * KV_CACHE_BYTES[precision] / (self.tp * self.pp))

    def activations(self, model: Dict[str, Any], precision: str, sequences_per_example: int = 1) -> float:
        """Activations kept for backward on the busiest pipeline stage.

        Per layer and token the values of ``LAYER_VALUES_PER_*`` in the activation dtype, split
        over tp as sequence parallelism does. Under the 1F1B schedule the first stage holds
        min(pp, micro-batches per step) micro-batches of its layers; the last holds one plus
        the embeddings, final norm and fp32 logits. ``sequences_per_example``: DPO runs a chosen
        and a rejected sequence per example.
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
        outside = tokens * (OUTSIDE_VALUES_PER_HIDDEN * h * value_bytes
                            + LOGIT_VALUES_PER_VOCAB * model["vocab_size"] * FP32_BYTES) / self.tp
        stage_layers = model["num_layers"] / self.pp
        micro_batches = max(1, self.global_batch // (self.micro_batch * self.dp))
        first_stage = stage_layers * min(self.pp, micro_batches) * kept_layer
        last_stage = stage_layers * kept_layer + outside
        return max(first_stage, last_stage) + recompute

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
