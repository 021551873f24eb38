"""``technique=curate`` as a stage: the two passes over the corpus's shards on the chosen engine, and the report.

Everything a rerun can reuse lives in ``<stage dir>/work/``: the facts of each shard and the dedup
decisions, under a fingerprint of the corpus files and the settings that decide them (the engine
and its cluster do not: both give the same output). A rerun with the same fingerprint skips every
shard whose facts or output part exist; another fingerprint starts afresh. The kept records go to
``<stage dir>/curated/`` (``part-00000.jsonl``...), the report to ``<stage dir>/report.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from llmexp.data.text import text_corpus
from llmexp.plugins.curate.corpus import Shard, corpus_files, plan_shards
from llmexp.plugins.curate.decisions import DECIDED, read_decisions, save_decisions
from llmexp.plugins.curate.facts import facts_path, shard_facts
from llmexp.plugins.curate.output import write_part
from llmexp.plugins.curate.report import curation_report
from llmexp.sdk import Progress, StageContext, StageResult, write_json_atomic

CURATED = "curated"
WORK = "work"
FINGERPRINT = "fingerprint.json"
REPORT = "report.json"


def fingerprint(paths: Sequence[str], text_field: str, node) -> dict:
    """What decides the facts, decisions and output: each corpus file (path, size, modification time) and the
    settings other than the engine's."""
    settings = OmegaConf.to_container(node, resolve=True)
    for engine_only in ("engine", "dask"):
        settings.pop(engine_only)
    files = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in corpus_files(paths)]
    return {"files": files, "text_field": text_field, "settings": settings}


def fresh_work(stage_dir: Path, expected: dict) -> Path:
    """The work folder, emptied with the output folder when it was made for another fingerprint."""
    work = stage_dir / WORK
    marker = work / FINGERPRINT
    if not marker.exists() or json.loads(marker.read_text(encoding="utf-8")) != expected:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stage_dir / CURATED, ignore_errors=True)
        write_json_atomic(marker, expected)
    return work


def engine_for(config, node, stage_dir: Path):
    if node.engine == "dask":
        from llmexp.plugins.curate.dask_engine import DaskEngine

        return DaskEngine(config, node.dask, stage_dir / "dask-logs")
    from llmexp.plugins.curate.local_engine import LocalEngine

    return LocalEngine()


def run_pass(progress: Progress, engine, description: str, shards: Sequence[Shard], finished, function,
             *args) -> int:
    """``function(shard, *args)`` on the engine for each shard not ``finished``, with a progress task in
    documents/s; the number of documents it read."""
    todo = [shard for shard in shards if not finished(shard)]
    started, done = time.perf_counter(), 0
    total = sum(shard.count for shard in shards)
    task = progress.add_task(description, total=total, completed=total - sum(shard.count for shard in todo),
                             detail=lambda: f"{done / max(time.perf_counter() - started, 1e-9):,.0f} docs/s")
    for count in engine.each(function, todo, *args):
        done += count
        progress.advance(task, count)
    return done


def curate(ctx: StageContext) -> StageResult:
    node, stage_dir = ctx.stage_config, ctx.stage_dir.resolve()  # absolute: workers run elsewhere
    paths, text_field = text_corpus(ctx.config.data)
    shards = plan_shards(paths, text_field, node.shard_records)  # reads every record: a bad one stops it here
    work, out = fresh_work(stage_dir, fingerprint(paths, text_field, node)), stage_dir / CURATED
    settings = OmegaConf.to_object(node)
    started = time.perf_counter()
    engine = engine_for(ctx.config, node, stage_dir)
    try:
        with Progress(ctx.stage_name, unit="documents") as progress:
            judged = run_pass(progress, engine, "rules", shards, lambda shard: facts_path(work, shard).exists(),
                              shard_facts, text_field, settings, work)
            if not (work / DECIDED).exists():
                save_decisions(shards, engine.duplicates(shards, work, node.fuzzy_dedup.threshold), work)
            written = run_pass(progress, engine, "write", shards, lambda shard: (out / shard.output_name).exists(),
                               write_part, text_field, settings, work, out)
    finally:
        engine.close()
    elapsed = time.perf_counter() - started
    duplicates = {index: rule for shard in shards for index, rule in read_decisions(shard, work).items()}
    report = curation_report(shards, work, duplicates)
    # documents through the whole curation per second of it (engine start included); a resumed run counts
    # the documents of the pass that had the most left to do
    report["metrics"]["docs_per_s"] = max(judged, written) / elapsed
    report.update(engine=node.engine, shards=len(shards), elapsed_s=elapsed, curated=str(out))
    write_json_atomic(stage_dir / REPORT, report)
    return StageResult(metrics=report["metrics"], artifacts={CURATED: str(out), "report": str(stage_dir / REPORT)})
