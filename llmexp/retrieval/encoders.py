"""The encoders dense retrieval embeds with: a saved sentence-transformers directory, or the embedded encoder.

``retriever.encoder`` (and ``technique.encoder`` of ``technique=embed``) names a directory that
``SentenceTransformer(path)`` loads, the name of a pipeline stage that saved one (``technique=embed``'s
``<stage dir>/encoder``: ``resolved_encoder_config`` swaps the name for that directory), or nothing: the
embedded encoder. Nothing is downloaded: a directory is loaded with ``local_files_only``.

The embedded encoder is a BERT-style transformer small enough to train in seconds on one CPU core
(``EMBEDDED_SHAPE``), whose tokenizer has one token per word of the embedded world
(``llmexp.data.tokenizer``), with mean pooling. It is trained contrastively
(``MultipleNegativesRankingLoss``: each question against its biography, the batch's other
biographies as negatives) on every fact asked with the training question templates, never the
held-out template the evaluation asks, so its scores on those questions measure generalisation.
It is a pure function of the world and ``EMBEDDED_TRAINING``, trained on one CPU thread (its
matrices are too small for threads or a GPU to pay, and its weights then do not depend on how many
cores a machine has), once: it is cached in ``${LLMEXP_CACHE_DIR:-~/.cache/llmexp}/encoders/<fingerprint>/``,
built beside it and renamed into place under a file lock, so a second process waits for it and loads it.

This module imports neither torch nor sentence-transformers until an encoder is built or loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from omegaconf import OmegaConf, open_dict

from llmexp.atomic import replace_atomically
from llmexp.configuration.pipeline import stage_name, stage_nodes
from llmexp.data.embedded import QUESTIONS, TRAIN_TEMPLATES, EmbeddedWorld, build_world
from llmexp.display import console
from llmexp.errors import UserError
from llmexp.retrieval.dense import embed
from llmexp.retrieval.metrics import retrieval_metrics
from llmexp.results.record import read_results
from llmexp.techniques.contract import Consumed, Reads

FIELD = "retriever.encoder"
ARTIFACT = "encoder"  # what technique=embed records: <stage dir>/encoder, a SentenceTransformer directory
TECHNIQUE = "embed"  # the technique whose stages save one
CACHE_ENV = "LLMEXP_CACHE_DIR"
RECORD = "encoder.json"  # in a cached encoder: what it was trained on, with what, and how it scores
FORMAT = 1  # bump when the embedded encoder's recipe changes in a way its settings do not show
SAVED_MARKER = "modules.json"  # what SentenceTransformer.save writes and SentenceTransformer(path) reads

Pair = Tuple[str, ...]  # (query, positive) or (query, positive, hard negative)


@dataclass(frozen=True)
class EncoderShape:
    """The embedded encoder's transformer (BERT's layout)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    intermediate: int = 128
    max_positions: int = 128  # a biography is about 35 words, a question about 8


@dataclass
class EncoderTraining:
    """Contrastive training with in-batch negatives (``MultipleNegativesRankingLoss``) through
    sentence-transformers' trainer; ``technique=embed``'s schema has these settings.

    A batch never holds the same text twice (sentence-transformers' no-duplicates sampler), so no
    question is pushed away from its own document as another question's negative. ``scale`` is the
    inverse temperature of the cosine similarities (20, the library's default). ``max_steps`` > 0
    overrides ``epochs``.
    """

    epochs: float = 5.0
    max_steps: int = 0
    lr: float = 1e-3
    batch_size: int = 16  # pairs per step: each query's negatives are the batch's other positives (and negatives)
    warmup_steps: int = 10
    weight_decay: float = 0.01
    scale: float = 20.0
    log_every: int = 10  # steps between rows of train_log.jsonl


EMBEDDED_SHAPE = EncoderShape()
# 450 pairs of the default world; 3, 5 and 10 epochs all rank the held-out questions' biography first 98-100% of the
# time (from 45% untrained); 5 take about 4 s on one core
EMBEDDED_TRAINING = EncoderTraining()


# -- loading ------------------------------------------------------------------------------------------------

def load_encoder(spec: Optional[str], cfg, field: str = FIELD):
    """The ``SentenceTransformer`` that ``spec`` names: a saved directory, or None for the embedded encoder of
    ``cfg.data``'s world (trained and cached on first use). A stage name must be resolved to its directory
    first (``resolved_encoder_config``). A bad directory is a ``UserError`` naming ``field``."""
    if spec is None:
        return embedded_encoder(cfg)
    problem = directory_problem(spec, field)
    if problem:
        raise UserError(problem)
    return _load(Path(spec))


def directory_problem(spec: str, field: str = FIELD) -> Optional[str]:
    """Why ``spec`` is not a saved SentenceTransformer directory, or None. Pure Python: plan checks call it."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        return (f"{field}={spec}: no such directory{where}. Give the directory of a saved sentence-transformers "
                "model (what SentenceTransformer.save and technique=embed write), the name of an earlier "
                "technique=embed stage of this pipeline, or leave it unset for the embedded encoder.")
    if not (path / SAVED_MARKER).is_file():
        return (f"{field}={spec} is a directory without {SAVED_MARKER}, so not a saved sentence-transformers model. "
                "Give a directory SentenceTransformer.save wrote (technique=embed saves <stage dir>/encoder), or "
                "leave it unset for the embedded encoder.")
    return None


def _load(path: Path):
    return _sentence_transformers().SentenceTransformer(str(path), local_files_only=True)


def _sentence_transformers():
    """The sentence_transformers module, its logger held to warnings: its INFO notes (the device it picked, each load
    and save) are for its developers, and a run's log shows INFO."""
    import sentence_transformers

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    return sentence_transformers


# -- pipeline stages ----------------------------------------------------------------------------------------

def encoder_stage(config, spec: Optional[str]) -> Optional[str]:
    """The stage of ``config``'s pipeline that ``spec`` names (its run name: a ``pipeline.nodes`` key, or a top-level
    stage's technique name), or None: ``spec`` is a directory or unset. Pure Python."""
    if not spec:
        return None
    names = [stage_name(key, node) for key, node in stage_nodes(config, strict=False)]
    return spec if spec in names else None


def encoder_consumed(config, spec: Optional[str], field: str = FIELD) -> Tuple[Consumed, ...]:
    """For ``Technique.consumes`` of a stage that embeds with ``spec``: the technique=embed stage it names, which the
    plan then checks runs before it. Pure Python."""
    stage = encoder_stage(config, spec)
    if stage is None:
        return ()
    return (Consumed(field, stage, Reads.RESULTS, technique=TECHNIQUE,
                     fix=", or give a saved sentence-transformers directory"),)


def encoder_problems(config, spec: Optional[str], field: str = FIELD) -> List[str]:
    """What is wrong with ``spec`` at plan time: a directory that is not a saved encoder. A stage name is checked by
    the plan's data flow (``encoder_consumed``). Pure Python."""
    if spec is None or encoder_stage(config, spec) is not None:
        return []
    problem = directory_problem(spec, field)
    return [problem] if problem else []


def resolve_encoder(spec: Optional[str], stages: Mapping[str, Mapping[str, Any]], field: str = FIELD) -> Optional[str]:
    """``spec`` with a stage name replaced by the encoder directory that stage recorded.

    ``stages`` are the records of the run's stages by name: a stage's ``StageContext.earlier``, or
    ``stage_records(run_dir)`` for a finished run. A directory or None is returned as it is.
    """
    if spec is None or spec not in stages:
        return spec
    directory = (stages[spec].get("artifacts") or {}).get(ARTIFACT)
    if not directory:
        raise UserError(f"{field}={spec} names a stage that recorded no {ARTIFACT!r} artifact (it ran "
                        f"technique={stages[spec].get('technique')}); name a technique={TECHNIQUE} stage, or give "
                        "a saved sentence-transformers directory.")
    return directory


def resolved_encoder_config(cfg, stages: Mapping[str, Mapping[str, Any]]):
    """``cfg`` with ``retriever.encoder`` resolved (``resolve_encoder``): what ``build_retriever`` is given by a stage
    (its ``ctx.earlier``) or by ``llmexp serve`` (``stage_records`` of the run). ``cfg`` itself when nothing changes."""
    spec = OmegaConf.select(cfg, FIELD, default=None)
    directory = resolve_encoder(spec, stages)
    if directory == spec:
        return cfg
    resolved = cfg.copy()
    with open_dict(resolved):
        resolved.retriever.encoder = directory
    return resolved


def stage_records(run_dir) -> Dict[str, Dict[str, Any]]:
    """The stage records of a run directory's results.json (``{}`` when it has none yet)."""
    try:
        return dict(read_results(run_dir).get("stages") or {})
    except (OSError, ValueError):
        return {}


# -- the embedded world's pairs and held-out questions ------------------------------------------------------

def embedded_pairs(world: EmbeddedWorld) -> List[Pair]:
    """(question, biography) for every fact asked with every training template: what the encoder trains on."""
    biographies = world.documents()
    return [(QUESTIONS[f.relation][t].format(p=f.person), biographies[f.person])
            for f in world.facts for t in range(TRAIN_TEMPLATES)]


def embedded_held_out(world: EmbeddedWorld) -> Tuple[List[str], List[Set[str]]]:
    """Every fact asked with the held-out template (the evaluation's), and the biography (by person) that answers it."""
    return ([QUESTIONS[f.relation][TRAIN_TEMPLATES].format(p=f.person) for f in world.facts],
            [{f.person} for f in world.facts])


def ranking_metrics(encoder, queries: Sequence[str], relevant: Sequence[Set[str]], documents: Mapping[str, str],
                    batch_size: int = 64) -> Dict[str, float]:
    """``retrieval_metrics`` (recall@1/5/10, MRR, nDCG@1/5/10) of ``documents`` (id -> text) ranked for each query
    by the encoder's cosine similarity: every document, exactly."""
    ids = list(documents)
    scores = embed(encoder, queries, batch_size) @ embed(encoder, [documents[i] for i in ids], batch_size).T
    ranked = [[ids[j] for j in row] for row in (-scores).argsort(axis=1, kind="stable")]
    return retrieval_metrics(ranked, list(relevant))


# -- the embedded encoder -----------------------------------------------------------------------------------

def embedded_encoder(cfg):
    """The embedded encoder of ``cfg.data``'s world, from the cache, trained there first when it is not."""
    world = build_world(cfg.data.seed, cfg.data.num_people)
    path = embedded_directory(world)
    if not path.is_dir():
        _build(world, path)
    return _load(path)


def embedded_directory(world: EmbeddedWorld) -> Path:
    """Where the embedded encoder of ``world`` is cached: ``<cache>/encoders/<fingerprint>``, the fingerprint of
    everything its weights follow from (vocabulary, pairs, shape, training, seed)."""
    settings = {"format": FORMAT, "vocabulary": world.vocabulary(), "pairs": embedded_pairs(world),
                "shape": asdict(EMBEDDED_SHAPE), "training": asdict(EMBEDDED_TRAINING), "seed": world.seed}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmexp").expanduser()
    return root / "encoders" / fingerprint


def new_embedded_encoder(words: Sequence[str], seed: int, shape: EncoderShape = EMBEDDED_SHAPE):
    """An untrained encoder over ``words`` (one token each), weights drawn from ``seed``, with mean pooling."""
    import tempfile

    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    from llmexp.data.tokenizer import word_level_tokenizer

    tokenizer = word_level_tokenizer(words)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=shape.max_positions, type_vocab_size=1,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:  # sentence-transformers builds its Transformer from a directory
        BertModel(config).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        transformer = Transformer(scratch, max_seq_length=shape.max_positions)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return _sentence_transformers().SentenceTransformer(modules=[transformer, pooling], device="cpu")


def _build(world: EmbeddedWorld, path: Path) -> None:
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire()
    except OSError as error:
        raise UserError(f"the embedded encoder cannot be cached at {path}: {error}. Set {CACHE_ENV} to a writable "
                        f"folder, or give {FIELD}=<a saved sentence-transformers directory>.") from None
    try:
        if path.is_dir():  # another process built it while this one waited
            return
        console.note(f"training the embedded encoder once (a few seconds); cached at {path}")
        partial = path.with_name(f"{path.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted build left
        with one_thread():
            encoder = new_embedded_encoder(world.vocabulary(), world.seed)
            queries, relevant = embedded_held_out(world)
            untrained = ranking_metrics(encoder, queries, relevant, world.documents())
            trained = train_encoder(encoder, embedded_pairs(world), EMBEDDED_TRAINING, world.seed, partial / "trainer",
                                    cpu=True)
            held_out = ranking_metrics(encoder, queries, relevant, world.documents())
        shutil.rmtree(partial / "trainer")
        encoder.save(str(partial))
        record = {"seed": world.seed, "people": len(world.people), "shape": asdict(EMBEDDED_SHAPE),
                  "training": asdict(EMBEDDED_TRAINING), **trained, "held_out": held_out, "untrained": untrained}
        replace_atomically(partial / RECORD, lambda handle: json.dump(record, handle, indent=2))
        os.replace(partial, path)
    finally:
        lock.release()


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside, as many as before after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- training -----------------------------------------------------------------------------------------------

def train_encoder(encoder, pairs: Sequence[Pair], training: EncoderTraining, seed: int, work_dir: Path,
                  on_step: Optional[Callable[[int, int], None]] = None,
                  on_log: Optional[Callable[[Dict[str, float]], None]] = None, cpu: bool = False) -> Dict[str, float]:
    """Train ``encoder`` in place on ``pairs`` (all with a hard negative, or none) with
    ``MultipleNegativesRankingLoss`` through ``SentenceTransformerTrainer``, deterministic in ``seed``, on a GPU when
    there is one unless ``cpu``.

    ``work_dir`` is the trainer's output directory (no checkpoint is saved in it). ``on_step(step, total)``
    follows each optimiser step; ``on_log({"step", "loss", "lr"})`` every ``log_every`` steps.
    Returns ``train_loss`` (the mean over the last logged window), ``train_steps`` and ``train_time_s``.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers.base.training_args import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import PrinterCallback, TrainerCallback

    widths = {len(pair) for pair in pairs}
    if widths - {2, 3} or len(widths) != 1:
        raise ValueError(f"pairs of {sorted(widths)} texts: all must be (query, positive) or all "
                         "(query, positive, negative)")
    columns = ("anchor", "positive", "negative")[:widths.pop()]
    dataset = Dataset.from_dict({column: [pair[i] for pair in pairs] for i, column in enumerate(columns)})
    arguments = _sentence_transformers().SentenceTransformerTrainingArguments(
        output_dir=str(work_dir), num_train_epochs=training.epochs, max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size, learning_rate=training.lr,
        warmup_steps=training.warmup_steps, weight_decay=training.weight_decay, seed=seed, data_seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=training.log_every, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=cpu, dataloader_pin_memory=torch.cuda.is_available() and not cpu)
    logged: List[Dict[str, float]] = []

    class Follow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                row = {"step": state.global_step, "loss": float(logs["loss"]),
                       "lr": float(logs.get("learning_rate", 0.0))}
                logged.append(row)
                if on_log is not None:
                    on_log(row)

    card = encoder.model_card_data  # the README.md a save writes: from what is here, without asking the Hub
    card.local_files_only = True
    # its example (else sampled from the data, with a progress bar, from Python's global random state)
    card.widget = [{"source_sentence": pairs[0][0], "sentences": list(pairs[0][1:])}]
    loss = MultipleNegativesRankingLoss(encoder, scale=training.scale)
    trainer = _sentence_transformers().SentenceTransformerTrainer(model=encoder, args=arguments, train_dataset=dataset,
                                                                  loss=loss, callbacks=[Follow()])
    trainer.remove_callback(PrinterCallback)  # its rows go to on_log instead of stdout
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    encoder.eval()
    final = logged[-1]["loss"] if logged else float(output.training_loss)
    return {"train_loss": round(final, 6), "train_steps": int(output.global_step), "train_time_s": round(seconds, 3)}
