"""Personal data in text: found by pattern and checksum, under Presidio's entity names, and masked.

Presidio (NeMo Guardrails' sensitive-data rail) needs a spaCy language model that no package registry
carries, so the entities here are the ones a pattern finds reliably without one: each pattern is checked
further where the format allows (a card number's Luhn digit, an IPv4 address's octets, an SSN's
never-issued areas), which keeps digits in word problems and dates from reading as personal data.
Masking replaces each finding with ``<ENTITY>``, as Presidio's anonymizer does by default.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple


def _luhn(digits: str) -> bool:
    numbers = [int(d) for d in re.sub(r"\D", "", digits)]
    total = sum(numbers[-1::-2]) + sum(sum(divmod(2 * d, 10)) for d in numbers[-2::-2])
    return 13 <= len(numbers) <= 19 and total % 10 == 0


def _ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def _ssn(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


# entity -> (pattern, a check of the match); the order is the order findings are reported in
RECOGNIZERS: Dict[str, Tuple[re.Pattern, Callable[[str], bool]]] = {
    "EMAIL_ADDRESS": (re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
                      lambda _: True),
    "CREDIT_CARD": (re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _luhn),
    "US_SSN": (re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), _ssn),
    # not a run of digit groups longer than a number's (a card number, a serial)
    "PHONE_NUMBER": (re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]\d{3,4}"
                                r"[ .-]\d{3,4}(?![\w-])(?![ .]\d)"), lambda _: True),
    "IP_ADDRESS": (re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])"), _ipv4),
}
ENTITIES = tuple(RECOGNIZERS)


@dataclass(frozen=True)
class Finding:
    entity: str
    start: int
    end: int


def find_entities(text: str, entities: Sequence[str]) -> List[Finding]:
    """The ``entities`` in ``text``, left to right, overlaps resolved for the one found first in ``ENTITIES``."""
    found: List[Finding] = []
    for entity in (e for e in ENTITIES if e in entities):
        pattern, valid = RECOGNIZERS[entity]
        for match in pattern.finditer(text):
            overlaps = any(f.start < match.end() and match.start() < f.end for f in found)
            if valid(match.group()) and not overlaps:
                found.append(Finding(entity, match.start(), match.end()))
    return sorted(found, key=lambda f: f.start)


def mask(text: str, findings: Sequence[Finding]) -> str:
    """``text`` with each finding replaced by ``<ENTITY>``."""
    pieces, position = [], 0
    for finding in findings:
        pieces += [text[position:finding.start], f"<{finding.entity}>"]
        position = finding.end
    return "".join(pieces) + text[position:]
