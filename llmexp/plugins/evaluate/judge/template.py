"""Judge templates: the prompt an LLM judge gets and how its reply becomes a score, kept as YAML data.

A template (``templates/<name>.yaml``, or any YAML file given by path) holds:

* ``system`` (optional) and ``user``: message texts with ``{question}``, ``{reference}``
  and ``{answer}`` placeholders (``str.format``; literal braces doubled, ``{{ }}``);
* ``reply``: ``json`` (the reply holds a JSON object with ``score`` and ``reason``; text or
  a Markdown fence around it is tolerated) or ``regex`` (``score_regex``'s first group is
  the score, ``reason_regex``'s the reason, else the whole reply);
* ``score_range``: ``[lowest, highest]`` whole scores.

A reply without a score in range is unparsable, never guessed at. The template's text is
part of the judge cache's key, so editing a template re-judges instead of reusing replies
to the old prompt.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional

from llmexp.sdk import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PLACEHOLDERS = frozenset({"question", "reference", "answer"})
_KEYS = {"system", "user", "reply", "score_regex", "reason_regex", "score_range"}


@dataclass(frozen=True)
class Verdict:
    score: int
    reason: str


@dataclass(frozen=True)
class JudgeTemplate:
    source: str  # the file it came from
    text: str  # the file's text, as read: what the cache key hashes
    user: str
    system: Optional[str]
    reply: str  # "json" or "regex"
    score_regex: Optional[str]
    reason_regex: Optional[str]
    score_min: int
    score_max: int
    placeholders: FrozenSet[str]

    def messages(self, item: Mapping[str, str]) -> List[Dict[str, str]]:
        """The chat messages judging one item (``question``, ``reference``, ``answer``)."""
        values = {name: item.get(name, "") for name in PLACEHOLDERS}
        messages = [{"role": "system", "content": self.system.format(**values)}] if self.system else []
        return messages + [{"role": "user", "content": self.user.format(**values)}]

    def parse(self, reply: str) -> Optional[Verdict]:
        """The score and reason in ``reply``, or None when it holds no score in range."""
        if self.reply == "json":
            found = _first_json_object_with(reply, "score")
            if found is None:
                return None
            score, reason = found.get("score"), found.get("reason", "")
            reason = reason if isinstance(reason, str) else json.dumps(reason)
        else:
            match = re.search(self.score_regex, reply)
            if match is None:
                return None
            score = match.group(1)
            reason_match = re.search(self.reason_regex, reply) if self.reason_regex else None
            reason = reason_match.group(1) if reason_match else reply.strip()
        score = _whole_number(score)
        if score is None or not self.score_min <= score <= self.score_max:
            return None
        return Verdict(score, reason.strip())


def shipped_templates() -> List[str]:
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.yaml"))


def load_template(reference: str) -> JudgeTemplate:
    """A shipped template by name (``faithfulness``) or a YAML file by path; a bad one raises ``UserError``."""
    import yaml

    path = _template_path(reference)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({error}). Give a YAML judge template.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", error)
        raise UserError(f"{where}: not valid YAML ({problem}). Fix the template file.") from None
    except RecursionError:  # PyYAML composes each level of nesting by recursion
        raise UserError(f"{path}: nested too deeply to parse as YAML. A judge template is a flat mapping of texts "
                        f"({', '.join(sorted(_KEYS))}); fix the template file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a judge template is a YAML mapping with keys {', '.join(sorted(_KEYS))}.")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(unknown)}; a judge template takes {', '.join(sorted(_KEYS))}."
        )
    user, system = data.get("user"), data.get("system")
    if not isinstance(user, str) or not user.strip():
        raise UserError(f"{path}: `user` (the message text, with {{question}}, {{reference}}, {{answer}}) is missing.")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{path}: `system` must be text (or left out).")
    placeholders = _placeholders(path, "user", user)
    if system:
        placeholders |= _placeholders(path, "system", system)
    reply = data.get("reply", "json")
    if reply not in ("json", "regex"):
        raise UserError(f"{path}: reply={reply!r} must be json (a JSON object with score and reason) or regex.")
    score_regex, reason_regex = data.get("score_regex"), data.get("reason_regex")
    if reply == "regex" and not score_regex:
        raise UserError(f"{path}: reply: regex needs a score_regex whose first group is the score: 'Score: (\\d+)'.")
    for key, pattern in (("score_regex", score_regex), ("reason_regex", reason_regex)):
        if pattern is not None:
            try:
                groups = re.compile(pattern).groups
            except (re.error, TypeError) as error:
                raise UserError(f"{path}: {key}={pattern!r} is not a regular expression ({error}).") from None
            if groups < 1:
                raise UserError(f"{path}: {key}={pattern!r} needs a group, (...), around what it extracts.")
    score_range = data.get("score_range", [1, 5])
    if (
        not isinstance(score_range, list)
        or len(score_range) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in score_range)
        or score_range[0] >= score_range[1]
    ):
        raise UserError(f"{path}: score_range={score_range!r} must be [lowest, highest] whole numbers, e.g. [1, 5].")
    return JudgeTemplate(
        str(path), text, user, system, reply, score_regex, reason_regex, score_range[0], score_range[1], placeholders
    )


def _template_path(reference: str) -> Path:
    if reference in shipped_templates():
        return TEMPLATE_DIR / f"{reference}.yaml"
    path = Path(reference)
    if path.is_file():
        return path
    raise UserError(
        f"template={reference!r} is neither a shipped judge template ({', '.join(shipped_templates())}) nor an "
        "existing YAML file; name one or give the path of your own (see judge/templates/faithfulness.yaml)."
    )


def _placeholders(path: Path, key: str, text: str) -> FrozenSet[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:
        fix = "write literal braces as {{ }}"
        raise UserError(f"{path}: `{key}` is not a valid format string ({error}); {fix}.") from None
    unknown = sorted(names - PLACEHOLDERS)
    if unknown:
        raise UserError(
            f"{path}: `{key}` has placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; the known ones are "
            "{question}, {reference}, {answer} (write literal braces as {{ }})."
        )
    return frozenset(names)


def _first_json_object_with(text: str, key: str) -> Optional[Dict[str, Any]]:
    """The first JSON object in ``text`` that has ``key``; prose and fences around it are skipped."""
    decoder = json.JSONDecoder()
    for start in (match.start() for match in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    return None


def _whole_number(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None
