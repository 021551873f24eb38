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
from typing import ClassVar, List

from llmexp.data.text import raw_text_problems, raw_text_refusal
from llmexp.sdk import TrainingConfig, TrainingTechnique, hookimpl, node_path, training_problems, validation_problem


@dataclass
class PretrainConfig(TrainingConfig):
    """The shared training settings (``llmexp.training.contract.TrainingConfig``): the embedded default's recipe.

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
    pipelines = True
    min_steps: ClassVar[int] = 0  # max_steps=0 passes the starting model on untrained

    entry = "llmexp.plugins.pretrain.loop:pretrain"

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """The stage's settings, and the raw text it reads (``data=text``'s files), checked before the run."""
        field = node_path(key)
        problems = super().plan_problems(config, key, node, plan) + training_problems(node, field, cls.min_steps)
        if node.val_every and node.max_steps:  # max_steps=0 passes the model on without training
            problems.append(validation_problem(node, field))
        return problems + raw_text_problems(config.data, raw_text_refusal(cls.name, config.data.name))


class ContinuedPretraining(Pretrain):
    name = "cpt"
    schema = CptConfig
    adapts_base = True
    min_steps = 1

    entry = "llmexp.plugins.pretrain.loop:continued_pretraining"


@hookimpl
def llmexp_techniques():
    return [Pretrain, ContinuedPretraining]
