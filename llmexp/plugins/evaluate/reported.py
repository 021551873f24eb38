"""What an evaluation reports to a comparison (``Evaluate.metrics``): its tasks' metrics, what a comparison with a
baseline adds, and what scoring cost.

The embedded tasks' declarations are the table below, by task: their qualities first, most important
first (a run's plots draw the first two its evaluations have), then the other measures in the order
the comparison table shows them. A task described as data declares its own through its task type
(``TaskType.metrics``); one that declares none reports its headline as its quality.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from llmexp.sdk import Metric, MetricKind
from llmexp.plugins.evaluate.harness.draft import METRICS as DRAFT_METRICS

QUALITY, INFO, COST = MetricKind.QUALITY, MetricKind.INFO, MetricKind.COST


def _keyed(name: str, higher_is_better: bool, kind: MetricKind) -> Metric:
    """A metric labelled by its key, as the comparison table has always headed it."""
    return Metric(name, higher_is_better, name, kind)


# (the task that reports it, the metric)
EMBEDDED: Tuple[Tuple[str, Metric], ...] = (
    ("multiple_choice", _keyed("mc_cloze_acc", True, QUALITY)),
    ("word_problems", _keyed("word_problem_em", True, QUALITY)),
    ("text2sql", _keyed("text2sql_em", True, QUALITY)),
    ("free_answer", _keyed("free_answer_em", True, QUALITY)),
    ("gsm8k", _keyed("gsm8k_em", True, QUALITY)),
    ("multiple_choice", _keyed("mc_letter_acc", True, QUALITY)),
    ("text2sql", _keyed("text2sql_exec_acc", True, INFO)),
    ("text2sql", _keyed("text2sql_rougeL", True, INFO)),
    ("text2sql", _keyed("text2sql_bleu", True, INFO)),
    ("text2sql", _keyed("text2sql_f1", True, INFO)),
    ("perplexity", _keyed("perplexity", False, INFO)),
)
# What the comparison with ``baseline`` adds (``harness/paired.py``), by the task it compares (None: any).
PAIRED: Tuple[Tuple[Optional[str], Metric], ...] = (
    ("multiple_choice", _keyed("mc_cloze_acc_delta", True, INFO)),
    ("multiple_choice", _keyed("mc_cloze_acc_delta_se", False, INFO)),
    ("word_problems", _keyed("word_problem_em_delta", True, INFO)),
    ("word_problems", _keyed("word_problem_em_delta_se", False, INFO)),
    ("perplexity", _keyed("perplexity_rel_delta", False, INFO)),
    (None, _keyed("kl_to_baseline", False, INFO)),
    ("multiple_choice", _keyed("flip_rate_multiple_choice", False, INFO)),
    ("word_problems", _keyed("flip_rate_word_problems", False, INFO)),
    ("word_problems", _keyed("word_problem_em_mcnemar_p", False, INFO)),
    ("text2sql", _keyed("text2sql_em_delta", True, INFO)),
    ("text2sql", _keyed("text2sql_em_mcnemar_p", False, INFO)),
)
# What scoring cost: the forward pass's speed (the throughput task) and the evaluation's peak memory.
COSTS: Tuple[Tuple[Optional[str], Metric], ...] = (
    ("throughput", Metric("tokens_per_s", True, "throughput", COST)),
    (None, Metric("eval_peak_memory_mb", False, "memory", COST)),
)


def reported(tasks: Sequence, compared: bool, drafted: bool = False) -> Tuple[Metric, ...]:
    """What an evaluation of ``tasks`` (``harness.registry.Task``) reports; ``compared``: it has a baseline;
    ``drafted``: its model is measured as the baseline's draft (``harness/draft.py``)."""
    names = {task.name for task in tasks if task.spec is None}

    def of(table) -> list:
        return [metric for task, metric in table if task is None or task in names]

    embedded = of(EMBEDDED)
    described = [metric for task in tasks if task.spec is not None for metric in task.metrics() or _headline(task)]
    return (
        *(metric for metric in embedded if metric.kind is QUALITY), *described,
        *(metric for metric in embedded if metric.kind is not QUALITY), *(of(PAIRED) if compared else ()),
        *(DRAFT_METRICS if drafted else ()), *of(COSTS),
    )


def _headline(task) -> Tuple[Metric, ...]:
    return (_keyed(task.headline, True, QUALITY),) if task.headline else ()
