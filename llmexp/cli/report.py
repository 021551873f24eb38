"""``llmexp report DIR...``: one table and Pareto plots over runs and sweeps.

Every ``results.json`` under the given directories is a run (a single run, a multirun's
jobs, a pipeline's run with its several evaluations). Each evaluation becomes a row that
names its run (``run``: the run directory below the folder the runs share), its pipeline,
the technique that made the evaluated model, and the overrides that made its run; the keys
whose values differ between runs are the swept keys, and rows are grouped by them.
``--baseline key=value,...`` names one row (``run=0,stage=baseline_eval``); every other row
gets the difference of each accuracy and cost from it.
Runs that failed or were skipped (and sweep jobs that never wrote results) are listed with
their reasons instead of dropped. Columns, their labels and the plots' axes come from what each run's
stages declare (``llmexp.results.columns``), looked up among the plugins installed here. Writes
``report.md``, ``report.csv`` and one ``pareto_<cost>.png`` per cost the evaluations declare and the
model's size (``pareto_throughput.png``, ``pareto_size.png`` ...) atomically into ``--out``; where evaluations
record a condition (closed-book, few-shot, RAG), report.md's conditions table (``llmexp.results.conditions``: each
evaluation's model, condition, qualities and paired comparison with its baseline) and ``conditions.csv``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from llmexp.atomic import replace_atomically
from llmexp.errors import UserError
from llmexp.results.record import RESULTS_FILE, flatten_numbers
from llmexp.results.report import markdown_table, pareto_png, report_rows, write_csv
from llmexp.results.columns import (
    PAIRED_SUFFIXES, PLOTTED_QUALITIES, SIZE, Columns, columns_of, declared_metrics, file_stem, is_number, plottable,
    present,
)
from llmexp.results.conditions import CONDITIONS_CSV, condition_columns, condition_rows
from llmexp.techniques.contract import Metric, MetricKind

REPORT_MD, REPORT_CSV = "report.md", "report.csv"
# What a row shows about the model besides its measures, when present.
_MODEL_COLUMNS = ("precision", "parameters")
_VS_BASELINE = "_vs_baseline"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmexp report", description=__doc__.split("\n", 1)[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories (searched for results.json)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the only DIR, else ./report)")
    parser.add_argument("--baseline", help="the row others are compared with: key=value[,key=value] (e.g. stage=baseline_eval)")
    parser.add_argument("--metric", action="append", default=[], help="a quality to show and plot, by its key (repeatable); default: what the runs declare")
    args = parser.parse_args(argv)
    from llmexp.display import console

    runs, missing = find_runs(args.dirs)
    rows, unfinished, swept, columns = collect_rows(runs)
    conditions = collect_conditions(runs)
    unfinished += missing
    if not rows and not unfinished:
        raise UserError(
            f"no results.json under {', '.join(map(str, args.dirs))}; give run directories (outputs/<date>/<time>) "
            "or multirun directories (multirun/<date>/<time>)."
        )
    qualities = [columns.metric(name) or Metric(name, True, name, MetricKind.QUALITY) for name in args.metric] or [
        columns.metric(name) for name in accuracy_metrics(rows, columns.measured.values())]
    baseline = baseline_row(rows, args.baseline) if args.baseline else None
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path("report"))
    written = write_cross_run_report(out, rows, unfinished, columns, qualities, swept, baseline, conditions)
    names = [metric.name for metric in qualities]
    others = [m.name for m in columns.of_kind(MetricKind.INFO) if not m.name.endswith(PAIRED_SUFFIXES)]
    measures = [*names[:3], *(name + _VS_BASELINE for name in names[:1]), *others[:1], SIZE.name,
                *(m.name for m in columns.of_kind(MetricKind.COST))]
    # What a narrow terminal keeps first: which row it is (its run and stage are never left out), its first
    # quality, the swept keys, then the other measures.
    priority = list(dict.fromkeys(["run", "stage", "technique", "pipeline", *measures[:1], *swept, *measures]))
    console.print_fitted_table(
        "Report", rows, present(rows, priority), (REPORT_MD, REPORT_CSV), keep=2,
        order=[*row_names(swept), *measures],
    )
    for entry in unfinished:
        console.warn(f"{entry['status']}: {entry['run']}: {entry.get('reason') or 'no reason recorded'}")
    console.out.print(f"{len(rows)} row(s) from {len(runs)} run(s), {len(unfinished)} not completed; wrote:")
    for path in written.values():
        console.out.print(f"  {path}", soft_wrap=True, highlight=False)
    return 0


def find_runs(dirs: Sequence[Path]) -> Tuple[List[Tuple[Path, Dict[str, Any]]], List[Dict[str, Any]]]:
    """``(run dir, results)`` for every results.json under ``dirs``, and sweep jobs that never wrote one.

    A job of a multirun that died before writing (a directory with ``.hydra/`` but no
    results.json), or one a Slurm sweep's ``jobs.json`` lists as failed without results,
    is reported as failed with what is known.
    """
    runs: List[Tuple[Path, Dict[str, Any]]] = []
    missing: List[Dict[str, Any]] = []
    for root in dirs:
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; give run or multirun directories (they hold results.json).")
        for results_file in sorted(root.rglob(RESULTS_FILE), key=_natural):
            try:
                runs.append((results_file.parent, json.loads(results_file.read_text())))
            except (OSError, ValueError) as error:
                missing.append({"run": str(results_file.parent), "status": "failed", "reason": f"unreadable {RESULTS_FILE}: {error}"})
        known = {str(run_dir) for run_dir, _ in runs}
        for hydra_dir in sorted(root.rglob(".hydra"), key=_natural):
            if str(hydra_dir.parent) not in known and (hydra_dir / "overrides.yaml").is_file():
                missing.append({"run": str(hydra_dir.parent), "status": "failed", "reason": "no results.json: the job ended before writing it"})
        recorded = {run_dir.absolute() for run_dir, _ in runs}
        for jobs_file in root.rglob("jobs.json"):  # a sweep's record of its jobs (absolute run directories)
            for job in json.loads(jobs_file.read_text()):
                if job.get("status") != "completed" and Path(str(job.get("run_dir"))).absolute() not in recorded:
                    missing.append({"run": str(job.get("run_dir")), "status": job.get("status"), "reason": job.get("reason")})
    return runs, _unique(missing)


def collect_rows(
    runs: Sequence[Tuple[Path, Mapping[str, Any]]],
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], List[str], Columns]:
    """One row per evaluation of every completed run with its swept overrides; the runs that did not complete; the
    swept keys; the rows' columns (what each run's stages declare)."""
    rows: List[Dict[str, Any]] = []
    unfinished: List[Dict[str, Any]] = []
    columns = Columns()
    overrides = {str(run_dir): _overrides(run_dir) for run_dir, _ in runs}
    swept = swept_keys(list(overrides.values()))
    names = run_names([run_dir for run_dir, _ in runs])
    for run_dir, results in runs:
        status = results.get("status")
        if status != "completed":
            unfinished.append({"run": str(run_dir), "status": status, "reason": results.get("reason"), **_pick(overrides[str(run_dir)], swept)})
            continue
        stages = results.get("stages") or {}
        evaluations = report_rows(results.get("comparison") or [])
        if not evaluations:  # a run without an evaluation: its last stage's numbers
            name, entry = list((stages or {"-": {}}).items())[-1]
            evaluations = [{"stage": name, "made_by": entry.get("technique"), **flatten_numbers(entry.get("metrics") or {})}]
        columns.add(columns_of(evaluations, declared_metrics(results)))
        pipeline = ((results.get("config") or {}).get("pipeline") or {}).get("name")
        for evaluation in evaluations:
            row = {
                "run": names[str(run_dir)], **_pick(overrides[str(run_dir)], swept), **evaluation,
                "pipeline": pipeline, "technique": _technique(stages, evaluation), "run_dir": str(run_dir),
            }
            label = [*(f"{key}={row[key]}" for key in swept if row.get(key) is not None), row.get("stage", "")]
            row["label"] = " ".join([row["run"], *label] if len(runs) > 1 else label).strip()
            rows.append(row)
    rows.sort(key=lambda row: [_sort_key(row.get(key)) for key in swept])
    return rows, unfinished, swept, columns


def collect_conditions(runs: Sequence[Tuple[Path, Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """The conditions table's rows (``llmexp.results.conditions``) of every completed run, in run order."""
    names = run_names([run_dir for run_dir, _ in runs])
    return [row for run_dir, results in runs if results.get("status") == "completed"
            for row in condition_rows(names[str(run_dir)], results, declared_metrics(results))]


def run_names(run_dirs: Sequence[Path]) -> Dict[str, str]:
    """A short name for each run directory: its path below the deepest folder that holds them all.

    A multirun's jobs are ``0``, ``1`` ...; runs of one day ``10-00-00``, ``11-30-00``; jobs
    of two sweeps ``<sweep>/0`` ...; a single run its directory's name.
    """
    if not run_dirs:
        return {}
    common = Path(os.path.commonpath([Path(run_dir).absolute().parent for run_dir in run_dirs]))
    return {str(run_dir): Path(run_dir).absolute().relative_to(common).as_posix() for run_dir in run_dirs}


def _technique(stages: Mapping[str, Any], evaluation: Mapping[str, Any]) -> Optional[str]:
    """The technique that made the row's model (``quantize`` for a compress run's ``fp8_eval``); for a model
    given by ``model.path``, or a row of a stage's own numbers, that stage's technique."""
    maker = stages.get(evaluation.get("model")) or stages.get(evaluation.get("stage")) or {}
    return maker.get("technique")


def row_names(swept: Sequence[str]) -> List[str]:
    """The columns that say which row it is, in the order the tables show them."""
    return list(dict.fromkeys(["run", *swept, "pipeline", "technique", "stage"]))


def swept_keys(overrides: Sequence[Mapping[str, str]]) -> List[str]:
    """The override keys whose value is not the same in every run (absent counts as a value), in first-seen order."""
    keys = list(dict.fromkeys(key for run in overrides for key in run))
    return [key for key in keys if len({run.get(key) for run in overrides}) > 1]


def accuracy_metrics(rows: Sequence[Mapping[str, Any]], declared: Iterable[Metric]) -> List[str]:
    """The qualities ``declared`` (``Technique.metrics``) that the rows carry, in the order declared."""
    present = {key for row in rows for key, value in row.items() if is_number(value)}
    return [metric.name for metric in declared if metric.kind is MetricKind.QUALITY and metric.name in present]


def baseline_row(rows: Sequence[Mapping[str, Any]], selector: str) -> Mapping[str, Any]:
    """The one row every ``key=value`` of ``selector`` matches; a clear error for none or several."""
    wanted = {}
    for part in filter(None, (piece.strip() for piece in selector.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise UserError(f"--baseline {selector!r}: {part!r} is not key=value; e.g. --baseline stage=baseline_eval.")
        wanted[key.strip()] = value.strip()
    matches = [row for row in rows if all(str(row.get(key)) == value for key, value in wanted.items())]
    if len(matches) != 1:
        labels = "; ".join(str(row.get("label")) for row in (matches or rows)[:12])
        raise UserError(
            f"--baseline {selector!r} matches {len(matches)} rows, not one; add keys until one row matches "
            f"(rows{' matching' if matches else ''}: {labels})."
        )
    return matches[0]


def write_cross_run_report(
    out: Path,
    rows: Sequence[Dict[str, Any]],
    unfinished: Sequence[Mapping[str, Any]],
    columns: Columns,
    qualities: Sequence[Metric],
    swept: Sequence[str] = (),
    baseline: Optional[Mapping[str, Any]] = None,
    conditions: Sequence[Mapping[str, Any]] = (),
) -> Dict[str, Path]:
    """``report.md`` (table, the ``conditions`` table, runs not completed), ``report.csv``, ``conditions.csv`` (with
    conditions) and one Pareto PNG per cost axis (``columns.costs``).

    Every measure (the ``qualities``, the other declared measures, the size and the costs) gets its difference from
    the ``baseline`` row (``<metric>_vs_baseline``)."""
    others = [m.name for m in columns.of_kind(MetricKind.INFO) if not m.name.endswith(PAIRED_SUFFIXES)]
    costs = [SIZE.name, *(m.name for m in columns.of_kind(MetricKind.COST)), *columns.made]
    measures = list(dict.fromkeys([*(metric.name for metric in qualities), *others, *costs]))
    if baseline is not None:
        for row in rows:
            for measure in measures:
                if _number(row.get(measure)) and _number(baseline.get(measure)):
                    row[measure + _VS_BASELINE] = row[measure] - baseline[measure]
    shown = present(rows, [
        *row_names(swept), *_MODEL_COLUMNS, *(c for m in measures for c in (m, m + _VS_BASELINE)), "run_dir",
        *columns.undeclared,
    ])
    out.mkdir(parents=True, exist_ok=True)
    body = markdown_table(rows, shown, [_header(columns, column) for column in shown]) if rows else "No completed runs.\n"
    if baseline is not None:
        body = f"Differences (`*_vs_baseline`) are against **{baseline.get('label')}**.\n\n" + body
    if conditions:
        names, headers = condition_columns(conditions, several_runs=len({row["run"] for row in conditions}) > 1)
        body += ("\n## Conditions\n\nWhat each evaluation's model read before each question, and its paired "
                 "comparison with its baseline's evaluation of the same items.\n\n"
                 + markdown_table(conditions, names, headers))
    if unfinished:
        body += "\n## Not completed\n\n" + markdown_table(list(unfinished), ["run", "status", "reason"])
    written = {
        "table": replace_atomically(out / REPORT_MD, lambda handle: handle.write(body)),
        "csv": replace_atomically(out / REPORT_CSV, lambda handle: write_csv(handle, rows, shown)),
    }
    if conditions:
        written["conditions"] = replace_atomically(
            out / CONDITIONS_CSV, lambda handle: write_csv(handle, conditions, names))
    for cost in columns.costs(rows):
        png = pareto_png(rows, [q for q in qualities if plottable(rows, q.name)][:PLOTTED_QUALITIES], [cost], label="label")
        if png is not None:
            written[cost.name] = replace_atomically(
                out / f"pareto_{file_stem(cost)}.png", lambda handle, png=png: handle.write(png), binary=True)
    return written


def _header(columns: Columns, column: str) -> str:
    """A report's Markdown header: the column's label, ``<label> vs baseline`` for its difference from the baseline."""
    measure, suffix = column[: -len(_VS_BASELINE)], column[-len(_VS_BASELINE):]
    return f"{columns.label(measure)} vs baseline" if suffix == _VS_BASELINE else columns.label(column)


def _overrides(run_dir: Path) -> Dict[str, str]:
    """The command-line overrides of a run, from Hydra's ``.hydra/overrides.yaml`` (empty when absent)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = [str(item).partition("=") for item in OmegaConf.load(path)]
    return {key.lstrip("+~"): value for key, _, value in pairs if not key.startswith("hydra")}


def _pick(overrides: Mapping[str, str], keys: Sequence[str]) -> Dict[str, Optional[str]]:
    return {key: overrides.get(key) for key in keys}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sort_key(value: Any) -> tuple:
    """Numbers in numeric order, then text; missing values last."""
    if value is None:
        return (2, "")
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def _natural(path: Path) -> list:
    """Multirun job directories 0, 1, ..., 10 in numeric order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def _unique(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen, kept = set(), []
    for entry in entries:
        if entry["run"] not in seen:
            seen.add(entry["run"])
            kept.append(entry)
    return kept
