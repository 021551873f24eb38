"""Pretraining on the embedded corpus through the shared Lightning loop."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from llmexp.data.embedded import build_world, embedded_token_stream
from llmexp.data.packing import pack_documents
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError
from llmexp.models import build_model, input_model, model_stats, save_model
from llmexp.technique import ModelArtifact, StageContext, StageResult
from llmexp.training import CausalLMModule, fit, make_trainer


def pretrain(ctx: StageContext) -> StageResult:
    cfg, tcfg = ctx.config, ctx.stage_config
    if cfg.data.name != "embedded":
        raise UserError(f"technique=pretrain reads data=embedded; data={cfg.data.name} is not supported by it.")
    torch.set_flush_denormal(True)  # denormals in tiny models' grads cost up to 10x on CPU
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    world = build_world(cfg.data.seed, cfg.data.num_people)
    start = input_model(ctx)
    if start is None:
        tokenizer = word_level_tokenizer(world.vocabulary())
        model = build_model(cfg.model, tokenizer)
    else:
        model, tokenizer = start.model, start.tokenizer

    blocks = pack_documents(
        embedded_token_stream(world, tokenizer, cfg.data.word_problem_weight),
        seq_len=cfg.data.seq_len,
        num_blocks=tcfg.max_steps * cfg.parallelism.global_batch,
    )
    loader = DataLoader(TensorDataset(blocks), batch_size=cfg.parallelism.micro_batch, shuffle=False)
    optim = {k: tcfg[k] for k in ("lr", "weight_decay", "beta1", "beta2", "warmup_steps", "min_lr_ratio")}
    module = CausalLMModule(model, optim, tcfg.max_steps)
    trainer = make_trainer(cfg, tcfg.max_steps, ctx.tracker.lightning_logger(ctx.stage_name), tcfg.log_every, tcfg.grad_clip)
    metrics = fit(trainer, module, loader)
    metrics["final_loss"] = round(float(trainer.callback_metrics["train/loss"]), 5)
    metrics["steps"] = trainer.global_step
    model.eval()

    path = ctx.stage_dir / "model"
    stats = save_model(model, tokenizer, path) if tcfg.save_model else model_stats(model)
    return StageResult(
        metrics=metrics,
        model=ModelArtifact(model, tokenizer, path if tcfg.save_model else None, produced_by=ctx.stage_name),
        artifacts={"model": str(path)} if tcfg.save_model else {},
        model_stats=stats,
    )
