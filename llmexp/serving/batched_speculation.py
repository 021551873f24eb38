"""One speculative round for many sequences at once: each of the draft's steps and the target's check is one
batched forward pass over all of them, instead of one per sequence.

Each sequence keeps its own caches between rounds (``llmexp.serving.drafted_batch``): rows
accept different numbers of proposals, so their lengths drift apart by up to ``k`` a round. A
round stacks the caches left-padded (the attention mask hides the padding, positions count the
real tokens, as the engine's running batch does), runs the draft ``k`` steps and the target
once over the stack, applies the acceptance rule row by row (``speculative.accept``), and cuts
each row's caches back to its own accepted tokens. The rows' own caches are replaced only
after both forwards succeeded, so a batched forward that raises leaves them as they were and
the caller can run the rows one by one (``speculative.speculative_round``) to find the one at
fault. Each row's result is counted as one target forward, as a round alone would be.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch

from llmexp.serving.speculative import (
    DraftedSequence, Sampling, SpeculationCounts, accept, cache_keyword_of, check_numbers, new_cache, propose,
)


def batched_round(
    target, draft, sequences: Sequence[DraftedSequence], ks: Sequence[int], samplings: Sequence[Sampling],
    counts: SpeculationCounts, stop_tokens: Sequence[Collection[int]], target_inputs: Optional[Dict[str, Any]] = None,
) -> List[Union[List[int], Exception]]:
    """A round for every sequence (row ``i`` proposing up to ``ks[i]``, its draft stopping after
    ``stop_tokens[i]``): per row, its 1 to ``ks[i] + 1`` tokens, or the exception its own part raised (NaN
    logits, ...), after which that row cannot go on. A forward pass that raises raises, every row untouched."""
    k = max(ks)
    proposals: List[List[int]] = [[] for _ in sequences]
    dists: List[List[Optional[torch.Tensor]]] = [[] for _ in sequences]
    failures: Dict[int, Exception] = {}
    draft_cache, draft_mask = _stacked(draft, [s.draft_cache for s in sequences])
    pending_width = max(len(s.draft_pending) for s in sequences)
    feed = [[0] * (pending_width - len(s.draft_pending)) + s.draft_pending for s in sequences]
    mask = torch.cat([draft_mask, _left_justified([len(s.draft_pending) for s in sequences], pending_width,
                                                  draft_mask.device)], dim=1)
    for step in range(k):
        logits = _forward(draft, feed, mask, draft_cache, keep_last=True)[:, -1]
        for i, sequence in enumerate(sequences):
            drafting = i not in failures and len(proposals[i]) == step < ks[i] and not (
                proposals[i] and proposals[i][-1] in stop_tokens[i])
            if drafting:
                try:
                    token, dist = propose(logits[i], samplings[i], "draft")
                except Exception as error:  # this row's draft output is not numbers: this row fails
                    failures[i] = error
                    continue
                proposals[i].append(token)
                dists[i].append(dist)
        # a row that stopped proposing is fed its last token again: positions it never keeps
        feed = [[p[-1] if p else s.last_token] for p, s in zip(proposals, sequences)]
        mask = torch.cat([mask, mask.new_ones(len(sequences), 1)], dim=1)
    target_cache, target_mask = _stacked(target, [s.target_cache for s in sequences])
    checked = [[s.last_token, *p, *[p[-1] if p else s.last_token] * (k - len(p))] for p, s in zip(proposals, sequences)]
    mask = torch.cat([target_mask, target_mask.new_ones(len(sequences), k + 1)], dim=1)
    target_logits = _forward(target, checked, mask, target_cache, keep_last=False, **(target_inputs or {}))
    results: List[Union[List[int], Exception]] = []
    for i, sequence in enumerate(sequences):
        try:
            if i in failures:
                raise failures[i]
            results.append(_take(target, draft, sequence, i, proposals[i], dists[i], samplings[i], counts,
                                 target_logits, (target_cache, target_mask), (draft_cache, draft_mask), pending_width))
        except Exception as error:  # this row's output is not numbers (or its sampling failed): it alone ends
            results.append(error)
    return results


def _take(target, draft, sequence: DraftedSequence, i: int, proposals: List[int], dists, sampling: Sampling,
          counts: SpeculationCounts, target_logits: torch.Tensor, target_stack, draft_stack,
          pending_width: int) -> List[int]:
    """Row ``i``'s accepted tokens, its caches cut from the stacks to them."""
    drafted = len(proposals)
    check_numbers(target_logits[i, : drafted + 1])
    accepted, token = accept(target_logits[i, : drafted + 1], proposals, dists, sampling)
    (target_cache, target_mask), (draft_cache, draft_mask) = target_stack, draft_stack
    target_width, draft_width = target_mask.shape[1], draft_mask.shape[1]
    # the target keeps its old tokens, last_token and the accepted proposals
    target_kept = _row_cache(target, target_cache, i, [
        (target_width - int(target_mask[i].sum()), target_width + 1 + accepted)])
    if drafted:  # a row that proposed nothing keeps its draft cache: its pending tokens wait for a round
        # the draft read its old tokens, its pending ones, then each proposal at the step after it; it keeps
        # them up to the last accepted proposal, at most the one before its last (as a round alone does)
        kept = min(accepted, drafted - 1)
        sequence.draft_cache = _row_cache(draft, draft_cache, i, [
            (draft_width - int(draft_mask[i].sum()), draft_width),
            (draft_width + pending_width - len(sequence.draft_pending), draft_width + pending_width + kept)])
        sequence.draft_pending = [*proposals[kept:accepted], token]
    else:
        sequence.draft_pending = [*sequence.draft_pending, token]
    sequence.target_cache, sequence.last_token = target_kept, token
    counts.target_forwards += 1
    counts.proposed += drafted
    counts.accepted += accepted
    counts.produced += accepted + 1
    return [*proposals[:accepted], token]


def _left_justified(lengths: Sequence[int], width: int, device) -> torch.Tensor:
    """A mask [rows, width] whose row ``i`` has ``lengths[i]`` ones at its right end."""
    columns = torch.arange(width, device=device)
    return (columns[None, :] >= width - torch.tensor(lengths, device=device)[:, None]).long()


def _stacked(model, caches) -> Tuple[Any, torch.Tensor]:
    """One cache holding every row's, left-padded to the longest, and its mask [rows, positions] (a copy: the
    rows' own caches are untouched by what the batched forward appends)."""
    widths = [cache.get_seq_length() for cache in caches]
    width = max(widths)
    device = model.device
    stacked = new_cache(model)
    mask = _left_justified(widths, width, device)
    if width == 0:
        return stacked, mask
    template = caches[widths.index(width)]
    for index, layer in enumerate(template.layers):
        keys = layer.keys.new_zeros((len(caches), *layer.keys.shape[1:]))
        values = layer.values.new_zeros((len(caches), *layer.values.shape[1:]))
        for row, (cache, length) in enumerate(zip(caches, widths)):
            if length:
                keys[row, :, width - length:] = cache.layers[index].keys[0]
                values[row, :, width - length:] = cache.layers[index].values[0]
        stacked.update(keys, values, index)
    return stacked, mask


def _row_cache(model, stacked, row: int, spans: List[Tuple[int, int]]):
    """Row ``row`` of ``stacked``, the positions in ``spans`` ((start, end) pairs) one after another."""
    own = new_cache(model)
    for index, layer in enumerate(stacked.layers):
        keys = torch.cat([layer.keys[row:row + 1, :, start:end] for start, end in spans], dim=2)
        values = torch.cat([layer.values[row:row + 1, :, start:end] for start, end in spans], dim=2)
        own.update(keys, values, index)
    return own


def _forward(model, token_ids: List[List[int]], mask: torch.Tensor, cache, keep_last: bool, **inputs) -> torch.Tensor:
    """Float logits [rows, positions, vocabulary] of ``token_ids`` read after ``cache``; ``mask`` covers both."""
    input_ids = torch.tensor(token_ids, device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_keyword_of(model): cache}, logits_to_keep=1 if keep_last else 0, **inputs)
    return out.logits.float()
