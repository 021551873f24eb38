"""Word problems to learn a skill from: a prompt, its worked solution and the number it ends in (``data=word_problems``).

Fine-tuning reads them as prompt -> worked solution (SFT on the gold answers); reinforcement
learning reads the prompt and the number a completion must reach (GRPO's verifiable reward).
Without ``data.path`` they are the embedded world's word problems, whose number triples are never
in the held-out test that the evaluation's ``word_problems`` task scores, so a score after
training measures the skill, not recall. With ``data.path``, a GSM8K-layout JSONL training file
(``{"question": ..., "answer": "... #### 72"}``); validation from ``data.validation_path`` or a
seeded share (``llmexp.data.splits``).
"""

from __future__ import annotations

from typing import List, Tuple

from llmexp.data.embedded import build_world
from llmexp.data.gsm8k import GSM8KProblem, load_gsm8k
from llmexp.data.records import Example
from llmexp.data.splits import read_train_and_validation, split_validation
from llmexp.errors import UserError


DEFAULT_PROBLEMS = 2000  # generated when the data option does not say (data=embedded)


def word_problem_data(data_cfg) -> Tuple[List[GSM8KProblem], List[GSM8KProblem]]:
    """(train, validation) problems of ``data=word_problems``, or of ``data=embedded`` (its world's, as
    ``data=word_problems`` generates them by default); a bad file line raises ``UserError`` at ``file:line``."""
    if data_cfg.name not in ("word_problems", "embedded"):
        raise UserError(
            f"data={data_cfg.name} holds no word problems with answers. Use data=word_problems (the embedded "
            "world's, or data.path=<train.jsonl> in GSM8K's layout: question, and an answer ending '#### N')."
        )
    if data_cfg.get("path"):
        return read_train_and_validation(data_cfg, load_gsm8k)
    count = data_cfg.get("problems", DEFAULT_PROBLEMS)
    if count < 2:
        raise UserError(
            f"data.problems={count}: generate at least 2 word problems (one to train on, one to "
            "validate with), e.g. data.problems=2000."
        )
    world = build_world(data_cfg.seed, data_cfg.num_people)
    problems = [GSM8KProblem(p.question, p.solution, p.answer) for p in world.word_problems(count)]
    return split_validation(problems, data_cfg)


def word_problem_examples(data_cfg) -> Tuple[List[Example], List[Example]]:
    """(train, validation) of ``word_problem_data`` as prompt -> worked solution examples, for SFT and LoRA."""
    train, validation = word_problem_data(data_cfg)
    return [_example(p) for p in train], [_example(p) for p in validation]


def _example(problem: GSM8KProblem) -> Example:
    return Example(problem.prompt, problem.solution)
