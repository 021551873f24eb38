"""Knowledge distillation: a trainable student learns a frozen teacher's next-token distributions.

The student is the stage's input model (the previous stage's, or ``model.path``); the
teacher is a checkpoint (``teacher.path``) or an earlier stage's model (``teacher.stage``:
the compress pipeline distils the unpruned baseline into its depth-pruned copy, as
Minitron does). Training runs through the shared loop on the data pretraining reads.

This module imports without torch: the planner loads every plugin. The run lives in
``stage.py``, the loss in ``loss.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.data.text import raw_text_problems
from llmexp.sdk import (
    FIELD, FP32_BYTES, TrainingConfig, TrainingTechnique, UserError, architecture, count_parameters, hookimpl,
    model_numbers_from_hf_config, node_path, read_hf_config, stage_nodes, training_problems, validate_checkpoint_dir,
    validation_problem,
)

WEIGHTS = ("kl_weight", "lm_weight", "hidden_weight")
# fp32 values per token and vocabulary entry the teacher adds: its logits and log-probabilities, and the
# student's tempered log-probabilities kept for backward
TEACHER_VALUES_PER_VOCAB = 3


@dataclass
class TeacherConfig:
    """Where the teacher comes from: set exactly one."""

    path: Optional[str] = None  # a Hugging Face checkpoint directory
    stage: Optional[str] = None  # an earlier stage of the pipeline whose model teaches


@dataclass
class DistillConfig(TrainingConfig):
    """Forward KL to the teacher's tempered distributions, optionally mixed with next-token and hidden-state losses.

    Defaults follow Minitron (logit-only KL at temperature 1); lr 1e-3, like ``cpt``,
    adapts a trained student without overwriting it.
    """

    name: str = "distill"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    temperature: float = 1.0  # both distributions are softened by it; the KL is scaled by its square
    kl_weight: float = 1.0
    lm_weight: float = 0.0  # next-token cross-entropy on the data
    hidden_weight: float = 0.0  # 1 - cosine of the last hidden states (needs equal hidden sizes)
    max_steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 20


class Distill(TrainingTechnique):
    name = "distill"
    schema = DistillConfig
    memory = "distill"
    pipelines = True

    entry = "llmexp.plugins.distill.stage:run_distill"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        """Full training of the student plus a frozen teacher and its fp32 logits.

        The teacher's weights are held in the run's precision; it runs without grad, so of its forward pass only
        what the loss reads stays (``TEACHER_VALUES_PER_VOCAB``). Its architecture is ``teacher.path``'s
        config.json, else the run's model (an earlier stage's model is the run's model or one made smaller from
        it); the student is counted as the run's model too.
        """
        teacher = model
        if node.teacher.path:
            try:
                teacher = architecture(model_numbers_from_hf_config(read_hf_config(node.teacher.path)))
            except UserError:
                pass  # plan_problems reports a bad teacher.path
        logits = layout.tokens * TEACHER_VALUES_PER_VOCAB * teacher["vocab_size"] * FP32_BYTES / layout.tp
        return {**layout.training_memory(model, precision),
                "teacher": layout.weights(count_parameters(teacher), precision), "teacher_logits": logits}

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """The stage's settings, its teacher against the model it receives, and its data."""
        stages = stage_nodes(config, strict=False)  # the stages before it: where its teacher may come from
        earlier = stages[:[stage for stage, _ in stages].index(key)] if key in dict(stages) else []
        return super().plan_problems(config, key, node, plan) + stage_problems(
            config, node, node_path(key), earlier, plan.architectures, key)

    @classmethod
    def pipeline_refusal(cls, config, key: str, node) -> Optional[str]:
        """Pipeline stages hand the loss the student's logits only, not its hidden states."""
        if node.hidden_weight > 0:
            return (f"{node_path(key)}.hidden_weight={node.hidden_weight} compares the student's last hidden states, "
                    f"which pipeline stages (parallelism.pp={config.parallelism.pp}) do not hand the loss; set "
                    f"{node_path(key)}.hidden_weight=0, or parallelism.pp=1.")
        return None

    @classmethod
    def consumes(cls, config, key: str, node):
        """The teacher's stage, when an earlier stage's model teaches."""
        from llmexp.sdk import Consumed, Reads, node_path

        if node.teacher.path or not node.teacher.stage:
            return ()
        field = node_path(key)
        return (Consumed(f"{field}.teacher.stage", node.teacher.stage, Reads.MODEL,
                         fix=f", or give a checkpoint with {field}.teacher.path instead"),)


@hookimpl
def llmexp_techniques():
    return [Distill]


def stage_problems(config, node, field: str, earlier, shapes, key: str) -> List[str]:
    """Problems of the distill node at ``field`` (stage ``key``); ``earlier``: the ``(key, node)`` of the stages
    before it; ``shapes``: each stage's received and made architecture numbers (``Plan.architectures``)."""
    problems = training_problems(node, field) + _numbers_problems(node, field) + _data_problems(config, field)
    if node.val_every:
        problems.append(validation_problem(node, field))
    teacher, student = node.teacher, shapes[key][0]
    if bool(teacher.path) == bool(teacher.stage):
        problems.append(
            f"{field}.teacher sets {'both' if teacher.path else 'neither'} of teacher.path and teacher.stage; set "
            f"exactly one: {field}.teacher.path=<the teacher's checkpoint directory> or {field}.teacher.stage=<an "
            "earlier stage of the pipeline whose model teaches>."
        )
    elif teacher.path:
        problems += _teacher_path_problems(config, node, field, student)
    elif teacher.stage in dict(earlier):  # whether that stage may teach: llmexp.planning.data_flow
        problems += _hidden_size_problems(node, field, shapes[teacher.stage][1], student)
    return problems


def _hidden_size_problems(node, field: str, teacher, student) -> List[str]:
    if node.hidden_weight > 0 and teacher["hidden_size"] != student["hidden_size"]:
        return [hidden_size_mismatch(field, node, teacher["hidden_size"], student["hidden_size"])]
    return []


def teacher_path_error(error, key: str) -> str:
    """A checkpoint error about ``model.path`` (``llmexp.models.checkpoint``), told of ``<key>.teacher.path``."""
    return str(error).replace(FIELD, f"{key}.teacher.path")


def vocabulary_mismatch(key: str, teacher, detail: str) -> str:
    """The message refusing a teacher whose vocabulary is not the student's."""
    source = f"teacher.path={teacher.path}" if teacher.path else f"teacher.stage={teacher.stage}"
    return (
        f"{key}.{source}: the teacher's vocabulary differs from the student's ({detail}); distillation compares "
        "their next-token distributions token by token, so both need the same tokenizer. Choose a teacher "
        "trained with the student's tokenizer, or a student made from the teacher (e.g. pruned from it)."
    )


def hidden_size_mismatch(key: str, node, teacher_size: int, student_size: int) -> str:
    return (
        f"{key}.hidden_weight={node.hidden_weight} compares last hidden states, but the teacher's hidden size is "
        f"{teacher_size} and the student's {student_size}; set {key}.hidden_weight=0."
    )


def _numbers_problems(node, key: str) -> List[str]:
    problems = []
    if node.temperature <= 0:
        problems.append(f"{key}.temperature={node.temperature} must be positive (1.0 is usual).")
    problems += [f"{key}.{name}={node[name]} is negative; set it to 0 or more." for name in WEIGHTS if node[name] < 0]
    if all(node[name] == 0 for name in WEIGHTS):
        problems.append(
            f"{key}: kl_weight, lm_weight and hidden_weight are all 0, so nothing trains; set {key}.kl_weight=1."
        )
    return problems


def _data_problems(config, key: str) -> List[str]:
    return raw_text_problems(config.data, (
        f"data={config.data.name} holds instructions or pairs, and {key} (technique=distill) trains on the "
        "text pretraining reads: use data=embedded or data=text (data.paths=[...])."
    ))


def _teacher_path_problems(config, node, key: str, student) -> List[str]:
    """A valid checkpoint whose vocabulary (and hidden size, for ``hidden_weight``) match the ``student``'s numbers:
    those of the model the stage receives."""
    path = node.teacher.path
    if not Path(path).is_dir():
        return [
            f"{key}.teacher.path={path} is not a directory; point it at the teacher's Hugging Face checkpoint "
            f"(config.json, weights and tokenizer files), or name an earlier stage with {key}.teacher.stage."
        ]
    try:
        validate_checkpoint_dir(path)
        teacher = architecture(model_numbers_from_hf_config(read_hf_config(path)))
    except UserError as error:
        return [teacher_path_error(error, key)]
    if teacher["vocab_size"] != student["vocab_size"]:
        return [vocabulary_mismatch(
            key, node.teacher, f"{teacher['vocab_size']} token ids against the student's {student['vocab_size']}"
        )]
    vocabularies = (_tokenizer_vocabulary(path), config.model.path and _tokenizer_vocabulary(config.model.path))
    if all(vocabularies) and vocabularies[0] != vocabularies[1]:
        return [vocabulary_mismatch(
            key, node.teacher, f"its tokenizer.json maps tokens to other ids than model.path={config.model.path}'s"
        )]
    return _hidden_size_problems(node, key, teacher, student)


def _tokenizer_vocabulary(path):
    """The token ids of a checkpoint's ``tokenizer.json`` (its model's vocabulary and added tokens), or None.

    Read as JSON, not through transformers: the plan check must not import it.
    """
    file = Path(path) / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        return spec["model"].get("vocab"), [(t["id"], t["content"]) for t in spec.get("added_tokens") or ()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no tokenizer.json (a sentencepiece model): compared when the run loads both tokenizers
