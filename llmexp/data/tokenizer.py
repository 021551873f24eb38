"""A word-level tokenizer for the embedded world, saved in Hugging Face's format.

The world's text is space-separated words, so one token per word keeps the tiny model's
vocabulary (and embedding table) small. Saved with ``save_pretrained`` it loads through
plain ``AutoTokenizer.from_pretrained`` beside the model. tokenizers and transformers are imported
when a tokenizer is built: the planner reads the embedded data without them.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def word_level_tokenizer(words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over the special tokens followed by ``words``, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: decoding joins the words with single spaces (a WordPiece decoder would glue `####` on).
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
