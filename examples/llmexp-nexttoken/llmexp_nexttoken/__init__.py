"""``technique=next_token``: how often the model's most likely next token is the text's, on held-out documents.

A complete third-party technique, declared on itself: its config schema, its plan checks
(``plan_problems``), its memory per device (``memory_per_device``) and what it reports
(``metrics``), so ``llmexp plan``, a run, results.json, comparison.md and pareto.png take it in
with no change to llmexp. It imports llmexp's core through ``llmexp.sdk`` (and the embedded data
through ``llmexp.data``) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from llmexp.data.embedded import build_world
from llmexp.sdk import (
    FP32_BYTES, Metric, MetricKind, StageContext, StageResult, Technique, TechniqueConfig, UserError, hookimpl,
    input_model, node_path,
)

ACCURACY = Metric("next_token_acc", True, "next-token accuracy", MetricKind.QUALITY)


@dataclass
class NextTokenConfig(TechniqueConfig):
    name: str = "next_token"
    documents: int = 16  # held-out documents of the embedded world to score (at most data.heldout_documents)


class NextToken(Technique):
    """Scores the input model; produces a metric, not a model."""

    name = "next_token"
    schema = NextTokenConfig
    requires = ("torch", "transformers")

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        field, available = f"{node_path(key)}.documents", config.data.get("heldout_documents")
        if available is None:
            return [f"{node_path(key)}: next_token scores the embedded world's held-out documents, and "
                    f"data={config.data.name} has none; run it with data=embedded."]
        if not 1 <= node.documents <= available:
            return [f"{field}={node.documents} must be between 1 and data.heldout_documents ({available}); "
                    f"set {field}=16."]
        return []

    @classmethod
    def memory_per_device(cls, config, key: str, node, model, precision: str, layout) -> Dict[str, float]:
        """Inference, plus the fp32 logits of one document over the whole vocabulary."""
        return {**layout.inference_memory(model, precision),
                "logits": float(layout.seq_len * model["vocab_size"] * FP32_BYTES)}

    @classmethod
    def metrics(cls, config, node):
        return (ACCURACY,)

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        artifact = input_model(ctx)
        if artifact is None:
            raise UserError(f"{ctx.stage_name}: no model to score; set model.path or put a stage that makes one before it.")
        data = ctx.config.data
        documents = build_world(data.seed, data.num_people).heldout_documents(ctx.stage_config.documents)
        model, correct, total = artifact.model.eval(), 0, 0
        with torch.no_grad():
            for text in documents:
                ids = artifact.tokenizer(text, return_tensors="pt").input_ids[:, : data.seq_len].to(model.device)
                predicted = model(ids).logits[0, :-1].argmax(-1)
                correct += int((predicted == ids[0, 1:]).sum())
                total += ids.shape[1] - 1
        return StageResult(metrics={ACCURACY.name: correct / total, "next_token_tokens": total})


@hookimpl
def llmexp_techniques():
    return [NextToken]
