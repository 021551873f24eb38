"""GRPO's rewards: Python callables ``reward(prompts, completions, answers) -> list of floats``, one per completion.

``technique.rewards`` names them, summed with ``technique.reward_weights`` (TRL's default
``sum_then_normalize``: the weighted sum is what the group's advantages are computed from):

- ``exact_match``: 1 when the completion's strict ``#### N`` (``llmexp.data.gsm8k.extract_answer``, the
  evaluation's grading) equals the prompt's answer, else 0;
- ``format``: 1 when the completion has a strict ``#### <number>`` at all, else 0;
- ``reward_model``: the score of a saved ``AutoModelForSequenceClassification`` (one label) for the prompt and
  completion, tokenized as ``technique=reward_model`` trained it (``encode_example``: the formatted prompt, the
  response, EOS). ``technique.reward_model`` is the name of an earlier ``reward_model`` stage of the pipeline
  (its ``reward_model`` artifact) or a local directory: never a hub download;
- ``package.module:function``: the user's callable, imported when the plan is made.

The module imports without torch (the plan resolves the names); the reward model loads in ``load_rewards``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from llmexp.data.gsm8k import extract_answer
from llmexp.sdk import FIELD, UserError, read_hf_config, stage_nodes, validate_checkpoint_dir

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Any]], List[float]]
REWARD_MODEL = "reward_model"
ARTIFACT = "reward_model"  # the artifact a reward_model stage records: the saved classifier's directory
REWARD_MODEL_BATCH = 32


def exact_match(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any]) -> List[float]:
    """1.0 where the completion's first strict ``#### N`` equals the answer."""
    scores = []
    for completion, answer in zip(completions, answers, strict=True):
        predicted = extract_answer(completion)
        scores.append(float(predicted is not None and predicted == answer))
    return scores


def format_reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any]) -> List[float]:
    """1.0 where the completion states a final answer the strict way (``#### <number>``), right or wrong."""
    return [float(extract_answer(completion) is not None) for completion in completions]


BUILT_IN: Dict[str, RewardFn] = {"exact_match": exact_match, "format": format_reward}
NEEDS_ANSWERS = ("exact_match",)


def is_user_function(name: str) -> bool:
    return ":" in name


def user_function(spec: str, field: str) -> RewardFn:
    """The callable ``package.module:function`` names; a ``UserError`` naming ``field`` when it cannot be had."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way while it imports
        raise UserError(
            f"{field} names {spec!r}, and its module {module_name!r} does not import ({type(error).__name__}: "
            f"{error}); put the module on PYTHONPATH (or install its package) and name a function in it as "
            "'package.module:function'."
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(
            f"{field} names {spec!r}, and {module_name} has no function {function_name!r}; name a callable "
            "taking (prompts, completions, answers) and returning one float per completion."
        )
    return function


def reward_stage(config, key: str, node) -> Optional[str]:
    """The earlier pipeline stage ``technique.reward_model`` names, or None when it names a directory."""
    name = node.get("reward_model")
    if not name or REWARD_MODEL not in node.rewards:
        return None
    stages = [stage for stage, _ in stage_nodes(config, strict=False)]
    earlier = stages[:stages.index(key)] if key in stages else []
    return name if name in earlier else None


def reward_problems(config, key: str, node, field: str, has_answers: bool) -> List[str]:
    """What is wrong with the stage's ``rewards``, ``reward_weights`` and ``reward_model``, one paragraph each."""
    rewards = list(node.rewards)
    problems = []
    if not rewards:
        problems.append(f"{field}.rewards is empty; name at least one reward: exact_match, format, reward_model "
                        "or 'package.module:function'.")
    for name in rewards:
        if is_user_function(name):
            try:
                user_function(name, f"{field}.rewards")
            except UserError as error:
                problems.append(str(error))
        elif name not in (*BUILT_IN, REWARD_MODEL):
            problems.append(f"{field}.rewards names {name!r}, which is no reward; choose from exact_match, format, "
                            "reward_model, or name your own as 'package.module:function'.")
        elif name in NEEDS_ANSWERS and not has_answers:
            problems.append(
                f"{field}.rewards has {name}, which compares a completion with the prompt's answer, and "
                f"data={config.data.name} has no answers; use data=word_problems, or reward with reward_model or "
                "your own 'package.module:function'.")
    weights = list(node.reward_weights)
    if weights and len(weights) != len(rewards):
        problems.append(f"{field}.reward_weights has {len(weights)} values for {len(rewards)} rewards; give one weight "
                        "per reward, in the same order (or [] for all 1).")
    if REWARD_MODEL in rewards:
        problems += _reward_model_problems(config, key, node, field)
    return problems


def _reward_model_problems(config, key: str, node, field: str) -> List[str]:
    name = node.get("reward_model")
    if not name:
        return [f"{field}.rewards has reward_model and {field}.reward_model is not set; set it to the name of an "
                "earlier technique=reward_model stage of the pipeline, or to the directory of a saved "
                "AutoModelForSequenceClassification."]
    if reward_stage(config, key, node) is not None:
        return []  # the planner checks the stage runs before this one and is a reward_model stage (consumes)
    if not Path(name).is_dir():
        return [f"{field}.reward_model={name} is neither an earlier stage of this pipeline nor a directory; name "
                "an earlier technique=reward_model stage, or give the directory a reward_model stage saved "
                "(<stage dir>/reward_model)."]
    try:
        validate_checkpoint_dir(name)
        architectures = read_hf_config(name).get("architectures") or []
    except UserError as error:
        return [str(error).replace(FIELD, f"{field}.reward_model")]
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return [f"{field}.reward_model={name} holds a {', '.join(architectures) or 'model'} checkpoint, not a "
                "sequence classifier; give the directory of an AutoModelForSequenceClassification with one label "
                "(what technique=reward_model saves)."]
    return []


def reward_model_directory(ctx) -> Path:
    """Where the reward model is: the ``reward_model`` artifact of the stage named, else the directory named."""
    name = ctx.stage_config.reward_model
    if name in ctx.earlier:
        artifacts = ctx.earlier[name].get("artifacts") or {}
        if ARTIFACT not in artifacts:
            raise UserError(f"stage {name} recorded no {ARTIFACT!r} artifact; name a technique=reward_model stage.")
        return Path(artifacts[ARTIFACT])
    return Path(name)


class RewardModelScore:
    """The reward function of a saved sequence classifier: its score for each (prompt, completion)."""

    def __init__(self, directory: Path, max_len: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True,
                                                                        trust_remote_code=False)
        self.model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        self.max_len = max_len

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any]) -> List[float]:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        from llmexp.data.instructions import encode_example
        from llmexp.data.records import Example

        rows = [torch.tensor(encode_example(Example(p, c), self.tokenizer, self.max_len)[0])
                for p, c in zip(prompts, completions, strict=True)]
        scores: List[float] = []
        with torch.no_grad():
            for begin in range(0, len(rows), REWARD_MODEL_BATCH):
                batch = rows[begin:begin + REWARD_MODEL_BATCH]
                ids = pad_sequence(batch, batch_first=True, padding_value=self.tokenizer.pad_token_id)
                mask = pad_sequence([torch.ones_like(row) for row in batch], batch_first=True, padding_value=0)
                scores.extend(self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist())
        return scores


@dataclass
class Rewards:
    """The stage's reward functions by name, and their weights."""

    names: List[str]
    functions: List[RewardFn]
    weights: List[float]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any]):
        """(each function's rewards [completions][functions], their weighted sum per completion)."""
        columns = []
        for name, function in zip(self.names, self.functions):
            values = [float(v) for v in function(list(prompts), list(completions), list(answers))]
            if len(values) != len(completions):
                raise UserError(f"reward {name} returned {len(values)} values for {len(completions)} completions; "
                                "a reward function returns one float per completion.")
            columns.append(values)
        per_function = [list(row) for row in zip(*columns)]
        totals = [sum(w * v for w, v in zip(self.weights, row)) for row in per_function]
        return per_function, totals


def load_rewards(ctx, field: str) -> Rewards:
    """The stage's ``Rewards``; the reward model loads here."""
    node = ctx.stage_config
    functions: List[RewardFn] = []
    for name in node.rewards:
        if is_user_function(name):
            functions.append(user_function(name, f"{field}.rewards"))
        elif name == REWARD_MODEL:
            functions.append(RewardModelScore(reward_model_directory(ctx), ctx.config.data.seq_len))
        else:
            functions.append(BUILT_IN[name])
    weights = [float(w) for w in node.reward_weights] or [1.0] * len(functions)
    return Rewards(list(node.rewards), functions, weights)
