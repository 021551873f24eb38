"""``technique=weightstats``: the largest-norm weight matrices of the input model.

The smallest complete third-party technique: a config schema, a Technique class with its own plan
check, and the hook that offers it. It imports llmexp's core through ``llmexp.sdk`` only.
It reads the model the previous stage produced, or the checkpoint at ``model.path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from llmexp.sdk import StageContext, StageResult, Technique, TechniqueConfig, UserError, hookimpl, input_model, node_path


@dataclass
class WeightStatsConfig(TechniqueConfig):
    name: str = "weightstats"
    top_k: int = 3  # how many of the largest-norm matrices to report


class WeightStats(Technique):
    name = "weightstats"
    schema = WeightStatsConfig
    requires = ("torch",)

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        if node.top_k < 1:
            return [f"{node_path(key)}.top_k={node.top_k} must be at least 1; set {node_path(key)}.top_k=3."]
        return []

    def run(self, ctx: StageContext) -> StageResult:
        import json

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

