"""The shared training loop: its pieces, and `train` itself on a 2-layer model in this process."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llmexp.configuration.compose import compose_config
from llmexp.data.packing import pack_documents
from llmexp.errors import UserError
from llmexp.models.loading import build_model
from llmexp.machine.peak_memory import PeakMemory
from llmexp.techniques.contract import StageContext
from llmexp.results.tracking import make_tracker
from llmexp.training.contract import LossOutput
from llmexp.training.loop import accumulation_steps, make_trainer, train
from llmexp.training.schedule import data_order, warmup_cosine

# 2 layers, 16-token blocks, micro-batches of 2 accumulated to 4: a step takes milliseconds.
TINY = [
    "model.num_layers=2", "data.seq_len=16", "parallelism.micro_batch=2", "parallelism.global_batch=4",
    "technique.max_steps=6", "technique.log_every=1", "technique.warmup_steps=2", "technique.checkpoint_every=0",
]


def context(stage_dir, *overrides):
    cfg = compose_config([*TINY, *overrides])
    tracker = make_tracker(cfg.tracker, stage_dir.parent, cfg)
    return StageContext(cfg, cfg.technique, stage_dir, None, tracker, "pretrain")


def tiny_model(ctx):
    torch.manual_seed(0)
    return build_model(ctx.config.model)


def blocks(n=24, seed=1):
    return list(torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed)))


def next_token_loss(model, input_ids):
    return LossOutput(model(input_ids=input_ids, labels=input_ids).loss, input_ids.numel())


def noisy_loss(model, input_ids):
    """The next-token loss scaled by draws from the python, numpy and torch generators (as dropout would draw)."""
    noise = random.random() + np.random.rand() + torch.rand(()).item()
    return LossOutput(model(input_ids=input_ids, labels=input_ids).loss * (1 + 0.1 * noise), input_ids.numel())


def run(ctx, model=None, loss=next_token_loss, **kwargs):
    model = model if model is not None else tiny_model(ctx)
    return model, train(ctx, model, loss, kwargs.pop("data", blocks()), torch.stack, **kwargs)


def log_rows(stage_dir):
    return [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]


# -- pieces ---------------------------------------------------------------------------------


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_accumulation_reaches_global_batch():
    par = OmegaConf.create({"micro_batch": 4, "global_batch": 32, "dp": 2})
    assert accumulation_steps(par) == 4


def test_packing_runs_documents_across_blocks():
    packed = pack_documents(iter([[1, 2, 3], [4, 5], [6, 7, 8, 9]]), seq_len=4, num_blocks=2)
    assert packed.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert packed.dtype == torch.long
    with pytest.raises(ValueError):
        pack_documents(iter([[1, 2]]), seq_len=4, num_blocks=1)


def test_unsupported_training_setups_are_user_errors():
    for overrides, message in ((["precision=fp8"], "precision=fp8"), (["parallelism=dp2"], "trains on 2 ranks"),
                               (["precision=fp16"], "precision=fp16 is not available for training on hardware=cpu")):
        cfg = compose_config(overrides)
        with pytest.raises(UserError, match=message):
            make_trainer(cfg, cfg.technique)


def test_data_order_is_seeded_passes_of_permutations():
    order = data_order(10, 25, seed=3).tolist()
    assert len(order) == 25
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert len(set(order[20:])) == 5  # the third pass, cut short
    assert order != list(range(10)) * 2 + list(range(5))
    assert data_order(10, 25, seed=3).tolist() == order
    assert data_order(10, 25, seed=4).tolist() != order


def test_data_order_without_shuffle_is_the_examples_in_order_repeated():
    assert data_order(4, 10, seed=3, shuffle=False).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert data_order(6, 6, seed=3, shuffle=False).tolist() == list(range(6))


def test_peak_memory_sees_an_allocation_above_the_baseline():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, written
        del block  # at once: a sampler could miss it, the kernel's high-water mark does not
    assert 60 < peak.mb < 200
    with PeakMemory("cpu") as again:  # a second block counts from its own entry, not the first one's peak
        block = torch.ones(16 * 2**20 // 4)
        del block
    assert 12 < again.mb < 60


# -- train ----------------------------------------------------------------------------------


def test_train_logs_every_log_every_steps_and_reports_its_figures(tmp_path):
    ctx = context(tmp_path / "pretrain", "technique.log_every=4", "technique.max_steps=6")
    model, metrics = run(ctx)
    rows = log_rows(ctx.stage_dir)
    assert [row["step"] for row in rows] == [4, 6]  # every 4 steps, and the last
    assert rows[-1]["loss"] == pytest.approx(metrics["final_loss"], abs=1e-5)
    assert rows[0]["lr"] == pytest.approx(1e-2 * warmup_cosine(3, 2, 6, 0.1))
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 0
    assert metrics["train_tokens"] == 6 * 4 * 16
    assert metrics["total_parameters"] == metrics["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["trainable_fraction"] == 1.0 and metrics["peak_memory_mb"] >= 0
    assert not model.training
    csv = (ctx.stage_dir / "metrics.csv").read_text().splitlines()  # the tracker's Lightning logger, same steps
    assert csv[0].split(",") == ["step", "train/loss", "train/lr"]
    assert [line.split(",")[0] for line in csv[1:]] == ["4", "6"]


def test_validation_runs_every_val_every_steps_and_after_the_last(tmp_path):
    ctx = context(tmp_path / "pretrain", "technique.val_every=2", "technique.max_steps=5")
    val = blocks(5, seed=2)  # micro-batches of 2, 2 and 1 example: the mean is weighted by tokens
    model, metrics = run(ctx, val_data=val)
    val_rows = [row for row in log_rows(ctx.stage_dir) if "val_loss" in row]
    assert [row["step"] for row in val_rows] == [2, 4, 5]
    with torch.no_grad():
        batches = [torch.stack(part) for part in (val[:2], val[2:4], val[4:])]
        losses = [(model(input_ids=b, labels=b).loss.item(), b.numel()) for b in batches]
    expected = sum(loss * tokens for loss, tokens in losses) / sum(tokens for _, tokens in losses)
    assert val_rows[-1]["val_loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["val_loss"] == pytest.approx(expected, abs=1e-5)
    csv = (ctx.stage_dir / "metrics.csv").read_text()
    assert csv.splitlines()[0].split(",") == ["step", "train/loss", "train/lr", "val/loss"]


def test_validation_data_is_left_alone_unless_val_every_is_set(tmp_path):
    ctx = context(tmp_path / "pretrain")
    _, metrics = run(ctx, val_data=blocks(4, seed=2))
    assert "val_loss" not in metrics
    assert not [row for row in log_rows(ctx.stage_dir) if "val_loss" in row]


def test_validation_without_validation_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="technique.val_every=2"):
        run(context(tmp_path / "pretrain", "technique.val_every=2"))


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    _, plain = run(context(tmp_path / "plain" / "pretrain"))
    _, checkpointed = run(context(tmp_path / "ac" / "pretrain", "parallelism.activation_checkpointing=true"))
    assert checkpointed["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-5)
    plain_rows = log_rows(tmp_path / "plain" / "pretrain")
    for a, b in zip(plain_rows, log_rows(tmp_path / "ac" / "pretrain")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_activation_checkpointing_on_a_peft_adapter_trains_the_adapter_alike(tmp_path):
    peft = pytest.importorskip("peft")

    def adapted(ctx):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return peft.get_peft_model(tiny_model(ctx), config)

    plain_ctx = context(tmp_path / "plain" / "pretrain")
    ac_ctx = context(tmp_path / "ac" / "pretrain", "parallelism.activation_checkpointing=true")
    _, plain = run(plain_ctx, adapted(plain_ctx))
    model, checkpointed = run(ac_ctx, adapted(ac_ctx))
    assert checkpointed["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-5)
    assert checkpointed["final_loss"] != pytest.approx(log_rows(ac_ctx.stage_dir)[0]["loss"], abs=1e-3)  # it learned
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert checkpointed["trainable_parameters"] == adapter
    assert checkpointed["trainable_fraction"] == round(adapter / checkpointed["total_parameters"], 6) < 0.05


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_eager_one_and_saves_the_same_keys(tmp_path):
    eager_model, eager = run(context(tmp_path / "eager" / "pretrain"))
    compiled_model, compiled = run(context(tmp_path / "compiled" / "pretrain", "technique.compile=true"))
    for a, b in zip(log_rows(tmp_path / "eager" / "pretrain"), log_rows(tmp_path / "compiled" / "pretrain"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)  # the tolerance of the dp-vs-single parity check
    assert compiled["compile_time_s"] > 1.0 and "compile_time_s" not in eager  # eager first steps take milliseconds
    assert list(compiled_model.state_dict()) == list(eager_model.state_dict())  # the model, not a compiled wrapper
    assert not compiled_model.training and type(compiled_model) is type(eager_model)


def test_adamw_runs_its_fused_kernel_on_plain_tensors_and_keeps_the_decay_groups():
    from llmexp.training.optimizer import adamw

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    optimizer = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.1)
    assert optimizer.defaults["fused"] is True
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert [p.shape for p in no_decay["params"]] == [(4,), (4,)] and no_decay["weight_decay"] == 0.0


def test_mixed_precision_training_clips_with_the_foreach_adamw(tmp_path):
    """Lightning refuses to clip for an optimizer that unscales gradients itself (the fused kernel)."""
    for precision in ("fp32", "bf16"):
        run(context(tmp_path / precision / "pretrain", f"precision={precision}", "technique.grad_clip=0.5"))
    fp32, bf16 = (log_rows(tmp_path / precision / "pretrain") for precision in ("fp32", "bf16"))
    assert [row["loss"] for row in bf16] == pytest.approx([row["loss"] for row in fp32], abs=0.02)


def test_frozen_parameters_are_counted_and_left_alone(tmp_path):
    ctx = context(tmp_path / "pretrain")
    model = tiny_model(ctx)
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(False)
    before = embedding.detach().clone()
    _, metrics = run(ctx, model)
    total = sum(p.numel() for p in model.parameters())
    assert metrics["total_parameters"] == total
    assert metrics["trainable_parameters"] == total - 256 * 128
    assert metrics["trainable_fraction"] == round((total - 256 * 128) / total, 6)
    assert torch.equal(embedding, before)


def test_extra_modules_are_used_frozen_and_never_saved(tmp_path):
    ctx = context(tmp_path / "pretrain", "technique.checkpoint_every=3")
    model = tiny_model(ctx)
    reference = copy.deepcopy(model).train()
    reference_weights = copy.deepcopy(reference.state_dict())
    seen_modes = []

    def loss_with_reference(model, input_ids):
        with torch.no_grad():
            reference_loss = reference(input_ids=input_ids, labels=input_ids).loss
        seen_modes.append(reference.training)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        return LossOutput(loss, input_ids.numel(), {"gap": loss.detach() - reference_loss})

    train(ctx, model, loss_with_reference, blocks(), torch.stack, extra_modules=[reference])
    assert seen_modes and not any(seen_modes)
    assert all(torch.equal(v, reference_weights[k]) for k, v in reference.state_dict().items())
    checkpoint = torch.load(ctx.stage_dir / "checkpoints" / "step-00000006.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in model.state_dict()}
    assert all("gap" in row for row in log_rows(ctx.stage_dir))


def test_checkpoints_keep_the_newest_and_leave_no_temporary_files(tmp_path):
    ctx = context(tmp_path / "pretrain", "technique.checkpoint_every=2", "technique.keep_checkpoints=2")
    run(ctx)
    directory = ctx.stage_dir / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000004.ckpt", "step-00000006.ckpt"]
    assert not [p for p in ctx.stage_dir.rglob("*") if p.name.endswith(".tmp")]
    checkpoint = torch.load(directory / "step-00000004.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["llmexp"]["micro_batches"] == 8
    assert set(checkpoint["llmexp"]["rng"]) >= {"python", "numpy", "torch"}


def test_a_resumed_stage_continues_the_run_it_interrupted(tmp_path, capsys):
    """Shuffled data, accumulation, random draws: the data position, RNGs and loop state all have to come back."""
    overrides = ("technique.checkpoint_every=2", "technique.keep_checkpoints=3")
    clean = context(tmp_path / "clean" / "pretrain", *overrides)
    _, expected = run(clean, loss=noisy_loss, data=blocks(10))

    ctx = context(tmp_path / "cut" / "pretrain", *overrides)
    run(ctx, loss=noisy_loss, data=blocks(10))
    directory = ctx.stage_dir / "checkpoints"
    (directory / "step-00000006.ckpt").unlink()  # as if killed after step 5's row was logged
    (directory / "step-00000004.ckpt").write_bytes(b"truncated")
    with open(ctx.stage_dir / "train_log.jsonl", "a") as log:
        log.write('{"step": 6, "lo')  # a torn last line
    capsys.readouterr()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # whatever the process drew since
    _, resumed = run(ctx, loss=noisy_loss, data=blocks(10))

    assert "step-00000004.ckpt cannot be resumed" in capsys.readouterr().err
    assert resumed["resumed_from_step"] == 2
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-6)
    assert resumed["train_tokens"] == expected["train_tokens"]
    assert log_rows(ctx.stage_dir) == log_rows(clean.stage_dir)
    assert sorted(p.name for p in directory.iterdir()) == [f"step-0000000{n}.ckpt" for n in (2, 4, 6)]


def test_checkpoints_of_another_config_are_not_resumed(tmp_path, capsys):
    stage_dir = tmp_path / "pretrain"
    run(context(stage_dir, "technique.checkpoint_every=3"))
    _, metrics = run(context(stage_dir, "technique.checkpoint_every=3", "technique.lr=0.02"))
    assert metrics["resumed_from_step"] == 0
    assert "different configuration" in capsys.readouterr().err
    assert [row["step"] for row in log_rows(stage_dir)] == [1, 2, 3, 4, 5, 6]
