"""What plans clean starts: the option space swept, each clean plan's first stage started as far as this machine can.

The space is every model x hardware x parallelism x precision x technique x backend option (about 10^5
points). The plan-only sweep takes a deterministic sample that holds every pair of option values of
any two axes (asserted), plans each point, and starts the pure part of its first stage: megatron's
argument translation (``llmexp.training.megatron.arguments.translate``, the first thing a megatron stage does)
and, on the torch backend, Lightning's Trainer and strategy for the layout (``llmexp.training.loop``). A
refusal there after a clean plan is a refusal the planner missed.

The slow test starts the first stage of tiny_llama points for real (one optimiser step, one item,
two calibration sequences), one point per technique and precision on a hardware preset that has it.
This machine has no GPU, so a GPU point starts as its CPU twin: ``hardware.accelerator=cpu``, every
other hardware fact (name, generation, dtypes) kept, so the precision and formats the point asks for
are still tried; a twin this machine cannot run at all (a CUDA-only format, Megatron-Bridge) is
counted as not startable here, never as passing. Real models are only planned.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from llmexp.techniques import plugin_manager
from llmexp.models.checkpoint import HF_KEYS
from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.configuration.pipeline import stage_nodes
from llmexp.planning.planner import make_plan
from llmexp.training.contract import TrainingTechnique

REPO = Path(__file__).resolve().parents[1]
FLAT_GROUPS = ("model", "hardware", "parallelism")  # option files merged onto the typed node (a defaults list left out)


def options(group):
    return sorted(path.stem for path in (REPO / "llmexp" / "conf" / group).glob("*.yaml"))


AXES = {
    "model": options("model"),
    "hardware": options("hardware"),
    "parallelism": options("parallelism"),
    "precision": ["fp32", "bf16", "fp16", "fp8", "fp4"],
    "technique": sorted(plugin_manager.techniques()),
    "backend": options("backend"),
}
SAMPLE = 1300  # the smallest round size whose sample (seed 0) holds every pair of option values


def sample_points():
    """A deterministic sample of the product of the axes, as dicts axis -> option."""
    names = list(AXES)
    sizes = [len(AXES[name]) for name in names]
    total = int(np.prod(sizes))
    chosen = random.Random(0).sample(range(total), SAMPLE)
    points = []
    for index in chosen:
        point = {}
        for name, size in zip(reversed(names), reversed(sizes)):
            index, position = divmod(index, size)
            point[name] = AXES[name][position]
        points.append(point)
    return points


def config_only_checkpoint(directory: Path, preset: dict) -> Path:
    """A checkpoint directory with the preset's numbers as config.json (the planner reads them, never the weights)."""
    directory.mkdir(parents=True)
    hf = {theirs: preset[ours] for ours, theirs in HF_KEYS.items() if preset.get(ours) is not None}
    (directory / "config.json").write_text(json.dumps(hf))
    save_file({"placeholder": np.zeros((4,), dtype=np.float16)}, str(directory / "model.safetensors"))
    return directory


def first_stage_settings(technique: str, checkpoint: Path):
    """What a technique needs beyond its defaults to be the first stage (its input model, a teacher, a recipe)."""
    needs = {"distill": [f"technique.teacher.path={checkpoint}"],
             "bridge_recipe": ["technique.recipe=llama.llama32_1b_sft_config"]}
    return [f"model.path={checkpoint}", f"technique={technique}", *needs.get(technique, [])]


class Composer:
    """Composes a point: Hydra once per (technique, backend), then each flat group's node set to its option file
    merged onto the typed schema, as Hydra merges it (composing each point afresh would take hours).

    The config returned is reused for the next point: copy it to keep it.
    """

    def __init__(self, checkpoints):
        self.checkpoints, self.bases = checkpoints, {}
        base = compose_config([])
        self.nodes = {group: {name: self._option(base[group], group, name) for name in AXES[group]}
                      for group in FLAT_GROUPS}
        for name, node in self.nodes["model"].items():
            node.path = str(checkpoints[name])

    @staticmethod
    def _option(typed, group, name):
        schema = OmegaConf.structured(OmegaConf.get_type(typed))
        option = yaml.safe_load((REPO / "llmexp" / "conf" / group / f"{name}.yaml").read_text())
        return OmegaConf.merge(schema, {key: value for key, value in option.items() if key != "defaults"})

    def __call__(self, point):
        key = (point["technique"], point["backend"])
        if key not in self.bases:
            self.bases[key] = compose_config([f"backend={point['backend']}",
                                              *first_stage_settings(point["technique"], Path("/unset"))])
        cfg = self.bases[key]
        for group in FLAT_GROUPS:
            cfg[group] = self.nodes[group][point[group]]
        cfg.precision = point["precision"]
        if point["technique"] == "distill":
            cfg.technique.teacher.path = cfg.model.path
        return cfg


@pytest.fixture(scope="module")
def composer(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    presets = {name: yaml.safe_load((REPO / "llmexp/conf/model" / f"{name}.yaml").read_text()) for name in AXES["model"]}
    return Composer({name: config_only_checkpoint(root / name, preset) for name, preset in presets.items()})


def test_the_sample_holds_every_pair_of_option_values():
    points = sample_points()
    for first, second in itertools.combinations(AXES, 2):
        seen = {(point[first], point[second]) for point in points}
        assert len(seen) == len(AXES[first]) * len(AXES[second]), (first, second)


def test_the_composer_composes_as_hydra_does(composer):
    point = dict(model="llama3_1_70b", hardware="h100", parallelism="tp4_pp4_dp4", precision="bf16",
                 technique="distill", backend="megatron")
    checkpoint = composer.checkpoints[point["model"]]
    fresh = compose_config([*(f"{axis}={point[axis]}" for axis in ("model", "hardware", "parallelism", "precision",
                                                                    "backend")),
                            *first_stage_settings(point["technique"], checkpoint)])
    assert OmegaConf.to_container(composer(point)) == OmegaConf.to_container(fresh)
    assert composer(dict(point, model="tiny_llama")).model.num_layers == 8


def test_every_point_that_plans_clean_starts_its_first_stage(composer):
    from llmexp.training.megatron.arguments import translate
    from llmexp.training.loop import make_trainer, training_strategy

    clean = started = 0
    for point in sample_points():
        cfg = composer(point)
        plan = make_plan(cfg)  # never raises: every problem is a message
        if plan.problems:
            continue
        clean += 1
        key, node = stage_nodes(cfg)[0]
        if not issubclass(plugin_manager.technique(node.name), TrainingTechnique):
            continue
        twin = cfg.copy()
        twin.hardware.accelerator = "cpu"  # this machine's: the Trainer then builds here
        single = cfg.parallelism.tp * cfg.parallelism.pp * cfg.parallelism.dp == 1
        if cfg.backend.name == "torch" and single and make_plan(twin).problems:
            continue  # what a CPU does not train (fp16): not startable here
        started += 1
        try:
            if cfg.backend.name == "megatron":
                translate(cfg, node, transformer_engine=True)  # the GPUs it plans for have Transformer Engine
            elif single:
                make_trainer(twin, node)
            else:
                training_strategy(cfg.parallelism, cfg.hardware.accelerator)
        except UserError as error:
            pytest.fail(f"{point} plans clean but its first stage ({key}) refuses it: {error}")
    assert clean > 100 and started > 50, (clean, started)


BUDGET = {  # the cheapest start of each kind of stage: one step, one item, two calibration sequences
    "max_steps": 1, "checkpoint_every": 0, "limit": 1, "max_new_tokens": 4, "calibration_size": 2,
    "request_count": 1, "warmup_requests": 0, "coherence_prompts": 0, "concurrency": [1], "input_tokens": [8],
    "output_tokens": [4],
}


@pytest.mark.slow
def test_tiny_points_that_plan_clean_start_for_real(tmp_path, tiny_checkpoint):
    from llmexp.running.runner import run_experiment

    hardware = AXES["hardware"]
    started, not_here = [], []
    for index, (technique, precision) in enumerate(itertools.product(AXES["technique"], AXES["precision"])):
        for name in hardware[index % len(hardware):] + hardware[:index % len(hardware)]:
            point = ["model=tiny_llama", f"hardware={name}", "parallelism=single", f"precision={precision}",
                     "pipeline=technique_only", *first_stage_settings(technique, tiny_checkpoint)]
            if not make_plan(compose_config(point)).problems:
                break
        else:
            continue  # refused on every hardware preset: nothing to start
        schema = plugin_manager.technique(technique).schema
        budget = [f"technique.{k}={v}".replace(" ", "") for k, v in BUDGET.items() if k in schema.__dataclass_fields__]
        twin = compose_config([*point, "hardware.accelerator=cpu", *budget])
        node = twin.technique
        if make_plan(twin).problems or plugin_manager.technique(technique).machine_problems(twin, node, "technique"):
            not_here.append(point)
            continue
        try:
            run_experiment(twin, tmp_path / f"{technique}-{precision}", multirun=False)
        except UserError as error:
            pytest.fail(f"{point} plans clean but its first stage refuses it: {error}")
        started.append(point)
    assert len(started) >= 30, (started, not_here)
