"""PII redaction by regular expressions with checks: each match becomes a typed placeholder
("<EMAIL>", "<PHONE>", ...) and is counted.

Regular expressions, not Presidio: Presidio's default analyser needs a spaCy language model
that cannot be installed offline, and the kinds redacted here are formats, not names, so a
pattern plus a checksum (Luhn for cards, mod-97 for IBANs, `ipaddress` for IP addresses) finds
them as reliably, with no model and at regex speed. Names and addresses in free text are not
redacted: that does need a NER model."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


def _luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_valid(candidate: str) -> bool:
    if sum(c.isalnum() for c in candidate) < 2:  # "::" and "::1" hold nothing personal ("f :: Int")
        return False
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _phone_valid(candidate: str) -> bool:
    return 7 <= sum(c.isdigit() for c in candidate) <= 15


# kind -> (pattern, check of a match). Order matters: credentials before e-mail addresses (both
# hold "@"), card numbers and IBANs before phone numbers (all digit runs).
PII_PATTERNS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    "url_credentials": (re.compile(r"(?<=://)[^\s:/@]+:[^\s/@]+(?=@)"), None),
    "email": (re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    "credit_card": (re.compile(r"(?<![\d-])[2-6]\d{3}(?:[ -]?\d{3,4}){2,4}(?:[ -]?\d{1,4})?(?![\d-])"), _luhn_valid),
    "iban": (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban_valid),
    "ip_address": (
        re.compile(r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w.:])"),
        _ip_valid,
    ),
    "phone": (
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # international
            r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)"  # North American
        ),
        _phone_valid,
    ),
}


@dataclass
class PiiSettings:
    """Which kinds of PII to redact, each replaced by "<KIND>" (e.g. "<EMAIL>")."""

    kinds: list[str] = field(default_factory=lambda: list(PII_PATTERNS))


def pii_problems(s: PiiSettings, field_prefix: str) -> list[str]:
    """One paragraph per bad setting, naming the field, the value and the fix."""
    return [
        f"{field_prefix}.kinds names {kind!r}, which is not a PII kind: use any of {', '.join(PII_PATTERNS)}."
        for kind in s.kinds
        if kind not in PII_PATTERNS
    ]


def placeholder(kind: str) -> str:
    return f"<{kind.upper()}>"


def redact(text: str, s: PiiSettings) -> tuple[str, Counter[str]]:
    """The text with each PII match of the chosen kinds replaced by its placeholder, and the
    number of replacements per kind (kinds with none absent)."""
    counts: Counter[str] = Counter()
    for kind, (pattern, check) in PII_PATTERNS.items():
        if kind not in s.kinds:
            continue

        def replace(match: re.Match[str], kind: str = kind, check: Callable[[str], bool] | None = check) -> str:
            if check is not None and not check(match.group()):
                return match.group()
            counts[kind] += 1
            return placeholder(kind)

        text = pattern.sub(replace, text)
    return text, counts
