"""The ``code`` task type: HumanEval-style functional correctness, pass@k over executed completions.

``{type: code, path: data/HumanEval.jsonl, n_samples: 10, k: [1, 10]}`` reads problems in
OpenAI's ``human-eval`` layout (one JSON object a line: ``task_id``, ``prompt``,
``canonical_solution``, ``test`` defining ``check(candidate)``, ``entry_point``), has the
model complete each prompt ``n_samples`` times (greedy when 1; sampled with
``temperature``/``top_p``/``seed`` otherwise), cut at the ``stop`` strings, and runs each
``check(<entry_point>)`` with the sandbox (``sandbox/``): ``prompt + completion`` runs in
a process the kernel isolates (namespaces, a read-only file view, an unprivileged uid,
resource limits, seccomp), ``prompt + test`` runs in a verdict process that calls the
program's function there. A sample passes when ``check`` returns. Where the kernel does
not allow the isolation, the task refuses to run (``machine_problems``) unless the spec
says ``unsafe_allow_unisolated: true``.

pass@k is Chen et al. 2021's unbiased estimator, averaged over problems: with ``n``
samples of which ``c`` pass, ``1 - C(n-c, k) / C(n, k)``, computed as a product so that
large ``n`` does not overflow. Metrics: ``pass_at_<k>`` for each ``k``, and
``samples_timed_out`` (a share: a high value means ``timeout_s`` is too short, or the
model loops). Rows (one per problem) carry every completion with its outcome; ``correct``
is whether the first sample passed (with one sample, what ``pass_at_1`` averages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from llmexp.sdk import warn
from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.sdk import UserError
from llmexp.plugins.evaluate.sandbox.runner import Limits, Program, isolation_problem, run_programs
from llmexp.sdk import Metric, MetricKind, statistics
from llmexp.sdk import TaskInputs, TaskResult, TaskType

# Where HumanEval's completions end (Chen et al. 2021): the next top-level statement.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")
DEFAULTS: Dict[str, Any] = {
    "n_samples": 1,
    "k": [1],
    "temperature": 0.8,
    "top_p": 0.95,
    "seed": 0,
    "max_new_tokens": None,  # None: the evaluation's max_new_tokens
    "stop": list(HUMANEVAL_STOP),
    "timeout_s": 10.0,
    "workers": None,  # None: one per CPU core, at most 8
    "memory_mb": 2048,
    "unsafe_allow_unisolated": False,  # True: where the kernel cannot isolate the programs, run them anyway
}
KEYS = ("path", *DEFAULTS)


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


def load_problems(path: str) -> List[CodeProblem]:
    """The problems of a HumanEval-layout JSONL file; a bad line raises ``UserError`` naming ``file:line``."""
    problems: List[CodeProblem] = []
    seen: Dict[str, int] = {}
    for number, record in read_jsonl_numbered(path):
        missing = [name for name in REQUIRED_FIELDS if not isinstance(record.get(name), str)]
        if missing:
            raise UserError(
                f"{path}:{number}: {', '.join(missing)} missing or not a string. A code problem (HumanEval layout) "
                f"has string fields {', '.join(REQUIRED_FIELDS)} (and canonical_solution); fix or delete that line."
            )
        if not record["entry_point"].isidentifier():
            raise UserError(
                f"{path}:{number}: entry_point={record['entry_point']!r} is not a Python name; give the name of the "
                "function the tests call (check(<entry_point>))."
            )
        try:
            compile(checks_source(record["prompt"], record["test"]), f"{path}:{number}", "exec")
        except SyntaxError as error:
            raise UserError(
                f"{path}:{number}: the prompt followed by the test is not valid Python ({error.msg}, line "
                f"{error.lineno} of the two). The checks run apart from the completion, so the prompt must be "
                "complete on its own (HumanEval's end after the function's docstring); fix or delete that line."
            ) from None
        if record["task_id"] in seen:
            raise UserError(
                f"{path}:{number}: task_id={record['task_id']!r} already used on line {seen[record['task_id']]}; "
                "task ids must be unique."
            )
        seen[record["task_id"]] = number
        problems.append(CodeProblem(*(record[name] for name in REQUIRED_FIELDS)))
    return problems


def program(problem: CodeProblem, completion: str) -> Program:
    """One sample for the sandbox: the prompt and the completion run isolated, the prompt and the test check them."""
    return Program(f"{problem.prompt}{completion}\n", checks_source(problem.prompt, problem.test), problem.entry_point)


def checks_source(prompt: str, test: str) -> str:
    """The prompt (its imports and helpers, which tests use) and the test, which defines ``check(candidate)``."""
    return f"{prompt}\n{test}\n"


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    settings = {**DEFAULTS, **{key: value for key, value in spec.items() if value is not None}}
    isolated = _isolated(settings, f"the {spec.get('name') or spec['type']} task")
    problems = inputs.first(load_problems(spec["path"]))
    n = int(settings["n_samples"])
    completions = _complete(scorer, [problem.prompt for problem in problems], n, settings)
    limits = Limits(timeout_s=float(settings["timeout_s"]), memory_mb=int(settings["memory_mb"]))
    samples = [program(problem, completion) for problem, own in zip(problems, completions) for completion in own]
    workers = settings["workers"] or min(8, os.cpu_count() or 1)
    outcomes = run_programs(samples, limits, workers=workers, isolated=isolated)
    ks = sorted(set(int(k) for k in settings["k"]))
    rows = []
    for index, (problem, own) in enumerate(zip(problems, completions)):
        results = outcomes[index * n : (index + 1) * n]
        passed = sum(outcome.passed for outcome in results)
        rows.append(
            {
                "task_id": problem.task_id,
                "prompt": problem.prompt,
                "completions": own,
                "outcomes": [
                    {"status": o.status, "seconds": round(o.seconds, 3), "detail": o.detail[-1000:]} for o in results
                ],
                "n": n,
                "passed": passed,
                **{f"pass_at_{k}": statistics.pass_at_k(n, passed, k) for k in ks},
                "correct": results[0].passed,
            }
        )
    metrics = {f"pass_at_{k}": statistics.mean(row[f"pass_at_{k}"] for row in rows) for k in ks}
    metrics["samples_timed_out"] = statistics.mean(o.status == "timed_out" for o in outcomes)
    return TaskResult(metrics, rows)


def machine_problems(entries: Sequence[Any], field: str) -> List[str]:
    """The code tasks among ``entries`` (a ``tasks`` list at ``field``) that this machine cannot run isolated."""
    found = []
    for index, entry in enumerate(entries):
        spec = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
        if isinstance(spec, Mapping) and spec.get("type") == "code":
            problem = _isolation_refusal({**DEFAULTS, **spec}, f"{field}[{index}]")
            if problem:
                found.append(problem)
    return found


def _isolated(settings: Mapping[str, Any], where: str) -> bool:
    """Whether to isolate the programs; raises ``UserError`` where that is impossible and not waived."""
    refusal = _isolation_refusal(settings, where)
    if refusal:
        raise UserError(refusal)
    reason = isolation_problem()
    if reason:
        warn(f"{where}: running the model's programs WITHOUT isolation (unsafe_allow_unisolated: true): {reason}")
    return reason is None


def _isolation_refusal(settings: Mapping[str, Any], where: str) -> Optional[str]:
    if settings.get("unsafe_allow_unisolated") is True:
        return None
    reason = isolation_problem()
    if reason is None:
        return None
    return (
        f"{where}: the code task runs the model's programs isolated by the kernel (user, PID, mount and network "
        f"namespaces, seccomp), and this machine refuses that: {reason}. Run it where unprivileged user namespaces "
        "are allowed (on the host, or in a container started with --security-opt seccomp=unconfined; on Ubuntu "
        "24.04 and later also sysctl kernel.apparmor_restrict_unprivileged_userns=0) and, when llmexp runs as root, "
        "with a Python installation that uid 65534 may read (the programs run as that uid), or set "
        f"{where}.unsafe_allow_unisolated=true to run them without isolation: as the user running llmexp, able to "
        "read and write what that user can."
    )


def _complete(scorer, prompts: Sequence[str], n: int, settings: Mapping[str, Any]) -> List[List[str]]:
    """``n`` completions of each prompt: greedy when ``n`` is 1, else sampled (the same seed: the same samples)."""
    from llmexp.plugins.evaluate.harness.scoring import Sampling

    budget, stop = settings["max_new_tokens"], list(settings["stop"])
    if n == 1:
        return [[text] for text in scorer.generate(list(prompts), stop, max_new_tokens=budget)]
    sampling = Sampling(float(settings["temperature"]), float(settings["top_p"]), int(settings["seed"]))
    repeated = [prompt for prompt in prompts for _ in range(n)]
    flat = scorer.generate(repeated, stop, max_new_tokens=budget, sampling=sampling)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    """What is wrong with a ``code`` task's spec: the file, and each setting's range."""
    found: List[str] = []
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        found.append(
            f"{field}.path is missing; set it to a HumanEval-layout JSONL file (task_id, prompt, test, entry_point)."
        )
    else:
        try:
            if not load_problems(path):
                found.append(f"{field}.path={path} holds no problems; point it at a HumanEval-layout JSONL file.")
        except UserError as error:
            found.append(f"{field}.path: {error}")
    settings = {**DEFAULTS, **{key: value for key, value in spec.items() if value is not None}}
    n = settings["n_samples"]
    if not _whole(n, 1):
        found.append(f"{field}.n_samples={n!r} must be a whole number of at least 1 (completions per problem).")
        n = None
    ks = settings["k"]
    if not isinstance(ks, (list, tuple)) or not ks or not all(_whole(k, 1) for k in ks):
        found.append(f"{field}.k={ks!r} must be a list of whole numbers of at least 1, e.g. [1, 10].")
    elif n is not None and max(ks) > n:
        found.append(
            f"{field}.k={list(ks)} asks for pass@{max(ks)} from {n} sample(s); every k must be at most n_samples "
            f"(raise n_samples to {max(ks)} or drop that k)."
        )
    for key, high, what in (
        ("temperature", None, "above 0 (sampling n_samples > 1 completions; with 1 the completion is greedy)"),
        ("top_p", 1.0, "in (0, 1]"),
        ("timeout_s", None, "above 0 seconds"),
    ):
        value = settings[key]
        if not _number(value) or value <= 0 or (high is not None and value > high):
            found.append(f"{field}.{key}={value!r} must be a number {what}.")
    if not isinstance(settings["unsafe_allow_unisolated"], bool):
        found.append(f"{field}.unsafe_allow_unisolated={settings['unsafe_allow_unisolated']!r} must be true or false.")
    for key, low in (("seed", 0), ("max_new_tokens", 1), ("workers", 1), ("memory_mb", 64)):
        value = settings[key]
        if value is not None and not _whole(value, low):
            found.append(f"{field}.{key}={value!r} must be a whole number of at least {low}.")
    stop = settings["stop"]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        found.append(f"{field}.stop={stop!r} must be a list of non-empty strings, e.g. {list(HUMANEVAL_STOP)!r}.")
    return found


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics(spec: Mapping[str, Any]) -> Tuple[Metric, ...]:
    """``pass_at_<k>`` for each ``k`` (the first its quality), and the share of samples that timed out.

    A spec ``problems`` refuses declares what it can (the plan reports the rest)."""
    ks = {**DEFAULTS, **spec}["k"]
    ks = sorted(set(k for k in ks if _whole(k, 1))) if isinstance(ks, (list, tuple)) else []
    passes = (Metric(f"pass_at_{k}", True, f"pass_at_{k}", MetricKind.QUALITY if k == ks[0] else MetricKind.INFO)
              for k in ks)
    return (*passes, Metric("samples_timed_out", False, "samples_timed_out", MetricKind.INFO))


CODE = TaskType("code", run, problems, KEYS, headline="pass_at_1", metrics=metrics)
