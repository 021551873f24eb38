"""The sft, lora and dpo stages: data in, the shared training loop, the trained model out.

Every stage trains a private copy of its starting model (``llmexp.models.loading.starting_model``)
and hands a plain Hugging Face model to the next stage: LoRA's adapter is merged into its
copy after the adapter itself is saved in PEFT format.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

from llmexp.sdk import distributed
from llmexp.data.instructions import encode_example, instruction_data, pad_collate
from llmexp.data.preference import encode_pair, pair_collate, preference_data
from llmexp.sdk import UserError
from llmexp.sdk import base_model, trained_model_result
from llmexp.plugins.customize.losses import DPOLoss, response_loss
from llmexp.sdk import ModelArtifact, StageContext, StageResult
from llmexp.sdk import train


def run_sft(ctx: StageContext) -> StageResult:
    start = base_model(ctx)
    return _fine_tune(ctx, start, start.model)


def run_lora(ctx: StageContext) -> StageResult:
    import torch

    start = base_model(ctx)
    torch.manual_seed(ctx.config.seed)  # the adapters' initial weights depend on the seed alone
    return _fine_tune(ctx, start, add_lora(start.model, ctx.stage_config, ctx.stage_name))


def run_dpo(ctx: StageContext) -> StageResult:
    cfg, node = ctx.config, ctx.stage_config
    start = base_model(ctx)
    tokenizer = start.tokenizer
    train_pairs, val_pairs = preference_data(cfg.data)
    reference = copy.deepcopy(start.model).eval().requires_grad_(False)
    metrics = train(
        ctx,
        start.model,
        DPOLoss(reference, node.beta),
        [encode_pair(pair, tokenizer, cfg.data.seq_len) for pair in train_pairs],
        pair_collate(tokenizer.pad_token_id),
        [encode_pair(pair, tokenizer, cfg.data.seq_len) for pair in val_pairs],
        extra_modules=[reference],
    )
    return _finish(ctx, start, start.model, metrics)


def add_lora(model, node, key: str):
    """``model`` with LoRA adapters on ``node.target_modules`` (PEFT); everything else frozen."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = list(node.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"  # PEFT's shorthand: every linear layer but the output head
    else:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        missing = [name for name in targets if name not in linear]
        if missing:
            raise UserError(
                f"{key}.target_modules names {', '.join(missing)}, which this model does not have; "
                f"its linear layers are {', '.join(linear)} (or use [all-linear])."
            )
    config = LoraConfig(
        r=node.rank, lora_alpha=node.alpha, lora_dropout=node.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def _fine_tune(ctx: StageContext, start: ModelArtifact, model) -> StageResult:
    cfg = ctx.config
    tokenizer = start.tokenizer
    train_examples, val_examples = instruction_data(cfg.data)
    metrics = train(
        ctx,
        model,
        response_loss,
        [encode_example(example, tokenizer, cfg.data.seq_len) for example in train_examples],
        pad_collate(tokenizer.pad_token_id),
        [encode_example(example, tokenizer, cfg.data.seq_len) for example in val_examples],
    )
    return _finish(ctx, start, model, metrics)


def _finish(ctx: StageContext, start: ModelArtifact, model, metrics: Dict[str, Any]) -> StageResult:
    """Save what the stage made (a PEFT adapter, the model) and hand a plain HF model on."""
    artifacts: Dict[str, str] = {}
    save = ctx.stage_config.save_model
    if hasattr(model, "merge_and_unload"):  # a PEFT model: the adapter is the product
        adapter_dir = ctx.stage_dir / "adapter"
        if distributed.is_rank_zero():  # every rank holds the trained adapter; rank 0 writes
            model.save_pretrained(str(adapter_dir))
            start.tokenizer.save_pretrained(str(adapter_dir))
        artifacts["adapter"] = str(adapter_dir)
        model = model.merge_and_unload()
        save = save and ctx.stage_config.merge
    return trained_model_result(ctx, model, start.tokenizer, metrics, artifacts, save=save)
