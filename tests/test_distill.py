"""The distill technique: its loss, its plan checks and memory, a short real run, a refused teacher."""

import json
import re

import pytest
import torch

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.architecture import count_parameters
from llmexp.planning.planner import make_plan
from llmexp.planning.stages import model_numbers
from llmexp.plugins.distill.loss import DistillationLoss, distillation_kl
from tests.conftest import read_results, run_llmexp


def tiny_llama(seed: int, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def test_loss_is_zero_against_itself_and_positive_against_another_model():
    teacher = tiny_llama(0).eval()
    ids = torch.randint(0, 64, (2, 12))
    loss = DistillationLoss(teacher, temperature=2.0, kl_weight=1.0, lm_weight=0.0, hidden_weight=1.0)
    same = loss(tiny_llama(0), ids)
    other = loss(tiny_llama(1), ids)
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert same.logs["cosine"].item() == pytest.approx(0.0, abs=1e-6)
    assert other.logs["kl"].item() > 1e-4 and other.logs["cosine"].item() > 1e-3
    assert other.loss.item() == pytest.approx(other.logs["kl"].item() + other.logs["cosine"].item(), rel=1e-5)
    assert same.tokens == 24 and "lm" not in same.logs


def test_kl_is_forward_kl_of_softened_distributions_times_tau_squared():
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11) * 3
    for tau in (1.0, 2.0, 4.0):
        p, q = (teacher / tau).softmax(-1), (student / tau).softmax(-1)
        expected = tau**2 * (p * (p.log() - q.log())).sum(-1).mean()  # KL(teacher || student) per position, averaged
        assert distillation_kl(student, teacher, tau).item() == pytest.approx(expected.item(), rel=1e-5)
    # logits scaled by tau at temperature tau: the same distributions, so tau^2 times the tau=1 loss
    assert distillation_kl(4 * student, 4 * teacher, 4.0).item() == pytest.approx(
        16 * distillation_kl(student, teacher, 1.0).item(), rel=1e-5
    )


def test_kl_agrees_with_modelopts_logits_distillation_loss():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modelopt's notice about the transformers version
        from modelopt.torch.distill.losses import LogitsDistillationLoss

    student, teacher = torch.randn(2, 7, 13), torch.randn(2, 7, 13)
    for tau in (1.0, 3.0):
        theirs = LogitsDistillationLoss(temperature=tau, reduction="none")(student, teacher).mean()
        assert distillation_kl(student, teacher, tau).item() == pytest.approx(theirs.item(), rel=1e-5)


def test_gradients_reach_only_the_student():
    teacher, student = tiny_llama(0).eval(), tiny_llama(1)
    loss = DistillationLoss(teacher, 1.0, kl_weight=1.0, lm_weight=0.5, hidden_weight=0.5)
    out = loss(student, torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert out.loss.item() == pytest.approx(
        out.logs["kl"].item() + 0.5 * out.logs["lm"].item() + 0.5 * out.logs["cosine"].item(), rel=1e-5
    )


def test_a_teacher_with_other_token_ids_or_hidden_size_is_refused_at_run_start():
    from omegaconf import OmegaConf

    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer
    from llmexp.plugins.distill.stage import check_pair
    from llmexp.techniques.contract import ModelArtifact

    node = OmegaConf.create({"teacher": {"path": None, "stage": "base"}, "hidden_weight": 1.0})
    ours, theirs = (word_level_tokenizer(build_world(seed).vocabulary()) for seed in (0, 1))
    student = ModelArtifact(tiny_llama(1, vocab=256), ours)
    with pytest.raises(UserError, match=r"pipeline\.nodes\.d\.teacher\.stage=base: .*different ids"):
        check_pair(ModelArtifact(tiny_llama(0, vocab=256), theirs), student, node, "pipeline.nodes.d")
    with pytest.raises(UserError, match=r"teacher\.stage=base: .*128 logits against the student's 256"):
        check_pair(ModelArtifact(tiny_llama(0, vocab=128), ours), student, node, "pipeline.nodes.d")
    wide = ModelArtifact(tiny_llama(0, vocab=256), ours)
    wide.model.config.hidden_size = 64  # only the number is compared
    with pytest.raises(UserError, match=r"pipeline\.nodes\.d\.hidden_weight=1\.0 .* 64 and the student's 32"):
        check_pair(wide, student, node, "pipeline.nodes.d")
    check_pair(ModelArtifact(tiny_llama(0, vocab=256), ours), student, node, "pipeline.nodes.d")  # a match passes


def test_plan_counts_the_teacher_on_top_of_full_training(tiny_checkpoint):
    student = f"model.path={tiny_checkpoint}"
    full = make_plan(compose_config(["technique=cpt", student]))
    distill = make_plan(compose_config(["technique=distill", student, f"technique.teacher.path={tiny_checkpoint}"]))
    assert distill.feasible and distill.technique_memory == "distill"
    teacher_bytes = 4 * count_parameters(model_numbers(compose_config([student]), []))  # fp32
    assert distill.memory_breakdown["teacher"] == teacher_bytes
    assert distill.memory_breakdown["teacher_logits"] == 3 * 16 * 64 * 256 * 4  # logits, log-probs x2, fp32
    extra = distill.memory_per_device_bytes - full.memory_per_device_bytes
    assert extra == teacher_bytes + distill.memory_breakdown["teacher_logits"]
    # a teacher from an earlier stage is counted as the run's model: twice the student here
    staged = make_plan(compose_config([
        "pipeline=technique_then_evaluation", "+technique@pipeline.nodes.base=pretrain", "+technique@pipeline.nodes.student=distill",
        "pipeline.stages=[base,student]", "pipeline.nodes.student.teacher.stage=base",
    ]))
    assert staged.feasible, staged.problems
    assert staged.memory_breakdown["teacher"] == staged.memory_breakdown["weights"] == 4 * staged.parameters


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], r"technique\.teacher sets neither"),
        (["technique.teacher.path=/x", "technique.teacher.stage=pretrain"], r"technique\.teacher sets both"),
        (["technique.teacher.path=/no/such/dir"], r"technique\.teacher\.path=/no/such/dir is not a directory"),
        (["technique.teacher.stage=base"], r"technique\.teacher\.stage=base is not a stage before this one"),
        (["technique.teacher.stage=base", "technique.temperature=0"], r"technique\.temperature=0\.0 must be positive"),
        (["technique.teacher.stage=base", "technique.lm_weight=-1"], r"technique\.lm_weight=-1\.0 is negative"),
        (["technique.teacher.stage=base", "technique.kl_weight=0"], r"technique: kl_weight, lm_weight and hidden_w"),
        (["technique.teacher.stage=base", "technique.max_steps=0"], r"technique\.max_steps=0 must be at least 1"),
        (["technique.teacher.stage=base", "data=jsonl"], r"data=jsonl holds instructions or pairs"),
    ],
)
def test_plan_refuses_bad_settings_naming_the_field(overrides, expected):
    problems = make_plan(compose_config(["technique=distill", *overrides])).problems
    assert any(re.search(expected, problem) for problem in problems), problems


def test_plan_refuses_a_teacher_checkpoint_with_another_hidden_size_for_the_hidden_loss(tiny_checkpoint):
    overrides = ["technique=distill", f"technique.teacher.path={tiny_checkpoint}", "model.hidden_size=256"]
    assert make_plan(compose_config(overrides)).feasible  # logits only: any hidden size
    problems = make_plan(compose_config([*overrides, "technique.hidden_weight=0.5"])).problems
    assert problems == [
        "technique.hidden_weight=0.5 compares last hidden states, but the teacher's hidden size is 128 and the "
        "student's 256; set technique.hidden_weight=0."
    ]


def test_vocabulary_mismatch_exits_2_naming_the_field_and_writes_nothing(tmp_path, tiny_checkpoint):
    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer
    from llmexp.models.loading import load_model, save_model

    model, _ = load_model(tiny_checkpoint)
    teacher = tmp_path / "teacher"
    save_model(model, word_level_tokenizer(build_world(seed=1).vocabulary()), teacher)  # another world's names
    run_dir = tmp_path / "run"
    result = run_llmexp(
        "technique=distill", f"technique.teacher.path={teacher}", f"model.path={tiny_checkpoint}",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"technique.teacher.path={teacher}: the teacher's vocabulary differs from the student's" in result.stderr
    assert not run_dir.exists()


def held_out_blocks(tokenizer):
    from llmexp.data.embedded import build_world

    ids = tokenizer(build_world(0).heldout_documents(40))["input_ids"]
    stream = [token for document in ids for token in document]
    return torch.tensor(stream[: 8 * 64]).view(8, 64)


def test_distillation_run_brings_the_student_towards_the_teacher(tmp_path, tiny_checkpoint):
    """A random student learns a peaked random teacher for 20 steps through the real command."""
    from llmexp.models.loading import load_model, save_model

    model, tokenizer = load_model(tiny_checkpoint)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50)  # tied: sharp next-token distributions to learn
    teacher = tmp_path / "teacher"
    save_model(model, tokenizer, teacher)
    run_dir = tmp_path / "run"
    result = run_llmexp(
        "technique=distill", "pipeline=technique_only", f"technique.teacher.path={teacher}", f"model.path={tiny_checkpoint}",
        "technique.max_steps=20", "technique.warmup_steps=2", "technique.lr=1e-2", "technique.log_every=1",
        "technique.checkpoint_every=20", "technique.lm_weight=0.1", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "distill" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and all(row["loss"] == pytest.approx(row["kl"] + 0.1 * row["lm"], rel=1e-4) for row in log)
    # on held-out text the saved student is much closer to the teacher than the student it started from
    blocks = held_out_blocks(tokenizer)
    with torch.no_grad():
        teacher_logits = model(input_ids=blocks).logits
        before, after = (
            distillation_kl(load_model(path)[0](input_ids=blocks).logits, teacher_logits, 1.0)
            for path in (tiny_checkpoint, run_dir / "distill" / "model")
        )
    assert after < 0.75 * before, (before, after)
    stage = read_results(run_dir)["stages"]["distill"]
    assert stage["metrics"]["steps"] == 20 and stage["metrics"]["trainable_parameters"] == count_parameters(
        model_numbers(compose_config([f"model.path={tiny_checkpoint}"]), [])
    )
    stats = stage["model_stats"]
    assert stats["layers"] == 2 and stats["precision"] == "fp32"
    assert stats["bits_per_weight"] == pytest.approx(32, abs=0.1)
    assert stats["bytes_on_disk"] > 0 and (run_dir / "distill" / "model" / "config.json").is_file()
    # the checkpoint holds the student alone: the teacher is an extra module, never saved
    (checkpoint,) = (run_dir / "distill" / "checkpoints").glob("*.ckpt")
    weights = torch.load(checkpoint, weights_only=False)["state_dict"]
    student = load_model(run_dir / "distill" / "model")[0]
    assert sorted(weights) == sorted(f"model.{name}" for name in student.state_dict())
