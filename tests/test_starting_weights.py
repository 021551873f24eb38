"""Where a stage's starting weights come from: a preset's published weights through a local Hugging Face cache
(never the network), the embedded baseline trained once and reused, and the refusal when there are none."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from .conftest import REPO, read_results, run_llmexp

REPO_ID = "llmexp-test/tiny-llama"
MAIN_COMMIT = "a" * 40  # refs/main points here: a 2-layer checkpoint
PINNED_COMMIT = "b" * 40  # an older revision: a 1-layer checkpoint
FAST = ["pipeline=technique_only", "parallelism.micro_batch=8", "parallelism.global_batch=8", "data.seq_len=32"]

PUBLISHED = {
    "llama3_2_1b": "meta-llama/Llama-3.2-1B",
    "llama3_2_3b": "meta-llama/Llama-3.2-3B",
    "llama3_1_8b": "meta-llama/Llama-3.1-8B",
    "llama3_1_70b": "meta-llama/Llama-3.1-70B",
    "llama3_1_405b": "meta-llama/Llama-3.1-405B",
    "mistral_7b": "mistralai/Mistral-7B-v0.1",
    "qwen2_5_7b": "Qwen/Qwen2.5-7B",
}


def tiny_llama_checkpoint(path: Path, layers: int) -> Path:
    """A ``layers``-layer tiny Llama with the embedded tokenizer, saved as a release is (safetensors + tokenizer)."""
    import torch
    from omegaconf import OmegaConf

    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer
    from llmexp.models.loading import build_model, save_model

    torch.manual_seed(layers)
    model_cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    model_cfg.num_layers = layers
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    save_model(build_model(model_cfg, tokenizer), tokenizer, path)
    return path


def add_snapshot(cache: Path, repo: str, commit: str, checkpoint: Path) -> Path:
    """``checkpoint``'s files as huggingface_hub caches them: content-addressed blobs, and the snapshot of
    ``commit`` made of symlinks to them (models--org--name/blobs, snapshots/<commit>)."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    blobs, snapshot = storage / "blobs", storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding REPO_ID at two commits, main being MAIN_COMMIT."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub"
    for commit, layers in ((MAIN_COMMIT, 2), (PINNED_COMMIT, 1)):
        add_snapshot(cache, REPO_ID, commit, tiny_llama_checkpoint(root / f"layers{layers}", layers))
    refs = cache / f"models--{REPO_ID.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text(MAIN_COMMIT)
    return cache


def snapshot_of(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / commit


def offline(cache: Path, **more) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), **more}


def test_each_preset_names_its_base_models_repository_at_main():
    for name, repo in PUBLISHED.items():
        preset = yaml.safe_load((REPO / f"llmexp/conf/model/{name}.yaml").read_text())
        assert (preset["hub_repo"], preset.get("revision", "main")) == (repo, "main"), name
    assert "hub_repo" not in yaml.safe_load((REPO / "llmexp/conf/model/tiny_llama.yaml").read_text())


def test_published_weights_load_from_the_cache_offline_at_main_or_a_pinned_revision(tmp_path, hub_cache):
    """pretrain with max_steps=0 passes its starting model on as it is: the snapshot the revision names."""
    stages = {}
    for revision, commit, layers in (("main", MAIN_COMMIT, 2), (PINNED_COMMIT, PINNED_COMMIT, 1)):
        run = tmp_path / commit[:4]
        result = run_llmexp("technique=pretrain", "technique.max_steps=0", f"model.hub_repo={REPO_ID}",
                            f"model.revision={revision}", "pipeline=technique_only", f"hydra.run.dir={run}", cwd=tmp_path,
                            env=offline(hub_cache))
        assert result.returncode == 0, result.stderr[-3000:]
        stage = stages[commit] = read_results(run)["stages"]["pretrain"]
        assert stage["artifacts"]["model"] == str(snapshot_of(hub_cache, commit))
        assert stage["model_stats"]["layers"] == layers
    assert stages[MAIN_COMMIT]["model_stats"]["parameters"] > stages[PINNED_COMMIT]["model_stats"]["parameters"]


def test_lora_adapts_the_published_weights_and_the_plan_says_where_they_are(tmp_path, hub_cache):
    source = [f"model.hub_repo={REPO_ID}", f"model.revision={PINNED_COMMIT}"]
    plan = run_llmexp("plan", "--json", "technique=lora", *source, cwd=tmp_path, env=offline(hub_cache))
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    snapshot = snapshot_of(hub_cache, PINNED_COMMIT)
    weights = json.loads(plan.stdout)["config"]["weights"]
    assert weights == f"{REPO_ID}@{PINNED_COMMIT}, in the Hugging Face cache ({snapshot})"

    result = run_llmexp("technique=lora", *source, "technique.max_steps=2", "technique.rank=4",
                        "technique.target_modules=[q_proj]", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                        env=offline(hub_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_results(tmp_path / "run")["stages"]["lora"]["metrics"]
    adapter = 4 * (128 + 128)  # rank 4 on q_proj (128 -> 128) of the pinned revision's single layer
    assert metrics["trainable_parameters"] == adapter
    published = load_file(snapshot / "model.safetensors")
    assert metrics["total_parameters"] - adapter == sum(tensor.numel() for tensor in published.values())
    assert "downloading" not in result.stderr


def test_published_weights_offline_and_not_cached_are_refused_before_anything_runs(tmp_path):
    cache = tmp_path / "empty-cache"
    for command in ([], ["plan"]):
        result = run_llmexp(*command, "model=llama3_2_1b", "technique=lora", cwd=tmp_path, env=offline(cache))
        assert result.returncode == 2, result.stderr[-3000:]
        output = " ".join((result.stdout + result.stderr).split())
        assert (
            f"model.hub_repo=meta-llama/Llama-3.2-1B (revision main) is not in the Hugging Face cache ({cache}), and "
            "HF_HUB_OFFLINE=1 forbids downloading it. Download it where the network is reachable, into the same cache "
            "(`hf download meta-llama/Llama-3.2-1B --revision main`), or unset HF_HUB_OFFLINE; or set "
            "model.path=<a local checkpoint directory>."
        ) in output
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_adapting_a_model_without_weights_is_refused_naming_model_path(tmp_path):
    result = run_llmexp("model=llama3_2_1b", "model.hub_repo=null", "technique=lora", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert " ".join(result.stderr.split()).endswith(
        "technique: technique=lora adapts a base model and this run has none: model.path is unset, model=llama3_2_1b "
        "names no published weights (model.hub_repo). Set model.path=<a Hugging Face checkpoint directory> or "
        "model.hub_repo=<org/name>, or put a training stage before it in the pipeline (technique=pretrain, or "
        "pipeline=customize).")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("technique", ["lora", "sft", "dpo", "cpt", "prune"])
def test_every_technique_that_adapts_a_base_is_refused_without_one_at_plan_time(technique, tmp_path):
    result = run_llmexp("plan", "model=llama3_2_1b", "model.hub_repo=null", f"technique={technique}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:]
    assert (f"technique: technique={technique} adapts a base model and this run has none: model.path is unset"
            in " ".join(result.stdout.split()))


def test_lora_on_the_embedded_default_trains_the_baseline_once_then_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    small = ["technique=lora", "technique.max_steps=3", "technique.val_every=0", "model.baseline.max_steps=12",
             "model.baseline.warmup_steps=2", *FAST]
    env = {"LLMEXP_CACHE_DIR": str(cache)}

    first = run_llmexp(*small, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    (baseline,) = [path for path in (cache / "baselines").iterdir() if path.is_dir()]  # beside it: its lock file
    stderr = " ".join(first.stderr.split())
    assert (f"lora: no base model (model.path unset, no earlier stage made one), so the embedded baseline is trained "
            f"first (model.baseline: technique=pretrain, 12 steps) and cached at {baseline} for later runs") in stderr
    record = json.loads((baseline / "baseline.json").read_text())
    assert record["metrics"]["steps"] == 12 and record["config"]["technique"]["max_steps"] == 12
    assert not (baseline / "checkpoints").exists() and (baseline / "train_log.jsonl").is_file()
    weights = baseline / "model" / "model.safetensors"
    written = weights.stat().st_mtime_ns

    second = run_llmexp(*small, f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"lora: starting from the embedded baseline cached at {baseline}" in " ".join(second.stderr.split())
    assert "trained first" not in second.stderr
    assert weights.stat().st_mtime_ns == written  # read, not trained again
    assert json.loads((tmp_path / "second/results.json").read_text())["stages"]["lora"]["input_model"] == str(
        baseline / "model")
    # the same base and seed: the two runs' adapters are the same tensors
    adapters = [load_file(tmp_path / run / "lora/adapter/adapter_model.safetensors") for run in ("first", "second")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(adapters[0][name].equal(adapters[1][name]) for name in adapters[0])

    plan = run_llmexp("plan", "--json", *small, cwd=tmp_path, env=env)
    assert f"embedded baseline (cached at {baseline}," in json.loads(plan.stdout)["config"]["weights"]


class HubErrors(http.server.BaseHTTPRequestHandler):
    """The Hub's answers to a repository that is gated, one that does not exist, and a revision that does not exist:
    the status and ``X-Error-Code`` huggingface_hub reads them by."""

    ANSWERS = {"gated-org/model": (403, "GatedRepo"), "missing-org/model": (404, "RepoNotFound"),
               f"{REPO_ID}/revision/v9": (404, "RevisionNotFound")}

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, code = next((answer for key, answer in self.ANSWERS.items() if key in self.path), (500, "Unexpected"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_download_failures_name_the_repository_the_revision_and_the_fix(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub = f"http://127.0.0.1:{server.server_port}"
    token = "hf_test_token_never_printed"
    cases = [
        ("gated-org/model", "main", {"HF_TOKEN": token},
         f"model.hub_repo=gated-org/model is gated and the token in use (HF_TOKEN) has no access to it. Accept its "
         f"license at {hub}/gated-org/model and set HF_TOKEN to a read token of that account, or set "
         "model.path=<a local checkpoint directory>."),
        ("missing-org/model", "main", {},
         "model.hub_repo=missing-org/model (revision main) is not on the Hugging Face Hub, or it is private and "
         "HF_TOKEN is unset. Check the repository id, set HF_TOKEN, or set model.path=<a local checkpoint directory>."),
        (REPO_ID, "v9", {},
         f"model.hub_repo={REPO_ID} has no revision v9; set model.revision to one of its branches, tags or commit "
         "hashes, or set model.path=<a local checkpoint directory>."),
    ]
    try:
        for repo, revision, more, message in cases:
            result = run_llmexp("technique=pretrain", "technique.max_steps=0", "pipeline=technique_only", f"model.hub_repo={repo}",
                                f"model.revision={revision}", cwd=tmp_path, env={
                                    "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"),
                                    "HF_HUB_CACHE": str(tmp_path / "hf/hub"), **more})
            assert result.returncode == 2, result.stderr[-3000:]
            assert message in " ".join(result.stderr.split()) and token not in result.stderr + result.stdout
    finally:
        server.shutdown()
        server.server_close()
    unreachable = run_llmexp("technique=pretrain", "technique.max_steps=0", "pipeline=technique_only",
                             f"model.hub_repo={REPO_ID}", cwd=tmp_path, env={
                                 "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HUB_CACHE": str(tmp_path / "hf/hub")})
    assert unreachable.returncode == 2, unreachable.stderr[-3000:]
    assert (f"model.hub_repo={REPO_ID} (revision main) could not be downloaded: the Hugging Face Hub was not reachable "
            in " ".join(unreachable.stderr.split()))
    assert f"(`hf download {REPO_ID} --revision main`), or set model.path=<a local checkpoint directory>." in " ".join(
        unreachable.stderr.split())


def test_a_repository_id_that_cannot_be_one_is_refused_by_the_plan(capsys):
    from llmexp.cli import plan as plan_command
    assert plan_command.main(["model.hub_repo=not a repo", "technique=lora"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "weights: not a repo@main, which is not a repository id" in out
    assert "- model.hub_repo=not a repo is not a Hugging Face repository id (HFValidationError: " in out
    assert out.endswith("write it as org/name (meta-llama/Llama-3.2-1B), or set model.path=<a local checkpoint "
                        "directory>.")


PRESET = ["model=llama3_2_1b", f"model.hub_repo={REPO_ID}"]  # a preset by name, its repository on the local fake hub


class RecordingHub(http.server.BaseHTTPRequestHandler):
    """A Hub that answers nothing and remembers every path asked of it."""

    asked: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.asked.append(self.path)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_stages_that_read_a_model_plan_clean_on_a_presets_cached_weights_without_the_network(tmp_path, hub_cache):
    """quantize, evaluate, export and benchmark find the preset's weights in the cache; the plan asks the Hub nothing
    (HF_HUB_OFFLINE off, the Hub a server that records what it is asked)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(hub_cache), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    snapshot = snapshot_of(hub_cache, MAIN_COMMIT)
    try:
        for technique in ("quantize", "evaluate", "export", "benchmark"):
            plan = run_llmexp("plan", "--json", f"technique={technique}", *PRESET, cwd=tmp_path, env=env)
            assert plan.returncode == 0, technique + plan.stdout[-3000:] + plan.stderr[-3000:]
            planned = json.loads(plan.stdout)
            assert planned["problems"] == [], technique
            assert planned["config"]["weights"] == f"{REPO_ID}@main, in the Hugging Face cache ({snapshot})"
        # a check that reads the weights' files reads the cached snapshot's: its tokenizer counts the calibration text
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(" ".join(["the"] * 95))  # BOS, 95 words, EOS: 97 tokens, 3 blocks of 32
        plan = run_llmexp("plan", "--json", "technique=quantize", "pipeline=technique_only", *PRESET, "data=text",
                          f"data.paths=[{corpus}]", "data.seq_len=32", "technique.calibration_size=10", cwd=tmp_path,
                          env=env)
        assert json.loads(plan.stdout)["problems"] == [
            "technique.calibration_size=10 asks for more calibration sequences than data.paths holds: 3 of "
            "data.seq_len=32 tokens. Set technique.calibration_size=3 or less, or add text."]
    finally:
        server.shutdown()
        server.server_close()
    assert RecordingHub.asked == []


COMPRESS_PUBLISHED = """\
defaults:
  - /technique@nodes.base_eval: evaluate
  - /technique@nodes.fp8: quantize
  - /technique@nodes.fp8_eval: evaluate
  - _self_
name: published
stages: [base_eval, fp8, fp8_eval]
nodes:
  base_eval: {tasks: [multiple_choice, perplexity], limit: 8}
  fp8: {format: fp8, calibration_size: 8}
  fp8_eval: {tasks: [multiple_choice, perplexity], limit: 8, baseline: base_eval}
"""


def test_evaluate_and_quantize_run_from_the_cached_snapshot_and_results_name_it(tmp_path, hub_cache):
    """The preset's weights evaluated, quantized and the quantized model compared with them (KL to the baseline
    reloads them): every stage starts from the snapshot, and results.json and the comparison say which."""
    (tmp_path / "conf/pipeline").mkdir(parents=True)
    (tmp_path / "conf/pipeline/published.yaml").write_text(COMPRESS_PUBLISHED)
    run = tmp_path / "run"
    result = run_llmexp(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "pipeline=published", *PRESET,
                        "data.seq_len=32", f"hydra.run.dir={run}", cwd=tmp_path, env=offline(hub_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_results(run)
    stages = results["stages"]
    source = f"{REPO_ID}@main"
    assert [stages[name]["input_model"] for name in ("base_eval", "fp8", "fp8_eval")] == [source, source, "fp8"]
    published = load_file(snapshot_of(hub_cache, MAIN_COMMIT) / "model.safetensors")
    assert stages["fp8"]["model_stats"]["layers"] == 2  # the snapshot's, not the preset's 16
    assert stages["fp8"]["model_stats"]["parameters"] == sum(tensor.numel() for tensor in published.values())
    assert 0 <= stages["fp8_eval"]["metrics"]["kl_to_baseline"] < 0.1
    rows = {row["stage"]: row for row in results["comparison"]}
    assert (rows["base_eval"]["made_by"], rows["fp8_eval"]["made_by"]) == (source, "quantize")
    assert "downloading" not in result.stderr


def test_export_places_the_cached_snapshot_as_the_checkpoint(tmp_path, hub_cache):
    run = tmp_path / "run"
    result = run_llmexp("technique=export", "pipeline=technique_only", *PRESET, f"hydra.run.dir={run}", cwd=tmp_path,
                        env=offline(hub_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    stage = read_results(run)["stages"]["export"]
    assert stage["input_model"] == f"{REPO_ID}@main"
    assert json.loads((run / "export/export.json").read_text())["hf_from"] == "saved model"
    snapshot, exported = snapshot_of(hub_cache, MAIN_COMMIT), run / "export/hf"
    assert sorted(path.name for path in exported.iterdir()) == sorted(path.name for path in snapshot.iterdir())
    for path in exported.iterdir():  # the cache's files themselves, not its links to them (which would dangle here)
        assert not path.is_symlink() and path.read_bytes() == (snapshot / path.name).read_bytes(), path.name
    assert stage["metrics"]["checkpoint_bytes"] == sum((snapshot / path.name).stat().st_size for path in exported.iterdir())


def test_an_evaluation_with_no_model_before_it_scores_the_embedded_baseline(tmp_path):
    env = {"LLMEXP_CACHE_DIR": str(tmp_path / "cache")}
    small = ["data=word_problems", "model.baseline.max_steps=12", "model.baseline.warmup_steps=2",
             "technique=evaluate", "technique.tasks=[word_problems]", "technique.limit=6", *FAST]
    result = run_llmexp(*small, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (baseline,) = [path for path in (tmp_path / "cache" / "baselines").iterdir() if path.is_dir()]
    stage = json.loads((tmp_path / "run/results.json").read_text())["stages"]["evaluate"]
    assert stage["input_model"] == str(baseline / "model") and stage["metrics"]["word_problems_n"] == 6
    assert 0 <= stage["metrics"]["word_problem_em"] <= 1
