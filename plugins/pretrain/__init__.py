"""The ``pretrain`` technique: next-token training of a causal LM from scratch (or from ``model.path``).

This module is what the entry point loads, so it stays free of torch; the training loop
lives in ``loop.py`` and is imported only when the technique runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmexp.hookspecs import hookimpl
from llmexp.technique import StageContext, StageResult, Technique, TechniqueConfig


@dataclass
class PretrainConfig(TechniqueConfig):
    """Optimiser and schedule; batch sizes come from ``parallelism``, sequence length from ``data``.

    The defaults are the embedded default's recipe: AdamW (0.9, 0.95, wd 0.1), lr 1e-2 with
    50 warm-up steps and a cosine decay to 10%, 1,000 steps of 16 x 64 tokens, clip 1.0.
    """

    name: str = "pretrain"
    max_steps: int = 1000
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    save_model: bool = True


class Pretrain(Technique):
    name = "pretrain"
    schema = PretrainConfig
    memory = "full"
    produces_model = True
    requires = ("torch", "transformers", "lightning")

    def run(self, ctx: StageContext) -> StageResult:
        from llmexp.plugins.pretrain.loop import pretrain

        return pretrain(ctx)


@hookimpl
def llmexp_techniques():
    return [Pretrain]
