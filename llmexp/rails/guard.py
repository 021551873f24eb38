"""Running a rails config's flows on a request's input and on the model's output: a verdict per side.

Flows run in the order the config lists them, as NeMo Guardrails runs them; the first that blocks ends the
side, and a masking flow hands its masked text to the flows after it (and to the model, or the client).
The self checks ask the served model itself through ``ask`` (a coroutine: prompt, max_tokens -> its answer),
given per check, so a server asks the model (or adapter) each request names and an evaluation its own model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional, Tuple

import jinja2

from llmexp.rails.config import SELF_CHECK_TASKS, RailsSpec
from llmexp.rails.sensitive_data import find_entities, mask

REFUSAL = "I'm sorry, I can't respond to that."  # NeMo Guardrails' `bot refuse to respond`
Ask = Callable[[str, int], Awaitable[str]]


@dataclass(frozen=True)
class Verdict:
    """What the rails of one side made of a text: allowed (``rail`` None) or blocked by ``rail``; the text as it
    goes on (masked where a masking rail changed it); the entities masked; seconds spent per flow; what the
    model answered each self check."""

    text: str
    rail: Optional[str] = None
    reason: str = ""
    masked: Tuple[str, ...] = ()
    seconds: Tuple[Tuple[str, float], ...] = ()
    answers: Tuple[Tuple[str, str], ...] = ()

    @property
    def blocked(self) -> bool:
        return self.rail is not None

    def report(self) -> Dict[str, object]:
        """The verdict as a response shows it."""
        return {"blocked": self.blocked, "rail": self.rail, "reason": self.reason, "masked": list(self.masked),
                "seconds": {flow: round(spent, 6) for flow, spent in self.seconds}, "answers": dict(self.answers)}


@dataclass(frozen=True)
class _Outcome:
    block: str = ""  # why, when the flow blocks
    text: Optional[str] = None  # the masked text, when the flow masked
    masked: Tuple[str, ...] = ()
    answer: Optional[str] = None  # the model's answer, when the flow asked it


class Rails:
    """The flows of ``spec``; a check needs ``ask`` when a self check is among them."""

    def __init__(self, spec: RailsSpec):
        self.spec = spec
        templates = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self.templates = {task: templates.from_string(prompt.content) for task, prompt in spec.prompts.items()}

    async def check_input(self, user_input: str, ask: Optional[Ask] = None) -> Verdict:
        return await self._run(self.spec.input_flows, user_input, user_input, ask)

    async def check_output(self, bot_response: str, user_input: str, ask: Optional[Ask] = None) -> Verdict:
        return await self._run(self.spec.output_flows, bot_response, user_input, ask)

    async def _run(self, flows: Tuple[str, ...], text: str, user_input: str, ask: Optional[Ask]) -> Verdict:
        masked: List[str] = []
        seconds: List[Tuple[str, float]] = []
        answers: List[Tuple[str, str]] = []
        for flow in flows:
            start = time.perf_counter()
            outcome = await self._flow(flow, text, user_input, ask)
            seconds.append((flow, time.perf_counter() - start))
            if outcome.answer is not None:
                answers.append((flow, outcome.answer))
            if outcome.block:
                return Verdict(text, flow, outcome.block, tuple(masked), tuple(seconds), tuple(answers))
            if outcome.text is not None:
                text = outcome.text
                masked += [entity for entity in outcome.masked if entity not in masked]
        return Verdict(text, None, "", tuple(masked), tuple(seconds), tuple(answers))

    async def _flow(self, flow: str, text: str, user_input: str, ask: Optional[Ask]) -> _Outcome:
        side = "input" if flow.endswith("input") else "output"
        spec = self.spec
        if flow.startswith("regex check"):
            hits = [p.pattern for p in spec.denylist[side] if p.search(text)]
            return _Outcome(block=f"matches the denylist pattern {hits[0]!r}" if hits else "")
        if "sensitive data" in flow:
            findings = find_entities(text, spec.entities[side])
            entities = tuple(dict.fromkeys(f.entity for f in findings))
            if flow.startswith("detect"):
                return _Outcome(block=f"holds {', '.join(entities)}" if findings else "")
            return _Outcome(text=mask(text, findings), masked=entities) if findings else _Outcome()
        if flow == "jailbreak detection patterns":
            return _Outcome(block=_jailbreak(text, spec))
        if flow == "topic check input":
            on_topic = any(p.search(text) for p in spec.allowed_topics)
            return _Outcome(block="" if on_topic else "matches none of the allowed topics")
        if ask is None:
            raise ValueError(f"the rails flow {flow!r} asks the model, and nothing to ask it with was given")
        task = SELF_CHECK_TASKS[flow]
        prompt = self.templates[task].render(user_input=user_input, bot_response=text if side == "output" else "")
        return _self_check(await ask(prompt, spec.prompts[task].max_tokens))


def _self_check(answer: str) -> _Outcome:
    """A self check's answer read as NeMo Guardrails reads it: blocked when its first word is "yes"."""
    words = answer.strip().lower().split()
    first = words[0].strip(".,!:;\"'") if words else ""
    return _Outcome(block=f"the model answered {answer.strip()!r}" if first == "yes" else "", answer=answer)


def _jailbreak(text: str, spec: RailsSpec) -> str:
    """Why ``text`` reads as a jailbreak attempt: a known pattern, or a share of symbols that prose never has
    (the adversarial suffixes that optimizers append); "" when neither."""
    for pattern in spec.jailbreak_patterns:
        if pattern.search(text):
            return f"matches the jailbreak pattern {pattern.pattern!r}"
    threshold = spec.symbol_ratio_threshold
    visible = [c for c in text if not c.isspace()]
    if threshold is not None and len(visible) >= 20:
        ratio = sum(not c.isalnum() for c in visible) / len(visible)
        if ratio > threshold:
            return f"{ratio:.0%} of its characters are symbols (threshold {threshold:.0%})"
    return ""
