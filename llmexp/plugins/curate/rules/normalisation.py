"""Text normalisation before exact deduplication, so that copies differing only in case,
Unicode form, punctuation or spacing count as the same document."""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from dataclasses import dataclass

UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD", "none")

_DIGITS = re.compile(r"\d")


@dataclass
class Normalisation:
    """What `normalise` folds away before two documents are compared for exact equality."""

    lowercase: bool = True
    unicode_form: str = "NFKC"  # one of UNICODE_FORMS
    strip_punctuation: bool = True  # removes every Unicode punctuation (P*) and symbol (S*) character
    collapse_whitespace: bool = True
    strip_digits: bool = False


def normalisation_problems(how: Normalisation, field_prefix: str) -> list[str]:
    """One paragraph per bad setting, naming the field, the value and the fix."""
    if how.unicode_form not in UNICODE_FORMS:
        return [
            (
                f"{field_prefix}.unicode_form={how.unicode_form!r} is not a Unicode normal form: "
                f"use one of {', '.join(UNICODE_FORMS)}."
            )
        ]
    return []


@functools.cache
def _punctuation_and_symbols() -> dict[int, None]:
    """A `str.translate` table deleting every Unicode punctuation (P*) and symbol (S*) character:
    one C-level pass per text, where testing each character's category in Python is ~10x slower."""
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] in "PS"}


def normalise(text: str, how: Normalisation) -> str:
    """The text as exact deduplication compares it."""
    if how.unicode_form != "none":
        text = unicodedata.normalize(how.unicode_form, text)
    if how.lowercase:
        text = text.casefold()
    if how.strip_punctuation:
        text = text.translate(_punctuation_and_symbols())
    if how.strip_digits:
        text = _DIGITS.sub("", text)
    if how.collapse_whitespace:
        text = " ".join(text.split())
    return text


def exact_key(text: str, how: Normalisation) -> bytes:
    """A 16-byte digest of the normalised text: equal keys mean equal normalised texts
    (BLAKE2b-128, collisions negligible for any corpus size)."""
    return hashlib.blake2b(normalise(text, how).encode("utf-8"), digest_size=16).digest()
