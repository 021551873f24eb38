"""The reward_model stage: preference pairs in, the shared training loop, a scored classifier saved for its users.

Its product is ``<stage dir>/reward_model``, written whole or not at all (saved beside it, then
renamed into place), holding the classifier (safetensors, ``config.json`` with ``num_labels=1``
and ``pad_token_id``) and the tokenizer: ``AutoModelForSequenceClassification.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it as is, and ``scoring.reward_scores`` gives the
rewards its held-out figures were computed from.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from llmexp.data.preference import preference_data
from llmexp.data.records import PreferencePair
from llmexp.plugins.reward.classifier import add_lora, plain_classifier, sequence_classifier, with_pad_token
from llmexp.plugins.reward.diagnostics import pair_diagnostics
from llmexp.plugins.reward.losses import RewardLoss
from llmexp.plugins.reward.scoring import PairCollate, encode_pair, reward_scores
from llmexp.sdk import (
    StageContext, StageResult, base_model, distributed, model_stats, save_model, stage_node_path, train,
)

ARTIFACT = "reward_model"


def run_reward_model(ctx: StageContext) -> StageResult:
    import torch

    cfg, node = ctx.config, ctx.stage_config
    start = base_model(ctx)
    tokenizer = with_pad_token(start.tokenizer)
    torch.manual_seed(cfg.seed)  # the score head's (and LoRA's) initial weights depend on the seed alone
    model = sequence_classifier(start.model, tokenizer, stage_node_path(ctx))
    if node.lora_rank > 0:
        model = add_lora(model, node)
    train_pairs, held_out = preference_data(cfg.data)
    max_len = cfg.data.seq_len
    metrics = train(
        ctx,
        model,
        RewardLoss(node.center_rewards_coefficient),
        [encode_pair(pair, pair_margin(pair, node.margin), tokenizer, max_len) for pair in train_pairs],
        PairCollate(tokenizer.pad_token_id),
        [encode_pair(pair, pair_margin(pair, node.margin), tokenizer, max_len) for pair in held_out],
    )
    classifier = plain_classifier(model)
    metrics.update(held_out_figures(classifier, tokenizer, held_out, max_len))
    path = Path(ctx.stage_dir) / ARTIFACT
    stats = save_whole(classifier, tokenizer, max_len, path) if distributed.is_rank_zero() else model_stats(classifier)
    return StageResult(metrics=metrics, artifacts={ARTIFACT: str(path)}, model_stats=stats)


def pair_margin(pair: PreferencePair, default: float) -> float:
    """The margin the pair's chosen reward must clear: its record's own ``margin`` field, else ``default``."""
    return default if pair.margin is None else pair.margin


def held_out_figures(classifier, tokenizer, pairs: List[PreferencePair], max_len: int) -> Dict[str, float]:
    """``diagnostics.pair_diagnostics`` of the classifier's rewards on ``pairs``."""
    chosen, rejected = sides(classifier, tokenizer, pairs, max_len)

    def lengths(side: str) -> List[int]:
        return [len(tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"]) for pair in pairs]

    return pair_diagnostics(chosen, rejected, lengths("chosen"), lengths("rejected"))


def sides(classifier, tokenizer, pairs: List[PreferencePair], max_len: int) -> Tuple[List[float], List[float]]:
    """The rewards of the chosen and of the rejected responses of ``pairs``, in order."""
    prompts = [pair.prompt for pair in pairs]
    return (reward_scores(classifier, tokenizer, prompts, [pair.chosen for pair in pairs], max_len),
            reward_scores(classifier, tokenizer, prompts, [pair.rejected for pair in pairs], max_len))


def save_whole(classifier, tokenizer, max_len: int, path: Path) -> Dict:
    """Save into ``<path>.partial`` and rename it to ``path``: a reader finds the whole directory or none.

    The tokenizer is saved with ``model_max_length`` = ``max_len``, the length its sequences were cut to
    (``scoring.reward_input_ids``), so a user of the directory alone scores as the stage did.
    """
    partial = path.with_name(f"{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a save an interrupted attempt left
    tokenizer = copy.deepcopy(tokenizer)  # the starting model's tokenizer is left as it was
    tokenizer.model_max_length = max_len
    stats = save_model(classifier, tokenizer, partial)
    shutil.rmtree(path, ignore_errors=True)  # an attempt that saved but did not complete the stage
    os.replace(partial, path)
    return stats
