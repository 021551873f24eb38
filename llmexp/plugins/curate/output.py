"""Pass 2 of curation: each shard's kept records, redacted, written as an output part in the input's format."""

from __future__ import annotations

from pathlib import Path

from llmexp.plugins.curate.corpus import Shard, read_shard, write_shard
from llmexp.plugins.curate.decisions import read_decisions
from llmexp.plugins.curate.facts import read_facts, redacted


def write_part(shard: Shard, text_field: str, settings, facts: Path, out: Path) -> int:
    """Write ``shard``'s part unless it is written already; the number of documents read.

    A record is kept when the filters kept it (its facts) and deduplication did not remove it (the decisions).
    """
    if (out / shard.output_name).exists():
        return 0
    verdicts = read_facts(shard, facts)
    duplicates = read_decisions(shard, facts)
    kept = ((record, redacted(record.text, settings)[0])
            for record, verdict in zip(read_shard(shard, text_field), verdicts)
            if verdict["removed"] is None and record.index not in duplicates)
    write_shard(shard, kept, out, text_field)
    return shard.count
