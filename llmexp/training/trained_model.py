"""What a stage that trained a model returns: the model, saved by rank 0 into the stage's directory, and its stats."""

from __future__ import annotations

from pathlib import Path

from llmexp.models.loading import model_stats, save_model
from llmexp.techniques.contract import ModelArtifact, StageResult
from llmexp.training import distributed


def trained_model_result(ctx, model, tokenizer, metrics, artifacts=None, save: bool = True) -> StageResult:
    """The ``StageResult`` of a stage that trained ``model``: saved to ``<stage dir>/model`` when ``save`` (by rank 0)."""
    artifacts = dict(artifacts or {})
    path = Path(ctx.stage_dir) / "model"
    # on several ranks each holds the trained model; rank 0 saves it, and its stats are the ones recorded
    stats = save_model(model, tokenizer, path) if save and distributed.is_rank_zero() else model_stats(model)
    if save:
        artifacts["model"] = str(path)
    return StageResult(
        metrics=metrics,
        model=ModelArtifact(model, tokenizer, path if save else None, produced_by=ctx.stage_name),
        artifacts=artifacts,
        model_stats=stats,
    )
