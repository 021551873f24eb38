"""What GRPO samples completions for: each prompt's text as the model sees it, and the answer a reward may check.

``data=word_problems``, and ``data=embedded`` (its world's word problems: the embedded task with a
verifiable answer): the problems' prompts exactly as the evaluation's ``word_problems`` task asks
them ("Question: ...\\nAnswer:"), with the number after ``####`` as the answer. ``data=preference``:
the pairs' prompts as DPO and SFT show them (``format_prompt``), with no answer, so only a reward
model or the user's reward applies. Pure Python: the plan reads the prompts to check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from llmexp.data.gsm8k import Number
from llmexp.sdk import UserError



@dataclass(frozen=True)
class Prompt:
    """``question``: the plain prompt (what reward functions get); ``answer``: the reference, when the data has one."""

    question: str
    answer: Optional[Number] = None
    formatted: bool = False  # True: the model sees format_prompt(question) (the customization techniques' layout)

    def text(self, tokenizer) -> str:
        """The text the policy continues."""
        if not self.formatted:
            return self.question
        from llmexp.data.instructions import format_prompt

        return format_prompt(self.question, tokenizer)


def training_prompts(data_cfg) -> Tuple[List[Prompt], List[Prompt]]:
    """(train, validation) prompts of the run's data; anything else is a ``UserError`` naming ``data``."""
    if data_cfg.name in ("word_problems", "embedded"):
        from llmexp.data.word_problems import word_problem_data

        train, validation = word_problem_data(data_cfg)
        return [Prompt(p.prompt, p.answer) for p in train], [Prompt(p.prompt, p.answer) for p in validation]
    if data_cfg.name == "preference":
        from llmexp.data.preference import preference_data

        train, validation = preference_data(data_cfg)
        return ([Prompt(pair.prompt, formatted=True) for pair in _distinct(train)],
                [Prompt(pair.prompt, formatted=True) for pair in _distinct(validation)])
    raise UserError(
        f"data={data_cfg.name} with technique=grpo: GRPO samples completions for prompts and rewards them; "
        "use data=word_problems (prompts with the numbers their answers must reach: the exact_match reward) or "
        "data=preference (the pairs' prompts, for a reward model or your own reward function)."
    )


def _distinct(pairs):
    """One pair per prompt (preference files often hold several pairs of the same prompt), first seen first."""
    seen = {}
    for pair in pairs:
        seen.setdefault(pair.prompt, pair)
    return list(seen.values())
