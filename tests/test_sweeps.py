"""The ready-made sweeps in sweeps/: each says how to run it, and every point composes and plans."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from llmexp.configuration.compose import compose_config, sweep_points
from llmexp.errors import UserError
from llmexp.planning.planner import make_plan

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
NAMES = sorted(path.stem for path in SWEEPS.glob("*.yaml"))


def test_the_four_sweeps_ship():
    assert NAMES == ["gpu_throughput", "lora_rank_lr", "prune_distill", "quantize_format_gpu"]


@pytest.mark.parametrize("name", NAMES)
def test_each_sweep_names_its_command_and_every_point_composes(name):
    text = (SWEEPS / f"{name}.yaml").read_text()
    assert text.startswith("# ")
    assert f"llmexp -m --config-dir sweeps --config-name {name}" in text
    axes = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    points = sweep_points([], name, str(SWEEPS))
    assert len(points) == math.prod(len(str(values).split(",")) for values in axes.values())
    for point in points:
        cfg = compose_config(point, name, str(SWEEPS))
        for override in point:
            key, value = override.split("=", 1)
            chosen = cfg[key].name if key in ("hardware", "model") else OmegaConf.select(cfg, key)
            assert str(chosen) == value or float(chosen) == float(value), override


def test_a_command_line_axis_replaces_the_files_and_fixed_overrides_apply_to_every_point():
    points = sweep_points(["technique.rank=8", "technique.max_steps=5"], "lora_rank_lr", str(SWEEPS))
    assert len(points) == 3  # rank fixed to 8, three learning rates
    assert all("technique.rank=8" in point and "technique.max_steps=5" in point for point in points)


def test_the_quantization_sweep_skips_exactly_what_each_generation_cannot_run(tiny_checkpoint):
    refused = set()
    for point in sweep_points([f"model.path={tiny_checkpoint}"], "quantize_format_gpu", str(SWEEPS)):
        cfg = compose_config(point, "quantize_format_gpu", str(SWEEPS))
        if make_plan(cfg).problems:
            refused.add((cfg.technique.format, cfg.hardware.name))
    assert refused == {("fp8", "a100_80g"), ("nvfp4", "a100_80g"), ("nvfp4", "h100")}


def test_a_misspelled_key_in_a_sweep_run_is_a_one_paragraph_error():
    with pytest.raises(UserError, match="technique.rankk"):
        for point in sweep_points(["technique.rankk=3"], "lora_rank_lr", str(SWEEPS)):
            compose_config(point, "lora_rank_lr", str(SWEEPS))
