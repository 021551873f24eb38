"""``llmexp --help`` fits on a screen: the groups and their options, the subcommands, examples; the full config is ``--cfg job``."""

from __future__ import annotations

from llmexp.techniques.plugin_manager import techniques

from .conftest import REPO, run_llmexp

GROUPS = ["backend", "cluster", "data", "hardware", "model", "parallelism", "pipeline", "rails", "retriever", "tracker"]


def test_help_is_short_and_names_every_group_option_subcommand_and_the_full_config(tmp_path):
    result = run_llmexp("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 60
    listed = {line.split(":")[0]: line.split(": ", 1)[1].split(", ") for line in lines if ": " in line
              and line.split(":")[0] in [*GROUPS, "technique"]}
    for group in GROUPS:
        assert listed[group] == sorted(path.stem for path in (REPO / "llmexp" / "conf" / group).glob("*.yaml")), group
    assert listed["technique"] == sorted(techniques())
    for subcommand in ("llmexp plan", "llmexp plugins", "llmexp gather", "llmexp cancel", "llmexp report", "llmexp serve"):
        assert subcommand in result.stdout
    assert "llmexp --cfg job [overrides]" in result.stdout and "--cfg job --package technique" in result.stdout
    assert "llmexp --hydra-help" in result.stdout and "Examples:" in result.stdout
    assert "hidden_size" not in result.stdout  # no field of the composed config: that is what --cfg job is for
    assert not list(tmp_path.iterdir())


def test_cfg_job_prints_the_whole_config_the_help_leaves_out(tmp_path):
    result = run_llmexp("--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for field in ("hidden_size: 128", "name: compress", "width_distill:", "tracker:", "seed: 0"):
        assert field in result.stdout, field
    assert len(result.stdout.splitlines()) > 200
    part = run_llmexp("--cfg", "job", "--package", "technique", "technique=lora", cwd=tmp_path)
    assert part.returncode == 0, part.stderr
    assert part.stdout.splitlines()[:2] == ["# @package technique", "name: lora"] and "rank: 16" in part.stdout
