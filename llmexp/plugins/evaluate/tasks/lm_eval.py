"""Any lm-evaluation-harness task described by files on disk, run in-process on the framework's model.

``{type: lm_eval, include_path: my_tasks/, tasks: [mytask], num_fewshot: 5}``: lm-eval
(0.4.x) reads the task YAMLs under ``include_path`` (its built-in catalogue is not
indexed), builds the prompts and grades the answers; ``ScorerLM`` answers its requests
through the framework's ``Scorer``, so a task scores the model as every other task here
does (``harness/scoring.py``, which follows lm-eval's ``HFLM``). Nothing is downloaded: the
Hugging Face Hub is switched to offline mode for the run, and a task whose data is not on
this machine (``dataset_path: cais/mmlu`` and not in the local cache) stops with a
``UserError``; point its ``dataset_path`` at local files (``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``).

Metrics: lm-eval's ``<metric>,<filter>`` of every task and group, flattened to
``<task>_<metric>`` (filter ``none``) or ``<task>_<metric>_<filter>`` (e.g.
``gsm8k_exact_match_strict-match``); standard errors as ``<task>_<metric>_stderr``
(closed form for means, 1,000 bootstrap resamples otherwise), and ``<task>_n``. Rows: one
per lm-eval sample (task, doc id, first prompt, target, filtered answers, per-sample
metrics).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from llmexp.sdk import UserError
from llmexp.sdk import TaskInputs, TaskResult, TaskType

BOOTSTRAP_ITERS = 1000  # lm-eval's CLI uses 100,000: minutes for corpus metrics (BLEU), for the stderr only


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = list(spec["tasks"])
    manager = TaskManager(include_path=str(spec["include_path"]), include_defaults=False)
    with hub_offline():
        try:
            manager.load(names)  # builds the tasks, loading their data: the step that would download
        except Exception as error:  # lm-eval and datasets raise many kinds; all mean "cannot load this task"
            raise UserError(
                f"lm_eval tasks {', '.join(names)} from include_path={spec['include_path']} could not be loaded: "
                f"{' '.join(str(error).split())[:600]} (a {type(error).__name__}). Tasks run from local data only: "
                "point the task's dataset_path at files on this machine (dataset_path: json or csv with "
                "dataset_kwargs: {data_files: ...}, or a saved dataset directory)."
            ) from None
        results = simple_evaluate(
            model=scorer_lm(scorer),
            tasks=names,
            num_fewshot=spec.get("num_fewshot"),
            task_manager=manager,
            limit=inputs.limit,
            log_samples=True,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    metrics = flatten_metrics(results["results"])
    for task, counts in results.get("n-samples", {}).items():
        metrics[f"{_key(task)}_n"] = float(counts["effective"])
    rows = [_row(task, sample) for task, samples in results["samples"].items() for sample in samples]
    return TaskResult(metrics, rows)


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, float]:
    """lm-eval's ``{task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}`` as ``{"task_acc": 0.5, ...}``."""
    flat: Dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the alias, and "N/A" standard errors
            metric, filter_name = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            name = f"{_key(task)}_{metric[: -len('_stderr')] if stderr else metric}"
            name += "" if filter_name == "none" else f"_{_key(filter_name)}"
            flat[name + ("_stderr" if stderr else "")] = float(value)
    return flat


def scorer_lm(scorer):
    """An ``lm_eval.api.model.LM`` that answers lm-eval's requests through ``scorer``.

    Built in a function so that lm-eval is imported only when a task of this type runs.
    """
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llmexp.plugins.evaluate.harness.scoring import score_token_rows, greedy_generate, max_length

    class ScorerLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
            return [(s.logprob, s.is_greedy) for s in scorer.loglikelihood([request.args for request in requests])]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
            """Each text's log-likelihood in lm-eval's rolling windows, as ``HFLM`` computes it.

            The text is encoded as the tokenizer encodes it (BOS first where it adds one)
            and predicted from BOS (EOS where there is none), in disjoint windows of the
            model's context, each with as much preceding context as fits.
            """
            tokenizer, limit = scorer.tokenizer, max_length(scorer.model, scorer.tokenizer)
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            rows, owners = [], []
            for index, request in enumerate(requests):
                tokens = list(tokenizer(request.args[0]).input_ids)
                for context, targets in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, limit, 1)):
                    rows.append(((context + targets)[-(limit + 1) :][:-1], targets))
                    owners.append(index)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, score_token_rows(scorer.model, tokenizer, rows, scorer.batch_size, None)):
                totals[owner] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
            """Greedy (whatever the task's sampling settings), up to its ``until`` strings and EOS.

            ``max_gen_toks`` is the task's, else the evaluation's ``max_new_tokens``.
            """
            texts: Dict[int, str] = {}
            groups: Dict[str, List[int]] = {}
            for index, request in enumerate(requests):
                groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
            for indices in groups.values():
                settings = requests[indices[0]].args[1]
                until = settings.get("until") or []
                stop = [until] if isinstance(until, str) else list(until)
                generated = greedy_generate(
                    scorer.model,
                    scorer.tokenizer,
                    [requests[i].args[0] for i in indices],
                    max_new_tokens=int(settings.get("max_gen_toks") or scorer.max_new_tokens),
                    batch_size=scorer.batch_size,
                    stop=stop,
                )
                texts.update(zip(indices, generated))
            return [texts[i] for i in range(len(requests))]

    return ScorerLM()


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline (no download, local cache only) for the block.

    ``HF_HUB_OFFLINE`` is read once, when huggingface_hub and datasets are imported, so
    setting the variable here would be too late; both libraries consult these module
    constants on every call, so they are what is switched.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    import importlib.util

    include_path, names = spec.get("include_path"), spec.get("tasks")
    messages = []
    if importlib.util.find_spec("lm_eval") is None:
        messages.append(
            f"{field} is an lm_eval task but lm-evaluation-harness is not installed; install the extra: "
            "pip install 'llmexp[lm-eval]'."
        )
    if not isinstance(include_path, str) or not Path(include_path).is_dir():
        messages.append(
            f"{field}.include_path={include_path!r} is not a directory; give the directory holding the "
            "lm-eval task YAML files (lm-eval's --include_path)."
        )
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        messages.append(f"{field}.tasks={names!r} must be a list of lm-eval task, group or tag names, e.g. [mytask].")
    num_fewshot = spec.get("num_fewshot")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        messages.append(f"{field}.num_fewshot={num_fewshot!r} must be a whole number, 0 or more (or left out: the task's).")
    if messages:
        return messages
    defined, unreadable = task_names_in(Path(include_path))
    missing = [name for name in names if not fnmatch.filter(defined, name)]
    if missing:
        found = ", ".join(sorted(defined)) or "none"
        broken = f" YAML files lm-eval would skip: {'; '.join(unreadable)}." if unreadable else ""
        messages.append(
            f"{field}.tasks names {', '.join(missing)}, defined by no YAML file under {include_path} "
            f"(names there: {found}).{broken} Give the `task:`, `group:` or `tag:` name of a task there."
        )
    return messages


def task_names_in(directory: Path) -> Tuple[List[str], List[str]]:
    """The task, group and tag names the YAML files under ``directory`` define, and the files that do not parse.

    Read with PyYAML rather than lm-eval's ``TaskManager``, whose import costs seconds
    (datasets, pandas), so that the planner's check stays fast. ``!function`` tags are
    accepted, as lm-eval accepts them.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    names: set = set()
    unreadable: List[str] = []
    for path in sorted(directory.rglob("*.yaml")):
        if "__pycache__" in path.parts or ".ipynb_checkpoints" in path.parts:
            continue
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            mark = getattr(error, "problem_mark", None)
            unreadable.append(f"{path}:{mark.line + 1}" if mark else f"{path} ({error})")
            continue
        if not isinstance(config, dict):
            continue
        for key in ("task", "group", "tag"):
            value = config.get(key)
            values = [value] if isinstance(value, str) else value if key == "tag" and isinstance(value, list) else []
            names.update(v for v in values if isinstance(v, str))
    return sorted(names), unreadable


def _row(task: str, sample: Mapping[str, Any]) -> Dict[str, Any]:
    arguments = sample.get("arguments") or [[""]]
    row = {
        "task": task,
        "doc_id": sample.get("doc_id"),
        "prompt": arguments[0][0],
        "target": sample.get("target"),
        "filtered_resps": sample.get("filtered_resps"),
        "filter": sample.get("filter"),
    }
    for metric in sample.get("metrics") or []:
        value = sample.get(metric)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            row[metric] = value
    return json.loads(json.dumps(row, default=str))  # lm-eval's docs may hold numpy values; rows are JSON


def _key(name: str) -> str:
    return "_".join(str(name).replace(",", " ").split())


LM_EVAL = TaskType("lm_eval", run, problems, keys=("include_path", "tasks", "num_fewshot"))
