"""The evaluated model as the speculative-decoding draft of its baseline's model: how many of its tokens the baseline
accepts, and how much faster the baseline generates with it.

A compressed model (pruned, distilled) that keeps its baseline's tokenizer can draft for it:
the comparison with the baseline (``baseline``) then also reports, from greedy generation of
the embedded free-answer prompts with and without the draft (``llmexp.sdk.measure_draft``),
``draft_acceptance_rate``, ``draft_tokens_per_target_forward`` and ``draft_speedup``, so the
comparison table shows which compressed variant makes the best draft. Opt-in (``as_draft``):
a few seconds per evaluation on the tiny default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from llmexp.sdk import Metric, MetricKind, TaskInputs


@dataclass
class AsDraftConfig:
    """Measure this stage's model as the draft of the baseline evaluation's model (needs ``baseline``)."""

    num_speculative_tokens: int = 0  # tokens it proposes per round; 0: not measured
    prompts: int = 8  # embedded free-answer prompts generated with and without it
    max_new_tokens: int = 32


METRICS = (
    Metric("draft_acceptance_rate", True, "draft acceptance", MetricKind.INFO),
    Metric("draft_tokens_per_target_forward", True, "draft tokens/target forward", MetricKind.INFO),
    Metric("draft_speedup", True, "draft speed-up", MetricKind.COST),
)


def as_draft_problems(node, field: str) -> List[str]:
    """Problems with a node's ``as_draft``: whole numbers in range, and a baseline to draft for."""
    settings = node.as_draft
    problems = [f"{field}.as_draft.{key}={value} must be at least {least}."
                for key, value, least in (("num_speculative_tokens", settings.num_speculative_tokens, 0),
                                          ("prompts", settings.prompts, 1),
                                          ("max_new_tokens", settings.max_new_tokens, 2))
                if value < least]
    if settings.num_speculative_tokens and not node.baseline:
        problems.append(
            f"{field}.as_draft.num_speculative_tokens={settings.num_speculative_tokens}: the model drafts for the "
            f"baseline evaluation's model, and {field}.baseline is unset. Name an earlier evaluate stage, of the "
            f"model to draft for ({field}.baseline=<that stage>, e.g. baseline_eval), or set "
            f"{field}.as_draft.num_speculative_tokens=0."
        )
    return problems


def draft_measures(settings: AsDraftConfig, target, draft, tokenizer, inputs: TaskInputs) -> Dict[str, float]:
    """The ``METRICS`` of ``draft`` proposing for ``target`` on the first ``settings.prompts`` free-answer prompts."""
    from llmexp.sdk import measure_draft  # imports torch: the planner loads this plugin without it

    items = inputs.world.free_answer_test()[: settings.prompts]
    prompts = [tokenizer(item.prompt)["input_ids"] for item in items]
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    speed = measure_draft(target, draft, prompts, settings.max_new_tokens, settings.num_speculative_tokens, eos)
    if not speed.identical:
        raise RuntimeError("greedy generation with the draft differs from the target's alone: a speculative decoding bug")
    return speed.as_metrics()
