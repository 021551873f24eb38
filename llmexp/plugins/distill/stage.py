"""The distill stage: teacher and student, the pretraining data, the shared training loop, the student out.

The student is a private copy of the stage's input model (``starting_model``); the teacher
is loaded from ``teacher.path`` or taken from an earlier stage (``ctx.model_of``) and handed
to ``train`` as an extra module: placed on the device, in eval mode, never optimised and
never saved in checkpoints. Everything that can refuse the pair is checked before any
file is written.
"""

from __future__ import annotations

import torch

from llmexp.sdk import console
from llmexp.sdk import UserError
from llmexp.sdk import load_model, new_embedded_model, starting_model, trained_model_result
from llmexp.sdk import stage_node_path
from llmexp.plugins.distill import hidden_size_mismatch, teacher_path_error, vocabulary_mismatch
from llmexp.plugins.distill.loss import DistillationLoss
from llmexp.data.blocks import training_blocks
from llmexp.sdk import ModelArtifact, StageContext, StageResult
from llmexp.sdk import train


def run_distill(ctx: StageContext) -> StageResult:
    node, key = ctx.stage_config, stage_node_path(ctx)
    teacher = teacher_model(ctx, key)
    student = starting_model(ctx)
    if student is None:
        console.warn(
            f"{ctx.stage_name}: no student model (model.path unset and no earlier stage made one), so it distils into "
            f"a randomly initialised model={ctx.config.model.name}; set model.path=<the student's checkpoint>."
        )
        student = new_embedded_model(ctx.config)
    check_pair(teacher, student, node, key)
    blocks, shuffle = training_blocks(ctx.config, node, student.tokenizer)
    loss = DistillationLoss(teacher.model, node.temperature, node.kl_weight, node.lm_weight, node.hidden_weight)
    metrics = train(ctx, student.model, loss, blocks, torch.stack, shuffle=shuffle, extra_modules=[teacher.model])
    return trained_model_result(ctx, student.model, student.tokenizer, metrics, save=node.save_model)


def teacher_model(ctx: StageContext, key: str) -> ModelArtifact:
    teacher = ctx.stage_config.teacher
    if teacher.stage:
        return ctx.model_of(teacher.stage)
    try:
        model, tokenizer = load_model(teacher.path)
    except UserError as error:
        raise UserError(teacher_path_error(error, key)) from None
    return ModelArtifact(model, tokenizer, teacher.path, produced_by=f"{key}.teacher.path")


def check_pair(teacher: ModelArtifact, student: ModelArtifact, node, key: str) -> None:
    """Refuse a teacher whose token ids or (for ``hidden_weight``) hidden size differ from the student's."""
    teacher_rows = teacher.model.get_output_embeddings().weight.shape[0]
    student_rows = student.model.get_output_embeddings().weight.shape[0]
    if teacher_rows != student_rows:
        detail = f"{teacher_rows} logits against the student's {student_rows}"
        raise UserError(vocabulary_mismatch(key, node.teacher, detail))
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise UserError(vocabulary_mismatch(key, node.teacher, "their tokenizers map tokens to different ids"))
    sizes = teacher.model.config.hidden_size, student.model.config.hidden_size
    if node.hidden_weight > 0 and sizes[0] != sizes[1]:
        raise UserError(hidden_size_mismatch(key, node, *sizes))
