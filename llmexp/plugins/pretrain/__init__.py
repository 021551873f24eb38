"""Next-token training on raw text: ``pretrain`` (from scratch) and ``cpt`` (continued pretraining).

Both read ``data=embedded`` (the generated corpus) or ``data=text`` (the user's files) and
share one loop (``loop.py``). ``pretrain`` starts from the previous stage's model or the run's
weights (``model.path``, a preset's published ones) when there are any, else from scratch;
``cpt`` continues a base model (on the embedded default without one, the embedded baseline:
``llmexp.models.embedded_baseline``), with a gentler default schedule. This module is what the entry
point loads, so it stays free of torch; the loop is imported only when a technique runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmexp.sdk import hookimpl
from llmexp.sdk import TrainingConfig, TrainingTechnique


@dataclass
class PretrainConfig(TrainingConfig):
    """The shared training settings (``llmexp.training.loop.TrainingConfig``): the embedded default's recipe.

    ``max_steps=0`` passes the starting model (``model.path``) on untrained.
    """

    name: str = "pretrain"


@dataclass
class CptConfig(TrainingConfig):
    """Continued pretraining: a tenth of pretraining's learning rate, so the base is adapted, not overwritten."""

    name: str = "cpt"
    max_steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 20


class Pretrain(TrainingTechnique):
    name = "pretrain"
    schema = PretrainConfig
    backends = ("torch", "megatron")

    entry = "llmexp.plugins.pretrain.loop:pretrain"


class ContinuedPretraining(Pretrain):
    name = "cpt"
    schema = CptConfig
    adapts_base = True

    entry = "llmexp.plugins.pretrain.loop:continued_pretraining"


@hookimpl
def llmexp_techniques():
    return [Pretrain, ContinuedPretraining]


@hookimpl
def llmexp_plan_problems(config, plan):
    """Each pretrain/cpt stage's settings, and the raw text it reads (``data=text``'s files), checked before the run."""
    from llmexp.data.text import raw_text_problems, raw_text_refusal
    from llmexp.sdk import node_path, stage_nodes
    from llmexp.sdk import training_problems, validation_problem

    stages = [(key, node) for key, node in stage_nodes(config, strict=False) if node.name in ("pretrain", "cpt")]
    problems = []
    for key, node in stages:
        problems += training_problems(node, node_path(key), min_steps=0 if node.name == "pretrain" else 1)
        if node.val_every and node.max_steps:  # max_steps=0 passes the model on without training
            problems.append(validation_problem(node, node_path(key)))
    if stages:
        problems += raw_text_problems(config.data, raw_text_refusal(stages[0][1].name, config.data.name))
    return problems

