"""``engine=local``: the shards one after another in this process, dedup groups in dictionaries."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

from llmexp.plugins.curate.corpus import Shard
from llmexp.plugins.curate.decisions import bucket_pairs, exact_duplicates, fuzzy_duplicates, removals, similar_pairs
from llmexp.plugins.curate.facts import band_rows, exact_rows, read_facts


class LocalEngine:
    def each(self, function: Callable[..., int], shards: Sequence[Shard], *args) -> Iterator[int]:
        """``function(shard, *args)`` for each shard, its results as they come."""
        return (function(shard, *args) for shard in shards)

    def duplicates(self, shards: Sequence[Shard], folder: Path, threshold: float) -> Dict[int, str]:
        """Exact then fuzzy duplicates among the documents the filters kept (``decisions``)."""
        groups: Dict[int, List[int]] = defaultdict(list)
        for shard in shards:
            for key, index in exact_rows(read_facts(shard, folder)):
                groups[key].append(index)
        exact = {index for group in groups.values() if len(group) > 1 for index in exact_duplicates(group)}
        buckets: Dict[int, List[int]] = defaultdict(list)
        for shard in shards:
            for key, index in band_rows(read_facts(shard, folder), exact):
                buckets[key].append(index)
        pairs = (pair for bucket in buckets.values() if len(bucket) > 1 for pair in bucket_pairs(bucket))
        return removals(exact, fuzzy_duplicates(similar_pairs(pairs, shards, folder, threshold)))

    def close(self) -> None:
        pass
