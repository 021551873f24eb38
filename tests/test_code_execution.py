"""The ``code`` task type: pass@k, the HumanEval layout, and the sandbox that runs completions."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import pytest

from llmexp.errors import UserError
from llmexp.plugins.evaluate.code_execution import TASK_TYPES, load_problems, pass_at_k, program
from llmexp.plugins.evaluate.sandbox import Limits, run_program, run_programs

FIXTURE = Path(__file__).parent / "fixtures" / "humaneval_mini.jsonl"
QUICK = Limits(timeout_s=5.0)


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(0.9166666666666666)
    assert pass_at_k(10, 3, 10) == 1.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0
    for n, c, k in ((200, 13, 1), (200, 13, 10), (200, 13, 100), (50, 49, 2)):
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_problems(str(FIXTURE))
    assert [p.entry_point for p in problems] == ["add_one", "is_palindrome", "sum_of_squares"]
    canonical = [json.loads(line)["canonical_solution"] for line in FIXTURE.read_text().splitlines()]
    wrong = ["    return x + 2\n", "    return True\n", "    return sum(numbers)\n"]
    sources = [program(p, c) for p, c in zip(problems, canonical)] + [program(p, w) for p, w in zip(problems, wrong)]
    outcomes = run_programs(sources, QUICK, workers=2)
    assert [o.status for o in outcomes] == ["passed"] * 3 + ["failed"] * 3
    assert "AssertionError" in outcomes[3].detail


def test_an_endless_loop_times_out_within_the_limit_and_the_next_sample_still_runs():
    started = time.monotonic()
    outcomes = run_programs(["while True:\n    pass\n", "assert 1 + 1 == 2\n"], Limits(timeout_s=1.0), workers=1)
    assert [o.status for o in outcomes] == ["timed_out", "passed"]
    assert 1.0 <= outcomes[0].seconds < 2.0
    assert time.monotonic() - started < 4.0


def test_writing_outside_the_scratch_directory_fails_the_sample_and_writes_nothing(tmp_path):
    outside = tmp_path / "outside.txt"
    attempts = [
        f"open({str(outside)!r}, 'w').write('escaped')\n",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('escaped')\n",
        f"import os\nos.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nos.symlink('/etc/hostname', 'link')\nos.rename('link', {str(outside)!r})\n",
    ]
    outcomes = run_programs(attempts, QUICK, workers=2)
    assert [o.status for o in outcomes] == ["failed"] * len(attempts)
    assert all("outside the scratch directory" in o.detail for o in outcomes)
    assert not outside.exists()
    # inside its own directory a program may write, read and delete files
    inside = "open('notes.txt', 'w').write('x')\nimport os, shutil\nos.makedirs('a/b')\nshutil.rmtree('a')\n"
    inside += "import tempfile\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
    inside += "assert open('notes.txt').read() == 'x'\n"
    assert run_program(inside, QUICK).status == "passed"


def test_an_exit_before_the_checks_does_not_count_as_a_pass():
    problem = load_problems(str(FIXTURE))[0]
    for early_exit in ("    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(0)\n"):
        # the function body exits when check() first calls it: before any assertion runs
        outcome = run_program(program(problem, early_exit), QUICK)
        assert outcome.status == "exited_early" and not outcome.passed
    module_level_exit = "    return x + 1\nimport os\nos._exit(0)\n"
    assert run_program(program(problem, module_level_exit), QUICK).status == "exited_early"


def test_a_socket_connection_to_localhost_is_refused():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
        ]
        outcomes = run_programs(attempts, QUICK, workers=2)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody got through
    assert [o.status for o in outcomes] == ["failed"] * len(attempts)


def test_crashes_forks_floods_and_signals_fail_only_their_own_sample(tmp_path):
    flood_done = tmp_path / "flood"  # written by no one: the flood must not get that far
    cases = {
        "import ctypes\nctypes.string_at(0)\n": "crashed",  # a segfault
        "import os\nos.fork()\n": "failed",
        "import subprocess\nsubprocess.run(['true'])\n": "failed",
        "import os\nos.system('true')\n": "failed",
        "import os\nos.kill(os.getppid(), 9)\n": "failed",
        "while True:\n    print('x' * 10000)\n": "failed",  # output capped by the file-size limit
        "x = bytearray(8 * 2**30)\n": "failed",  # MemoryError under the address-space limit
        "raise SystemExit(3)\n": "failed",
        "import sys\nsys.stdout.close()\n": "passed",  # the marker has its own descriptor
    }
    outcomes = run_programs(list(cases), QUICK, scratch_root=tmp_path / "scratch", workers=2)
    assert [o.status for o in outcomes] == list(cases.values())
    assert "SIGSEGV" in outcomes[0].detail
    assert "File too large" in outcomes[5].detail
    assert not flood_done.exists()
    assert list((tmp_path / "scratch").iterdir()) == []  # every scratch directory removed


def test_a_sample_cannot_see_the_parents_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-children")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    source = "import os\nassert 'OPENAI_API_KEY' not in os.environ and 'HTTPS_PROXY' not in os.environ\n"
    assert run_program(source, QUICK).status == "passed"


def test_problems_name_the_file_line_and_bad_settings(tmp_path):
    check = TASK_TYPES["code"].problems
    assert check({"type": "code", "path": str(FIXTURE), "n_samples": 10, "k": [1, 10]}, "technique.tasks[0]") == []
    found = check({"type": "code", "path": str(FIXTURE), "n_samples": 2, "k": [1, 5], "top_p": 0}, "technique.tasks[0]")
    assert len(found) == 2
    assert "technique.tasks[0].k=[1, 5]" in found[0] and "n_samples" in found[0]
    assert "technique.tasks[0].top_p=0" in found[1]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + '{"task_id": "x", "prompt": "def f():\\n"}\n')
    (message,) = check({"type": "code", "path": str(broken)}, "t")
    assert f"{broken}:2" in message and "test, entry_point" in message
    (message,) = check({"type": "code", "path": str(tmp_path / "absent.jsonl")}, "t")
    assert "does not exist" in message
    with pytest.raises(UserError, match=r"broken.jsonl:2"):
        load_problems(str(broken))


def problems_the_words_cannot_change(tmp_path: Path) -> str:
    """Two problems whose prompts hold a whole function and end inside a comment that the completion continues.

    Random weights write random words (never a newline: the embedded tokenizer has none),
    and in a comment they cannot matter: the first function is right, the second wrong, so
    every sample of the first passes and none of the second, whatever the model writes.
    """
    path = tmp_path / "problems.jsonl"
    test = "\n\ndef check(candidate):\n    assert candidate(2) == 4\n"
    rows = [
        {"task_id": "right", "prompt": "def double(x):\n    return 2 * x\n# ", "test": test, "entry_point": "double"},
        {"task_id": "wrong", "prompt": "def double(x):\n    return x + 3\n# ", "test": test, "entry_point": "double"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_scorer(tiny_checkpoint):
    from llmexp.models import load_model
    from llmexp.plugins.evaluate.scoring import Scorer

    model, tokenizer = load_model(tiny_checkpoint)[:2]
    return Scorer(model, tokenizer, max_new_tokens=40)


def test_the_code_task_runs_the_models_completions_through_the_registry(tiny_scorer, tmp_path):
    from llmexp.data.embedded import build_world
    from llmexp.plugins.evaluate.registry import resolve_tasks, run_task
    from llmexp.plugins.evaluate.tasks import TaskInputs

    path = problems_the_words_cannot_change(tmp_path)
    entry = {"type": "code", "name": "mini_code", "path": path, "max_new_tokens": 8}
    (task,), problems = resolve_tasks([entry], None, "technique.tasks")
    assert problems == [] and task.headline == "mini_code_pass_at_1"
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    result = run_task(task, TaskInputs(world=build_world(0), stage_dir=str(stage_dir)), tiny_scorer)
    assert result.metrics == {"mini_code_pass_at_1": 0.5, "mini_code_samples_timed_out": 0.0}
    assert [row["correct"] for row in result.rows] == [True, False]
    assert [row["outcomes"][0]["status"] for row in result.rows] == ["passed", "failed"]
    assert all(isinstance(row["completions"][0], str) and "\n" not in row["completions"][0] for row in result.rows)
    assert list(stage_dir.iterdir()) == []  # scratch directories cleaned up


def test_sampled_completions_are_seeded_and_scored_per_problem(tiny_scorer, tmp_path):
    from llmexp.data.embedded import build_world
    from llmexp.plugins.evaluate.tasks import TaskInputs

    spec = {"type": "code", "path": problems_the_words_cannot_change(tmp_path), "n_samples": 4, "k": [1, 2, 4],
            "temperature": 1.0, "seed": 3, "max_new_tokens": 8}
    assert TASK_TYPES["code"].problems(spec, "t") == []
    inputs = TaskInputs(world=build_world(0))
    result = TASK_TYPES["code"].run(spec, inputs, tiny_scorer)
    assert result.metrics == {"pass_at_1": 0.5, "pass_at_2": 0.5, "pass_at_4": 0.5, "samples_timed_out": 0.0}
    assert [row["passed"] for row in result.rows] == [4, 0]
    assert [row["pass_at_2"] for row in result.rows] == [1.0, 0.0]
    samples = result.rows[0]["completions"]
    assert len(samples) == 4 and len(set(samples)) > 1  # sampled, not four greedy copies
    again = TASK_TYPES["code"].run(spec, inputs, tiny_scorer)
    assert [row["completions"] for row in again.rows] == [row["completions"] for row in result.rows]
