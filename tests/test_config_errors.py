"""Bad overrides, as ``llmexp`` answers them: the field, what its type expects, the value given, the fix.

Each case runs the command's entry point in a fresh directory and checks the exit code, the
message, that nothing was written, and that none of Hydra's wrong advice ("+key" to append)
or search-path listing reaches the user.
"""

from __future__ import annotations

import pytest

from llmexp.cli import main as cli
from .conftest import run_llmexp

WRONG_TYPE = [
    (["technique.max_steps=many"], "technique.max_steps=many: technique.max_steps expects an integer (now 1000), got "
     "'many'; give a whole number, e.g. technique.max_steps=1000."),
    (["parallelism.tp=two"], "parallelism.tp=two: parallelism.tp expects an integer (now 1), got 'two'; give a whole "
     "number, e.g. parallelism.tp=1."),
    (["technique.max_steps=1e3"], "technique.max_steps expects an integer (now 1000), got 1000.0; give a whole number, "
     "e.g. technique.max_steps=1000."),
    (["seed=true"], "seed=true: seed expects an integer (now 0), got true; give a whole number, e.g. seed=0."),
    (["technique.lr=abc"], "technique.lr expects a number (now 0.01), got 'abc'; give a number such as 0.001 or 3e-4, "
     "e.g. technique.lr=0.01."),
    (["model.tie_word_embeddings=maybe"], "model.tie_word_embeddings expects true or false (now true), got 'maybe'; "
     "give true or false, e.g. model.tie_word_embeddings=true."),
    (["model.head_dim=x"], "model.head_dim expects an integer or null (now 32), got 'x'; give a whole number "
     "(null for none), e.g. model.head_dim=32."),
    (["hardware.memory_gb=lots"], "hardware.memory_gb expects a number or null (now null), got 'lots'; give a number "
     "such as 0.001 or 3e-4 (null for none)."),
    (["model.name=[a,b]"], "model.name expects a string (now tiny_llama), got [a,b]; quote it, e.g. "
     "model.name='[a,b]'."),
    (["pipeline.nodes.baseline.max_steps=x"], "pipeline.nodes.baseline.max_steps=x: pipeline.nodes.baseline.max_steps "
     "expects an integer (now 1000), got 'x'; give a whole number, e.g. pipeline.nodes.baseline.max_steps=1000."),
    (["data=text", "data.paths=3"], "data.paths=3: data.paths expects a list of strings (now []), got 3; give a list "
     "in brackets, e.g. data.paths=[3]."),
    (["technique=benchmark", "technique.concurrency=4"], "technique.concurrency expects a list of integers "
     "(now [1,4]), got 4; give a list in brackets, e.g. technique.concurrency=[4]."),
    (["technique=benchmark", "technique.concurrency=[1,many]"], "technique.concurrency=[1,many]: technique.concurrency "
     "expects a list of integers, got 'many' as technique.concurrency[1]; give a whole number for each item."),
    (["technique=benchmark", "technique.extra_body=3"], "technique.extra_body expects a mapping of keys to values "
     "(now {}), got 3; give a mapping in braces, e.g. technique.extra_body={}."),
    (["technique=distill", "technique.teacher=3"], "technique.teacher expects a mapping with the keys path, stage "
     "(now {path:null,stage:null}), got 3; give a mapping in braces"),
    (["hardware.dtypes=bf16"], "hardware.dtypes expects a list of values from fp32, tf32, fp16, bf16, int8, fp8, fp4, "
     "mxfp8 (now [fp32,bf16,fp16,int8]), got 'bf16'; give a list in brackets, e.g. hardware.dtypes=[bf16]."),
]

KEY_TYPO = [
    (["modle=llama3_1_8b"], "modle=llama3_1_8b: modle is not a key of the config; did you mean model=llama3_1_8b?"),
    (["technique.lrr=1"], "technique.lrr=1: technique.lrr is not a key of technique=pretrain; did you mean "
     "technique.lr=1?"),
    (["techniqe.lr=1"], "techniqe.lr=1: techniqe is not a key of the config; did you mean technique.lr=1?"),
    (["technque=lora"], "technque is not a key of the config; did you mean technique=lora?"),
    (["pipeline.nodes.basline.max_steps=1"], "pipeline.nodes.basline is not a key of pipeline.nodes; did you mean "
     "pipeline.nodes.baseline.max_steps=1?"),
    (["pipeline.nodes.baseline.max_stepz=1"], "pipeline.nodes.baseline.max_stepz is not a key of "
     "pipeline.nodes.baseline (technique=pretrain); did you mean pipeline.nodes.baseline.max_steps=1?"),
    (["technique=distill", "technique.teacher.stag=baseline"], "technique.teacher.stag is not a key of "
     "technique.teacher; did you mean technique.teacher.stage=baseline?"),
    (["technique.zzz=1"], "technique.zzz is not a key of technique=pretrain, whose keys are name, max_steps, lr,"),
    (["+technique.lrr=1"], "+technique.lrr=1: technique.lrr is not a key of technique=pretrain; did you mean "
     "technique.lr=1? (`+` adds a key the run would ignore.)"),
]

OPTION_TYPO = [
    (["model=llama3_1_8bb"], "model=llama3_1_8bb: model has no option llama3_1_8bb; did you mean model=llama3_1_8b? "
     "Its options are llama3_1_405b, llama3_1_70b, llama3_1_8b, llama3_2_1b, llama3_2_3b, mistral_7b, qwen2_5_7b, "
     "tiny_llama."),
    (["technique@evaluation=lorra"], "technique@evaluation=lorra: technique has no option lorra; did you mean "
     "technique@evaluation=lora? Its options are benchmark,"),
    (["model=llama9"], "model=llama9: model has no option llama9. Its options are llama3_1_405b,"),
]

UNPARSABLE = [
    (["model.revision=<commit>"], "model.revision=<commit>: this override cannot be parsed at `<` (character 16). "
     "Quote a value that holds characters other than letters, digits and . / - _ :"),
    (["-m", "seed=0,1", "model.path=outputs/<run>/baseline/model"], "model.path=outputs/<run>/baseline/model: this "
     "override cannot be parsed at `<` (character 20). Quote a value"),
    (["technique.tasks=[{type: mmlu"], "technique.tasks=[{type: mmlu: this override cannot be parsed. Quote a value"),
]


def llmexp_refuses(argv, capsys) -> str:
    """``llmexp <argv>``'s one-paragraph refusal, after checking it exited 2 with nothing else on stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize("argv, message", WRONG_TYPE + KEY_TYPO + OPTION_TYPO + UNPARSABLE)
def test_bad_override_names_the_field_the_value_and_the_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = llmexp_refuses(argv, capsys)
    assert message in err
    for hydra_noise in ("To append", "use +", "Error merging", "Config search path", "provider=", "Could not override",
                        "LexerNoViableAltException", "hydra.cc"):
        assert hydra_noise not in err
    assert list(tmp_path.iterdir()) == []  # no outputs/ directory


def test_the_command_line_answers_a_wrong_type_and_a_typo_in_one_paragraph(tmp_path):
    wrong = run_llmexp("technique.max_steps=many", cwd=tmp_path, timeout=120)
    typo = run_llmexp("plan", "modle=llama3_1_8b", cwd=tmp_path, timeout=120)
    for result in (wrong, typo):
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "technique.max_steps expects an integer (now 1000), got 'many'" in wrong.stderr
    assert "did you mean model=llama3_1_8b?" in typo.stderr and "+modle" not in typo.stderr
    assert list(tmp_path.iterdir()) == []
