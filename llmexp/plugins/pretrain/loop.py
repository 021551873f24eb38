"""Next-token training on packed blocks of text through ``llmexp.training.loop``: pretrain and cpt.

``data=embedded``: the generated corpus, packed into exactly the run's blocks and seen once
each, in stream order. ``data=text``: the user's documents, packed once into as many full
blocks as they fill and cycled through in a seeded shuffled order.
"""

from __future__ import annotations

import torch

from llmexp.data.blocks import training_blocks
from llmexp.sdk import base_model, input_model, model_stats, new_embedded_model, starting_model, trained_model_result
from llmexp.sdk import ModelArtifact, StageContext, StageResult
from llmexp.sdk import LossOutput, train


def next_token_loss(model, input_ids) -> LossOutput:
    return LossOutput(model(input_ids=input_ids, labels=input_ids).loss, input_ids.numel())


def pretrain(ctx: StageContext) -> StageResult:
    """From the previous stage's model or the run's weights (``model.path``, the preset's published ones), else from
    scratch (its purpose: no warning; ``model.hub_repo=null`` pretrains a preset's architecture from scratch).

    ``max_steps=0`` passes the starting model on untrained: how a pipeline whose first stage
    trains the embedded default's baseline (``pipeline=compress``) takes a real checkpoint as
    its baseline instead (``model.path=... pipeline.nodes.baseline.max_steps=0``).
    """
    if ctx.stage_config.max_steps == 0:
        return _as_given(ctx)
    return _train_on_text(ctx, starting_model(ctx) or new_embedded_model(ctx.config))


def _as_given(ctx: StageContext) -> StageResult:
    """The input model unchanged; one read from the run's weights is not copied, only pointed at."""
    start = input_model(ctx)
    if start is None:
        start = new_embedded_model(ctx.config)
    if start.path is None:
        return trained_model_result(ctx, start.model, start.tokenizer, {"steps": 0})
    return StageResult(
        metrics={"steps": 0},
        model=ModelArtifact(start.model, start.tokenizer, start.path, produced_by=ctx.stage_name),
        artifacts={"model": str(start.path)},
        model_stats=model_stats(start.model, start.path),
    )


def continued_pretraining(ctx: StageContext) -> StageResult:
    """From a base model (``base_model``: the run's weights, else the embedded baseline)."""
    return _train_on_text(ctx, base_model(ctx))


def _train_on_text(ctx: StageContext, start: ModelArtifact) -> StageResult:
    blocks, shuffle = training_blocks(ctx.config, ctx.stage_config, start.tokenizer)
    metrics = train(ctx, start.model, next_token_loss, blocks, torch.stack, shuffle=shuffle)
    return trained_model_result(ctx, start.model, start.tokenizer, metrics, save=ctx.stage_config.save_model)
