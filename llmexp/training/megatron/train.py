"""A training technique's steps on megatron-core (``backend=megatron``), from and back to a Hugging Face model.

The technique hands over the same things it gives ``llmexp.training.loop.train``: a Hugging Face
model, its examples and their collate function. Here the weights move into megatron-core GPT
chunks (``checkpoint_mapping``: this rank's tensor-parallel shard of its pipeline stage's
layers, one chunk per virtual stage), train with megatron's pipeline schedules, distributed
data parallel and optimizer, and come back into the Hugging Face model, so every later stage
(evaluation, quantization, export) sees the model it would see after the torch backend.

Same recipe as on torch: the same example order (``llmexp.training.loop.data_order``) split the
same way over data-parallel ranks, AdamW with the warm-up + cosine schedule, gradient
clipping, and a step's loss as the mean of its micro-batches' mean token losses. Megatron
computes next-token loss only: a batch is a tensor of token ids (pretraining) or a mapping
with ``input_ids`` and ``labels`` (-100 where no loss is taken: SFT's prompt and padding).
Needs CUDA: megatron-core's GPT model calls it in its rotary embeddings and RNG tracker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from llmexp.training import distributed
from llmexp.machine.backends import importable
from llmexp.errors import UserError
from llmexp.training.megatron import arguments as megatron_arguments
from llmexp.training.megatron import bridge, checkpoint_mapping
from llmexp.techniques.contract import StageContext

IGNORE_INDEX = -100


def require_megatron(cfg) -> None:
    """The run-time half of the planner's checks: megatron-core installed and a CUDA GPU present."""
    if not importable("megatron.core"):
        raise UserError(
            "backend=megatron needs megatron-core, which is not installed here: pip install 'llmexp[megatron]' "
            "(Transformer Engine, for FP8 and the fused layer spec, comes with NVIDIA's PyTorch container), or train "
            "with backend=torch.")
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"backend=megatron needs a CUDA GPU and this machine has none (hardware={cfg.hardware.name}); run it on a "
            "GPU node (hydra/launcher=slurm cluster=...), or train here with backend=torch hardware=cpu.")


def transformer_engine_installed() -> bool:
    return importable("transformer_engine")


def train(ctx: StageContext, model, train_data: Sequence, collate: Callable,
          val_data: Optional[Sequence] = None, shuffle: bool = True) -> Dict[str, float]:
    """Train the Hugging Face ``model`` in place for ``max_steps`` optimiser steps; return the same figures as torch's.

    ``val_data`` is scored after the last step when the technique validates (``val_every``).
    """
    import torch

    from llmexp.training.loop import data_order, warmup_cosine

    cfg, tcfg = ctx.config, ctx.stage_config
    require_megatron(cfg)
    args = megatron_arguments.translate(cfg, tcfg, transformer_engine=transformer_engine_installed(),
                                        model=model_numbers(model))
    lead = distributed.is_rank_zero()
    with _process_group():
        from megatron.core import parallel_state

        _initialize(args, cfg.seed)
        try:
            chunks, config, converter = _build_chunks(args, model, ctx.stage_dir / "bridge_input")
            optimizer = _optimizer(args, chunks, config)
            batch = args.batch
            steps, micro = tcfg.max_steps, batch["micro_batch_size"]
            order = data_order(len(train_data), steps * batch["global_batch_size"], cfg.seed, shuffle)
            dp_rank, dp = parallel_state.get_data_parallel_rank(), batch["data_parallel_size"]
            per_step = batch["num_microbatches"] * dp
            log_path = ctx.stage_dir / "train_log.jsonl"
            if lead:
                ctx.stage_dir.mkdir(parents=True, exist_ok=True)
                log_path.write_text("")
            torch.cuda.reset_peak_memory_stats()
            losses: List[float] = []
            tokens = 0
            start = time.perf_counter()
            for step in range(steps):
                lr = tcfg.lr * warmup_cosine(step, tcfg.warmup_steps, steps, tcfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                indices = [step * per_step + k * dp + dp_rank for k in range(batch["num_microbatches"])]
                micro_batches = [collate([train_data[int(i)] for i in order[b * micro:(b + 1) * micro]])
                                 for b in indices]
                loss = _step(chunks, optimizer, micro_batches, args, forward_only=False)
                losses.append(loss)
                tokens += batch["global_batch_size"] * batch["seq_length"]  # as processed: rows padded to seq_length
                if lead and ((step + 1) % tcfg.log_every == 0 or step + 1 == steps):
                    with log_path.open("a", encoding="utf-8") as log:
                        log.write(json.dumps({"step": step + 1, "loss": round(loss, 5), "lr": lr}) + "\n")
                    print(f"{ctx.stage_name}: step {step + 1}/{steps}  loss {loss:.4f}  lr {lr:.2e}", flush=True)
            seconds = time.perf_counter() - start
            metrics = {
                "train_time_s": round(seconds, 3),
                "train_tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 1),
                "final_loss": round(losses[-1], 5) if losses else float("nan"),
                "steps": steps,
                "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            }
            if tcfg.val_every and val_data:
                metrics["val_loss"] = round(_validate(chunks, optimizer, val_data, collate, args), 5)
            _copy_back(chunks, model, args, converter)
        finally:
            parallel_state.destroy_model_parallel()
    total = sum(p.numel() for p in model.parameters())
    metrics.update(trainable_parameters=total, total_parameters=total, trainable_fraction=1.0, resumed_from_step=0)
    model.eval()
    return metrics


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """The job's process group (``llmexp.training.distributed`` starts one on several ranks), or a one-rank NCCL group."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _initialize(args, seed: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(**args.parallel_state)
    model_parallel_cuda_manual_seed(seed)


def _transformer_config(args):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(args.transformer)
    kwargs["activation_func"] = {"silu": F.silu}[kwargs["activation_func"]]
    kwargs["params_dtype"] = _torch_dtype(kwargs["params_dtype"])
    kwargs["pipeline_dtype"] = _torch_dtype(kwargs["pipeline_dtype"])
    return TransformerConfig(**kwargs)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _layer_spec(args):
    from megatron.core.models.gpt import gpt_layer_specs

    if args.layer_spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def _build_chunks(args, hf_model, scratch: Path):
    """This rank's model chunks holding its shard of ``hf_model``'s weights, wrapped for mixed precision and DDP;
    and the Megatron-Bridge converter when Bridge loaded them (None: our ``checkpoint_mapping`` did).

    Bridge converts where it is installed (it maps Transformer Engine's layer spec, and needs the model
    on disk: rank 0 saves it to ``scratch``); our mapping serves elsewhere.
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    config = _transformer_config(args)
    spec = _layer_spec(args)
    vp = args.parallel_state["virtual_pipeline_model_parallel_size"]
    raw = []
    for vp_rank in range(vp or 1):
        stage = vp_rank if vp else None
        raw.append(GPTModel(
            config, spec, **args.model,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        ))
    converter = None
    if bridge.bridge_available() and args.layer_spec == "transformer_engine":
        if distributed.is_rank_zero():
            hf_model.save_pretrained(str(scratch))
        torch.distributed.barrier()
        converter = bridge.load_hf_weights(raw, hf_model, scratch)
    else:
        _load_with_our_mapping(raw, args, hf_model)
    ddp_config = DistributedDataParallelConfig(**args.ddp)
    chunks = []
    for vp_rank, chunk in enumerate(raw):
        chunk.cuda(torch.cuda.current_device())
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=vp_rank > 0))
    for chunk in chunks:
        chunk.broadcast_params()
    return chunks, config, converter


def _load_with_our_mapping(raw_chunks, args, hf_model) -> None:
    from megatron.core import parallel_state

    numbers = _architecture(args, hf_model)
    hf_state = {key: value.detach().cpu() for key, value in hf_model.state_dict().items()}
    p = args.parallel_state
    for vp_rank, chunk in enumerate(raw_chunks):
        shard = checkpoint_mapping.hf_to_megatron(
            hf_state, numbers, spec=args.layer_spec, tp_size=p["tensor_model_parallel_size"],
            tp_rank=parallel_state.get_tensor_model_parallel_rank(), pp_size=p["pipeline_model_parallel_size"],
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            vp_size=p["virtual_pipeline_model_parallel_size"], vp_rank=vp_rank)
        _load(chunk, shard)


def model_numbers(hf_model) -> SimpleNamespace:
    """The architecture as ModelConfig names it, from the model itself (a checkpoint may differ from the preset)."""
    c = hf_model.config
    return SimpleNamespace(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        attention_bias=bool(getattr(c, "attention_bias", c.model_type == "qwen2")),  # Qwen2 has q/k/v biases, unflagged
        rms_norm_eps=c.rms_norm_eps, rope_theta=_rope_theta(c), max_position_embeddings=c.max_position_embeddings,
    )


def _rope_theta(hf_config) -> float:
    """transformers 5 keeps it in ``rope_parameters``; earlier releases as ``rope_theta``."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _architecture(args, hf_model) -> Dict[str, Any]:
    """``checkpoint_mapping``'s numbers: the model's, with megatron's padded vocabulary."""
    numbers = vars(model_numbers(hf_model))
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")
    return {**{key: numbers[key] for key in keep}, "padded_vocab_size": args.model["vocab_size"]}


def _load(chunk, shard: Dict[str, Any]) -> None:
    expected = {key for key in chunk.state_dict() if not key.endswith("_extra_state")}
    if set(shard) != expected:
        raise RuntimeError(f"the mapped weights do not fit megatron's GPT model: missing {sorted(expected - set(shard))}, "
                           f"unexpected {sorted(set(shard) - expected)}")
    chunk.load_state_dict(shard, strict=False)


def _optimizer(args, chunks, config):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    settings = dict(args.optimizer, params_dtype=_torch_dtype(args.optimizer["params_dtype"]))
    optimizer = get_megatron_optimizer(OptimizerConfig(**settings), chunks)
    # the hooks megatron's schedules call: gradient sync across micro-batches, reductions, loss scaling
    no_sync = [chunk.no_sync for chunk in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _step(chunks, optimizer, micro_batches, args, forward_only: bool):
    """One optimiser step (or, ``forward_only``, one scoring pass) over ``micro_batches``: the mean loss."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    seq_length = args.batch["seq_length"]
    on_gpu = [tuple(t.cuda(non_blocking=True) for t in next_token_batch(batch, seq_length)) for batch in micro_batches]
    iterators = [iter(on_gpu) for _ in chunks]
    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=args.batch["seq_length"],
        micro_batch_size=args.batch["micro_batch_size"],
        forward_only=forward_only,
    )
    if not forward_only:
        optimizer.step()
    # the last pipeline stage holds the losses: [sum of micro-batch means, micro-batches], summed over dp, sent to all
    totals = torch.zeros(2, device="cuda")
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in reduced:
            totals += item["lm loss"]
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, count = totals.tolist()
    return loss_sum / max(count, 1)


def _forward_step(data_iterator, model):
    """megatron's forward step: the per-token losses of one micro-batch, and how to reduce them."""
    import torch

    tokens, targets, mask = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=targets)
    return output, functools.partial(masked_loss, mask)


def masked_loss(mask, per_token):
    """(sum of the masked losses, their count, what is logged): megatron divides by both count and micro-batches."""
    import torch

    loss = (per_token.float().reshape(-1) * mask.reshape(-1)).sum()
    count = mask.sum().int()
    logged = torch.stack([loss.detach() / count.clamp(min=1), torch.ones_like(loss)])
    return loss, count, {"lm loss": logged}


def next_token_batch(batch, seq_length: int):
    """(tokens, next-token targets, loss mask) from a collated batch, as Hugging Face's ``model(labels=...)`` shifts them.

    Rows are right-padded to ``seq_length`` (masked): pipeline stages exchange tensors of one fixed shape.
    """
    import torch

    if isinstance(batch, torch.Tensor):
        input_ids, labels = batch, batch
    else:
        input_ids, labels = batch["input_ids"], batch["labels"]
    rows, width = input_ids.shape
    if width > seq_length:
        raise UserError(f"a training batch holds rows of {width} tokens and data.seq_len={seq_length}; the data "
                        "must be cut to data.seq_len for backend=megatron.")
    padded = torch.zeros(rows, seq_length, dtype=input_ids.dtype)
    padded[:, :width] = input_ids
    input_ids = padded
    targets = torch.full((rows, seq_length), IGNORE_INDEX, dtype=labels.dtype)
    targets[:, :width - 1] = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).float()
    targets = targets.clamp(min=0)  # masked positions still need a valid index for the loss kernel
    return input_ids, targets, mask


def _validate(chunks, optimizer, val_data, collate, args) -> float:
    """Mean loss over the validation examples, in whole micro-batches (the last partial one is dropped)."""
    for chunk in chunks:
        chunk.eval()
    micro = args.batch["micro_batch_size"]
    batches = [collate(list(val_data[i:i + micro])) for i in range(0, len(val_data) - micro + 1, micro)]
    loss = _step(chunks, optimizer, batches, args, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return loss


def _copy_back(chunks, hf_model, args, converter) -> None:
    """Gather the trained weights of every rank's chunks and load them into ``hf_model``.

    Through Megatron-Bridge where it loaded them; otherwise the chunks of data-parallel rank 0 of each
    tp x pp position are gathered to every rank and mapped back with ``checkpoint_mapping``.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if args.ddp["use_distributed_optimizer"]:
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)  # parameters are whole again on every data-parallel rank
    if converter is not None:
        state = bridge.hf_state(converter, chunks)
    else:
        mine = {}
        if parallel_state.get_data_parallel_rank() == 0:
            position = (parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_rank())
            for vp_rank, chunk in enumerate(chunks):
                mine[(position[0], vp_rank, position[1])] = {
                    key: value.detach().float().cpu() for key, value in _unwrap(chunk).state_dict().items()
                    if not key.endswith("_extra_state")}
        gathered: List[Dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        p = args.parallel_state
        state = checkpoint_mapping.megatron_to_hf(
            {key: value for part in gathered for key, value in part.items()}, _architecture(args, hf_model),
            spec=args.layer_spec, tp_size=p["tensor_model_parallel_size"], pp_size=p["pipeline_model_parallel_size"],
            vp_size=p["virtual_pipeline_model_parallel_size"])
    reference = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:  # one tensor under two names; Bridge exports it once
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    with torch.no_grad():
        hf_model.load_state_dict({key: value.to(reference[key].dtype) for key, value in state.items()}, strict=True)


def _unwrap(chunk):
    """The GPTModel inside DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
