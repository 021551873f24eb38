"""The ``evaluate`` technique: score a model on the embedded tasks (and GSM8K if given).

``llmexp technique=evaluate model.path=/ckpt/my-model`` evaluates a checkpoint; in the
default pipeline the same technique runs as the ``evaluation`` stage after training or
compression, and scores what that training taught besides its ``tasks``
(``harness/learned_tasks.py``: ``text2sql`` after ``technique=lora`` on the embedded data).
Per-item predictions go to ``<stage dir>/<task>.jsonl``. Its ``condition`` says what precedes each
question: nothing, solved examples, or retrieved passages (``harness/conditions.py``).

Four parts, a folder each: ``harness/`` runs tasks (the task interface, the registry fed by
the ``llmexp_evaluation_tasks`` hook, the scorer with lm-evaluation-harness's conventions,
paired comparison); ``tasks/`` holds the built-in task types, one module per benchmark
format, registered through that hook as a third party's are; ``judge/`` grades answers with
an LLM on an OpenAI-compatible endpoint; ``sandbox/`` runs a model's programs isolated.

This module imports without torch: the planner loads every plugin; the scorer, which imports it, is
imported when a stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from llmexp.data.knowledge import evaluated_world
from llmexp.data.gsm8k import load_gsm8k
from llmexp.data.jsonl import write_jsonl
from llmexp.sdk import (
    TOP_LEVEL_NODES, Consumed, PeakMemory, Progress, Reads, StageContext, StageResult, TaskInputs, Technique,
    TechniqueConfig, UserError, base_model, console, context_length, hookimpl, input_model, load_model, model_sources,
    node_path, resolved_encoder_config, run_device, stage_nodes, starting_weights,
)
from llmexp.plugins.evaluate.harness.conditions import (
    CLOSED_BOOK, RAG, condition_problems, retriever_for, unconditioned, with_shots,
)
from llmexp.plugins.evaluate.harness.draft import AsDraftConfig, as_draft_problems, draft_measures
from llmexp.plugins.evaluate.harness.learned_tasks import added_tasks, learned_problems, learned_tasks
from llmexp.plugins.evaluate.harness.paired import baseline_rows, missing_tasks_problem, paired_measures
from llmexp.plugins.evaluate.harness.registry import Task, resolve_tasks, run_task
from llmexp.plugins.evaluate.reported import reported
from llmexp.plugins.evaluate.tasks import BUILT_IN
from llmexp.plugins.evaluate.tasks.code import machine_problems
from llmexp.plugins.evaluate.tasks.embedded import EMBEDDED_TASKS
from llmexp.plugins.evaluate.tasks.text_perplexity import window_problems


@dataclass
class EvaluateConfig(TechniqueConfig):
    """What to evaluate. ``llmexp technique=evaluate technique.limit=50 technique.gsm8k_path=test.jsonl``"""
    name: str = "evaluate"
    # embedded task names (multiple_choice, free_answer, word_problems, perplexity, ...) and tasks
    # over your data described as mappings: {type: mmlu, path: data/mmlu, num_fewshot: 5} (harness/registry.py)
    tasks: List[Any] = field(default_factory=lambda: list(EMBEDDED_TASKS))
    limit: Optional[int] = None  # at most this many items per task (None: all)
    batch_size: int = 32  # sequences per forward pass / generate call
    max_new_tokens: int = 40  # generation budget per answer (real models on GSM8K want ~256)
    gsm8k_path: Optional[str] = None  # a GSM8K-format JSONL test file; adds the gsm8k task
    # what the model reads before each question: closed_book (the question alone), few_shot (num_fewshot solved
    # examples) or rag (the passages the run's `retriever` finds for it); harness/conditions.py
    condition: str = CLOSED_BOOK
    passages: Optional[int] = None  # rag: how many passages precede each question (None: retriever.top_k)
    num_fewshot: int = 0  # solved examples in the prompt: the text2sql task's always, every task's under few_shot
    # an earlier evaluate stage of the pipeline (same tasks) to compare with item by item:
    # deltas, flip rates, paired standard errors and KL(baseline || model) (harness/paired.py)
    baseline: Optional[str] = None
    # also score what the model was trained for (its stages' measured_by: text2sql after sft, lora
    # or dpo on data=embedded), and what a comparison naming this one as baseline adds; false: tasks alone
    add_learned_tasks: bool = True
    # compared with a baseline: also measure this model as the speculative-decoding draft of the baseline's
    # (acceptance rate, tokens per target forward, speed-up; harness/draft.py), when num_speculative_tokens > 0
    as_draft: AsDraftConfig = field(default_factory=AsDraftConfig)


class Evaluate(Technique):
    """Scores the input model; produces metrics and per-item predictions, not a model."""
    name = "evaluate"
    schema = EvaluateConfig
    memory = "inference"
    produces_model = False
    implied_measurement = True
    requires = ("torch", "transformers")

    @classmethod
    def metrics(cls, config, node):
        """Its tasks' metrics, with the tasks it adds for what its model learned, and its comparison's (``reported.py``)."""
        tasks = resolve_tasks(node.tasks, node.gsm8k_path, "tasks")[0]
        key = next((key for key, other in stage_nodes(config, strict=False) if other is node), None)
        return reported(tasks + added_tasks(tasks, learned_tasks(config).get(key, [])), compared=bool(node.baseline),
                        drafted=bool(node.baseline and node.as_draft.num_speculative_tokens))

    @classmethod
    def consumes(cls, config, key: str, node):
        """The baseline's results, when this evaluation is compared with one item by item."""
        if not node.baseline:
            return ()
        return (Consumed(f"{node_path(key)}.baseline", node.baseline, Reads.RESULTS, technique=cls.name,
                         fix=": the evaluation of the baseline model, with the same tasks"),)

    @classmethod
    def planned_as(cls, config, key: str, node) -> str:
        """``evaluate``, and the tasks it adds to its own for what its model was trained for (``learned_tasks``)."""
        tasks = resolve_tasks(node.tasks, node.gsm8k_path, "tasks")[0]
        added = [task.name for task in added_tasks(tasks, learned_tasks(config).get(key, []))]
        return f"{cls.name} (+{', +'.join(added)}: what its model was trained for)" if added else cls.name

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        """Code tasks run the model's programs isolated by the kernel of the machine that runs them."""
        return machine_problems(node.tasks, f"{field}.tasks")

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """Its task names, numbers and files, the tasks it adds for what its model learned, a model to score, and,
        compared with a baseline, that the baseline evaluation scores every task it does, those added included."""
        learned = learned_tasks(config)
        problems: List[str] = learned_problems({key: learned[key]})
        nodes = dict(stage_nodes(config, strict=False))
        keys = list(nodes)
        # the runner skips a top-level evaluation after a stage that made no model: it has nothing new to score
        skipped = key in TOP_LEVEL_NODES and keys.index(key) > 0
        # with no stage before it making a model it scores the run's weights, or on the embedded world the
        # embedded baseline (the base a fine-tuning stage would adapt)
        if model_sources(config)[key] is None and not skipped and starting_weights.source(config, True) is None:
            problems.append(_NO_MODEL.format(stage=key))
        problems += config_problems(node, node_path(key)) or _window_problems(node, context_length(config))
        retriever = config.get("retriever") or {}  # a config composed without the group has none
        problems += condition_problems(node, node_path(key), str(retriever.get("name", "none")))
        if not problems and str(retriever.get("name", "none")) == "none":
            problems += _unsearchable(node, node_path(key))
        baseline = node.get("baseline")
        earlier = keys[: keys.index(key)]
        if baseline in earlier and nodes[baseline].get("name") == cls.name:  # else llmexp.planning.data_flow refuses it
            theirs = _task_names(nodes[baseline], learned[baseline])
            missing = [name for name in _task_names(node, learned[key]) if name not in theirs]
            if missing:
                problems.append(missing_tasks_problem(f"{node_path(key)}.baseline", node_path(baseline), missing))
        return problems

    def run(self, ctx: StageContext) -> StageResult:
        from llmexp.plugins.evaluate.harness.scoring import Scorer

        cfg = ctx.stage_config
        problems = config_problems(cfg, ctx.stage_name)
        if problems:
            raise UserError(" ".join(problems))
        artifact = input_model(ctx)
        if artifact is None and starting_weights.source(ctx.config, True) is not None:
            artifact = base_model(ctx)  # the embedded baseline, loaded from its cache or trained now
        if artifact is None:
            raise UserError(_NO_MODEL.format(stage=ctx.stage_name))
        data = ctx.config.data
        searched = resolved_encoder_config(ctx.config, ctx.earlier)  # retriever.encoder=<embed stage>: its encoder
        inputs = TaskInputs(
            world=evaluated_world(data),
            heldout_documents=data.heldout_documents,
            limit=cfg.limit,
            gsm8k_path=cfg.gsm8k_path,
            num_fewshot=cfg.num_fewshot,
            stage_dir=str(ctx.stage_dir),
            condition=cfg.condition,
            config=searched,
        )
        metrics, artifacts = {}, {}
        progress = Progress(ctx.stage_name)
        tasks = _stage_tasks(ctx)
        closed = unconditioned(tasks, cfg.condition)
        if closed:
            console.note(f"{ctx.stage_name}: {', '.join(closed)} scored closed-book: the condition {cfg.condition} "
                         "does not apply to them (harness/conditions.py)")
        if cfg.condition == RAG:
            inputs.retrieve = retriever_for(searched, Path(ctx.stage_dir), cfg.passages)
        rows = {}
        artifact.model.to(run_device(ctx.config.hardware))  # a GPU run's model may come back on the CPU (Lightning)
        with progress, PeakMemory(next(artifact.model.parameters()).device) as peak:
            scorer = Scorer(artifact.model, artifact.tokenizer, cfg.batch_size, cfg.max_new_tokens, progress)
            for task in tasks:
                scorer.track(task.name)
                result = run_task(task, inputs, scorer)
                rows[task.name] = result.rows
                path = write_jsonl(Path(ctx.stage_dir) / f"{task.name}.jsonl", result.rows)
                metrics.update({key: float(value) for key, value in result.metrics.items()})
                metrics[f"{task.name}_n"] = len(result.rows)
                artifacts[task.name] = str(path)
            if cfg.baseline:
                scorer.track("vs baseline")
                metrics.update(_compared_with_baseline(ctx, scorer, inputs, tasks, metrics, rows))
        metrics["eval_peak_memory_mb"] = peak.mb
        return StageResult(metrics=metrics, artifacts=artifacts)


def _stage_tasks(ctx: StageContext) -> List[Task]:
    """The node's tasks, then the learned ones the config adds to this stage (``learned_tasks``), said on the console."""
    tasks = resolve_tasks(ctx.stage_config.tasks, ctx.stage_config.gsm8k_path, f"{ctx.stage_name}.tasks")[0]
    key = next((key for key, node in stage_nodes(ctx.config, strict=False) if node is ctx.stage_config), None)
    added = added_tasks(tasks, learned_tasks(ctx.config).get(key, []))
    if added:
        console.note(
            f"{ctx.stage_name}: also scoring {', '.join(task.name for task in added)}, what its model (or one compared "
            f"with it) was trained for; {node_path(key)}.add_learned_tasks=false scores {node_path(key)}.tasks alone"
        )
    return tasks + added


def _compared_with_baseline(ctx: StageContext, scorer, inputs: TaskInputs, tasks, metrics, rows):
    """Paired measures against the evaluation ``baseline`` names, and KL to the model it evaluated."""
    name, field_name = ctx.stage_config.baseline, f"{ctx.stage_name}.baseline"
    entry = ctx.earlier.get(name)
    if entry is None or entry.get("technique") != Evaluate.name:
        raise UserError(f"{field_name}={name} is not an evaluate stage that ran before {ctx.stage_name}; name one.")
    names = [task.name for task in tasks]
    headlines = {task.name: task.headline for task in tasks if task.headline}
    paired = paired_measures(
        metrics, rows, entry["metrics"], baseline_rows(entry, names, name, field_name), headlines
    )
    source = entry.get("input_model")
    # the run's own weights or the embedded baseline (whose source is its directory), not an earlier stage's model
    own = source == starting_weights.source(ctx.config, True)
    own_directory = starting_weights.weights_directory(ctx.config) or source
    reference = load_model(own_directory)[0] if own else ctx.model_of(source).model
    if reference.config.vocab_size != scorer.model.config.vocab_size:
        raise UserError(
            f"{field_name}={name}: its model has a vocabulary of {reference.config.vocab_size} tokens and this one "
            f"{scorer.model.config.vocab_size}, so their next-token distributions cannot be compared; name a baseline "
            "with the same tokenizer."
        )
    documents = inputs.first(inputs.world.heldout_documents(inputs.heldout_documents))
    total, count = scorer.next_token_kl(reference, documents)
    paired["kl_to_baseline"] = total / count
    if ctx.stage_config.as_draft.num_speculative_tokens:
        scorer.track("as draft of the baseline")
        paired.update(draft_measures(ctx.stage_config.as_draft, reference, scorer.model, scorer.tokenizer, inputs))
    return paired


_NO_MODEL = (
    "{stage}: nothing to evaluate: no stage before it produced a model, model.path is unset and the model trains no "
    "embedded baseline for this data. "
    "Set model.path=<a Hugging Face checkpoint directory> or run a training technique before it "
    "(e.g. the default pipeline: `llmexp technique=pretrain`)."
)


def config_problems(cfg, prefix: str) -> List[str]:
    """Problems with one evaluate node (``prefix`` is its key: ``technique`` or ``evaluation``)."""
    _, problems = resolve_tasks(cfg.tasks, None, f"{prefix}.tasks")
    if "gsm8k" in cfg.tasks and not cfg.gsm8k_path:
        problems.append(f"{prefix}.tasks lists 'gsm8k' but {prefix}.gsm8k_path is unset; set it to a GSM8K JSONL file.")
    for key, value in (("limit", cfg.limit), ("batch_size", cfg.batch_size), ("max_new_tokens", cfg.max_new_tokens)):
        if value is not None and value < 1:
            problems.append(f"{prefix}.{key}={value} must be at least 1.")
    if cfg.num_fewshot < 0:
        problems.append(f"{prefix}.num_fewshot={cfg.num_fewshot} must be 0 or more.")
    elif not problems:
        problems += _fewshot_problems(cfg, prefix)
    problems += as_draft_problems(cfg, prefix)
    if cfg.gsm8k_path:
        try:
            if not load_gsm8k(cfg.gsm8k_path):
                problems.append(
                    f"{prefix}.gsm8k_path={cfg.gsm8k_path} holds no problems; point it at a GSM8K test file."
                )
        except UserError as error:
            problems.append(f"{prefix}.gsm8k_path={cfg.gsm8k_path}: {error}")
    return problems


@hookimpl
def llmexp_techniques():
    return [Evaluate]


@hookimpl
def llmexp_evaluation_tasks():
    return list(BUILT_IN)


def _fewshot_problems(cfg, prefix: str) -> List[str]:
    """Under few_shot, the checks of the described tasks given the evaluation's ``num_fewshot`` (``with_shots``):
    where their solved examples come from."""
    found = []
    for index, task in enumerate(resolve_tasks(cfg.tasks, None, f"{prefix}.tasks")[0]):  # called on valid tasks
        spec = with_shots(task.spec or {}, task.type, cfg.condition, cfg.num_fewshot)
        if task.spec is not None and spec != task.spec:
            found += [f"{prefix}.condition=few_shot gives {task.name} {prefix}.num_fewshot={cfg.num_fewshot} solved "
                      f"examples (an entry's own num_fewshot, 0 included, overrides it): {problem}"
                      for problem in task.type.problems(spec, f"{prefix}.tasks[{index}]")]
    return found


def _window_problems(node, context: Optional[int]) -> List[str]:
    """text_perplexity tasks whose windows the run's model cannot read (the stage checks its model's own context)."""
    tasks = resolve_tasks(node.tasks, node.gsm8k_path, "tasks")[0]
    return [problem for task in tasks if context and task.spec and task.spec.get("type") == "text_perplexity"
            for problem in window_problems(task.spec, context)]


def _unsearchable(node, prefix: str) -> List[str]:
    """A task that scores the run's retriever (``retrieval``) in a run that has none: refused before anything runs."""
    searching = [task.name for task in resolve_tasks(node.tasks, node.gsm8k_path, "tasks")[0]
                 if task.type.name == "retrieval"]
    return [f"{prefix}.tasks: {', '.join(searching)} scores the run's retriever, and retriever=none has none; choose "
            "retriever=bm25 (or retriever=dense, retriever=hybrid), or drop the task."] if searching else []


def _task_names(node, learned: List[str]) -> List[str]:
    """Names of the tasks an evaluate node runs (its rows files and metric prefixes), ``learned`` ones included."""
    tasks = resolve_tasks(node.tasks, node.gsm8k_path, "tasks")[0]
    return [task.name for task in tasks + added_tasks(tasks, learned)]
