"""``technique=weightstats``: the largest-norm weight matrices of the input model.

A complete third-party technique: a config schema, a Technique class and two hooks.
It reads the model the previous stage produced, or the checkpoint at ``model.path``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmexp.errors import UserError
from llmexp.techniques.hookspecs import hookimpl
from llmexp.techniques.contract import StageContext, StageResult, Technique, TechniqueConfig


@dataclass
class WeightStatsConfig(TechniqueConfig):
    name: str = "weightstats"
    top_k: int = 3  # how many of the largest-norm matrices to report


class WeightStats(Technique):
    name = "weightstats"
    schema = WeightStatsConfig
    memory = "inference"
    requires = ("torch",)

    def run(self, ctx: StageContext) -> StageResult:
        import json

        from llmexp.models.loading import input_model

        artifact = input_model(ctx)
        if artifact is None:
            raise UserError("technique=weightstats needs a model: set model.path=<HF checkpoint directory>.")
        norms = {
            name: float(param.detach().float().norm())
            for name, param in artifact.model.named_parameters()
            if param.ndim == 2
        }
        top = dict(sorted(norms.items(), key=lambda item: -item[1])[: ctx.stage_config.top_k])
        path = ctx.stage_dir / "top_norms.json"
        path.write_text(json.dumps(top, indent=1))
        metrics = {"matrices": len(norms), "max_norm": max(norms.values()), "mean_norm": sum(norms.values()) / len(norms)}
        return StageResult(metrics=metrics, artifacts={"top_norms": str(path)})


@hookimpl
def llmexp_techniques():
    return [WeightStats]


@hookimpl
def llmexp_plan_problems(config, plan):
    if config.technique.name == "weightstats" and config.technique.top_k < 1:
        return [f"technique.top_k={config.technique.top_k} must be at least 1; set technique.top_k=3."]
    return []
