"""What each pipeline stage reads of the stages before it, checked before anything runs.

A stage starts from a model (the latest earlier stage that made one, or the one ``pipeline.inputs``
names) and may read more of earlier stages: a distillation its teacher's model, an evaluation its
baseline's results. Each technique declares the latter itself (``Technique.consumes``); this module
refuses, at plan time, every read that the run could only fail on minutes later: a stage that is not
before the reader, one that makes no model, one that does not run the technique whose results are read.
What the read stage holds (an evaluation's tasks) is the reading technique's own plan check.
"""

from __future__ import annotations

from typing import List

from omegaconf import OmegaConf

from llmexp.configuration.pipeline import NO_MODEL, node_path, stage_name, stage_nodes, with_data_fields
from llmexp.errors import UserError
from llmexp.techniques.contract import Consumed, Reads
from llmexp.techniques.plugin_manager import technique


def data_flow_problems(config) -> List[str]:
    """One paragraph per read of an earlier stage that cannot happen, naming the field and the fix."""
    stages = stage_nodes(config, strict=False)
    problems = input_problems(config, stages) + data_field_problems(config, stages)
    for index, (key, node) in enumerate(stages):
        earlier = {stage_name(k, n): n for k, n in stages[:index]}
        for read in technique(node.name).consumes(config, key, node):
            problems += _read_problems(read, key, earlier)
    return problems


def _read_problems(read: Consumed, key: str, earlier) -> List[str]:
    """Why ``key`` cannot read ``read.stage`` among the ``earlier`` stages (run name -> node), if it cannot."""
    if read.reads is Reads.MODEL:
        makers = [name for name, node in earlier.items() if technique(node.name).produces_model]
        if read.stage in makers:
            return []
        choice = f"name one of {', '.join(makers)}" if makers else "put that stage before it in pipeline.stages"
        return [f"{read.field}={read.stage} is not a stage before this one that makes a model; {choice}{read.fix}."]
    runs = [name for name, node in earlier.items() if node.name == read.technique]
    if read.stage in runs:
        return []
    article = "an" if read.technique[0] in "aeiou" else "a"
    return [f"{read.field}={read.stage} must name {article} {read.technique} stage that runs before {key!r} "
            f"({', '.join(runs) or 'there is none'}){read.fix}."]


def input_problems(config, stages) -> List[str]:
    """``pipeline.inputs`` and ``pipeline.data_inputs``: each names a stage that runs before its reader and makes a
    model (inputs) or a corpus (data_inputs: ``Technique.produces_data``)."""
    return (_source_problems(config, stages, "inputs", "starts from the model", lambda cls: cls.produces_model, "a model")
            + _source_problems(config, stages, "data_inputs", "reads the corpus", lambda cls: cls.produces_data is not None,
                               "a corpus"))


def data_field_problems(config, stages) -> List[str]:
    """``pipeline.data_fields``: each names a stage, and sets fields its data option has to values they take."""
    keys = [key for key, _ in stages]
    declared = OmegaConf.select(config, "pipeline.nodes", default=None) or {}
    problems = []
    for stage in OmegaConf.select(config, "pipeline.data_fields", default=None) or {}:
        if stage not in keys and stage not in declared:
            problems.append(f"pipeline.data_fields.{stage}: {stage!r} is not a stage of pipeline.stages "
                            f"({', '.join(keys)}); name one of them.")
            continue
        try:
            with_data_fields(config, stage)
        except UserError as error:
            problems.append(str(error))
    return problems


def _source_problems(config, stages, setting: str, reads: str, makes, kind: str) -> List[str]:
    keys = [key for key, _ in stages]
    nodes = dict(stages)
    inputs = OmegaConf.select(config, f"pipeline.{setting}", default=None) or {}
    all_keys = list(OmegaConf.select(config, "pipeline.stages", default=None) or [])
    declared = OmegaConf.select(config, "pipeline.nodes", default=None) or {}
    problems = []
    for stage, source in inputs.items():
        if stage not in keys and stage in declared:
            continue  # a node of the pipeline that pipeline.stages leaves out: it runs, and reads, nothing
        if setting == "inputs" and source == NO_MODEL and stage in keys:
            continue
        if stage not in keys:
            problems.append(f"pipeline.{setting}.{stage}={source}: {stage!r} is not a stage of pipeline.stages "
                            f"({', '.join(all_keys)}); name one of them.")
            continue
        if source not in keys or keys.index(source) >= keys.index(stage):
            problems.append(
                f"pipeline.{setting}.{stage}={source}: both must be stages of pipeline.stages "
                f"({', '.join(all_keys)}) and {source!r} must come before {stage!r}."
            )
            continue
        makers = [key for key in keys[:keys.index(stage)] if makes(technique(nodes[key].name))]
        if source not in makers:
            problems.append(
                f"pipeline.{setting}.{stage}={source}: {stage!r} {reads} {source!r} makes, and "
                f"{node_path(source)} (technique={nodes[source].name}) makes none; name a stage before it "
                f"that makes {kind} ({', '.join(makers) or 'there is none'})."
            )
    return problems
