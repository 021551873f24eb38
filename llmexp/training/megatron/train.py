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
Needs CUDA: megatron-core's GPT model calls it in its rotary embeddings and RNG tracker. torch and
megatron-core are imported inside the functions: megatron-core is an extra, and the planner
imports this package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from llmexp.training import distributed
from llmexp.machine.backends import importable
from llmexp.errors import UserError
from llmexp.training.megatron import arguments as megatron_arguments
from llmexp.training.megatron.model_chunks import build_chunks, copy_back, model_numbers, torch_dtype
from llmexp.training.schedule import data_order, warmup_cosine
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

    cfg, tcfg = ctx.config, ctx.stage_config
    require_megatron(cfg)
    args = megatron_arguments.translate(cfg, tcfg, transformer_engine=transformer_engine_installed(),
                                        model=model_numbers(model))
    lead = distributed.is_rank_zero()
    with _process_group():
        from megatron.core import parallel_state

        _initialize(args, cfg.seed)
        try:
            chunks, config, converter = build_chunks(args, model, ctx.stage_dir / "bridge_input")
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
            copy_back(chunks, model, args, converter)
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


def _optimizer(args, chunks, config):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    settings = dict(args.optimizer, params_dtype=torch_dtype(args.optimizer["params_dtype"]))
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
