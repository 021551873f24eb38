"""Documents/s of ``technique=curate``, local engine against Dask (a 2-worker LocalCluster), at 1x, 4x and 16x a base corpus.

    python benchmarks/bench_curate_scale.py                  # base corpus of 1000 documents
    python benchmarks/bench_curate_scale.py --base 250 --scales 1 4

Each scale is a generated JSONL corpus of that many times the base's documents, polluted in the same
shares at every scale (near-duplicates, exact copies, short pages, German pages, PII), so the work per
document stays the same and the table shows how the cost grows with size. Each point runs the real
command (``llmexp technique=curate``) once per engine in a fresh run directory; documents/s is
records in over the stage's wall time as results.json records it (Dask's includes starting its
cluster). The two engines' outputs are compared byte for byte at every scale.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

WORDS = ("the of and to that have with be is was for on at by from river mountain forest city people history music "
         "science language water light garden morning evening winter summer village teacher student doctor market "
         "bridge harbor country travel church school family friend animal weather island valley road station kitchen "
         "window letter story picture member office report season ocean field north south").split()
GERMAN = "Der Hund läuft schnell über die Straße und die Katze schläft im Garten bei der alten Mutter. "


def page(rng: random.Random) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(10))


def corpus(path: Path, documents: int, seed: int = 0) -> None:
    """``documents`` records: 75% clean pages, 10% near-duplicates, 5% exact copies, 5% short, 5% German; PII in
    one clean page in twenty."""
    rng = random.Random(seed)
    clean: List[str] = []
    with path.open("w", encoding="utf-8") as handle:
        for n in range(documents):
            roll = rng.random()
            if roll < 0.10 and clean:
                words = rng.choice(clean).split()
                for _ in range(2):
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                text = " ".join(words)
            elif roll < 0.15 and clean:
                text = rng.choice(clean)
            elif roll < 0.20:
                text = "Click here to read more."
            elif roll < 0.25:
                text = GERMAN * 6
            else:
                text = page(rng)
                clean.append(text)
                if rng.random() < 0.05:
                    text += f" Mail person{n}@example.com for details."
            handle.write(json.dumps({"id": f"doc-{n}", "text": text}) + "\n")


def curate(folder: Path, engine: str) -> Dict[str, float]:
    run = folder / f"run-{engine}"
    finished = subprocess.run(
        [sys.executable, "-m", "llmexp", "technique=curate", "data=text", f"data.paths=[{folder / 'corpus.jsonl'}]",
         f"technique.engine={engine}", "technique.dask.workers=2", f"hydra.run.dir={run}"],
        capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"llmexp technique=curate technique.engine={engine} failed:\n{finished.stderr[-3000:]}")
    stage = json.loads((run / "results.json").read_text())["stages"]["curate"]
    return {"records": stage["metrics"]["records_in"], "out": stage["metrics"]["records_out"],
            "seconds": stage["wall_time_s"], "docs_per_s": stage["metrics"]["records_in"] / stage["wall_time_s"]}


def outputs(folder: Path, engine: str) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / f"run-{engine}" / "curate" / "curated").iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=1000, help="documents of the 1x corpus")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as temporary:
        for scale in args.scales:
            folder = Path(temporary) / f"x{scale}"
            folder.mkdir()
            corpus(folder / "corpus.jsonl", args.base * scale)
            local, dask = curate(folder, "local"), curate(folder, "dask")
            rows.append((scale, local, dask, outputs(folder, "local") == outputs(folder, "dask")))
    first_local, first_dask = rows[0][1]["seconds"], rows[0][2]["seconds"]
    print(f"{'scale':>5} {'records':>8} {'kept':>7} {'local docs/s':>12} {'dask docs/s':>12} {'local s':>8} "
          f"{'dask s':>8} {'local cost x':>12} {'dask cost x':>11} {'same output':>11}")
    for scale, local, dask, same in rows:
        print(f"{scale:>4}x {local['records']:>8} {local['out']:>7} {local['docs_per_s']:>12,.0f} "
              f"{dask['docs_per_s']:>12,.0f} {local['seconds']:>8.1f} {dask['seconds']:>8.1f} "
              f"{local['seconds'] / first_local:>12.2f} {dask['seconds'] / first_dask:>11.2f} {str(same):>11}")
    if not all(same for *_, same in rows):
        sys.exit("the engines' outputs differ")


if __name__ == "__main__":
    main()
