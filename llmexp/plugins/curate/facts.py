"""Pass 1 of curation: what the rules say about each document of a shard, saved beside the run.

A shard's facts are, per document, the filter that removed it (language, or the first failing quality
rule), every quality rule it failed, the PII it held, its token counts, and the keys deduplication
groups by (exact key, LSH band keys, the MinHash signature its candidate pairs are checked on) — never its text. They are written atomically, one JSON file per
shard, so a rerun skips a shard whose file exists and the dedup decisions are made from the files alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Container, Dict, Iterator, List, Optional, Tuple

from llmexp.plugins.curate.corpus import Shard, read_shard
from llmexp.sdk import write_json_atomic

LANGUAGE = "language"


def tokens(text: str) -> int:
    """Tokens as the report counts them: whitespace-separated words (no tokenizer is loaded to curate)."""
    return len(text.split())


def filtered(text: str, settings) -> Tuple[Optional[str], List[str]]:
    """``(the rule that removes the document or None, every quality rule it fails)``: language, then quality."""
    from llmexp.plugins.curate.rules.language import kept_language
    from llmexp.plugins.curate.rules.quality import quality_failures

    if settings.language.enabled and not kept_language(text, settings.language):
        return LANGUAGE, []
    failures = quality_failures(text, settings.quality) if settings.quality.enabled else []
    return (failures[0] if failures else None), failures


def redacted(text: str, settings) -> Tuple[str, Counter]:
    """The document as it is written out, and the PII it held by kind."""
    from llmexp.plugins.curate.rules.pii import redact

    return redact(text, settings.pii) if settings.pii.enabled else (text, Counter())


def as_int(key: bytes) -> int:
    """A key as an int (its bytes big-endian): JSON holds it as it is, and ints hash alike in every process, so
    a shuffle sends a key to the same partition whichever worker has it."""
    return int.from_bytes(key, "big")


def document_facts(index: int, text: str, settings) -> Dict[str, Any]:
    """Everything pass 1 learns about one document (see the module docstring)."""
    from llmexp.plugins.curate.rules.minhash import band_keys, signature
    from llmexp.plugins.curate.rules.normalisation import exact_key

    removed, failures = filtered(text, settings)
    facts: Dict[str, Any] = {"index": index, "removed": removed, "failures": failures, "tokens_in": tokens(text)}
    if removed is None:
        clean, pii = redacted(text, settings)
        facts.update(pii=dict(pii), tokens_out=tokens(clean))
        if settings.exact_dedup.enabled:
            facts["exact"] = as_int(exact_key(clean, settings.normalisation))
        if settings.fuzzy_dedup.enabled:
            sketch = signature(clean, settings.fuzzy_dedup)
            facts["bands"] = [as_int(key) for key in band_keys(sketch, settings.fuzzy_dedup)]
            facts["signature"] = sketch.tolist()  # candidate pairs are checked on it (``decisions.similar_pairs``)
    return facts


def facts_path(folder: Path, shard: Shard) -> Path:
    return folder / f"facts-{shard.number:05d}.json"


def shard_facts(shard: Shard, text_field: str, settings, folder: Path) -> int:
    """Compute and save the facts of ``shard`` unless they are saved already; the number of documents read."""
    target = facts_path(folder, shard)
    if target.exists():
        return 0
    documents = [document_facts(record.index, record.text, settings) for record in read_shard(shard, text_field)]
    write_json_atomic(target, {"shard": shard.number, "documents": documents})
    return shard.count


def read_facts(shard: Shard, folder: Path) -> List[Dict[str, Any]]:
    return json.loads(facts_path(folder, shard).read_text(encoding="utf-8"))["documents"]


def exact_rows(documents: List[Dict[str, Any]]) -> Iterator[Tuple[int, int]]:
    """``(exact key, index)`` of each document the filters kept."""
    return ((d["exact"], d["index"]) for d in documents if d["removed"] is None and "exact" in d)


def band_rows(documents: List[Dict[str, Any]], removed: Container[int]) -> Iterator[Tuple[int, int]]:
    """``(band key, index)`` of each document kept by the filters and by exact dedup (a band's index is part of
    its keys: ``rules.minhash.band_keys``)."""
    for d in documents:
        if d["removed"] is None and d["index"] not in removed:
            yield from ((key, d["index"]) for key in d.get("bands", ()))

