"""Progress off a terminal: plain, periodic lines while a run goes; live bars on a terminal."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
from rich.console import Console

from llmexp.errors import UserError
from llmexp.display.progress import INTERVAL_ENV, Progress, interval_s

from .conftest import run_llmexp

STEP_LINE = re.compile(
    r"^pretrain: step (?P<step>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) loss (?P<loss>\S+) (?P<rate>[\d.]+[kM]?) tok/s "
    r"elapsed (?P<elapsed>\d+:\d\d)( eta (?P<eta>\d+:\d\d))?$"
)


@pytest.mark.slow
def test_a_run_writing_to_a_file_prints_step_lines_while_it_trains(tmp_path):
    steps = 40
    env = {**os.environ, INTERVAL_ENV: "0.5", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [f"technique.max_steps={steps}", "evaluation.tasks=[perplexity]", "evaluation.limit=8", "hydra.run.dir=run"]
    seen_while_running = []
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "llmexp", *args], cwd=tmp_path, env=env, stdout=out,
                                   stderr=err)
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            lines = (tmp_path / "err.txt").read_text().splitlines()
            seen_while_running = [m for m in map(STEP_LINE.match, lines) if m]
            time.sleep(0.2)
        assert process.wait(timeout=5) == 0, (tmp_path / "err.txt").read_text()[-3000:]

    # lines came while the run went on, not all at its end
    early = sorted({int(m["step"]) for m in seen_while_running})
    assert len(early) >= 2 and early[0] < steps, early
    log = (tmp_path / "err.txt").read_text()
    lines = [STEP_LINE.match(line) for line in log.splitlines() if line.startswith("pretrain: ")]
    assert lines and all(lines), log
    numbers = [int(m["step"]) for m in lines]
    assert numbers[0] == 1 and numbers[-1] == steps and numbers == sorted(set(numbers))
    assert all(int(m["total"]) == steps and int(m["pct"]) == 100 * int(m["step"]) // steps for m in lines)
    losses = [float(m["loss"]) for m in lines]
    assert all(math.isfinite(loss) and 0 < loss < 20 for loss in losses)
    assert lines[-1]["eta"] is None and lines[len(lines) // 2]["eta"] is not None
    # the last line's loss is the step's loss train_log.jsonl records
    logged = {row["step"]: row for row in map(json.loads, (tmp_path / "run/pretrain/train_log.jsonl").open())}
    assert losses[-1] == pytest.approx(logged[steps]["loss"], rel=1e-3)
    # evaluation reports the same way; no live bar is drawn into the file; stdout keeps the results only
    assert re.search(r"^evaluate perplexity: 8/8 \(100%\) elapsed \d+:\d\d$", log, re.M), log
    assert "━" not in log and "\r" not in log
    stdout = (tmp_path / "out.txt").read_text()
    assert "tok/s" not in stdout and "run directory:" in stdout


def _lines(updates, interval: str, total=10, monkeypatch=None, **task):
    monkeypatch.setenv(INTERVAL_ENV, interval)
    stream = io.StringIO()
    with Progress("evaluate", unit="batch", stream_console=Console(file=stream, force_terminal=False)) as bars:
        task_id = bars.add_task("perplexity", total=total, **task)
        for done in updates:
            bars.update(task_id, completed=done)
    return stream.getvalue().splitlines()


def test_off_a_terminal_a_task_prints_its_first_and_last_update_within_one_interval(monkeypatch):
    lines = _lines(range(1, 11), "1000", monkeypatch=monkeypatch)
    assert [line.split(" elapsed")[0] for line in lines] == [
        "evaluate perplexity: batch 1/10 (10%)",
        "evaluate perplexity: batch 10/10 (100%)",
    ]


def test_a_run_of_short_tasks_prints_the_first_update_and_each_tasks_end(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1000")
    stream = io.StringIO()
    with Progress("baseline_eval", stream_console=Console(file=stream, force_terminal=False)) as bars:
        for name in ("multiple_choice", "perplexity"):
            task_id = bars.add_task(name, total=4)
            for done in range(1, 5):
                bars.update(task_id, completed=done)
    assert [line.split(" elapsed")[0] for line in stream.getvalue().splitlines()] == [
        "baseline_eval multiple_choice: 1/4 (25%)",
        "baseline_eval multiple_choice: 4/4 (100%)",
        "baseline_eval perplexity: 4/4 (100%)",
    ]


def test_interval_zero_prints_every_update(monkeypatch):
    lines = _lines(range(1, 11), "0", monkeypatch=monkeypatch)
    assert [int(re.search(r"batch (\d+)/10", line)[1]) for line in lines] == list(range(1, 11))


def test_a_task_left_unfinished_gets_a_line_for_its_last_progress(monkeypatch):
    lines = _lines([1, 2, 7], "1000", monkeypatch=monkeypatch)
    assert [re.search(r"batch (\d+)/10 \((\d+)%\)", line).groups() for line in lines] == [("1", "10"), ("7", "70")]


def test_a_lines_detail_is_read_only_when_a_line_is_printed(monkeypatch):
    reads = []

    def detail() -> str:
        reads.append(1)
        return f"loss {len(reads)}.5"

    lines = _lines(range(1, 11), "1000", monkeypatch=monkeypatch, detail=detail)
    assert len(reads) == 2
    assert [line.split(" elapsed")[0] for line in lines] == [
        "evaluate perplexity: batch 1/10 (10%) loss 1.5",
        "evaluate perplexity: batch 10/10 (100%) loss 2.5",
    ]


def test_descriptions_are_printed_literally(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    stream = io.StringIO()
    with Progress("bench", stream_console=Console(file=stream, force_terminal=False)) as bars:
        bars.update(bars.add_task("[red]c1 in{x}[/]", total=2), completed=2)
    assert stream.getvalue().startswith("bench [red]c1 in{x}[/]: 2/2 (100%) elapsed 0:00")


def test_on_a_terminal_the_live_bar_stays_and_no_line_is_printed(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    stream = io.StringIO()
    with Progress("evaluate", stream_console=Console(file=stream, force_terminal=True, width=100)) as bars:
        task_id = bars.add_task("perplexity", total=10)
        for done in range(1, 11):
            bars.update(task_id, completed=done)
    shown = stream.getvalue()
    assert "10/10" in shown and "━" in shown and "(100%)" not in shown


def test_a_terminal_that_cannot_redraw_gets_lines(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    monkeypatch.setenv("TERM", "dumb")
    stream = io.StringIO()
    with Progress("evaluate", stream_console=Console(file=stream, force_terminal=True)) as bars:
        bars.update(bars.add_task("perplexity", total=2), completed=2)
    assert stream.getvalue().startswith("evaluate perplexity: 2/2 (100%) elapsed 0:00")


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_an_interval_that_is_not_a_number_of_seconds_is_refused(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(UserError, match=rf"{INTERVAL_ENV}='{value}' is not a number of seconds"):
        interval_s()


def test_the_interval_defaults_to_thirty_seconds(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_s() == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "12.5")
    assert interval_s() == 12.5


def test_a_bad_interval_stops_the_run_before_anything_is_written(tmp_path):
    result = run_llmexp("technique.max_steps=2", cwd=tmp_path, env={INTERVAL_ENV: "soon"}, timeout=120)
    assert result.returncode == 2
    assert f"{INTERVAL_ENV}='soon' is not a number of seconds" in result.stderr
    assert "Set it to a number such as 10" in result.stderr
    assert list(tmp_path.iterdir()) == []
