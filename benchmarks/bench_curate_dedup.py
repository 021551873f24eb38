"""The curate stage's deduplication against exact Jaccard similarity computed by brute force.

Run from the repository (nothing is written into it)::

    OMP_NUM_THREADS=1 python benchmarks/bench_curate_dedup.py            # ~3,000 documents
    OMP_NUM_THREADS=1 python benchmarks/bench_curate_dedup.py --bases 3000 --pairs-per-level 200

The corpus
----------
``--bases`` random documents (200-600 words from a 20,000-word vocabulary, so unrelated
documents share no 5-word shingle), then for each planted Jaccard level a near-duplicate of
``--pairs-per-level`` further bases, made by replacing random words one at a time while the
pair's Jaccard similarity stays at or above the level, and ``--copies`` exact copies of bases
that differ only in case, spacing and punctuation. Every document comes from its own base, so
each planted pair is its own cluster. All documents are shuffled.

The truth, by brute force
-------------------------
Exact Jaccard similarity of the 5-word shingle sets (the same shingles the sketches see) of
*every* pair of documents sharing at least one shingle, found through an inverted index
(pairs sharing none have Jaccard 0). Exact copies: the planted copies.

What is measured
----------------
* exact dedup (``exact_key``): precision and recall of the removed copies (target 1 and 1);
* fuzzy dedup (``signature`` -> ``band_keys`` -> buckets -> ``duplicate_pairs`` ->
  ``connected_components_survivors``) with datatrove's defaults, 14 bands x 8 rows: recall of
  the true pairs at Jaccard >= 0.85 and >= 0.9 (targets 0.92 and 0.98), the removed documents
  whose most similar document has Jaccard <= 0.5 (target 0), and recall per similarity band
  beside the LSH curve 1 - (1 - s^8)^14;
* documents/s of each, in one process and in 2 processes (signatures are independent per
  document; the bucket grouping and components run once);
* the same with candidate pairs checked on their signatures (estimated Jaccard >= 0.7, >= 0.8):
  the LSH curve alone merges 5% of pairs at Jaccard 0.5 and 1% at 0.4, the check removes that tail;
* datatrove's MinHash dedup (signature, buckets, cluster, filter; its defaults) on the same
  documents when it can be imported: documents/s, the same accuracy table, and the planted pairs
  only one of the two merged. Its English word tokenizer downloads NLTK data, so it gets a
  whitespace one (the documents are plain lowercase words); it needs xxhash < 4, so install it
  beside the environment rather than into it::

      pip install --target /tmp/dtlib --no-deps datatrove loguru humanize "xxhash<4"
      OMP_NUM_THREADS=1 PYTHONPATH=/tmp/dtlib python benchmarks/bench_curate_dedup.py

Exit status 1 if exact dedup is not exact, or a checked run removes a document with no partner
above Jaccard 0.5.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from importlib.metadata import version
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import OtherLoad, describe

from llmexp.plugins.curate.rules.minhash import (
    FuzzySettings,
    band_keys,
    connected_components_survivors,
    duplicate_pairs,
    estimated_jaccard,
    lsh_probability,
    shingles,
    signature,
)
from llmexp.plugins.curate.rules.normalisation import Normalisation, exact_key

LEVELS = (0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975)
REPORT_BANDS = ((0.2, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01))
CHECKS = (None, 0.7, 0.8)  # no check (datatrove), then candidate pairs checked on their signatures
SETTINGS = FuzzySettings()  # 112 permutations, 14 bands x 8 rows, 5-word shingles


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def near_duplicate(words: list[str], level: float, vocab: list[str], rng: random.Random) -> list[str]:
    """The document with random words replaced, one at a time (at least one), while its Jaccard
    similarity to the original stays >= level."""
    original = shingles(" ".join(words), SETTINGS)
    positions = rng.sample(range(len(words)), len(words))
    edited = list(words)
    edited[positions[0]] = f"{words[positions[0]]}x"
    for position in positions[1:]:
        trial = list(edited)
        trial[position] = rng.choice(vocab)
        if jaccard(original, shingles(" ".join(trial), SETTINGS)) < level:
            break
        edited = trial
    return edited


def surface_variant(text: str, rng: random.Random) -> str:
    """The same text after normalisation: other case, spacing and punctuation."""
    words = [w.upper() if rng.random() < 0.3 else w for w in text.split(" ")]
    return "  ".join(words).replace("  ", ", ", 3).replace("  ", "\n", 2) + "!"


def build_corpus(args) -> tuple[list[str], list[tuple[int, int]]]:
    """The shuffled documents and the (base, copy) index pairs of the planted exact copies."""
    rng = random.Random(args.seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(20_000)]
    bases = [[rng.choice(vocab) for _ in range(rng.randint(200, 600))] for _ in range(args.bases)]
    docs = [(" ".join(words), base) for base, words in enumerate(bases)]
    donors = iter(rng.sample(range(args.bases), args.bases))
    for level in LEVELS:
        for _ in range(args.pairs_per_level):
            docs.append((" ".join(near_duplicate(bases[next(donors)], level, vocab, rng)), None))
    for _ in range(args.copies):
        base = next(donors)
        docs.append((surface_variant(" ".join(bases[base]), rng), base))
    rng.shuffle(docs)
    where = {base: i for i, (text, base) in enumerate(docs) if base is not None and text == " ".join(bases[base])}
    copies = [(where[base], i) for i, (text, base) in enumerate(docs) if base is not None and where[base] != i]
    return [text for text, _ in docs], copies


def true_pairs(docs: list[str]) -> dict[tuple[int, int], float]:
    """Exact Jaccard similarity of every pair of documents sharing a shingle."""
    sets = [shingles(d, SETTINGS) for d in docs]
    index: dict[bytes, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for shingle in s:
            index[shingle].append(i)
    candidates = {(a, b) for ids in index.values() for k, a in enumerate(ids) for b in ids[k + 1 :]}
    return {(a, b): jaccard(sets[a], sets[b]) for a, b in candidates}


def sketch(docs: list[str]) -> list[tuple[np.ndarray, list[bytes]]]:
    return [(sig, band_keys(sig, SETTINGS)) for sig in (signature(d, SETTINGS) for d in docs)]


def fuzzy_removed(docs: list[str], processes: int, check: float | None) -> tuple[set[int], float]:
    """The documents fuzzy dedup removes, and the seconds it took. With `check`, a candidate pair
    counts only when its signatures' estimated Jaccard similarity reaches it."""
    start = time.perf_counter()
    if processes == 1:
        sketches = sketch(docs)
    else:
        chunks = [docs[i : i + 250] for i in range(0, len(docs), 250)]
        with Pool(processes) as pool:
            sketches = [k for part in pool.map(sketch, chunks) for k in part]
    buckets: dict[bytes, list[int]] = defaultdict(list)
    for i, (_, keys) in enumerate(sketches):
        for key in keys:
            buckets[key].append(i)
    pairs = duplicate_pairs(buckets.values())
    if check is not None:
        pairs = (p for p in pairs if estimated_jaccard(sketches[p[0]][0], sketches[p[1]][0]) >= check)
    removed = connected_components_survivors(len(docs), pairs)
    return removed, time.perf_counter() - start


def exact_removed(docs: list[str]) -> tuple[set[int], float]:
    start = time.perf_counter()
    first: dict[bytes, int] = {}
    removed = set()
    for i, d in enumerate(docs):
        key = exact_key(d, Normalisation())
        if key in first:
            removed.add(i)
        else:
            first[key] = i
    return removed, time.perf_counter() - start


def datatrove_removed(docs: list[str]) -> tuple[set[int], float]:
    """The documents datatrove's MinHash dedup removes (its four stages, defaults, one process),
    and the seconds it took. Words are split on whitespace: datatrove's English word tokenizer is
    NLTK's punkt, whose data it downloads."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError("MinHash dedup splits words only")

    config = MinhashConfig()
    documents = [Document(text=d, id=str(i)) for i, d in enumerate(docs)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        MinhashDedupSignature(f"{work}/sigs", config, language=Whitespace()).run(iter(documents), 0, 1)
        for bucket in range(config.num_buckets):
            MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config).run(None, bucket, config.num_buckets)
        MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config).run(None, 0, 1)
        kept = {int(d.id) for d in MinhashDedupFilter(f"{work}/remove").run(iter(documents), 0, 1)}
    return set(range(len(docs))) - kept, time.perf_counter() - start


def report_fuzzy(truth: dict[tuple[int, int], float], removed: set[int]) -> bool:
    """Prints recall per similarity band and against the targets; whether no document was removed
    without a partner above Jaccard 0.5."""
    # Every document is in at most one pair of Jaccard >= 0.2 (the planted ones; unrelated documents
    # share a shingle or two at most), so such a pair was merged when one of its two was removed.
    similar = [i for (a, b), j in truth.items() if j >= 0.2 for i in (a, b)]
    assert len(similar) == len(set(similar)), "a document is similar to two others"

    def merged(pairs: list[tuple[int, int]]) -> int:
        return sum(a in removed or b in removed for a, b in pairs)

    print(f"{'true Jaccard':>14} {'pairs':>6} {'merged':>7} {'recall':>7} {'LSH curve':>10}")
    for low, high in REPORT_BANDS:
        in_band = [p for p, j in truth.items() if low <= j < high]
        expected = sum(lsh_probability(truth[p], SETTINGS) for p in in_band) / max(len(in_band), 1)
        print(f"{f'[{low:.2f}, {min(high, 1.0):.2f})':>14} {len(in_band):>6} {merged(in_band):>7} "
              f"{merged(in_band) / max(len(in_band), 1):>7.3f} {expected:>10.3f}")
    for level, target in ((0.85, 0.92), (0.9, 0.98)):
        pairs = [p for p, j in truth.items() if j >= level]
        got = merged(pairs) / len(pairs)
        print(f"recall at Jaccard >= {level}: {got:.3f} over {len(pairs)} pairs (target {target}) "
              f"{'PASS' if got >= target else 'MISS'}")
    best: dict[int, float] = defaultdict(float)
    for (a, b), j in truth.items():
        best[a], best[b] = max(best[a], j), max(best[b], j)
    wrong = [i for i in removed if best[i] <= 0.5]
    print(f"removed documents whose most similar document has Jaccard <= 0.5: {len(wrong)} (target 0) "
          f"{'PASS' if not wrong else 'MISS'}")
    return not wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=int, default=2000, help="unrelated base documents")
    parser.add_argument("--pairs-per-level", type=int, default=60, help="near-duplicates planted per Jaccard level")
    parser.add_argument("--copies", type=int, default=150, help="exact copies (after normalisation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.bases < args.pairs_per_level * len(LEVELS) + args.copies:
        parser.error(f"--bases must be at least pairs-per-level x {len(LEVELS)} + copies")

    docs, copies = build_corpus(args)
    start = time.perf_counter()
    truth = true_pairs(docs)
    print(f"{len(docs)} documents; brute-force Jaccard of {len(truth)} pairs sharing a shingle "
          f"in {time.perf_counter() - start:.1f} s")
    print("LSH curve 1-(1-s^8)^14: " + ", ".join(f"{s}: {lsh_probability(s, SETTINGS):.4f}"
                                                for s in (0.3, 0.4, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)))

    exact, exact_s = exact_removed(docs)
    twins = {i for pair in copies for i in pair}
    precision = len(exact & twins) / max(len(exact), 1)
    recall = sum(a in exact or b in exact for a, b in copies) / len(copies)
    ok = precision == recall == 1.0
    print(f"\nexact dedup: removed {len(exact)} documents for {len(copies)} planted copies: precision "
          f"{precision:.3f}, recall {recall:.3f} (target 1, 1); {len(docs) / exact_s:,.0f} documents/s in one process")

    removed_by: dict[float | None, set[int]] = {}
    for check in CHECKS:
        load = OtherLoad().start()
        removed, one_s = fuzzy_removed(docs, 1, check)
        removed_2, two_s = fuzzy_removed(docs, 2, check)
        others = describe(load.cores())
        assert removed == removed_2, "the 2-process run removed other documents"
        how = "LSH candidates as they are" if check is None else f"candidates with estimated Jaccard >= {check}"
        print(f"\nfuzzy dedup, {SETTINGS.bands} bands x {SETTINGS.rows} rows, 5-word shingles, {how}: "
              f"removed {len(removed)}; {len(docs) / one_s:,.0f} documents/s in one process, {len(docs) / two_s:,.0f} "
              f"in 2 processes (2 cores; other processes kept {others} cores busy meanwhile)")
        clean = report_fuzzy(truth, removed)
        ok &= clean or check is None  # the bare LSH curve itself merges ~5% of pairs at 0.5
        removed_by[check] = removed

    os.environ["TQDM_DISABLE"] = "1"  # datatrove draws progress bars; tqdm reads this on import
    try:
        import datatrove.pipeline.dedup.minhash  # noqa: F401 (sets up its loguru handlers)
        from loguru import logger
    except ImportError:
        print("\ndatatrove is not installed: no side-by-side run (see the module docstring)")
        return 0 if ok else 1
    logger.remove()  # datatrove logs every stage through loguru
    theirs, their_s = datatrove_removed(docs)
    ours = removed_by[None]
    print(f"\ndatatrove {version('datatrove')} MinHash dedup, the same 14 x 8 and 5-word shingles, one process: "
          f"removed {len(theirs)}; {len(docs) / their_s:,.0f} documents/s (ours, no check: {len(ours)} removed)")
    report_fuzzy(truth, theirs)
    similar = [p for p, j in truth.items() if j >= 0.2]
    for name, one, other in (("ours", ours, theirs), ("datatrove", theirs, ours)):
        alone = sorted(truth[p] for p in similar if (p[0] in one or p[1] in one) and not (p[0] in other or p[1] in other))
        print(f"planted pairs merged by {name} only: {len(alone)}, {sum(j < 0.85 for j in alone)} of them at Jaccard "
              f"< 0.85 (on the slope of the LSH curve); at >= 0.85: {[round(j, 3) for j in alone if j >= 0.85]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
