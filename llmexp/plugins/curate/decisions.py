"""Deduplication decisions over the whole corpus, from the groups an engine forms of the saved facts.

An engine groups documents by exact key, and (among the survivors) by LSH band key, however it likes:
a dictionary in this process, a shuffle across partitions on Dask. What it then decides runs here,
so both engines remove the same documents: in an exact group every document but the smallest index,
and of the near-duplicate pairs' connected components every member but the smallest index. The
decisions are saved per shard for the pass that writes the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from llmexp.plugins.curate.corpus import Shard
from llmexp.plugins.curate.facts import read_facts
from llmexp.sdk import write_json_atomic

DECIDED = "decided.json"
EXACT = "exact_duplicate"
FUZZY = "fuzzy_duplicate"


def exact_duplicates(group: List[int]) -> List[int]:
    """The documents of one exact-key group that go: all but the first in corpus order."""
    first = min(group)
    return [index for index in group if index != first]


def bucket_pairs(bucket: List[int]) -> List[Tuple[int, int]]:
    """Candidate near-duplicate pairs of one LSH bucket (documents sharing a band key)."""
    from llmexp.plugins.curate.rules.minhash import duplicate_pairs

    return list(duplicate_pairs([bucket]))


def similar_pairs(pairs: Iterable[Tuple[int, int]], shards: Sequence[Shard], folder: Path,
                  threshold: float) -> List[Tuple[int, int]]:
    """The candidate pairs whose signatures estimate a Jaccard similarity of at least ``threshold``.

    LSH alone also pairs dissimilar documents now and then: with 14 bands of 8 rows, 5% of the pairs at
    Jaccard 0.5 share a band. Checking each candidate on its signatures removes that tail at a small
    cost in recall (``benchmarks/bench_curate_dedup.py``: 0.994 instead of 0.996 at Jaccard >= 0.85).
    """
    import numpy as np

    from llmexp.plugins.curate.rules.minhash import estimated_jaccard

    pairs = list(pairs)
    wanted = {index for pair in pairs for index in pair}
    signatures = {}
    for shard in shards:
        if any(shard.first <= index < shard.first + shard.count for index in wanted):
            signatures.update((d["index"], np.asarray(d["signature"], dtype=np.uint64))
                              for d in read_facts(shard, folder) if d["index"] in wanted)
    return [(a, b) for a, b in pairs if estimated_jaccard(signatures[a], signatures[b]) >= threshold]


def fuzzy_duplicates(pairs: Iterable[Tuple[int, int]]) -> List[int]:
    """Every member of a connected component of ``pairs`` but its smallest index, in ascending order."""
    from llmexp.plugins.curate.rules.minhash import connected_components_survivors

    pairs = list(pairs)
    members = sorted({index for pair in pairs for index in pair})
    return sorted(connected_components_survivors(members, pairs))


def removals(exact: Iterable[int], fuzzy: Iterable[int]) -> Dict[int, str]:
    """Each removed document's index and the dedup rule that removed it."""
    return {**{index: FUZZY for index in fuzzy}, **{index: EXACT for index in exact}}


def decisions_path(folder: Path, shard: Shard) -> Path:
    return folder / f"duplicates-{shard.number:05d}.json"


def save_decisions(shards: Sequence[Shard], removed: Dict[int, str], folder: Path) -> None:
    """Each shard's removed duplicates in a file of its own (what its output task reads), then ``DECIDED``,
    whose presence tells a rerun the decisions are complete."""
    for shard in shards:
        write_json_atomic(decisions_path(folder, shard), {
            str(index): removed[index] for index in range(shard.first, shard.first + shard.count) if index in removed})
    write_json_atomic(folder / DECIDED, {"removed": len(removed)})


def read_decisions(shard: Shard, folder: Path) -> Dict[int, str]:
    return {int(index): rule for index, rule in json.loads(decisions_path(folder, shard).read_text()).items()}
