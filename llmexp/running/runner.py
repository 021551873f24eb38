"""One run: plan, run the pipeline's stages in order, record results.json, print the table.

Called by Hydra once per job (a plain run, or each point of a multirun). results.json is
written as soon as the job starts (status ``running``, its config and where it runs) and
after each stage, so a job killed at any moment leaves a record. In a multirun a point that
cannot run is recorded as ``skipped`` (infeasible plan) or ``failed`` (its error on one line,
the traceback in ``error.log``), and the sweep goes on.

Running the same command again in the same run directory (``hydra.run.dir=<dir>``) picks it
up: when its results.json holds the same config, the stages it records as completed are kept
rather than run again (a model-producing stage's model is loaded from its saved ``model``
directory; one that saved none runs again, and so does every stage after it), and a training
stage that was cut short resumes from its checkpoints (``llmexp.training.resume``). A different config
starts afresh.

A job of several ranks (``llmexp.training.distributed``) runs this on every rank. Rank 0 does every
write: results.json, the console, the tracker, each stage's files. The other ranks take part
only in the stages that train (``llmexp.training.loop``: the training loop is theirs too) and skip
the others; after each stage rank 0 tells them what it recorded and where its model is, so
that the next training stage starts from the same model on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from llmexp.display import console

from llmexp.training import distributed

from llmexp.models import starting_weights
from llmexp.machine.backends import gpu_driver_present
from llmexp.models.checkpoint import validate_checkpoint_dir
from llmexp.errors import UserError
from llmexp.failure import reason_of
from llmexp.display.library_noise import quiet_libraries
from llmexp.models.loading import load_model
from llmexp.configuration.pipeline import (
    TOP_LEVEL_NODES, data_input_stage, model_source, node_path, stage_nodes, with_corpus, with_data_fields,
)
from llmexp.planning.planner import make_plan
from llmexp.results.columns import declared_metrics
from llmexp.results.report import write_report
from llmexp.results.summary import print_results
from llmexp.techniques.plugin_manager import technique
from llmexp.results.record import RunRecord, flatten_numbers, read_results, redact_hydra_record
from llmexp.techniques.contract import ModelArtifact, StageContext, StageResult
from llmexp.results.tracking import Tracker, make_tracker
from llmexp.training.contract import TrainingTechnique


def run_experiment(cfg: DictConfig, run_dir: Path, multirun: bool) -> RunRecord:
    lead = distributed.is_rank_zero()
    if lead:
        redact_hydra_record(run_dir / ".hydra", cfg)
    plan = make_plan(cfg)
    record = RunRecord.start(run_dir, cfg, plan.to_dict())
    problems = plan.problems or _machine_problems(cfg)
    if problems:
        if not multirun:
            raise UserError(" ".join(problems))
        return _close(record, "skipped", " ".join(problems)) if lead else record

    quiet_libraries()
    earlier = distributed.decided_by_rank_zero(lambda: _completed_earlier(record))
    if lead:
        record.stages.update(earlier)  # an earlier attempt's stages stay on record until one runs again
        record.write()  # from the first second: a job killed before its first stage ends still has a record
        tracker = make_tracker(cfg.tracker, run_dir, record.config)
    else:  # tracker=none's, which the other ranks never ask for a logger: nothing leaves them
        tracker = Tracker(cfg.tracker, run_dir, record.config)
    try:
        _run_stages(cfg, run_dir, tracker, record, earlier)
    except Exception as error:
        tracker.finish("failed")
        if lead:
            log = run_dir / "error.log"
            log.write_text(traceback.format_exc())
            record.error_log = str(log)
            record.finish("failed", reason_of(error)).write()
        if not multirun or distributed.world_size() > 1:
            raise  # a plain run shows its error; the other ranks may be waiting for this one
        if lead:
            console.warn(f"failed: {record.reason}")
        return record
    if not lead:
        return record
    _close(record, "completed")
    results = record.to_dict()
    declared = declared_metrics(results)
    if len(results["comparison"]) > 1:
        for path in write_report(run_dir, results["comparison"], declared).values():
            tracker.log_file(path)
    tracker.log_results(results)
    tracker.finish("completed")
    print_results(results, declared=declared)
    return record


def _machine_problems(cfg) -> List[str]:
    """What this machine lacks for the run: a GPU for a GPU preset, and what each stage's technique needs
    (``Technique.machine_problems``). The plan checks the config only: it may be made elsewhere."""
    problems: List[str] = []
    if cfg.hardware.accelerator == "gpu" and not gpu_driver_present():
        problems.append(
            f"hardware={cfg.hardware.name} is a GPU and this machine has no NVIDIA driver; run it on a GPU machine "
            "(hydra/launcher=slurm cluster=... for a cluster), or here with hardware=cpu (`llmexp plan` checks a "
            "configuration without running it).")
    for key, node in stage_nodes(cfg, strict=False):
        for problem in technique(node.name).machine_problems(cfg, node, node_path(key)):
            if problem not in problems:
                problems.append(problem)
    return problems


def _run_stages(cfg: DictConfig, run_dir: Path, tracker, record: RunRecord, earlier: Dict[str, Any]) -> None:
    # A top-level stage whose technique produces no model (evaluate, benchmark) is skipped when
    # that technique already looked at the same model: `technique=evaluate` evaluates once, not
    # twice; and an implied measurement (``Technique.implied_measurement``: the evaluation) is skipped after
    # any technique that made no model (`technique=benchmark` benchmarks, it does not also score). A pipeline's own nodes always
    # run: its author put each there on purpose.
    models: Dict[str, ModelArtifact] = {}  # by stage; model None, path set: kept, loaded when needed
    kept_stages: List[str] = []  # stages an earlier attempt completed, kept by this one
    latest: Optional[str] = None  # the stage that made the newest model
    looked_at, taken = set(), set()
    lead = distributed.is_rank_zero()
    for key, node in stage_nodes(cfg):
        cls = technique(node.name)
        source = model_source(cfg, key, latest)
        if not cls.produces_model:
            if key in TOP_LEVEL_NODES and (
                (source, cls.name) in looked_at or (cls.implied_measurement and any(s == source for s, _ in looked_at))
            ):
                continue
            looked_at.add((source, cls.name))
        stage_name = key if key not in TOP_LEVEL_NODES else _unique(cls.name, taken)
        taken.add(stage_name)
        # an implied measurement (the evaluation) with no model before it scores the base a fine-tuning stage adapts
        input_model = source or starting_weights.source(cfg, cls.adapts_base or cls.implied_measurement)
        input_data = data_input_stage(cfg, key)
        if lead:
            console.stage_banner(stage_name)
        entry = earlier.get(stage_name)
        if distributed.decided_by_rank_zero(lambda: _can_keep(entry, cls, stage_name)):
            kept = StageResult(entry["metrics"], artifacts=entry["artifacts"], model_stats=entry["model_stats"])
            record.add_stage(stage_name, cls.name, kept, wall_time_s=entry["wall_time_s"], input_model=input_model,
                             input_data=input_data)
            kept_stages.append(stage_name)
            if cls.produces_model:
                models[stage_name] = ModelArtifact(None, None, Path(entry["artifacts"]["model"]), produced_by=stage_name)
                latest = stage_name
            continue
        if earlier:  # what the earlier attempt recorded from this stage on no longer stands
            record.stages = {name: record.stages[name] for name in kept_stages}
        earlier = {}  # the stages after one that runs again run again too: their input may differ
        clock = time.perf_counter()
        stage_dir = run_dir / stage_name
        if lead:
            stage_dir.mkdir(parents=True, exist_ok=True)

        def run_stage() -> StageResult:
            model = _model_of(models, source) if source else None
            context = StageContext(
                _stage_config(with_data_fields(cfg, key), record, input_data), node, stage_dir, model, tracker, stage_name,
                model_of=lambda stage: _model_of(models, stage, asked_by=stage_name), earlier=dict(record.stages),
            )
            return cls().run(context)

        result = None
        if issubclass(cls, TrainingTechnique):
            result = run_stage()
        else:
            with distributed.rank_zero_alone():
                if lead:
                    result = run_stage()
        wall_time = time.perf_counter() - clock
        shared = distributed.decided_by_rank_zero(lambda: _shareable(result, wall_time))
        recorded, wall_time, made_model, saved_at = shared
        record.add_stage(stage_name, cls.name, recorded, wall_time_s=wall_time, input_model=input_model,
                         input_data=input_data)
        if lead:
            record.write()  # a run that dies later still shows what finished (status "running")
            tracker.log_metrics(flatten_numbers(recorded.metrics, prefix=f"{stage_name}/"))
        if made_model:  # a trained model is in every rank's memory; another is loaded from where rank 0 saved it
            made = result.model if result is not None else ModelArtifact(None, None, saved_at, produced_by=stage_name)
            models[stage_name], latest = made, stage_name


def _stage_config(cfg: DictConfig, record: RunRecord, input_data: Optional[str]) -> DictConfig:
    """The run's config as a stage sees it: its data replaced by the corpus ``input_data`` made
    (``pipeline.data_inputs``), which the plan checked is an earlier stage that makes one."""
    if input_data is None:
        return cfg
    made_by = technique(record.stages[input_data]["technique"])
    return with_corpus(cfg, record.stages[input_data]["artifacts"][made_by.produces_data])


def _shareable(result: StageResult, wall_time: float) -> Tuple[StageResult, float, bool, Optional[Path]]:
    """What rank 0 tells the other ranks of a stage: its record, wall time, whether it made a model, where that is."""
    path = result.model.path if result.model is not None else None
    return dataclasses.replace(result, model=None), wall_time, result.model is not None, path


def _model_of(models: Dict[str, ModelArtifact], stage: str, asked_by: Optional[str] = None) -> ModelArtifact:
    """The model ``stage`` made, loaded from its saved directory when only the path is kept."""
    artifact = models.get(stage)
    if artifact is None:
        raise UserError(
            f"{asked_by}: it needs the model of stage {stage!r}, but no stage of that name made a model before it; "
            f"name one of the stages before it that made a model ({', '.join(models) or 'none so far'})."
        )
    if artifact.model is None and artifact.path is None:
        raise UserError(
            f"{asked_by}: it needs the model of stage {stage!r} on every rank, and only rank 0 ran that stage, "
            f"which did not save its model; let {stage!r} save it (its save_model=true) or run with parallelism=single."
        )
    if artifact.model is None:
        artifact = models[stage] = ModelArtifact(*load_model(artifact.path), path=artifact.path, produced_by=stage)
    return artifact


def _completed_earlier(record: RunRecord) -> Dict[str, Any]:
    """Completed stages of an earlier attempt at this run directory with the same config, by stage name."""
    try:
        earlier = read_results(record.run_dir)
    except (OSError, ValueError):  # none yet, or unreadable: start afresh
        return {}
    if earlier.get("config") != json.loads(json.dumps(record.config)):
        return {}
    return {name: entry for name, entry in (earlier.get("stages") or {}).items() if entry.get("status") == "completed"}


def _can_keep(entry: Optional[Dict[str, Any]], cls, stage_name: str) -> bool:
    """Whether an earlier attempt's record of this stage stands; a model-producing stage needs its saved model."""
    if entry is None or entry.get("technique") != cls.name:
        return False
    if cls.produces_model:
        path = (entry.get("artifacts") or {}).get("model")
        if not path:
            return False
        try:
            validate_checkpoint_dir(path)
        except UserError as error:
            console.warn(f"{stage_name}: the model it saved earlier is unusable, so it runs again ({error})")
            return False
    console.warn(f"{stage_name}: completed by an earlier attempt at this run directory; kept, not run again")
    return True


def _close(record: RunRecord, status: str, reason: Optional[str] = None) -> RunRecord:
    record.finish(status, reason).write()
    if status != "completed":
        console.warn(f"{status}: {reason}")
    return record


def _unique(name: str, taken: set) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
