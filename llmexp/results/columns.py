"""Which columns a comparison shows, in what order and under which labels, and which axes its plots take.

A stage's technique declares what it reports (``Technique.metrics``): each number's direction,
label and kind. A comparison row is an evaluation of a model: its columns are what that
evaluation declares, then what making the model cost (the costs its maker declares). The
core owns the columns it records itself: which row it is and what the model is (``IDENTITY``)
and the model's size on disk (``SIZE_COLUMNS``). A row whose technique is not installed here
(a report over another machine's runs) keeps its numbers, as undeclared columns after the
declared ones.

The table reads: which row, then the evaluation's qualities and other measures in the order
declared, then the model's size, then the evaluation's costs and the maker's. A Pareto plot
draws at most two qualities against the evaluation's first cost and the model's size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from llmexp.configuration.pipeline import TOP_LEVEL_NODES, stage_nodes
from llmexp.errors import UserError
from llmexp.techniques.contract import Metric, MetricKind
from llmexp.techniques.plugin_manager import technique

# Columns the core records for every row: which row it is and what the model is.
IDENTITY = ("stage", "made_by", "precision", "simulated", "layers", "parameters")
# The model's size on disk (``report.report_rows``): in MB and as a percentage of the first row's.
SIZE = Metric("size_mb", False, "size", MetricKind.COST)
SIZE_COLUMNS = (SIZE.name, "size_pct", "bits_per_weight")
# Keys of a row that say which model it is rather than measure it.
_NOT_MEASURES = ("model", "bytes_on_disk")
# Differences from a baseline (``<metric>_delta``, ``_delta_se``, the items gained and lost): the table keeps them,
# a terminal leaves them out (it shows McNemar's p-value of the gained and lost items).
PAIRED_SUFFIXES = ("_delta", "_delta_se", "_gained", "_lost")
# At most this many qualities a Pareto plot draws, each against every cost.
PLOTTED_QUALITIES = 2

Declared = Mapping[str, Optional[Tuple[Metric, ...]]]  # by stage name; None: its technique is not installed here


def declared_metrics(results: Mapping[str, Any]) -> Dict[str, Optional[Tuple[Metric, ...]]]:
    """What each stage of a run's results.json declares, by stage name: its technique (looked up among the plugins
    installed here) asked with the run's recorded config. None for a technique not installed, or a stage whose
    node the recorded config lacks (a record without its config): its numbers show undeclared."""
    config, nodes = recorded_nodes(results)
    declared: Dict[str, Optional[Tuple[Metric, ...]]] = {}
    for name, entry in (results.get("stages") or {}).items():
        node = nodes.get(name)
        try:
            cls = technique(str(entry.get("technique")))
        except UserError:  # not installed here
            cls = None
        declared[name] = tuple(cls.metrics(config, node)) if cls is not None and node is not None else None
    return declared


def recorded_nodes(results: Mapping[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """A run's recorded config and the config node of each of its stages, by stage name (a stage whose node the
    record lacks has none)."""
    from omegaconf import OmegaConf

    config = OmegaConf.create(dict(results.get("config") or {}))
    nodes = stage_nodes(config, strict=False) if "pipeline" in config else []
    own = {key: node for key, node in nodes if key not in TOP_LEVEL_NODES}  # a pipeline's nodes: named by their key
    top = [node for key, node in nodes if key in TOP_LEVEL_NODES]  # named by their technique (evaluate, evaluate-2)
    found: Dict[str, Any] = {}
    for name, entry in (results.get("stages") or {}).items():
        node = own.get(name) or next((node for node in top if node.name == entry.get("technique")), None)
        top = [other for other in top if other is not node]
        if node is not None:
            found[name] = node
    return config, found


@dataclass
class Columns:
    """The declared columns of a set of comparison rows (``columns_of``)."""

    measured: Dict[str, Metric] = field(default_factory=dict)  # what the rows' evaluations declare, in order
    made: Dict[str, Metric] = field(default_factory=dict)  # the costs of making the rows' models
    undeclared: List[str] = field(default_factory=list)  # numbers of rows whose technique declared nothing here

    def add(self, other: "Columns") -> None:
        """Take in another set of rows' columns (another run's), keeping the first declaration of each name."""
        for name, metric in other.measured.items():
            self.measured.setdefault(name, metric)
        for name, metric in other.made.items():
            if name not in self.measured:
                self.made.setdefault(name, metric)
        self.undeclared += [name for name in other.undeclared if name not in self.undeclared]

    def metric(self, column: str) -> Optional[Metric]:
        return SIZE if column == SIZE.name else self.measured.get(column) or self.made.get(column)

    def label(self, column: str) -> str:
        """The column's header in the Markdown table: its declared label, else its name."""
        metric = self.metric(column)
        return metric.label if metric is not None else column

    def of_kind(self, kind: MetricKind) -> List[Metric]:
        return [metric for metric in self.measured.values() if metric.kind is kind]

    def table(self) -> List[str]:
        """Every column, in the table's order."""
        measures = [m.name for m in self.measured.values() if m.kind is not MetricKind.COST]
        costs = [m.name for m in self.of_kind(MetricKind.COST)] + list(self.made)
        return list(dict.fromkeys([*IDENTITY, *measures, *SIZE_COLUMNS, *costs, *self.undeclared]))

    def console(self) -> List[str]:
        """The columns a terminal shows, most important first (it leaves out the last ones when narrow):
        which model, how good (the qualities the plots draw), how big; how else it differs (its first two other
        measures), what it is, its speed (its first cost), what made it; one more measure and what making it cost.
        The rest are in the table's files."""
        qualities = [m.name for m in self.of_kind(MetricKind.QUALITY)]
        others = [m.name for m in self.of_kind(MetricKind.INFO) if not m.name.endswith(PAIRED_SUFFIXES)]
        costs = [m.name for m in self.of_kind(MetricKind.COST)]
        return list(dict.fromkeys([
            "stage", *qualities[:PLOTTED_QUALITIES], SIZE.name, *others[:2], "precision", "parameters", "layers",
            *costs[:1], "made_by", *others[2:3], *list(self.made)[:1],
        ]))

    def qualities(self, rows: Sequence[Mapping[str, Any]]) -> List[Metric]:
        """The qualities a plot draws: the first ``PLOTTED_QUALITIES`` declared that two rows have."""
        return [m for m in self.of_kind(MetricKind.QUALITY) if plottable(rows, m.name)][:PLOTTED_QUALITIES]

    def costs(self, rows: Sequence[Mapping[str, Any]], first: Optional[int] = None) -> List[Metric]:
        """The costs a plot draws: the (``first``) costs the rows' evaluations declare that two rows have, then the
        model's size when two rows have one."""
        declared = [m for m in self.of_kind(MetricKind.COST) if plottable(rows, m.name)][:first]
        return declared + ([SIZE] if plottable(rows, SIZE.name) else [])


def columns_of(rows: Sequence[Mapping[str, Any]], declared: Declared) -> Columns:
    """The columns of ``rows``: each row's evaluation's declarations (``declared[row["stage"]]``), the costs its
    model's maker declares (``declared[row["model"]]``) that the row carries, and the numbers of rows whose
    evaluation declared nothing here."""
    columns = Columns()
    for row in rows:
        for metric in declared.get(row.get("stage")) or ():
            columns.measured.setdefault(metric.name, metric)
    for row in rows:
        for metric in declared.get(row.get("model")) or ():
            if metric.kind is MetricKind.COST and metric.name in row and metric.name not in columns.measured:
                columns.made.setdefault(metric.name, metric)
    known = {*IDENTITY, *SIZE_COLUMNS, *_NOT_MEASURES, *columns.measured, *columns.made}
    for row in rows:
        if declared.get(row.get("stage")) is None:
            columns.undeclared += [key for key, value in row.items() if key not in known and is_number(value)
                                   and key not in columns.undeclared]
    return columns


def present(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> List[str]:
    """The ``columns`` at least one row has a value for."""
    return [column for column in columns if any(row.get(column) is not None for row in rows)]


def plottable(rows: Sequence[Mapping[str, Any]], name: str) -> bool:
    return sum(is_number(row.get(name)) for row in rows) >= 2


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def axis_label(metric: Metric) -> str:
    """``label (name, higher is better)``: what the axis measures, the key it reads and which way is better."""
    better = "higher is better" if metric.higher_is_better else "lower is better"
    return f"{metric.label} ({better})" if metric.label == metric.name else f"{metric.label} ({metric.name}, {better})"


def file_stem(metric: Metric) -> str:
    """A file name's word for a metric: its label up to any parenthesis, lower case (``throughput``, ``size``)."""
    return re.sub(r"[^a-z0-9]+", "_", metric.label.split("(")[0].lower()).strip("_") or metric.name
