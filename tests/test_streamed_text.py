"""Streamed text: token by token it adds up to the whole decode, never shows half a character or a stop string,
and each token decodes a short window of ids, not the whole text so far."""

from __future__ import annotations

import random

import pytest

from llmexp.data.embedded import build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.serving.streamed_text import WINDOW, StreamedText

TEXTS = [
    "naïve café — 世界 🙂 ünïcödé 東京 👩‍🚀 crème brûlée",
    "Grüße aus Köln: 你好，世界！ emoji 🎉🎉 and ÆØÅ æøå",
    "plain ascii words, then 日本語のテキスト and 🚀 at the end",
]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with few merges: most non-ASCII characters stay split into one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TEXTS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style BPE (``▁`` marks a word's space; decoding drops the text's first one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator(TEXTS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def streamed(tokenizer, ids, stop=()):
    """The deltas of pushing ``ids`` one by one (then flushing, unless a stop string ended the text)."""
    text = StreamedText(tokenizer, stop)
    deltas = []
    for token in ids:
        delta, stopped = text.push(token)
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(text.flush())
    return deltas, False


def test_byte_level_deltas_add_up_to_the_whole_decode_and_never_hold_half_a_character(byte_tokenizer):
    eos = byte_tokenizer.eos_token_id
    for text in TEXTS:
        ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert any("\ufffd" in byte_tokenizer.decode([i]) for i in ids)  # characters really are split across tokens
        ids = ids[:9] + [eos] + ids[9:]  # a special token in the middle is skipped, as in the whole decode
        deltas, stopped = streamed(byte_tokenizer, ids)
        assert not stopped
        assert "".join(deltas) == byte_tokenizer.decode(ids, skip_special_tokens=True) == text
        assert not any("\ufffd" in delta for delta in deltas)


def test_sentencepiece_style_deltas_keep_the_spaces_between_words(metaspace_tokenizer):
    for text in TEXTS:
        ids = metaspace_tokenizer(text, add_special_tokens=False)["input_ids"]
        deltas, _ = streamed(metaspace_tokenizer, ids)
        assert "".join(deltas) == metaspace_tokenizer.decode(ids) == text


def test_word_level_deltas_add_up_to_the_whole_decode():
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    rng = random.Random(0)
    ids = [rng.randrange(4, tokenizer.vocab_size) for _ in range(200)]
    deltas, _ = streamed(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert sum(1 for delta in deltas if delta) == 200  # one word each step, nothing held back without stop strings


@pytest.mark.parametrize("stop", ["世界", "🙂 ü", "—"])
def test_a_multi_byte_stop_string_across_tokens_ends_the_text_before_it_and_is_never_streamed(byte_tokenizer, stop):
    text = TEXTS[0]
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas, stopped = streamed(byte_tokenizer, ids, stop=(stop, "never there"))
    assert stopped
    assert "".join(deltas) == text[:text.index(stop)]
    sent = ""
    for delta in deltas:  # no prefix of the stop string is ever sent before it is known not to be one
        sent += delta
        assert stop[0] not in sent


def test_each_token_decodes_a_short_window_not_the_whole_text_so_far():
    class CountingTokenizer:
        """The word-level tokenizer, counting the ids it is asked to decode."""

        def __init__(self, tokenizer):
            self.tokenizer, self.decoded = tokenizer, 0

        def decode(self, ids, **kwargs):
            self.decoded += len(ids)
            return self.tokenizer.decode(ids, **kwargs)

    tokenizer = CountingTokenizer(word_level_tokenizer(build_world(0).vocabulary()))
    rng = random.Random(1)
    ids = [rng.randrange(4, tokenizer.tokenizer.vocab_size) for _ in range(1000)]
    deltas, _ = streamed(tokenizer, ids, stop=("never there",))
    assert "".join(deltas) == tokenizer.tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decoded < 2 * WINDOW * len(ids)  # decoding everything each step: over 500,000 ids
