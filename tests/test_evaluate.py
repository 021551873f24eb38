"""The evaluate technique: lm-eval-style scoring, task grading, the plan hook, a whole run."""

import json
import math
import subprocess
import sys
from importlib.metadata import entry_points

import pluggy
import pytest
import torch
from omegaconf import OmegaConf

from llmexp.techniques import hookspecs, plugin_manager
from llmexp.techniques.hookspecs import hookimpl
from llmexp.data.embedded import LETTERS, build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError
from llmexp.models.loading import build_model
from llmexp.configuration.pipeline import stage_nodes
from llmexp.plugins.evaluate import EvaluateConfig, Evaluate
from llmexp.plugins.evaluate.harness import scoring
from llmexp.plugins.evaluate.harness import registry
from llmexp.plugins.evaluate.harness.decoding import cut_at_stop
from llmexp.plugins.evaluate.harness.scoring import LogLikelihood, Scorer, encode_pair
from llmexp.sdk import TaskInputs, TaskResult, TaskType
from llmexp.plugins.evaluate.tasks.embedded import EMBEDDED_TASKS, TASKS, free_answer, multiple_choice, word_problems
from llmexp.techniques.contract import ModelArtifact, StageContext

TINY = dict(
    name="test_tiny",
    architecture="llama",
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
)

GSM8K_LINES = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
    {
        "question": "A box holds 1,000 pens; 766 are sold. How many are left?",
        "answer": "1000-766 = <<1000-766=234>>234\n#### 234",
    },
    {"question": "It is 2 degrees and gets 7 degrees colder. What is it now?", "answer": "2-7 = <<2-7=-5>>-5\n#### -5"},
]


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return word_level_tokenizer(world.vocabulary())


def tiny_model(tokenizer, **overrides):
    """A random 2-layer Llama. Weights are drawn wider than the default init so that its
    next-token distributions depend visibly on the input (argmax tests are not ties)."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({**TINY, **overrides}), tokenizer)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


def reference_loglikelihood(model, tokenizer, context, continuation):
    """One full forward pass over context + continuation, log-softmax, sum the continuation's tokens."""
    whole = tokenizer(context + continuation).input_ids
    start = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    total = sum(logprobs[j - 1, whole[j]].item() for j in range(start, len(whole)))
    greedy = all(logprobs[j - 1].argmax().item() == whole[j] for j in range(start, len(whole)))
    return total, greedy


def write_gsm8k(path, records=GSM8K_LINES):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- the plugin as the framework sees it --------------------------------------------------


def test_plugin_imports_without_torch():
    code = "import sys, llmexp.plugins.evaluate; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_through_the_entry_point():
    (entry,) = [e for e in entry_points(group="llmexp") if e.name == "evaluate"]
    manager = pluggy.PluginManager("llmexp")
    manager.add_hookspecs(hookspecs)
    manager.register(entry.load())
    assert manager.hook.llmexp_techniques() == [[Evaluate]]
    assert (Evaluate.name, Evaluate.schema, Evaluate.memory, Evaluate.produces_model) == (
        "evaluate",
        EvaluateConfig,
        "inference",
        False,
    )
    assert Evaluate.requires == ("torch", "transformers") and Evaluate.missing_requirements() == ()


def test_schema_defaults_are_the_embedded_tasks():
    cfg = OmegaConf.structured(EvaluateConfig)
    assert list(cfg.tasks) == EMBEDDED_TASKS and set(EMBEDDED_TASKS) < set(TASKS)
    assert (cfg.limit, cfg.batch_size, cfg.max_new_tokens, cfg.gsm8k_path) == (None, 32, 40, None)


# -- log-likelihood ------------------------------------------------------------------------


def test_encode_pair_moves_trailing_context_whitespace_onto_the_continuation(tokenizer):
    assert encode_pair(tokenizer, "Question: who ?\nAnswer: ", "red") == encode_pair(
        tokenizer, "Question: who ?\nAnswer:", " red"
    )
    context, continuation = encode_pair(tokenizer, "Answer:", " red blue")
    assert context == tokenizer("Answer:").input_ids  # BOS first, as the tokenizer adds it
    assert context[0] == tokenizer.bos_token_id and tokenizer.convert_ids_to_tokens(continuation) == ["red", "blue"]


def test_loglikelihood_matches_a_hand_computed_forward_pass_batched_or_not(model, tokenizer, world):
    mc = world.multiple_choice_test()[0]
    problem = world.word_problem_test()[0]
    requests = [
        (mc.cloze_prompt(), f" {mc.choices[0]}"),
        (mc.letter_prompt(), " B"),
        (problem.prompt, f" {problem.solution}"),
        ("the pet of", " Kalo is a cat ."),
        (world.free_answer_test()[3].prompt, " red"),
    ]
    batched = scoring.loglikelihood(model, tokenizer, requests, batch_size=4)
    single = [scoring.loglikelihood(model, tokenizer, [r], batch_size=1)[0] for r in requests]
    for request, got, alone in zip(requests, batched, single):
        expected, greedy = reference_loglikelihood(model, tokenizer, *request)
        assert got.logprob == pytest.approx(expected, abs=1e-4)
        assert got.logprob == pytest.approx(alone.logprob, abs=1e-5)
        assert got.is_greedy == alone.is_greedy == greedy
        assert got.tokens == len(encode_pair(tokenizer, *request)[1])


def test_is_greedy_is_true_for_the_models_own_continuation(model, tokenizer, world):
    context = world.free_answer_test()[0].prompt
    continuation = ""
    for _ in range(2):  # extend by the argmax token twice: a two-token greedy continuation
        ids = tokenizer(context + continuation).input_ids
        with torch.no_grad():
            token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        continuation += " " + tokenizer.convert_ids_to_tokens(token)
    (result,) = scoring.loglikelihood(model, tokenizer, [(context, continuation)])
    assert result.is_greedy and result.tokens == 2
    (other,) = scoring.loglikelihood(model, tokenizer, [(context, continuation.rsplit(" ", 1)[0] + " ####")])
    assert other.logprob < result.logprob or not other.is_greedy


def test_document_nll_scores_bos_doc_eos_and_windows_long_documents(tokenizer, world):
    documents = world.heldout_documents(3)
    model = tiny_model(tokenizer)
    for document, (nll, count) in zip(documents, scoring.document_nll(model, tokenizer, documents, batch_size=2)):
        ids = tokenizer(document).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        assert count == len(ids) - 1
        assert nll == pytest.approx(-sum(logprobs[j - 1, ids[j]].item() for j in range(1, len(ids))), abs=1e-4)

    short = tiny_model(tokenizer, max_position_embeddings=16)
    ids = tokenizer(documents[1]).input_ids + [tokenizer.eos_token_id]
    assert len(ids) > 33  # at least three windows of 16
    ((nll, count),) = scoring.document_nll(short, tokenizer, [documents[1]])
    expected = 0.0
    for start in range(0, len(ids) - 1, 16):
        window = ids[start : start + 17]
        with torch.no_grad():
            logprobs = short(torch.tensor([window[:-1]])).logits[0].double().log_softmax(-1)
        expected -= sum(logprobs[j, window[j + 1]].item() for j in range(len(window) - 1))
    assert count == len(ids) - 1 and nll == pytest.approx(expected, abs=1e-4)


# -- generation ----------------------------------------------------------------------------


def test_greedy_generation_is_the_same_batched_left_padded_or_alone(model, tokenizer, world):
    prompts = [item.prompt for item in world.free_answer_test()[:3]] + [p.prompt for p in world.word_problem_test()[:3]]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) > 1  # the batch really is padded
    batched = scoring.greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=6, stop=())
    alone = [scoring.greedy_generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, stop=()) for p in prompts]
    alone = [texts[0] for texts in alone]
    assert batched == alone
    assert all(len(text.split()) <= 8 for text in batched) and any(batched)


def test_generation_stops_at_eos(tokenizer, world):
    model = tiny_model(tokenizer)
    prompt = world.free_answer_test()[0].prompt
    with torch.no_grad():
        first = model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1].argmax().item()
    assert scoring.greedy_generate(model, tokenizer, [prompt], max_new_tokens=5, stop=())[0] != ""
    model.generation_config.eos_token_id = first  # the model's first answer token is now its EOS
    assert scoring.greedy_generate(model, tokenizer, [prompt], max_new_tokens=5, stop=()) == [""]


def test_cut_at_stop():
    assert cut_at_stop("red\nQuestion: x", ("\n", "Question:")) == "red"
    assert cut_at_stop("a #### 5 Question: b", ("Question:",)) == "a #### 5 "
    assert cut_at_stop("no stop", ("\n",)) == "no stop" and cut_at_stop("x", ()) == "x"


# -- grading -------------------------------------------------------------------------------


class StubScorer:
    """Answers through the Scorer interface from rules, so a task's expected score is known."""

    def __init__(self, loglikelihood=None, generate=None):
        self._loglikelihood, self._generate = loglikelihood, generate

    def loglikelihood(self, requests):
        return [LogLikelihood(self._loglikelihood(c, x), False, 1) for c, x in requests]

    def generate(self, prompts, stop):
        return [self._generate(i, p) for i, p in enumerate(prompts)]


def test_multiple_choice_accuracy_is_the_argmax_of_independent_loglikelihoods(model, tokenizer, world):
    inputs = TaskInputs(world, limit=8)
    result = multiple_choice(inputs, Scorer(model, tokenizer, batch_size=5))
    items = world.multiple_choice_test()[:8]
    correct = {"cloze": [], "norm": [], "letter": []}
    for item, row in zip(items, result.rows):
        cloze = [reference_loglikelihood(model, tokenizer, item.cloze_prompt(), f" {c}")[0] for c in item.choices]
        letter = [reference_loglikelihood(model, tokenizer, item.letter_prompt(), f" {x}")[0] for x in LETTERS]
        norm = [lp / len(c) for lp, c in zip(cloze, item.choices)]
        by_scoring = {"cloze": cloze, "norm": norm, "letter": letter}
        picks = {name: max(range(4), key=scores.__getitem__) for name, scores in by_scoring.items()}
        assert row["predicted"] == item.choices[picks["cloze"]]
        assert row["predicted_norm"] == item.choices[picks["norm"]]
        assert row["predicted_letter"] == LETTERS[picks["letter"]]
        for name in correct:
            correct[name].append(picks[name] == item.answer)
    assert result.metrics["mc_cloze_acc"] == pytest.approx(sum(correct["cloze"]) / 8)
    assert result.metrics["mc_cloze_acc_norm"] == pytest.approx(sum(correct["norm"]) / 8)
    assert result.metrics["mc_letter_acc"] == pytest.approx(sum(correct["letter"]) / 8)


def test_multiple_choice_scores_with_forced_answers(world):
    items = world.multiple_choice_test()[:40]
    right = {(item.cloze_prompt(), f" {item.choices[item.answer]}") for item in items}

    def rule(context, continuation):
        if continuation.strip() in LETTERS:  # letter scoring: always " A"
            return 0.0 if continuation == " A" else -1.0
        # per character the right option is twice as likely: acc_norm always right, raw acc not
        return -len(continuation) * (0.5 if (context, continuation) in right else 1.0)

    metrics = multiple_choice(TaskInputs(world, limit=40), StubScorer(loglikelihood=rule)).metrics
    raw_right = []
    for item in items:
        answer = item.choices[item.answer]
        raw_right.append(all(0.5 * len(f" {answer}") < len(f" {c}") for c in item.choices if c != answer))
    assert metrics["mc_cloze_acc_norm"] == 1.0
    assert metrics["mc_cloze_acc"] == pytest.approx(sum(raw_right) / 40)
    assert metrics["mc_letter_acc"] == pytest.approx(sum(item.answer == 0 for item in items) / 40)


def test_free_answer_exact_match_ignores_case_and_whitespace(world):
    items = world.free_answer_test()[:4]
    answers = [f"  {items[0].answer.upper()} ", items[1].answer, f"{items[2].answer} too", ""]
    result = free_answer(TaskInputs(world, limit=4), StubScorer(generate=lambda i, _: answers[i]))
    assert [row["correct"] for row in result.rows] == [True, True, False, False]
    assert result.metrics["free_answer_em"] == 0.5


def test_word_problems_grade_the_first_hash_answer(world):
    problems = world.word_problem_test()[:5]
    outputs = [
        f"{problems[0].solution}",
        f"so #### {problems[1].answer} Question: #### 999",
        f"#### {problems[2].answer + 1}",
        f"the answer is {problems[3].answer}",  # no ####: wrong under strict match
        f"#### {problems[4].answer:,}.",
    ]
    result = word_problems(TaskInputs(world, limit=5), StubScorer(generate=lambda i, _: outputs[i]))
    assert [row["correct"] for row in result.rows] == [True, True, False, False, True]
    assert result.rows[3]["predicted"] is None and result.metrics["word_problem_em"] == 0.6


# -- the plan hook ---------------------------------------------------------------------------


def run_config(stages=("technique", "evaluation"), technique=None, model_path=None, **evaluation):
    return OmegaConf.create(
        {
            "model": {"path": model_path},
            "pipeline": {"name": "custom", "stages": list(stages)},
            "technique": technique if technique is not None else {"name": "pretrain"},
            "evaluation": OmegaConf.structured(EvaluateConfig(**evaluation)),
        }
    )


def evaluate_problems(config):
    """What the planner's walk over the pipeline's stages finds in its evaluate stages."""
    return [problem for key, node in stage_nodes(config, strict=False) if node.get("name") == "evaluate"
            for problem in Evaluate.plan_problems(config, key, node, None)]


def test_plan_reports_a_missing_gsm8k_file(tmp_path):
    missing = tmp_path / "gsm8k" / "test.jsonl"
    (problem,) = evaluate_problems(run_config(gsm8k_path=str(missing)))
    assert problem.startswith(f"evaluation.gsm8k_path={missing}:") and "does not exist" in problem


def test_plan_reports_a_malformed_gsm8k_line_with_file_and_line(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", GSM8K_LINES[:2] + [{"question": "q", "answer": "no number"}])
    (problem,) = evaluate_problems(run_config(gsm8k_path=str(path)))
    assert f"{path}:3:" in problem


def test_plan_accepts_a_good_config_and_checks_only_evaluate_stages(tmp_path):
    good = write_gsm8k(tmp_path / "test.jsonl")
    assert evaluate_problems(run_config(gsm8k_path=str(good))) == []
    no_evaluation = run_config(stages=["technique"], gsm8k_path=str(tmp_path / "absent.jsonl"), tasks=["nope"])
    assert evaluate_problems(no_evaluation) == []


def test_plan_checks_task_names_and_numbers():
    problems = evaluate_problems(run_config(tasks=["multiple_choice", "nope", "gsm8k"], limit=0))
    unknown = [p for p in problems if "evaluation.tasks[1]='nope' is not a task" in p]
    assert len(unknown) == 1 and "Give an embedded task (multiple_choice, free_answer" in unknown[0]
    assert any("evaluation.gsm8k_path is unset" in p for p in problems)
    assert any("evaluation.limit=0 must be at least 1" in p for p in problems)


def test_plan_for_technique_evaluate_needs_a_model(tmp_path):
    technique = OmegaConf.structured(EvaluateConfig(gsm8k_path=str(tmp_path / "absent.jsonl")))
    problems = evaluate_problems(run_config(stages=["technique"], technique=technique))
    assert any(p.startswith("technique: nothing to evaluate") and "model.path=" in p for p in problems)
    assert any(p.startswith("technique.gsm8k_path=") for p in problems)
    with_model = run_config(stages=["technique"], technique=OmegaConf.structured(EvaluateConfig), model_path="/ckpt")
    assert evaluate_problems(with_model) == []


# -- a whole run -----------------------------------------------------------------------------


def stage_context(tmp_path, name, model, tokenizer, **cfg):
    data = {"seed": 0, "num_people": 30, "heldout_documents": 200}
    config = OmegaConf.create({"model": {"path": None}, "data": data, "hardware": {"name": "cpu", "accelerator": "cpu"}})
    artifact = ModelArtifact(model, tokenizer) if model is not None else None
    stage = OmegaConf.structured(EvaluateConfig(**cfg))
    return StageContext(config, stage, tmp_path / name, artifact, tracker=None, stage_name="evaluation")


def test_run_writes_predictions_and_returns_every_metric_deterministically(tmp_path, model, tokenizer, capsys):
    gsm8k = str(write_gsm8k(tmp_path / "gsm8k.jsonl"))
    model.train()
    settings = dict(limit=8, batch_size=5, max_new_tokens=16, gsm8k_path=gsm8k)
    first = Evaluate().run(stage_context(tmp_path, "a", model, tokenizer, **settings))
    assert model.training  # the model's mode is left as it was found
    second = Evaluate().run(stage_context(tmp_path, "b", model, tokenizer, **settings))
    model.eval()

    counts = {"multiple_choice": 8, "free_answer": 8, "word_problems": 8, "perplexity": 8, "gsm8k": 3}
    for task, count in counts.items():
        assert first.metrics[f"{task}_n"] == count
        lines = (tmp_path / "a" / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == count and lines == (tmp_path / "b" / f"{task}.jsonl").read_text().splitlines()
        assert first.artifacts[task] == str(tmp_path / "a" / f"{task}.jsonl")
    row = json.loads((tmp_path / "a" / "gsm8k.jsonl").read_text().splitlines()[2])
    assert {"prompt", "expected", "predicted", "correct"} <= set(row) and row["expected"] == -5

    for key in ("mc_cloze_acc", "mc_cloze_acc_norm", "mc_letter_acc", "free_answer_em", "word_problem_em", "gsm8k_em"):
        assert 0.0 <= first.metrics[key] <= 1.0
    assert math.isfinite(first.metrics["perplexity"]) and first.metrics["perplexity"] > 1.0
    measured = {"eval_peak_memory_mb"}  # of the machine, not of the model
    assert {k: v for k, v in first.metrics.items() if k not in measured} == {
        k: v for k, v in second.metrics.items() if k not in measured}
    assert first.metrics["eval_peak_memory_mb"] >= 0
    assert first.model is None
    assert "multiple_choice" in capsys.readouterr().err  # rich progress goes to stderr


def test_run_without_a_model_says_what_to_set(tmp_path):
    with pytest.raises(UserError, match="nothing to evaluate.*model.path="):
        Evaluate().run(stage_context(tmp_path, "x", None, None))


def test_run_rejects_unknown_tasks(tmp_path, model, tokenizer):
    with pytest.raises(UserError, match=r"evaluation.tasks\[0\]='nope' is not a task.*Give an embedded task"):
        Evaluate().run(stage_context(tmp_path, "x", model, tokenizer, tasks=["nope"]))


def test_composed_config_selects_evaluate(tmp_path):
    from llmexp.configuration.compose import compose_config

    cfg = compose_config(["technique=evaluate", "technique.limit=5", f"evaluation.gsm8k_path={tmp_path / 'absent'}"])
    assert cfg.technique.name == "evaluate" and cfg.technique.limit == 5 and list(cfg.technique.tasks) == EMBEDDED_TASKS
    assert cfg.evaluation.gsm8k_path == str(tmp_path / "absent")
    problems = evaluate_problems(cfg)
    assert not any("nothing to evaluate" in p for p in problems)  # on the embedded world it scores the baseline
    assert any(p.startswith(f"evaluation.gsm8k_path={tmp_path / 'absent'}:") for p in problems)
    without_baseline = evaluate_problems(compose_config(["technique=evaluate", "model.baseline=null"]))
    assert any(p.startswith("technique: nothing to evaluate") for p in without_baseline)


# -- a task type from another package ---------------------------------------------------------


def _answer_likelihood(spec, inputs, scorer):
    """Log-likelihood of one fixed answer after each free-answer question: a third party's own measure."""
    prompts = [item.prompt for item in inputs.first(inputs.world.free_answer_test())]
    scores = scorer.loglikelihood([(prompt, f" {spec['answer']}") for prompt in prompts])
    rows = [{"prompt": prompt, "logprob": score.logprob} for prompt, score in zip(prompts, scores)]
    return TaskResult({"mean_logprob": sum(row["logprob"] for row in rows) / len(rows)}, rows)


def _answer_problems(spec, field):
    answer = spec.get("answer")
    return [] if isinstance(answer, str) and answer else [f"{field}.answer={answer!r}: give the answer to score."]


class AnswerLikelihoodPlugin:
    """Registered through the real hook, as a third-party package's entry point would be."""

    @hookimpl
    def llmexp_evaluation_tasks(self):
        return [TaskType("answer_likelihood", _answer_likelihood, _answer_problems, keys=("answer",))]


@pytest.fixture
def answer_likelihood_plugin():
    plugin = AnswerLikelihoodPlugin()
    plugin_manager.plugin_manager().register(plugin)
    registry.task_types.cache_clear()
    yield plugin
    plugin_manager.plugin_manager().unregister(plugin)
    registry.task_types.cache_clear()


def test_a_task_type_from_a_plugin_is_checked_and_scored_by_an_evaluate_stage(
    answer_likelihood_plugin, tmp_path, model, tokenizer, world
):
    spec = {"type": "answer_likelihood", "name": "says_red", "answer": "red"}
    problems = evaluate_problems(run_config(tasks=["perplexity", {**spec, "answer": ""}]))
    assert problems == ["evaluation.tasks[1].answer='': give the answer to score."]

    result = Evaluate().run(stage_context(tmp_path, "a", model, tokenizer, limit=3, tasks=["perplexity", spec]))
    prompts = [item.prompt for item in world.free_answer_test()[:3]]
    expected = [score.logprob for score in Scorer(model, tokenizer).loglikelihood([(p, " red") for p in prompts])]
    assert result.metrics["says_red_n"] == 3 and result.metrics["perplexity_n"] == 3
    assert result.metrics["says_red_mean_logprob"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "a" / "says_red.jsonl").read_text().splitlines()]
    assert [row["logprob"] for row in rows] == pytest.approx(expected, abs=1e-5)


def test_a_task_type_is_known_only_while_its_plugin_is_registered():
    (problem,) = evaluate_problems(run_config(tasks=[{"type": "answer_likelihood", "answer": "red"}]))
    assert problem.startswith("evaluation.tasks[0].type='answer_likelihood' is not a task type. Known types: mmlu")


def test_two_plugins_registering_one_task_type_name_are_refused_naming_both(answer_likelihood_plugin):
    class Again:
        @hookimpl
        def llmexp_evaluation_tasks(self):
            return [TaskType("answer_likelihood", _answer_likelihood)]

    plugin_manager.plugin_manager().register(Again(), name="second_answer_likelihood")
    registry.task_types.cache_clear()
    try:
        with pytest.raises(UserError, match="Two plugins register the evaluation task type 'answer_likelihood': .* and "
                                            "second_answer_likelihood. Uninstall one of them"):
            registry.task_types()
    finally:
        plugin_manager.plugin_manager().unregister(name="second_answer_likelihood")
