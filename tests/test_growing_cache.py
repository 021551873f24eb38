"""The running batch's KV cache grows in place: a decoding step writes its position instead of copying the cache,
and what the model computes through it equals transformers' own ``DynamicCache``, as rows join and leave."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from llmexp.serving.growing_cache import MIN_ROOM, GrowingLayer
from llmexp.serving.running_batch import Row, RunningBatch, cache_keyword
from tests.test_serving_engine import build_varied_model, random_prompts


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_update_appends_like_dynamic_layer_and_copies_only_when_the_room_is_used_up():
    torch.manual_seed(0)
    start = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer = GrowingLayer.stacked([start], 5)
    expected_keys, expected_values = start
    pointers = set()
    for _ in range(MIN_ROOM + 10):
        step = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = layer.update(*step)
        expected_keys = torch.cat([expected_keys, step[0]], dim=-2)
        expected_values = torch.cat([expected_values, step[1]], dim=-2)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        pointers.add(storage(keys))
    assert layer.get_seq_length() == 5 + MIN_ROOM + 10
    assert len(pointers) == 2  # the first buffer's room (5 + 64 positions), then one new buffer


def test_rows_stack_right_aligned_over_zeros_and_leave_without_new_buffers():
    torch.manual_seed(1)
    short, long = (torch.randn(2, 2, 3, 4),) * 2, (torch.randn(1, 2, 6, 4),) * 2
    layer = GrowingLayer.stacked([short, long], 6)
    assert torch.equal(layer.keys[:2, :, :3], torch.zeros(2, 2, 3, 4))  # left padding: finite, hidden by the mask
    assert torch.equal(layer.keys[:2, :, 3:], short[0]) and torch.equal(layer.keys[2:], long[0])
    before = storage(layer.keys)
    layer.keep_rows([0, 2], 1)
    assert storage(layer.keys) == before
    assert torch.equal(layer.keys, torch.cat([torch.cat([torch.zeros(1, 2, 2, 4), short[0][:1]], -2),
                                              long[0][:, :, 1:]]))
    step = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, _ = layer.update(*step)
    assert keys.shape == (2, 2, 6, 4) and torch.equal(keys[:, :, -1:], step[0])


def test_rows_join_in_the_buffers_room_widened_to_the_left_with_zeros():
    torch.manual_seed(3)
    first = torch.randn(2, 2, 6, 4)
    layer = GrowingLayer.stacked([(first, first)], 6)
    layer.keep_rows([1], 2)  # one row left, its first two positions dropped: width 4
    before = storage(layer.keys)
    joining = torch.randn(2, 2, 5, 4)
    layer.add_rows(joining, joining, 5)
    assert storage(layer.keys) == before  # in the room the buffers kept
    expected = torch.cat([torch.cat([torch.zeros(1, 2, 1, 4), first[1:, :, 2:]], -2), joining])
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, expected)
    longer = torch.randn(1, 2, 9, 4)
    layer.add_rows(longer, longer, 9)  # wider than the buffers reach to the left: new buffers
    assert torch.equal(layer.keys, torch.cat([torch.cat([torch.zeros(3, 2, 4, 4), expected], -2), longer]))


def test_keys_replaced_from_outside_are_taken_as_they_are():
    torch.manual_seed(2)
    layer = GrowingLayer.stacked([(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))], 8)
    layer.crop(-3)  # DynamicLayer's own crop slices keys and values
    step = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    keys, values = layer.update(*step)
    assert keys.shape[-2] == 6 and torch.equal(values[:, :, -1:], step[1])


def decode(model, batch: RunningBatch, tokens):
    """One decoding step of the running batch, as the engine runs it; the next greedy tokens."""
    mask = torch.cat([batch.mask, batch.mask.new_ones(len(tokens), 1)], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(tokens)[:, None], attention_mask=mask,
                       position_ids=mask.sum(-1, keepdim=True) - 1, **{cache_keyword(model): batch.cache}).logits
    batch.mask = mask
    return logits[:, -1].argmax(-1).tolist()


def prefill(model, prompts):
    """A fresh DynamicCache of ``prompts`` run left-padded together, their attention mask and first greedy tokens."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       **{cache_keyword(model): cache}).logits
    return cache, mask, logits[:, -1].argmax(-1).tolist()


def test_the_model_decodes_through_a_batch_that_rows_join_and_leave_as_each_prompt_alone():
    model, tokenizer = build_varied_model(seed=3)
    model.eval()
    prompts = [tokenizer(p)["input_ids"] for p in random_prompts(5, seed=8)]  # 17, 32, 8, 7 and 40 tokens
    steps = 12
    with torch.inference_mode():
        alone = [model.generate(torch.tensor([p]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    batch, outputs, rows = RunningBatch(), {}, []

    def join(indices):
        cache, mask, first = prefill(model, [prompts[i] for i in indices])
        new = [Row(None, None, prompts[i], "", steps, None, None, 0.0) for i in indices]
        for row, i, token in zip(new, indices, first):
            row.next_token, outputs[i] = token, [token]
        rows.extend(zip(new, indices))
        batch.merge(new, cache, mask)

    join([0, 1, 2])
    for step in range(1, steps + 8):
        pointer = storage(batch.cache.layers[0].keys)
        if step == 3:
            join([3])  # a shorter prompt joins a batch already decoding: in the buffers' room
        if step == 5:
            next(row for row, i in rows if i == 1).finish_reason = "stop"  # a middle row leaves
            batch.keep_unfinished()
        if step == 6:
            join([4])  # a prompt longer than the batch: new buffers
        tokens = decode(model, batch, [row.next_token for row in batch.rows])
        assert (storage(batch.cache.layers[0].keys) == pointer) == (step != 6)  # written in place, not copied
        for row, token in zip(batch.rows, tokens):
            i = next(index for r, index in rows if r is row)
            outputs[i].append(token)
            row.next_token = token
            if len(outputs[i]) == steps:
                row.finish_reason = "length"
        batch.keep_unfinished()
        if not batch.rows:
            break
    assert outputs[1] == alone[1][:5]
    assert all(outputs[i] == alone[i] for i in (0, 2, 3, 4))
    assert len({t for i in outputs for t in outputs[i]}) > 5  # varied output: a real test of positions and masks
