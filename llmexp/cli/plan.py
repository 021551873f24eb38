"""``llmexp plan [--json] <overrides>``: will this config fit and run, before anything starts.

Composes the config exactly as a run would, makes the plan and prints it: a table for
people, JSON for scripts, each first saying which job it is the plan of and why (a model or
technique named on the command line implies its technique and evaluation, not the whole
workflow). Exit code 0 when the plan has no problems, 2 when it has (or the config does not
compose); nothing is written and torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.resources import files
from typing import List, Optional

from llmexp.configuration.compose import CONFIG_NAME, compose_config, implied_pipeline
from llmexp.configuration.pipeline import stage_nodes
from llmexp.display import console
from llmexp.errors import EXIT_USER_ERROR, UserError
from llmexp.models import starting_weights
from llmexp.planning.planner import make_plan
from llmexp.techniques.plugin_manager import technique

GIB = 2**30


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmexp plan",
        description="Plan a run without running it: parameters, memory per device, problems. "
        "Exit code 0 when it fits and runs, 2 when it does not.",
        epilog="example: llmexp plan model=llama3_1_70b technique=lora hardware=a100_80g parallelism=fsdp8 "
        "precision=bf16 data.seq_len=8192 parallelism.activation_checkpointing=true",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--config-dir", help="a directory of your own configs, as for `llmexp` (sweeps/, `llmexp cp`)")
    parser.add_argument("--config-name", help="the primary config in it, as for `llmexp`")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `llmexp`")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error: argparse has printed why
        return int(exit_.code or 0)

    try:
        config_name = args.config_name or CONFIG_NAME
        cfg = compose_config(args.overrides, config_name, args.config_dir)
        plan = make_plan(cfg)
    except UserError as error:
        console.error(str(error))
        return EXIT_USER_ERROR
    implied_by = implied_pipeline(args.overrides, config_name)
    if args.json:
        print(json.dumps({"planned": planned(cfg, implied_by), **plan.to_dict(),
                          "config": {**summary(cfg), "pipeline_implied_by": implied_by}}, indent=2))
    else:
        print_table(cfg, plan, planned(cfg, implied_by))
    return 0 if plan.feasible else EXIT_USER_ERROR


SINGLE_TECHNIQUE = ("technique_then_evaluation", "technique_only")  # pipelines of the chosen technique (and evaluation)


def planned(cfg, implied_by: Optional[str]) -> str:
    """Which job this is the plan of, and why that one: ``llmexp.configuration.compose.implied_pipeline`` says whether an
    override (``implied_by``) chose it over the whole workflow."""
    name, workflow = cfg.pipeline.name, workflow_pipeline()
    stages = stage_nodes(cfg, strict=False)
    if name in SINGLE_TECHNIQUE:
        job = " then ".join([f"technique={cfg.technique.name}",
                             *(technique(node.name).planned_as(cfg, key, node) for key, node in stages[1:])])
    else:
        job = f"pipeline={name}, {len(stages)} stages: {' → '.join(key for key, _ in stages)}"
    if implied_by:
        why = f"pipeline={name}, implied by {implied_by}; name pipeline={workflow} for the whole workflow"
    elif name == workflow:
        why = "llmexp's default: its whole workflow, built for the embedded model"
    else:
        why = f"pipeline={name}, as named"
    return f"planned: {job} ({why})"


def workflow_pipeline() -> str:
    """The pipeline ``llmexp`` alone runs: llmexp/conf/config.yaml's default."""
    import yaml

    defaults = yaml.safe_load(files("llmexp.conf").joinpath("config.yaml").read_text(encoding="utf-8"))["defaults"]
    return next(entry["pipeline"] for entry in defaults if isinstance(entry, dict) and "pipeline" in entry)


def summary(cfg) -> dict:
    """The choices a plan depends on, so a JSON plan says what it is the plan of."""
    p = cfg.parallelism
    return {
        "model": cfg.model.name,
        "model_path": cfg.model.path,
        "weights": starting_weights.describe(cfg),
        "technique": cfg.technique.name,
        "pipeline": cfg.pipeline.name,
        "hardware": cfg.hardware.name,
        "precision": getattr(cfg.precision, "value", cfg.precision),
        "backend": cfg.backend.name,
        "parallelism": {"name": p.name, "tp": p.tp, "pp": p.pp, "dp": p.dp, "nodes": p.nodes,
                        "devices_per_node": p.devices_per_node, "sharding": p.sharding},
        "seq_len": cfg.data.seq_len,
        "micro_batch": p.micro_batch,
        "global_batch": p.global_batch,
    }


def print_table(cfg, plan, planned_job: str) -> None:
    from rich.table import Table
    from rich.text import Text

    s = summary(cfg)
    p = s["parallelism"]
    # a pipeline of its own nodes is planned by its heaviest stage, whose memory mode follows
    what = f"technique={s['technique']}" if s["pipeline"] in SINGLE_TECHNIQUE else f"pipeline={s['pipeline']}"
    title = (f"llmexp plan: model={s['model']} {what} ({plan.technique_memory}) "
             f"precision={s['precision']} hardware={s['hardware']} parallelism={p['name']} backend={s['backend']}")
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("parameters", count(plan.parameters))
    table.add_row("trainable", count(plan.trainable_parameters))
    table.add_row("world size", f"{plan.world_size} = tp {p['tp']} × pp {p['pp']} × dp {p['dp']}")
    table.add_row("devices", f"{p['nodes']} node × {p['devices_per_node']}, sharding {p['sharding']}")
    table.add_row("micro batch", f"{s['micro_batch']} × {s['seq_len']} tokens (global {s['global_batch']})")
    table.add_section()
    for name, value in plan.memory_breakdown.items():
        table.add_row(f"  {name}", size(value))
    table.add_section()
    share = plan.memory_per_device_bytes / plan.device_memory_bytes
    table.add_row("memory per device", f"{size(plan.memory_per_device_bytes)} of "
                  f"{size(plan.device_memory_bytes)} ({share:.0%})")
    if plan.at_train_seq_len:
        longer = plan.at_train_seq_len
        table.add_row(f"  at {longer['seq_len']} tokens", f"{size(longer['memory_per_device_bytes'])} of "
                      f"{size(plan.device_memory_bytes)} "
                      f"({longer['memory_per_device_bytes'] / plan.device_memory_bytes:.0%})")
    out = console.out
    out.print(Text(planned_job), soft_wrap=True)
    out.print(Text(title, style="bold"), soft_wrap=True)
    out.print(Text(f"weights: {s['weights']}"), soft_wrap=True)
    out.print(table)
    if plan.pipeline:
        print_pipeline(plan.pipeline, p["pp"], plan.device_memory_bytes)
    for warning in plan.warnings:
        out.print(Text(f"⚠ {warning}", style="yellow"), soft_wrap=True)
    if plan.feasible:
        out.print(Text("✓ fits and runs as configured", style="green"))
        return
    out.print(Text(f"✗ {len(plan.problems)} problem(s):", style="red bold"))
    for problem in plan.problems:
        out.print(Text(f"  - {problem}"), soft_wrap=True)  # unbroken, so it can be grepped


def print_pipeline(pipeline: dict, pp: int, device_bytes: int) -> None:
    """Each pipeline stage's layers, ranks and memory per device, and the share of a step the schedule idles."""
    from rich.table import Table
    from rich.text import Text

    m = pipeline["micro_batches"]
    console.out.print(Text(
        f"pipeline: {pp} stages, schedule {pipeline['schedule']}, {m} micro-batches per step; bubble "
        f"(pp-1)/(m+pp-1) = {pp - 1}/{m + pp - 1} = {pipeline['bubble_fraction']:.1%} of each step"), soft_wrap=True)
    if not pipeline["stages"]:
        return  # the layers do not split evenly: a problem below says so
    table = Table()
    for column in ("stage", "layers", "ranks", "activations", "memory per device"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in pipeline["stages"]:
        first, last = stage["layers"]
        total = stage["memory_per_device_bytes"]
        table.add_row(str(stage["stage"]), f"{first}-{last}", spans(stage["ranks"]),
                      size(stage["memory_breakdown"].get("activations", 0)),
                      f"{size(total)} ({total / device_bytes:.0%})")
    console.out.print(table)


def spans(ranks: List[int]) -> str:
    """Ranks as runs of consecutive ones: 0-3, 16-19."""
    runs: List[List[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def count(parameters: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.2f} {unit}"
    return str(parameters)


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
