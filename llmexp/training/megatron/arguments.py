"""Our ``model``, ``parallelism``, ``precision``, ``hardware`` and ``backend`` configs in megatron-core's terms.

Pure Python (no torch or megatron import) so the planner refuses what megatron cannot run
before a job is queued, and the translation of every preset is tested without a GPU.
``llmexp.training.megatron.train`` turns the dictionaries into megatron-core objects: ``transformer``
is ``TransformerConfig``'s keyword arguments, ``parallel_state`` those of
``parallel_state.initialize_model_parallel``, ``ddp`` ``DistributedDataParallelConfig``'s,
``optimizer`` ``OptimizerConfig``'s and ``model`` ``GPTModel``'s besides its config and spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from llmexp.errors import UserError

# Transformer Engine's FP8 recipes (``backend.fp8_recipe``) that need a GPU generation beyond FP8 itself.
FP8_RECIPE_NEEDS = {"mxfp8": "blackwell"}
# Megatron pads the vocabulary so each tensor-parallel rank holds a multiple of this many rows.
VOCAB_DIVISIBLE_BY = 128
# precision -> (params_dtype, bf16, fp16): mixed precision keeps fp32 master weights in the optimizer.
DTYPES = {"fp32": ("fp32", False, False), "bf16": ("bf16", True, False), "fp16": ("fp16", False, True),
          "fp8": ("bf16", True, False), "fp4": ("bf16", True, False)}


@dataclass(frozen=True)
class MegatronArguments:
    transformer: Dict[str, Any]
    model: Dict[str, Any]
    parallel_state: Dict[str, Any]
    ddp: Dict[str, Any]
    optimizer: Dict[str, Any]
    batch: Dict[str, int]  # micro_batch_size, global_batch_size, num_microbatches, data_parallel_size, seq_length
    layer_spec: str  # transformer_engine | local


def megatron_problems(cfg, transformer_engine: Optional[bool] = None) -> List[str]:
    """What megatron-core cannot run in this config, one paragraph each naming the field and the fix.

    ``transformer_engine``: whether TE is installed (None: unknown, as when planning for a
    cluster; only ``transformer_impl=local`` is then known to lack FP8).
    """
    backend, p, hardware = cfg.backend, cfg.parallelism, cfg.hardware
    precision = getattr(cfg.precision, "value", cfg.precision)
    problems = []
    if backend.sequence_parallel and p.tp < 2:
        problems.append(
            f"backend.sequence_parallel=true with parallelism.tp={p.tp} (parallelism={p.name}): sequence parallelism "
            "splits activations over the tensor-parallel ranks, so it needs parallelism.tp of 2 or more; raise "
            "parallelism.tp or set backend.sequence_parallel=false.")
    vp = backend.virtual_pipeline_stages
    if vp is not None:
        problems += _virtual_pipeline_problems(cfg, vp)
    if hardware.accelerator != "gpu":
        problems.append(
            f"backend=megatron with hardware={hardware.name}: megatron-core's GPT model runs on CUDA GPUs only (its "
            "rotary embeddings and RNG tracker call CUDA); choose a GPU preset (hardware=h100, a100_80g, ...) or "
            "train with backend=torch, which runs here.")
    low_precision = precision in ("fp8", "fp4")
    if low_precision and (backend.transformer_impl == "local" or transformer_engine is False):
        why = ("backend.transformer_impl=local" if backend.transformer_impl == "local"
               else "Transformer Engine is not installed")
        problems.append(
            f"precision={precision} on backend=megatron trains through Transformer Engine's kernels and {why}; "
            "install transformer-engine (NVIDIA's PyTorch container has it) with backend.transformer_impl=auto, or "
            "train with precision=bf16 and quantize afterwards (technique=quantize).")
    needs = FP8_RECIPE_NEEDS.get(str(backend.fp8_recipe))
    if precision == "fp8" and needs and hardware.generation != needs:
        problems.append(
            f"backend.fp8_recipe={backend.fp8_recipe} needs {needs.capitalize()} GPUs and hardware={hardware.name} is "
            f"{hardware.generation}; use backend.fp8_recipe=delayed (or tensorwise) or choose hardware=b200.")
    if p.sharding == "fsdp":
        problems.append(
            f"parallelism.sharding=fsdp (parallelism={p.name}) on backend=megatron: Megatron FSDP is not wired into "
            "llmexp's megatron training; use parallelism.sharding=none with backend.distributed_optimizer=true, which "
            "splits the optimizer states and fp32 master weights over dp (ZeRO-1), or backend=torch for FSDP2.")
    return problems


def _virtual_pipeline_problems(cfg, vp: int) -> List[str]:
    p, layers = cfg.parallelism, cfg.model.num_layers
    if vp < 2:
        return [f"backend.virtual_pipeline_stages={vp}: a pipeline rank holds 2 or more model chunks when it is set; "
                "set it to 2 or more, or to null for one chunk per rank."]
    if p.pp < 2:
        return [f"backend.virtual_pipeline_stages={vp} with parallelism.pp={p.pp} (parallelism={p.name}): virtual "
                "stages interleave the chunks of several pipeline ranks, so they need parallelism.pp of 2 or more; "
                "raise parallelism.pp or set backend.virtual_pipeline_stages=null."]
    problems = []
    if layers % (p.pp * vp):
        choices = [str(d) for d in range(2, layers // p.pp + 1) if layers % (p.pp * d) == 0]
        problems.append(
            f"model.num_layers={layers} is not divisible by parallelism.pp*backend.virtual_pipeline_stages = "
            f"{p.pp}*{vp}; every model chunk needs equal whole layers — choose backend.virtual_pipeline_stages from "
            f"{', '.join(choices) or 'none (set it to null)'}.")
    microbatches = p.global_batch // max(1, p.micro_batch * p.dp)
    if microbatches < p.pp:
        problems.append(
            f"backend.virtual_pipeline_stages={vp} needs at least parallelism.pp={p.pp} micro-batches per step, and "
            f"parallelism.global_batch/(micro_batch*dp) = {p.global_batch}/({p.micro_batch}*{p.dp}) = {microbatches}; "
            f"raise parallelism.global_batch to {p.pp * p.micro_batch * p.dp} or more.")
    return problems


def translate(cfg, node=None, transformer_engine: bool = False, model=None) -> MegatronArguments:
    """megatron-core's arguments for ``cfg`` (and the training technique ``node``, for the optimizer).

    ``model``: the architecture when it is not ``cfg.model`` (a checkpoint's own numbers), with
    ModelConfig's attribute names. Raises ``UserError`` with every problem of
    ``megatron_problems`` when there is one.
    """
    problems = megatron_problems(cfg, transformer_engine)
    if problems:
        raise UserError(" ".join(problems))
    backend, p, m = cfg.backend, cfg.parallelism, (model if model is not None else cfg.model)
    precision = getattr(cfg.precision, "value", cfg.precision)
    params_dtype, bf16, fp16 = DTYPES[precision]
    te = backend.transformer_impl == "transformer_engine" or (backend.transformer_impl == "auto" and transformer_engine)
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    transformer = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 holds [gate; up]
        activation_func="silu",
        add_bias_linear=False,
        add_qkv_bias=m.attention_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        # fused kernels come with Transformer Engine; the local spec runs plain PyTorch
        bias_activation_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=te,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=backend.virtual_pipeline_stages,
        sequence_parallel=backend.sequence_parallel,
        context_parallel_size=1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        fp8="hybrid" if precision == "fp8" else None,  # E4M3 forward, E5M2 gradients
        fp8_recipe=str(backend.fp8_recipe) if precision == "fp8" else None,
        fp4="e2m1" if precision == "fp4" else None,
        fp4_recipe="nvfp4" if precision == "fp4" else None,
        recompute_granularity="full" if p.activation_checkpointing else None,
        recompute_method="uniform" if p.activation_checkpointing else None,
        recompute_num_layers=1 if p.activation_checkpointing else None,
    )
    gpt = dict(
        vocab_size=padded_vocab(m.vocab_size, p.tp),
        max_sequence_length=m.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tie_word_embeddings,
    )
    parallel_state = dict(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=backend.virtual_pipeline_stages,
    )
    ddp = dict(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=backend.overlap_grad_reduce,
        use_distributed_optimizer=backend.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    batch = dict(
        micro_batch_size=p.micro_batch,
        global_batch_size=p.global_batch,
        num_microbatches=p.global_batch // (p.micro_batch * p.dp),
        data_parallel_size=p.dp,
        seq_length=cfg.data.seq_len,
    )
    return MegatronArguments(transformer, gpt, parallel_state, ddp, _optimizer(node, params_dtype, bf16, fp16,
                                                                                 backend), batch,
                             "transformer_engine" if te else "local")


def padded_vocab(vocab_size: int, tp_size: int, make_vocab_size_divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """The embedding rows megatron allocates: the vocabulary rounded up to a multiple of divisor * tp."""
    multiple = make_vocab_size_divisible_by * tp_size
    return math.ceil(vocab_size / multiple) * multiple


def _optimizer(node, params_dtype: str, bf16: bool, fp16: bool, backend) -> Dict[str, Any]:
    """AdamW with the technique's settings; the learning rate is set each step (warm-up + cosine, as on torch)."""
    if node is None:
        return {}
    return dict(
        optimizer="adam",  # megatron's adam is AdamW: decoupled weight decay
        lr=node.lr,
        min_lr=node.lr * node.min_lr_ratio,
        weight_decay=node.weight_decay,
        adam_beta1=node.beta1,
        adam_beta2=node.beta2,
        clip_grad=node.grad_clip,
        bf16=bf16,
        fp16=fp16,
        params_dtype=params_dtype,
        use_distributed_optimizer=backend.distributed_optimizer,
    )
