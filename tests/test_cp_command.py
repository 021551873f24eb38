"""``llmexp cp``: a technique's or pipeline's settings as a YAML file that runs, edited, with the schema's checks."""

from __future__ import annotations

import json

import pytest
import yaml

from llmexp.cli import main as cli
from .conftest import read_results, run_llmexp


def llmexp(argv, capsys) -> tuple:
    """``llmexp <argv>`` in this process: its exit code and its stdout and stderr, each on one line."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, " ".join(out.split()), " ".join(err.split())


def test_a_copied_technique_runs_with_the_value_edited_in_its_file(tmp_path):
    copied = run_llmexp("cp", "technique=pretrain", "technique.save_model=false", "configs/short.yaml", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert "llmexp --config-dir configs --config-name short" in copied.stdout
    file = tmp_path / "configs/short.yaml"
    text = file.read_text()
    assert "  save_model: false  # write the HF checkpoint to <stage dir>/model\n" in text
    file.write_text(text.replace("  max_steps: 1000  #", "  max_steps: 3  #"))
    plan = run_llmexp("plan", "--json", "--config-dir", "configs", "--config-name", "short", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["planned"] == "planned: technique=pretrain then evaluate (pipeline=technique_then_evaluation, as named)"

    result = run_llmexp("--config-dir", "configs", "--config-name", "short", "evaluation.limit=4", "hydra.run.dir=run",
                        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.startswith("running: technique=pretrain then evaluate (pipeline=technique_then_evaluation, as named)\n")
    record = read_results(tmp_path / "run")
    assert record["stages"]["pretrain"]["metrics"]["steps"] == 3
    assert record["config"]["technique"]["save_model"] is False
    assert list(record["stages"]) == ["pretrain", "evaluate"]  # the technique, then its evaluation


def test_a_copied_pipeline_composes_back_with_its_edits_and_references(tmp_path, capsys):
    code, out, _ = llmexp(["cp", "pipeline=compress", "pipeline.nodes.distill.max_steps=50", f"{tmp_path}/comp.yaml"],
                          capsys)
    assert code == 0 and f"{tmp_path}/comp.yaml" in out
    file = tmp_path / "comp.yaml"
    text = file.read_text()
    assert "      tasks: ${..baseline_eval.tasks}\n" in text  # the evaluations still follow the baseline's
    edited = (text.replace("tasks: [multiple_choice, word_problems, perplexity, throughput]", "tasks: [perplexity]")
              .replace("      ffn_hidden_size: 256", "      ffn_hidden_size: 128"))
    assert edited.count("[perplexity]") == 1 and "ffn_hidden_size: 128" in edited
    file.write_text(edited)

    shown = run_llmexp("--cfg", "job", "--resolve", "--config-dir", str(tmp_path), "--config-name", "comp",
                       cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    nodes = yaml.safe_load(shown.stdout)["pipeline"]["nodes"]
    assert nodes["distill"]["max_steps"] == 50 and nodes["width_prune"]["ffn_hidden_size"] == 128
    assert nodes["fp8_eval"]["tasks"] == nodes["width_distill_eval"]["tasks"] == ["perplexity"]


@pytest.mark.parametrize("edit, message", [
    (("  rank: 8\n", "  rnak: 8\n"), "In the config my_lora: technique.rnak is not a key of technique=lora; "
                                     "did you mean technique.rank?"),
    (("  rank: 8\n", "  rank: many\n"), "In the config my_lora: technique.rank expects an integer (now 16), got "
                                        "'many'; give a whole number, e.g. technique.rank=16."),
])
def test_a_mistake_in_the_copied_file_is_refused_when_it_composes(edit, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert llmexp(["cp", "technique=lora", "technique.rank=8", "my_lora.yaml"], capsys)[0] == 0
    file = tmp_path / "my_lora.yaml"
    file.write_text(file.read_text().replace(*edit))
    code, _, err = llmexp(["--config-dir", ".", "--config-name", "my_lora"], capsys)
    assert code == 2 and message in err
    assert list(tmp_path.iterdir()) == [file]  # no outputs/ directory


@pytest.mark.parametrize("argv, message", [
    (["model=llama3_1_8b", "x.yaml"], "model=llama3_1_8b: `llmexp cp` copies a technique or a pipeline; give "
     "technique=<name> or pipeline=<name> first"),
    (["technique=lora", "model=llama3_1_8b", "x.yaml"], "model=llama3_1_8b: `llmexp cp technique=lora` writes the "
     "technique node only, so this override would be left out of x.yaml;"),
    (["technique=lorra", "x.yaml"], "technique=lorra: technique has no option lorra; did you mean technique=lora?"),
    (["technique=lora", "technique.rank=many", "x.yaml"], "technique.rank expects an integer (now 16), got 'many'"),
    (["technique=lora", "x.txt"], "x.txt: the copy is a YAML file whose name is its config's name; give one ending "
     "in .yaml, e.g. x.yaml."),
    (["technique=lora", "config.yaml"], "config.yaml: config is the name of llmexp's own config, which the copy "
     "builds on;"),
])
def test_cp_refuses_bad_input_in_one_paragraph_and_writes_nothing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = llmexp(["cp", *argv], capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    assert list(tmp_path.iterdir()) == []


def test_cp_overwrites_a_file_only_with_force(tmp_path, capsys):
    file = tmp_path / "my_lora.yaml"
    file.write_text("mine\n")
    code, _, err = llmexp(["cp", "technique=lora", str(file)], capsys)
    assert code == 2 and f"{file} exists; give --force to overwrite it, or another file name." in err
    assert file.read_text() == "mine\n"
    assert llmexp(["cp", "--force", "technique=lora", "technique.rank=4", str(file)], capsys)[0] == 0
    assert "  rank: 4\n" in file.read_text() and "max_steps: 300  # optimiser steps" in file.read_text()
    assert list(tmp_path.iterdir()) == [file]  # the temporary file it was written through is gone
