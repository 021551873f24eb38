"""The one Lightning training loop every training technique shares.

A technique hands over an HF causal LM, its batches and its optimiser settings; this module
supplies the LightningModule (loss, AdamW, warm-up + cosine schedule), the Trainer
(precision from the config, gradient accumulation to reach ``global_batch``, clipping,
progress) and the throughput figures.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, Dict

import lightning as L
import torch

from llmexp.errors import UserError

# Lightning announces "GPU available: False", a product tip and more on every Trainer; its
# warnings still come through. The pytree notice is Lightning 2.6 calling an API torch 2.13 deprecated.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

# Our precision names -> Lightning's. Mixed precision keeps fp32 master weights.
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CausalLMModule(L.LightningModule):
    """Next-token loss on ``input_ids`` batches (padding, if any, masked with ``labels=-100``)."""

    def __init__(self, model, optim: Dict[str, Any], max_steps: int):
        super().__init__()
        self.model = model
        self.optim = optim
        self.max_steps = max_steps
        self.tokens_seen = 0

    def training_step(self, batch, batch_idx):
        input_ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.tokens_seen += input_ids.numel()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)  # no decay on norms and biases
        o = self.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=(o["beta1"], o["beta2"]),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, o["warmup_steps"], self.max_steps, o["min_lr_ratio"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def accumulation_steps(parallelism) -> int:
    """Micro-batches per optimiser step so that micro_batch * dp * steps = global_batch."""
    return parallelism.global_batch // (parallelism.micro_batch * parallelism.dp)


def make_trainer(config, max_steps: int, logger, log_every: int, grad_clip: float) -> L.Trainer:
    precision = config.precision.value
    if precision not in LIGHTNING_PRECISION:
        raise UserError(
            f"precision={precision} is not available for training on the torch backend "
            f"(it supports {', '.join(LIGHTNING_PRECISION)}); train with precision=bf16 and quantize afterwards."
        )
    world_size = config.parallelism.tp * config.parallelism.pp * config.parallelism.dp
    if world_size > 1:
        raise UserError(
            f"parallelism={config.parallelism.name} (world size {world_size}) passes the planner, but the torch "
            "backend does not execute tp/pp/dp yet; train with parallelism=single."
        )
    if config.hardware.accelerator != "cpu" and not torch.cuda.is_available():
        raise UserError(
            f"hardware={config.hardware.name} needs a CUDA GPU and this machine has none; run with hardware=cpu, "
            "or use `llmexp plan` to check the configuration without running it."
        )
    return L.Trainer(
        accelerator="cpu" if config.hardware.accelerator == "cpu" else "gpu",
        devices=1,
        precision=LIGHTNING_PRECISION[precision],
        max_steps=max_steps,
        max_epochs=1,  # techniques hand over exactly max_steps optimiser steps of data
        accumulate_grad_batches=accumulation_steps(config.parallelism),
        gradient_clip_val=grad_clip or None,
        logger=logger,
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )


def fit(trainer: L.Trainer, module: CausalLMModule, loader) -> Dict[str, float]:
    """Train and return wall time and throughput (tokens per second of the whole fit)."""
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    return {
        "train_time_s": round(seconds, 3),
        "train_tokens": module.tokens_seen,
        "tokens_per_s": round(module.tokens_seen / seconds, 1),
    }
