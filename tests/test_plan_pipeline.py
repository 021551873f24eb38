"""The plan of a pipeline-parallel job: each stage's layers, ranks and memory, the bubble, and the memory measured.

The memory check trains the tiny default with ``parallelism=pp2`` (2 gloo processes) under each schedule and
compares each stage's estimate with the peak its rank measures, as tests/test_memory_estimate.py does for one
process: the peak RSS above the RSS before training against the estimate without the weights, within the same
[0.75, 1.6]x. Every sequence is exactly ``data.seq_len`` tokens (pretraining packs the corpus into blocks of it),
so the run holds what the planner counts.

The runs fix glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``): every block of 64 KiB or more is then a
mapping of its own, returned when freed, so the RSS follows the live tensors. With glibc's default, a threshold that
rises to the size of the blocks freed, 1F1B's interleaved forwards and backwards leave freed blocks in the heap, and
the last stage's peak grows with the micro-batches it never holds at once: 158 MB at 4 micro-batches and 214 MB at
8, against an estimate of 64 MB (GPipe, whose peak comes before any backward, measured 1.17x and 1.19x). With
the fixed threshold: 1F1B 1.10x and 1.30x, GPipe 1.00x and 1.01x (first and last stage).
"""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import yaml

from llmexp.architecture import architecture, count_parameters
from llmexp.cli import plan as plan_command
from llmexp.configuration.compose import compose_config
from llmexp.planning.layout import Layout, stage_layers, stage_parameters, stage_ranks

from .conftest import read_results, run_llmexp

PRESETS = files("llmexp.conf").joinpath("parallelism")
PIPELINE_PRESETS = sorted(entry.name[:-5] for entry in PRESETS.iterdir()
                          if entry.name.endswith(".yaml") and yaml.safe_load(entry.read_text())["pp"] > 1)
# a model whose heads and layers every preset divides (64 heads, 8 kv heads, 80 layers)
BIG = ["model=llama3_1_70b", "hardware=h100", "precision=bf16", "technique=sft", "pipeline=technique_only"]
TINY = architecture(compose_config([]).model)


def plan_json(capsys, *overrides) -> dict:
    plan_command.main(["--json", *overrides])
    return json.loads(capsys.readouterr().out)


def test_stages_take_equal_contiguous_blocks_of_layers():
    assert stage_layers(80, 4) == [range(0, 20), range(20, 40), range(40, 60), range(60, 80)]
    assert stage_layers(8, 1) == [range(8)]
    with pytest.raises(ValueError, match="num_layers=8 does not split into pp=3"):
        stage_layers(8, 3)
    # Megatron's order: tp innermost, pp outermost; the torch backend's: one whole pipeline per replica
    assert [stage_ranks(2, 2, 2, stage, stages_outermost=True) for stage in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [stage_ranks(1, 2, 2, stage, stages_outermost=False) for stage in range(2)] == [[0, 2], [1, 3]]


def test_stage_parameters_add_up_to_the_model():
    untied = architecture(compose_config(["model=llama3_1_70b"]).model)
    held = [stage_parameters(untied, 4, stage) for stage in range(4)]
    assert sum(held) == count_parameters(untied)
    embeddings = untied["vocab_size"] * untied["hidden_size"]
    assert held[0] - held[1] == embeddings and held[3] - held[1] == embeddings + untied["hidden_size"]
    # tied embeddings: the first and the last stage each hold the one matrix
    tied = [stage_parameters(TINY, 2, stage) for stage in range(2)]
    assert sum(tied) == count_parameters(TINY) + TINY["vocab_size"] * TINY["hidden_size"]
    assert stage_parameters(TINY, 1, 0) == count_parameters(TINY)


def test_the_schedule_decides_how_many_micro_batches_a_stage_keeps():
    layout = Layout(tp=1, pp=2, dp=1, nodes=1, devices_per_node=2, micro_batch=4, global_batch=32, seq_len=64)
    assert layout.micro_batches == 8 and layout.bubble_fraction == pytest.approx(1 / 9)
    one_f_one_b = [layout.for_stage(TINY, stage).activations(TINY, "fp32") for stage in range(2)]
    gpipe = [Layout(**{**layout.__dict__, "schedule": "gpipe"}).for_stage(TINY, stage).activations(TINY, "fp32")
             for stage in range(2)]
    # 1F1B: the first stage keeps pp=2 micro-batches, the last one (plus the logits); GPipe: all 8 on each
    assert one_f_one_b[0] > one_f_one_b[1]
    assert gpipe[0] == pytest.approx(4 * one_f_one_b[0])
    assert gpipe[1] == pytest.approx(8 * one_f_one_b[1])
    # unsized, a layout gives the busiest stage's activations
    assert layout.activations(TINY, "fp32") == pytest.approx(max(one_f_one_b))
    # without a pipeline the split changes nothing: one micro-batch of everything
    single = Layout(tp=1, pp=1, dp=1, nodes=1, devices_per_node=1, micro_batch=4, global_batch=32, seq_len=64)
    assert single.for_stage(TINY, 0).activations(TINY, "fp32") == single.activations(TINY, "fp32")


def test_a_stage_holds_its_share_of_the_weights(capsys):
    plan = plan_json(capsys, *BIG, "parallelism=tp4_pp4_dp4")
    model = architecture(compose_config(["model=llama3_1_70b"]).model)
    for stage in plan["pipeline"]["stages"]:
        # bf16 weights of the stage's parameters, split over tp=4
        expected = stage_parameters(model, 4, stage["stage"]) * 2 / 4
        assert stage["memory_breakdown"]["weights"] == pytest.approx(expected, abs=1)
    first, middle, last = (plan["pipeline"]["stages"][index]["memory_breakdown"] for index in (0, 1, 3))
    assert first["activations"] > middle["activations"]  # 1F1B: 4 micro-batches in flight against 3
    assert last["weights"] > middle["weights"] and first["weights"] > middle["weights"]  # LM head, embeddings


@pytest.mark.parametrize("preset", PIPELINE_PRESETS)
def test_every_pipeline_preset_shows_its_stages(capsys, preset):
    p = yaml.safe_load(PRESETS.joinpath(f"{preset}.yaml").read_text())
    plan = plan_json(capsys, *BIG, f"parallelism={preset}")
    pipeline = plan["pipeline"]
    m = p["global_batch"] // (p["micro_batch"] * p["dp"])
    assert pipeline["micro_batches"] == m
    assert pipeline["bubble_fraction"] == pytest.approx((p["pp"] - 1) / (m + p["pp"] - 1))
    stages = pipeline["stages"]
    assert [stage["stage"] for stage in stages] == list(range(p["pp"]))
    assert [layer for stage in stages for layer in range(stage["layers"][0], stage["layers"][1] + 1)] == list(range(80))
    assert sorted(rank for stage in stages for rank in stage["ranks"]) == list(range(p["tp"] * p["pp"] * p["dp"]))
    assert all(len(stage["ranks"]) == p["tp"] * p["dp"] for stage in stages)
    assert plan["memory_per_device_bytes"] == max(stage["memory_per_device_bytes"] for stage in stages)
    assert all(stage["memory_per_device_bytes"] == sum(stage["memory_breakdown"].values()) for stage in stages)


def stage_rows(out: str) -> list:
    """(stage, layers, ranks) of each row of the pipeline table."""
    return [[cell.strip() for cell in line.split("│")[1:4]] for line in out.splitlines() if line.count("│") == 6]


def test_the_table_shows_each_stage_and_the_bubble(capsys):
    plan_command.main([*BIG, "parallelism=tp4_pp4_dp4", "backend=megatron"])
    out = capsys.readouterr().out
    assert ("pipeline: 4 stages, schedule 1f1b, 16 micro-batches per step; bubble (pp-1)/(m+pp-1) = 3/19 = 15.8% "
            "of each step") in out
    assert stage_rows(out) == [["0", "0-19", "0-15"], ["1", "20-39", "16-31"], ["2", "40-59", "32-47"],
                               ["3", "60-79", "48-63"]]
    plan_command.main(["parallelism=pp2_dp2", "parallelism.pipeline_schedule=gpipe"])
    out = capsys.readouterr().out
    assert "pipeline: 2 stages, schedule gpipe, 2 micro-batches per step; bubble (pp-1)/(m+pp-1) = 1/3 = 33.3%" in out
    assert stage_rows(out) == [["0", "0-3", "0, 2"], ["1", "4-7", "1, 3"]]


def test_a_plan_without_a_pipeline_has_none(capsys):
    assert plan_json(capsys, *BIG, "parallelism=tp8")["pipeline"] is None


# pretraining packs the corpus into 48-token blocks; 4 micro-batches of 24 per step, so a stage's activations
# (55 MB a micro-batch) outweigh what the estimate leaves out
PP2_RUN = ["pipeline=technique_only", "technique=pretrain", "data.seq_len=48", "parallelism.micro_batch=24",
           "parallelism.global_batch=96", "technique.max_steps=3", "technique.checkpoint_every=0",
           "technique.save_model=false"]
LIVE_TENSORS = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module's docstring


@pytest.mark.slow
@pytest.mark.skipif(not PRESETS.joinpath("pp2.yaml").is_file(),
                    reason="parallelism=pp2 (pipeline training on the torch backend) is not in this checkout")
def test_each_stage_estimate_matches_its_ranks_measured_peak(tmp_path):
    measured = {}
    for schedule in ("1f1b", "gpipe"):
        run_dir = tmp_path / schedule
        result = run_llmexp(*PP2_RUN, "parallelism=pp2", f"parallelism.pipeline_schedule={schedule}",
                            f"hydra.run.dir={run_dir}", cwd=tmp_path, env=LIVE_TENSORS)
        assert result.returncode == 0, result.stderr[-3000:]
        results = read_results(run_dir)
        metrics = results["stages"]["pretrain"]["metrics"]
        planned = results["plan"]["pipeline"]["stages"]
        assert [{key: stage[key] for key in ("stage", "layers", "ranks")} for stage in planned] == [
            {key: stage[key] for key in ("stage", "layers", "ranks")} for stage in metrics["pipeline_stages"]]
        measured[schedule] = []
        for stage in planned:
            estimate = stage["memory_per_device_bytes"] - stage["memory_breakdown"]["weights"]
            for rank in stage["ranks"]:
                peak = metrics["peak_memory_mb_per_rank"][rank] * 2**20
                assert 0.75 <= peak / estimate <= 1.6, (schedule, stage["stage"], peak / 2**20, estimate / 2**20)
            measured[schedule].append((peak, estimate))
    # what the schedule changes shows in both: GPipe keeps all 4 micro-batches on each stage, 1F1B 2 on the first
    # and 1 on the last
    (first, first_est), (last, last_est) = measured["1f1b"]
    (g_first, g_first_est), (g_last, g_last_est) = measured["gpipe"]
    assert first_est > last_est and first > last
    assert g_first_est > first_est and g_first > first
    assert g_last_est > last_est and g_last > last
