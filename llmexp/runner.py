"""One run: plan, run the pipeline's stages in order, record results.json, print the table.

Called by Hydra once per job (a plain run, or each point of a multirun). In a multirun a
point that cannot run is recorded as ``skipped`` (infeasible plan) or ``failed`` (its
error), and the sweep goes on.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig

from llmexp import console
from llmexp.errors import UserError
from llmexp.planner import make_plan
from llmexp.plugin_manager import technique
from llmexp.results import RunRecord, flatten_numbers, redact_hydra_record
from llmexp.technique import ModelArtifact, StageContext
from llmexp.tracking import make_tracker


def run_experiment(cfg: DictConfig, run_dir: Path, multirun: bool) -> RunRecord:
    redact_hydra_record(run_dir / ".hydra", cfg)
    plan = make_plan(cfg)
    record = RunRecord.start(run_dir, cfg, plan.to_dict())
    if plan.problems:
        if not multirun:
            raise UserError(" ".join(plan.problems))
        return _close(record, "skipped", " ".join(plan.problems))

    tracker = make_tracker(cfg.tracker, run_dir, record.config)
    try:
        _run_stages(cfg, run_dir, tracker, record)
    except Exception as error:
        tracker.finish("failed")
        if not multirun:
            raise
        (run_dir / "error.log").write_text(traceback.format_exc())
        reason = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        return _close(record, "failed", f"{reason} (traceback: {run_dir / 'error.log'})")
    _close(record, "completed")
    tracker.log_results(record.to_dict())
    tracker.finish("completed")
    console.print_results(record.to_dict())
    return record


def _run_stages(cfg: DictConfig, run_dir: Path, tracker, record: RunRecord) -> None:
    # A technique that produces no model (evaluate, benchmark) has nothing new to look at
    # if no model was produced since it last ran: `technique=evaluate` evaluates once.
    model: Optional[ModelArtifact] = None
    models_produced, last_seen = 0, {}
    for key in cfg.pipeline.stages:
        node = cfg[key]
        cls = technique(node.name)
        if not cls.produces_model and last_seen.get(cls.name) == models_produced:
            continue
        last_seen[cls.name] = models_produced
        stage_name = _unique(cls.name, record.stages)
        stage_dir = run_dir / stage_name
        stage_dir.mkdir(parents=True, exist_ok=True)
        console.stage_banner(stage_name)
        clock = time.perf_counter()
        result = cls().run(StageContext(cfg, node, stage_dir, model, tracker, stage_name))
        record.add_stage(stage_name, cls.name, result, wall_time_s=time.perf_counter() - clock)
        record.write()  # a run that dies later still shows what finished (status "running")
        tracker.log_metrics(flatten_numbers(result.metrics, prefix=f"{stage_name}/"))
        if result.model is not None:
            model, models_produced = result.model, models_produced + 1


def _close(record: RunRecord, status: str, reason: Optional[str] = None) -> RunRecord:
    record.finish(status, reason).write()
    if status != "completed":
        console.warn(f"{status}: {reason}")
    return record


def _unique(name: str, taken: Dict[str, object]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
