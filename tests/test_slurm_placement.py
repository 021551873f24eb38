"""Where the Slurm launcher sends a job (cluster profiles x hardware x parallelism), without a Slurm."""

from __future__ import annotations

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from llmexp.configuration.compose import compose_config
from llmexp.failure import MAX_REASON, last_error_line, reason_of
from llmexp.launchers.placement import SlurmResources, slurm_resources
from llmexp.launchers.slurm_queue import SlurmJobState, _expand
from llmexp.launchers.sweep_jobs import SweepJob, exit_code


def resources(*overrides: str):
    return slurm_resources(compose_config(list(overrides)))


def test_each_generation_goes_to_its_partition_feature_and_gpu_type():
    a100, h100, b200 = (resources("cluster=example", f"hardware={h}") for h in ("a100_80g", "h100", "b200"))
    assert (a100.partition, a100.constraint, a100.gres) == ("a100", "a100_80g", "gpu:a100:1")
    assert (h100.partition, h100.constraint, h100.gres) == ("hopper", "h100", "gpu:h100:1")
    assert (b200.partition, b200.constraint, b200.gres) == ("blackwell", "b200", "gpu:b200:1")
    assert (h100.cpus_per_task, h100.mem_per_gpu, h100.account, h100.qos) == (12, "200G", "my_project", "normal")
    assert h100.setup == ("module load cuda/12.8",) and h100.timeout_min == 240


def test_parallelism_sets_nodes_tasks_and_gpus_per_node():
    tp8_dp2 = resources("cluster=example", "hardware=h100", "parallelism=tp8_dp2")
    assert (tp8_dp2.nodes, tp8_dp2.tasks_per_node, tp8_dp2.gres) == (2, 8, "gpu:h100:8")
    single = resources("cluster=localhost", "hardware=cpu")
    assert (single.nodes, single.tasks_per_node, single.gres, single.partition) == (1, 1, None, "debug")


def test_unmapped_hardware_and_too_many_ranks_per_node_say_why_and_the_fix():
    unmapped = resources("cluster=localhost", "hardware=b200")
    assert isinstance(unmapped, str)
    assert "hardware=b200 has no placement in cluster=localhost" in unmapped and "cluster.hardware.b200" in unmapped
    crowded = resources("cluster=localhost", "hardware=h100", "parallelism=tp4")
    assert isinstance(crowded, str)
    assert "4 ranks on each node" in crowded and "has 2 GPUs" in crowded


def test_the_sbatch_header_carries_the_placement():
    placed = resources("cluster=example", "hardware=b200", "parallelism=tp8_dp2")
    assert isinstance(placed, SlurmResources)
    header = _make_sbatch_string(command="x", folder="/tmp/never-written/%j", **placed.sbatch_parameters())
    for line in ("--partition=blackwell", "--constraint=b200", "--gres=gpu:b200:8", "--nodes=2",
                 "--ntasks-per-node=8", "--cpus-per-task=14", "--mem-per-gpu=240G", "--account=my_project",
                 "--qos=normal", "--time=240"):
        assert f"#SBATCH {line}" in header, line
    assert "module load cuda/12.8" in header


def test_jobs_with_the_same_resources_group_together():
    one = resources("cluster=example", "hardware=h100", "seed=1")
    two = resources("cluster=example", "hardware=h100", "seed=2")
    other = resources("cluster=example", "hardware=h200")
    assert one == two and hash(one) == hash(two) and one != other


@pytest.mark.parametrize(
    "statuses, code", [(["completed", "skipped"], 0), (["completed", "failed"], 1), (["completed", "running"], 3),
                       (["pending", "failed"], 3), (["skipped", "skipped"], 0)],
)
def test_the_sweep_exit_code(statuses, code):
    """0: all completed or skipped; 1: some failed; 3: some have not ended, whatever the others did."""
    assert exit_code([SweepJob(i, [], "", status=s) for i, s in enumerate(statuses)]) == code


def test_a_failure_is_its_last_error_line_not_the_traceback():
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    raise ValueError("boom")\n'
        "           ^^^^^^^^^^^^^^^^^\nValueError: boom 7\nits second line\n"
    )
    assert last_error_line(traceback) == "ValueError: boom 7"
    chained = traceback + "\nDuring handling of the above exception, another exception occurred:\n\n" + traceback.replace(
        "ValueError: boom 7", "KeyError: 'k'")
    assert last_error_line(chained) == "KeyError: 'k'"


def test_a_reason_is_one_line_of_at_most_200_characters():
    long = reason_of(RuntimeError("x" * 500 + "\nsecond line"))
    assert long.startswith("RuntimeError: xxx") and len(long) == MAX_REASON and "\n" not in long and long.endswith("…")

    class RankFailed(RuntimeError):
        pass

    rank = reason_of(RankFailed("rank 1 of parallelism=dp2 failed:\nTraceback (most recent call last):\n"
                                '  File "a.py", line 3, in f\nZeroDivisionError: division by zero\n'))
    assert rank == "RankFailed: rank 1 of parallelism=dp2 failed: ZeroDivisionError: division by zero"


def test_array_tasks_sacct_groups_are_expanded_and_a_job_ends_only_when_squeue_drops_it():
    assert _expand("12_[3-5,7%2]") == ["12_3", "12_4", "12_5", "12_7"]
    assert _expand("12_4") == ["12_4"] and _expand("15") == ["15"]
    assert not SlurmJobState(True, "COMPLETING", node="node1").ended  # still listed
    assert not SlurmJobState(False, "RUNNING").ended  # accounting lags behind the controller
    assert SlurmJobState(False, "CANCELLED by 0", "0:15").ended
    assert not SlurmJobState(False).ended  # not in accounting yet
    assert SlurmJobState(False, record_expected=False).ended  # no accounting: gone from the queue is all there is
    assert SlurmJobState(False, "OUT_OF_MEMORY", "0:125").describe() == "Slurm: OUT_OF_MEMORY (exit code 0:125)"


def test_the_slurm_launcher_without_a_cluster_profile_is_refused_before_anything_is_written(tmp_path):
    from tests.conftest import run_llmexp

    done = run_llmexp("-m", "hydra/launcher=slurm", "hardware=h100", "seed=0,1", cwd=tmp_path)
    assert done.returncode == 2
    assert "needs a cluster profile" in done.stderr and "cluster=<name>" in done.stderr
    assert list(tmp_path.iterdir()) == []
