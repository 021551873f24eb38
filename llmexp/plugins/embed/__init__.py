"""``technique=embed``: fine-tunes a dense-retrieval encoder contrastively, with in-batch negatives.

Each step embeds a batch of queries and their positives (and hard negatives when the data has
them); sentence-transformers' ``MultipleNegativesRankingLoss`` is the cross-entropy of each query's
scaled cosine similarities, its own positive the target and every other text of the batch a
negative. The encoder is ``technique.encoder`` (a saved sentence-transformers directory, or an
earlier embed stage of the pipeline), else the embedded encoder. The stage scores the encoder on
held-out queries before and after (recall@1/5, MRR) and saves ``<stage dir>/encoder``, which
``SentenceTransformer(path)`` loads and ``retriever.encoder=<this stage>`` searches with.

This module imports without torch (the planner loads every plugin); the stage is ``stage.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from llmexp.data.embedded import build_world
from llmexp.plugins.embed.pairs import pair_data
from llmexp.sdk import (
    Consumed, EncoderTraining, Metric, MetricKind, Technique, TechniqueConfig, UserError, encoder_consumed,
    encoder_problems, hookimpl, node_path,
)


@dataclass
class EmbedConfig(EncoderTraining, TechniqueConfig):
    """The encoder to start from and its contrastive training (``EncoderTraining``: epochs or max_steps, lr,
    batch_size, warmup_steps, weight_decay, scale, log_every)."""

    name: str = "embed"
    # a saved sentence-transformers directory, or an earlier technique=embed stage; None: the embedded encoder
    encoder: Optional[str] = None
    # with encoder unset: start from the embedded encoder's initial weights (drawn from the run's seed), not the
    # trained ones, so before/after shows what contrastive training itself does
    untrained: bool = False


class Embed(Technique):
    """Trains an encoder beside the run's model, not the model: it hands no model on."""

    name = "embed"
    schema = EmbedConfig
    memory = "none"
    produces_model = False
    requires = ("torch", "sentence_transformers", "datasets", "accelerate")  # the trainer needs the last two
    extra = "rag"
    entry = "llmexp.plugins.embed.stage:run_embed"

    @classmethod
    def memory_per_device(cls, config, key: str, node, model, precision: str, layout):
        """None of the run's model: the stage holds an encoder, whose architecture the plan does not know (the
        embedded one has 96k parameters)."""
        return {}

    @classmethod
    def metrics(cls, config, node) -> Tuple[Metric, ...]:
        """The held-out queries' ranking after training, then before it, then what training cost."""
        after = tuple(Metric(name, True, label, MetricKind.QUALITY) for name, label in RANKING)
        before = tuple(Metric(f"before_{name}", True, f"{label} before", MetricKind.INFO) for name, label in RANKING)
        return after + before + (Metric("train_loss", False, "contrastive loss (last log)", MetricKind.INFO),
                                 Metric("train_time_s", False, "train_time_s", MetricKind.COST))

    @classmethod
    def consumes(cls, config, key: str, node) -> Tuple[Consumed, ...]:
        """The earlier embed stage whose encoder it continues, when ``encoder`` names one."""
        return encoder_consumed(config, node.encoder, f"{node_path(key)}.encoder")

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """The encoder it starts from, its settings, and the pairs it reads (read now: a bad line stops the plan)."""
        field = node_path(key)
        problems = encoder_problems(config, node.encoder, f"{field}.encoder") + settings_problems(node, field)
        if node.untrained and node.encoder is not None:
            problems.append(f"{field}.untrained=true starts from the embedded encoder's initial weights, and "
                            f"{field}.encoder={node.encoder} names another encoder; unset one of them.")
        try:
            data = pair_data(config.data)
        except UserError as error:
            return problems + [str(error)]
        if node.encoder is None:
            problems += vocabulary_problems(config.data, data, field)
        return problems


def vocabulary_problems(data_cfg, data, field: str) -> List[str]:
    """The embedded encoder has a token for each word of the embedded world and no other (``<unk>`` for the rest):
    on texts mostly of other words it cannot tell one text from another."""
    known = set(build_world(data_cfg.seed, data_cfg.num_people).vocabulary())
    words = [word for pair in data.train for text in pair for word in text.split()]
    unknown = sum(word not in known for word in words)
    if unknown * 2 <= len(words):
        return []
    return [f"{field}.encoder is unset, so the embedded encoder would train, and it knows only the embedded world's "
            f"words: {unknown} of the {len(words)} words of the pairs are not among them. Give {field}.encoder=<a "
            "saved sentence-transformers directory> (an encoder with a tokenizer for your texts)."]


RANKING = (("recall_at_1", "held-out recall@1"), ("recall_at_5", "held-out recall@5"), ("mrr", "held-out MRR"))


def settings_problems(node, field: str) -> List[str]:
    """Values of the training settings that cannot train."""
    checks = [
        (node.max_steps >= 0, f"{field}.max_steps={node.max_steps} must be 0 (epochs decide) or a number of steps."),
        (node.max_steps > 0 or (math.isfinite(node.epochs) and node.epochs > 0),
         f"{field}.epochs={node.epochs} must be positive (or set {field}.max_steps)."),
        (math.isfinite(node.lr) and node.lr > 0, f"{field}.lr={node.lr} must be positive (1e-3 suits the embedded "
                                                 "encoder; 2e-5 is usual for a pretrained one)."),
        (node.batch_size >= 2, f"{field}.batch_size={node.batch_size}: a query's negatives are the other pairs of its "
                               "batch, so a batch needs at least 2 (larger batches give more negatives; 16-64)."),
        (node.warmup_steps >= 0, f"{field}.warmup_steps={node.warmup_steps} must be 0 or more."),
        (math.isfinite(node.weight_decay) and node.weight_decay >= 0,
         f"{field}.weight_decay={node.weight_decay} must be 0 or more."),
        (math.isfinite(node.scale) and node.scale > 0,
         f"{field}.scale={node.scale} must be positive: it multiplies the cosine similarities (20 is usual)."),
        (node.log_every >= 1, f"{field}.log_every={node.log_every} must be at least 1 (steps between log rows)."),
    ]
    return [message for ok, message in checks if not ok]


@hookimpl
def llmexp_techniques():
    return [Embed]
