"""The per-rule report: records and tokens in, what each rule removed, the PII redacted, what came out.

A document counts once, under the first rule that removed it (language, the first quality rule it
failed, exact, then fuzzy dedup); ``quality_hits`` counts every quality rule each document reaching
the quality rules failed, so a rule's reach shows even when an earlier rule took its documents.
Tokens are whitespace-separated words.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, Sequence

from llmexp.plugins.curate.corpus import Shard
from llmexp.plugins.curate.decisions import EXACT, FUZZY
from llmexp.plugins.curate.facts import LANGUAGE, read_facts


def curation_report(shards: Sequence[Shard], facts: Path, duplicates: Dict[int, str]) -> Dict[str, Any]:
    """``{"metrics": {...}, "quality_hits": {...}}`` from the saved facts and the dedup decisions."""
    removed: Counter = Counter({LANGUAGE: 0, EXACT: 0, FUZZY: 0})
    quality, hits, pii = Counter(), Counter(), Counter()
    numbers = Counter({"records_in": 0, "tokens_in": 0, "records_out": 0, "tokens_out": 0})
    for shard in shards:
        for document in read_facts(shard, facts):
            numbers["records_in"] += 1
            numbers["tokens_in"] += document["tokens_in"]
            hits.update(document["failures"])
            rule = document["removed"] or duplicates.get(document["index"])
            if rule in (LANGUAGE, EXACT, FUZZY):
                removed[rule] += 1
            elif rule:
                quality[rule] += 1
            else:
                numbers["records_out"] += 1
                numbers["tokens_out"] += document["tokens_out"]
                pii.update(document["pii"])
    metrics = {"records_in": numbers["records_in"], "tokens_in": numbers["tokens_in"],  # in the rules' order
               f"removed_{LANGUAGE}": removed[LANGUAGE], "removed_quality": sum(quality.values()),
               **{f"removed_{rule}": count for rule, count in sorted(quality.items())},
               f"removed_{EXACT}": removed[EXACT], f"removed_{FUZZY}": removed[FUZZY],
               **{f"pii_{kind}": count for kind, count in sorted(pii.items())},
               "records_out": numbers["records_out"], "tokens_out": numbers["tokens_out"]}
    return {"metrics": metrics, "quality_hits": dict(sorted(hits.items()))}
