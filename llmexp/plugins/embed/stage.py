"""The embed stage: the starting encoder scored, trained on the pairs, scored again, saved whole.

Its product is ``<stage dir>/encoder``, saved beside it and renamed into place (a reader finds the
whole directory or none): ``SentenceTransformer(path)`` loads it as is. ``train_log.jsonl`` holds
the loss every ``log_every`` steps, which the tracker also receives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmexp.data.embedded import build_world
from llmexp.data.jsonl import write_jsonl
from llmexp.plugins.embed.pairs import pair_data
from llmexp.sdk import (
    ENCODER_ARTIFACT, EncoderTraining, FreeCores, Progress, StageContext, StageResult, load_encoder, new_embedded_encoder,
    ranking_metrics, resolve_encoder, stage_node_path, train_encoder, warn,
)

TRAIN_LOG = "train_log.jsonl"


def run_embed(ctx: StageContext) -> StageResult:
    cfg, node = ctx.config, ctx.stage_config
    field = f"{stage_node_path(ctx)}.encoder"
    data = pair_data(cfg.data)
    if node.untrained:
        encoder = new_embedded_encoder(build_world(cfg.data.seed, cfg.data.num_people).vocabulary(), cfg.seed)
    else:
        encoder = load_encoder(resolve_encoder(node.encoder, ctx.earlier, field), cfg, field)
    before = ranking_metrics(encoder, data.queries, data.relevant, data.documents)
    training = EncoderTraining(**{name: node[name] for name in EncoderTraining.__dataclass_fields__})
    rows = []
    free_cores = FreeCores(ctx.stage_name, warn)  # threads to the cores other processes leave free

    def logged(row) -> None:
        rows.append(row)
        ctx.tracker.log_metrics({f"{ctx.stage_name}/train/loss": row["loss"], f"{ctx.stage_name}/train/lr": row["lr"]},
                                step=row["step"])

    with Progress(ctx.stage_name, unit="step") as progress:
        task = progress.add_task("contrastive", total=None)

        def stepped(step: int, total: int) -> None:
            free_cores.check()
            progress.update(task, completed=step, total=total,
                            detail=f"loss {rows[-1]['loss']:.4f}" if rows else "")

        trained = train_encoder(encoder, data.train, training, cfg.seed, ctx.stage_dir / "trainer", stepped, logged)
    shutil.rmtree(ctx.stage_dir / "trainer", ignore_errors=True)  # the trainer's output folder: no checkpoints
    after = ranking_metrics(encoder, data.queries, data.relevant, data.documents)
    write_jsonl(ctx.stage_dir / TRAIN_LOG, rows)
    path = Path(ctx.stage_dir) / ENCODER_ARTIFACT
    save_whole(encoder, path)
    metrics = {**after, **{f"before_{name}": value for name, value in before.items()}, **trained,
               "train_pairs": len(data.train), "hard_negatives": int(data.hard_negatives),
               "held_out_queries": len(data.queries), "documents": len(data.documents),
               "encoder_parameters": sum(tensor.numel() for tensor in encoder.parameters())}
    # no model_stats: those describe the run's model, which an encoder is not
    return StageResult(metrics=metrics, artifacts={ENCODER_ARTIFACT: str(path)})


def save_whole(encoder, path: Path) -> None:
    """Save into ``<path>.partial``, then rename it to ``path``."""
    partial = path.with_name(f"{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted attempt left
    encoder.save(str(partial))
    shutil.rmtree(path, ignore_errors=True)  # an attempt that saved but did not complete the stage
    os.replace(partial, path)
