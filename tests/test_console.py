"""What a person sees is what was given: user text through the console and its tables is never rich markup."""

from __future__ import annotations

import json

import pytest

from llmexp import console

from .conftest import run_llmexp

# Brackets a path or list override carries, rich tags open and closing, an emoji code, quotes, '=', spaces, non-ASCII.
USER_TEXT = [
    "model.path=/data/run[3]", "evaluation.tasks=[perplexity]", "[bold]not bold[/bold]", "[/]", "[red]",
    ":smile:", "tracker.project='a \"quoted\" x=y'", "naïve café 日本", "[link=https://x]y[/link]",
]


@pytest.mark.parametrize("text", USER_TEXT)
def test_warnings_errors_and_banners_print_user_text_literally(capsys, text):
    console.warn(f"w {text}")
    console.error(f"e {text}")
    console.stage_banner(f"s {text}")
    err = capsys.readouterr().err
    assert f"w {text}" in err and f"error: e {text}" in err and f"s {text}" in err


def test_a_results_table_and_a_jobs_table_show_their_cells_literally(capsys, tmp_path):
    from llmexp.launchers.sweep_jobs import SweepJob, finish

    record = {
        "stages": {"[bold]stage[/]": {"metrics": {"tasks=[perplexity]": 1.0, ":smile:": 2.0}}},
        "model_stats": {}, "wall_time_s": 1.0, "run_dir": str(tmp_path / "run[3]"),
    }
    console.print_results(record)
    jobs = [SweepJob(0, USER_TEXT[:3], str(tmp_path / "0"), status="completed"),
            SweepJob(1, USER_TEXT[3:], str(tmp_path / "1"), status="failed", reason="ValueError: [/] at [3]")]
    assert finish(tmp_path, jobs) == 1
    out = capsys.readouterr().out
    for text in ["[bold]stage[/]", "tasks=[perplexity]", ":smile:", str(tmp_path / "run[3]"), "ValueError: [/] at [3]"]:
        assert text in out, text
    flat = " ".join(out.split())  # the overrides column folds long cells
    for text in USER_TEXT:
        assert all(word in flat for word in text.split()), text
    assert [job["overrides"] for job in json.loads((tmp_path / "jobs.json").read_text())] == [USER_TEXT[:3], USER_TEXT[3:]]


def test_a_bad_override_with_brackets_is_quoted_back_literally(tmp_path):
    done = run_llmexp("model.path='/no/such/run[3] [bold]x[/bold]'", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "/no/such/run[3] [bold]x[/bold]" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())
