"""Document quality heuristics with their published defaults, each a named rule that can be disabled.

- Gopher quality and repetition filters: Rae et al. 2021, "Scaling Language Models: Methods,
  Analysis & Insights from Training Gopher", appendix A (MassiveWeb), with the thresholds and
  the counting of datatrove's GopherQualityFilter and GopherRepetitionFilter.
- C4 filters: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer", section 2.2, as datatrove's C4QualityFilter implements them. C4
  removes single lines (no terminal punctuation, fewer than 3 words, a word over 1000
  characters, "javascript", cookie and policy notices) and then drops a page left with fewer
  than 5 sentences; here the line rules decide which lines count and the page's verdict is
  `c4_too_few_sentences`, so the kept text is never rewritten.

`quality_failures` lists every failed rule in the fixed order of `quality_rule_names`; the stage
counts a removed document under the first."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_PUNCTUATION_ONLY = re.compile(r"^[^\w]+$")
_LINE_BREAKS = re.compile(r"\n+")
_PARAGRAPH_BREAKS = re.compile(r"\n{2,}")
_SENTENCE_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)")
_TERMINAL_PUNCTUATION = (".", "?", "!", '"', "'", "”", "’")
_BULLETS = ("•", "-", "*", "●", "○", "▪", "‣", "–")  # datatrove checks the first two
_ELLIPSES = ("...", "…")


@dataclass
class QualitySettings:
    """Thresholds (published defaults) and the rules turned off by name."""

    # Gopher quality
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" per word, and ellipses per word
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending in an ellipsis
    min_alpha_words: float = 0.8  # fraction of words with at least one letter
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    min_stop_words: int = 2
    # Gopher repetition
    max_duplicate_lines: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_duplicate_paragraphs: float = 0.3
    max_duplicate_paragraph_chars: float = 0.2
    top_ngram_fractions: list[float] = field(default_factory=lambda: [0.2, 0.18, 0.16])  # n = 2, 3, 4
    duplicate_ngram_fractions: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )  # n = 5 .. 10
    # C4
    min_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    policy_phrases: list[str] = field(
        default_factory=lambda: [
            "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"
        ]
    )
    # rule names from quality_rule_names() to skip; "c4_*_lines" names turn off one C4 line rule
    disabled: list[str] = field(default_factory=list)


TOP_NGRAM_FIRST = 2
DUPLICATE_NGRAM_FIRST = 5
C4_LINE_RULES = ("c4_terminal_punctuation_lines", "c4_short_lines", "c4_long_word_lines", "c4_javascript_lines",
                 "c4_policy_lines")


def quality_rule_names(s: QualitySettings) -> list[str]:
    """Every document rule's name, in the order `quality_failures` checks them."""
    return [
        "gopher_word_count", "gopher_mean_word_length", "gopher_symbol_word_ratio", "gopher_bullet_lines",
        "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words",
        "gopher_duplicate_lines", "gopher_duplicate_line_chars",
        "gopher_duplicate_paragraphs", "gopher_duplicate_paragraph_chars",
        *(f"gopher_top_{n}gram" for n in range(TOP_NGRAM_FIRST, TOP_NGRAM_FIRST + len(s.top_ngram_fractions))),
        *(f"gopher_duplicate_{n}gram"
          for n in range(DUPLICATE_NGRAM_FIRST, DUPLICATE_NGRAM_FIRST + len(s.duplicate_ngram_fractions))),
        "c4_lorem_ipsum", "c4_curly_bracket", "c4_too_few_sentences",
    ]


def quality_problems(s: QualitySettings, field_prefix: str) -> list[str]:
    """One paragraph per bad setting, naming the field, the value and the fix."""
    known = [*quality_rule_names(s), *C4_LINE_RULES]
    problems = [
        f"{field_prefix}.disabled names {name!r}, which is not a quality rule: use any of {', '.join(known)}."
        for name in s.disabled if name not in known
    ]
    fractions = {"max_symbol_word_ratio": s.max_symbol_word_ratio, "max_bullet_lines": s.max_bullet_lines,
                 "max_ellipsis_lines": s.max_ellipsis_lines, "min_alpha_words": s.min_alpha_words,
                 "max_duplicate_lines": s.max_duplicate_lines, "max_duplicate_line_chars": s.max_duplicate_line_chars,
                 "max_duplicate_paragraphs": s.max_duplicate_paragraphs,
                 "max_duplicate_paragraph_chars": s.max_duplicate_paragraph_chars}
    problems += [f"{field_prefix}.{name}={value} is a fraction: use a value between 0 and 1."
                 for name, value in fractions.items() if not 0.0 <= value <= 1.0]
    if s.min_words > s.max_words:
        problems.append(f"{field_prefix}.min_words={s.min_words} exceeds {field_prefix}.max_words={s.max_words}: "
                        f"lower min_words or raise max_words.")
    return problems


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """How many elements repeat an earlier one, and their characters."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent word n-gram (its length times its count)."""
    counts = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0
    ngram, count = counts.most_common(1)[0]
    return len(ngram) * count if count > 1 else 0


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words inside n-grams that repeat an earlier one, each word counted once."""
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i <= len(words) - n:
        ngram = tuple(words[i : i + n])
        if ngram in seen:
            chars += sum(map(len, ngram))
            i += n
        else:
            seen.add(ngram)
            i += 1
    return chars


def c4_kept_lines(text: str, s: QualitySettings) -> list[str]:
    """The lines C4 keeps, under the C4 line rules not in `s.disabled`."""
    policy = [p.lower() for p in s.policy_phrases]
    kept = []
    for line in (line.strip() for line in text.splitlines()):
        lower = line.lower()
        words = line.split()
        if not line:
            continue
        if "c4_terminal_punctuation_lines" not in s.disabled and not line.endswith(_TERMINAL_PUNCTUATION):
            continue
        if "c4_short_lines" not in s.disabled and len(words) < s.min_words_per_line:
            continue
        if "c4_long_word_lines" not in s.disabled and any(len(w) > s.max_word_length for w in words):
            continue
        if "c4_javascript_lines" not in s.disabled and "javascript" in lower:
            continue
        if "c4_policy_lines" not in s.disabled and any(p in lower for p in policy):
            continue
        kept.append(line)
    return kept


def quality_failures(text: str, s: QualitySettings) -> list[str]:
    """The names of the rules this document fails, in `quality_rule_names` order."""
    words = [w for w in text.split() if not _PUNCTUATION_ONLY.match(w)]
    n_words = max(len(words), 1)
    lines = text.splitlines() or [""]
    chars = max(len(text), 1)
    stop_words = set(s.stop_words)
    lowered = text.lower()
    line_parts = [line for line in _LINE_BREAKS.split(text.strip()) if line]
    paragraphs = [p for p in _PARAGRAPH_BREAKS.split(text.strip()) if p]
    dup_lines, dup_line_chars = _duplicates(line_parts)
    dup_paragraphs, dup_paragraph_chars = _duplicates(paragraphs)
    mean_word_length = sum(map(len, words)) / n_words

    checks = {
        "gopher_word_count": lambda: not s.min_words <= len(words) <= s.max_words,
        "gopher_mean_word_length": lambda: not s.min_mean_word_length <= mean_word_length <= s.max_mean_word_length,
        "gopher_symbol_word_ratio": lambda: max(text.count("#"), sum(text.count(e) for e in _ELLIPSES)) / n_words
        > s.max_symbol_word_ratio,
        "gopher_bullet_lines": lambda: sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines)
        > s.max_bullet_lines,
        "gopher_ellipsis_lines": lambda: sum(line.rstrip().endswith(_ELLIPSES) for line in lines) / len(lines)
        > s.max_ellipsis_lines,
        "gopher_alpha_words": lambda: sum(any(c.isalpha() for c in w) for w in words) / n_words < s.min_alpha_words,
        "gopher_stop_words": lambda: sum(w.lower() in stop_words for w in words) < s.min_stop_words,
        "gopher_duplicate_lines": lambda: dup_lines / max(len(line_parts), 1) > s.max_duplicate_lines,
        "gopher_duplicate_line_chars": lambda: dup_line_chars / chars > s.max_duplicate_line_chars,
        "gopher_duplicate_paragraphs": lambda: dup_paragraphs / max(len(paragraphs), 1) > s.max_duplicate_paragraphs,
        "gopher_duplicate_paragraph_chars": lambda: dup_paragraph_chars / chars > s.max_duplicate_paragraph_chars,
        **{f"gopher_top_{n}gram": (lambda n=n, limit=limit: _top_ngram_chars(words, n) / chars > limit)
           for n, limit in enumerate(s.top_ngram_fractions, TOP_NGRAM_FIRST)},
        **{f"gopher_duplicate_{n}gram": (lambda n=n, limit=limit: _duplicate_ngram_chars(words, n) / chars > limit)
           for n, limit in enumerate(s.duplicate_ngram_fractions, DUPLICATE_NGRAM_FIRST)},
        "c4_lorem_ipsum": lambda: "lorem ipsum" in lowered,
        "c4_curly_bracket": lambda: "{" in text,
        "c4_too_few_sentences": lambda: sum(len(_SENTENCE_END.findall(line)) for line in c4_kept_lines(text, s))
        < s.min_sentences,
    }
    return [name for name in quality_rule_names(s) if name not in s.disabled and checks[name]()]
