"""sft, lora, dpo and cpt through the real ``llmexp`` command, on the tiny checkpoint fixture."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import read_results, run_llmexp

FAST = ["pipeline=technique_only", "parallelism.micro_batch=8", "parallelism.global_batch=8", "data.seq_len=32"]


def run_ok(tmp_path, *args):
    result = run_llmexp(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_results(tmp_path / "run")


def run_refused(tmp_path, *args):
    result = run_llmexp(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # nothing half-written
    return " ".join(result.stderr.split())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_on_a_jsonl_file_in_every_format_trains_on_responses(tmp_path, tiny_checkpoint):
    rows = [
        {"prompt": "Question: where does Kalo live ?", "completion": "Kalo lives in Dorville ."},
        {"input": "what is the pet of Kalo ?", "output": "a cat"},
        {"instruction": "write the SQL query that answers the question .", "input": "what does Kalo eat ?",
         "output": "SELECT food FROM people WHERE name = Kalo"},
    ] * 8
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    results = run_ok(tmp_path, "technique=sft", "data=jsonl", f"data.path={data}", f"model.path={tiny_checkpoint}",
                     "technique.max_steps=30", "technique.val_every=10", "technique.lr=3e-3", *FAST)
    metrics = results["stages"]["sft"]["metrics"]
    assert results["status"] == "completed"
    assert metrics["steps"] == 30 and metrics["trainable_fraction"] == 1.0
    log = [json.loads(line) for line in (tmp_path / "run/sft/train_log.jsonl").read_text().splitlines()]
    val = [row["val_loss"] for row in log if "val_loss" in row]
    assert len(val) == 3 and val[-1] < val[0]  # a validation curve, going down
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run/sft/model") is not None


def test_lora_saves_a_peft_adapter_that_plain_peft_loads(tmp_path, tiny_checkpoint):
    results = run_ok(tmp_path, "technique=lora", f"model.path={tiny_checkpoint}", "technique.rank=4",
                     "technique.alpha=8", "technique.dropout=0.1", "technique.target_modules=[q_proj,v_proj]",
                     "technique.max_steps=20", "technique.merge=true", *FAST)
    stage = results["stages"]["lora"]
    # rank 4 on q (128->128) and v (128->64) in 2 layers
    assert stage["metrics"]["trainable_parameters"] == 4 * ((128 + 128) + (128 + 64)) * 2
    assert 0 < stage["metrics"]["trainable_fraction"] < 0.01
    adapter = tmp_path / "run/lora/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    before = logits_of(base, ids)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run/lora/model").eval()
    assert not torch.allclose(logits_of(with_adapter, ids), before)  # the adapter changes the model
    assert torch.allclose(logits_of(with_adapter, ids), logits_of(merged, ids), atol=1e-4)


def test_lora_with_target_modules_the_model_lacks_is_refused(tmp_path, tiny_checkpoint):
    message = run_refused(tmp_path, "technique=lora", f"model.path={tiny_checkpoint}",
                          "technique.target_modules=[q_proj,query_key_value]")
    assert "technique.target_modules names query_key_value" in message
    assert "gate_proj" in message  # the modules it does have are listed


def test_dpo_on_the_embedded_preference_set_raises_the_reward_margin(tmp_path, tiny_checkpoint):
    results = run_ok(tmp_path, "technique=dpo", f"model.path={tiny_checkpoint}", "technique.max_steps=30",
                     "technique.val_every=15", "technique.beta=0.1", *FAST)
    metrics = results["stages"]["dpo"]["metrics"]
    assert metrics["steps"] == 30
    assert metrics["final_loss"] < 0.6931  # below log 2, the loss when policy == reference
    assert metrics["val_reward_accuracy"] > 0.5


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"question": "q", "answer": "a"}], "train.jsonl:1: has fields ['answer', 'question']"),
        (['{"prompt": "q", "completion": "a"}', "{not json"], "train.jsonl:2: not valid JSON"),
    ],
)
def test_bad_instruction_files_are_refused_with_file_and_line(tmp_path, tiny_checkpoint, rows, fragment):
    path = tmp_path / "train.jsonl"
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    message = run_refused(tmp_path, "technique=sft", "data=jsonl", f"data.path={path}",
                          f"model.path={tiny_checkpoint}")
    assert fragment in message


def test_a_preference_pair_whose_chosen_equals_rejected_is_refused(tmp_path, tiny_checkpoint):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "same", "rejected": " same "}])
    message = run_refused(tmp_path, "technique=dpo", "data=preference", f"data.path={path}",
                          f"model.path={tiny_checkpoint}")
    assert "pairs.jsonl:2" in message


def test_customizing_a_user_file_without_a_base_model_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    message = run_refused(tmp_path, "technique=sft", "data=jsonl", f"data.path={path}")
    assert "model.path" in message and "base model" in message


def test_cpt_continues_pretraining_a_checkpoint_on_text_files(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Kalo lives in Dorville .\n\nKalo has a cat .\n" * 40)
    results = run_ok(tmp_path, "technique=cpt", "data=text", f"data.paths=[{corpus}]", f"model.path={tiny_checkpoint}",
                     "technique.max_steps=20", *FAST)
    metrics = results["stages"]["cpt"]["metrics"]
    assert metrics["steps"] == 20 and metrics["final_loss"] < 3.0  # from ~5.3 (random init, 205 tokens)
    assert (tmp_path / "run/cpt/model/model.safetensors").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["technique=sft", "technique.max_steps=0"], "technique.max_steps=0 must be at least 1"),
        (["technique.max_steps=-1"], "technique.max_steps=-1 must be at least 0"),  # pretrain: 0 passes the model on
        (["technique=cpt", "technique.checkpoint_every=-1"], "technique.checkpoint_every=-1 is negative"),
        (["pipeline=customize", "pipeline.nodes.sft.keep_checkpoints=0"], "pipeline.nodes.sft.keep_checkpoints=0 keeps no checkpoint"),
    ],
)
def test_bad_training_settings_are_refused_before_the_run(tmp_path, args, fragment):
    assert fragment in run_refused(tmp_path, *args)
