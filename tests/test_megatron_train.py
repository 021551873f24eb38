"""The parts of ``backend=megatron``'s training step that run without a GPU: batches, loss and architecture.

megatron-core's GPT model takes next-token targets already shifted and a loss mask; these must
give exactly the loss Hugging Face's ``model(labels=...)`` gives, or the two backends would
train different objectives. The per-token losses here come from the HF model's own logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llmexp.data.instructions import pad_batch
from llmexp.training.megatron.model_chunks import model_numbers
from llmexp.training.megatron.train import masked_loss, next_token_batch


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def megatron_style_loss(model, batch, seq_length: int) -> torch.Tensor:
    tokens, targets, mask = next_token_batch(batch, seq_length)
    logits = model(input_ids=tokens).logits.float()
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [b, s], as GPTModel returns
    loss, count, logged = masked_loss(mask, per_token)
    assert torch.equal(logged["lm loss"], torch.stack([loss / count, torch.ones_like(loss)]))
    return loss / count


def test_pretraining_blocks_give_hugging_faces_loss():
    model = tiny_model()
    blocks = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=blocks, labels=blocks).loss
    assert torch.allclose(megatron_style_loss(model, blocks, 16), expected, atol=1e-6)


def test_sft_rows_padded_to_seq_length_give_hugging_faces_loss():
    """Prompt tokens and right padding are masked; padding up to seq_length changes nothing before it."""
    model = tiny_model()
    rows = [([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]), ([11, 12, 13], [-100, 12, 13])]
    batch = pad_batch(rows, pad_id=0, length=6)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    tokens, targets, mask = next_token_batch(batch, 10)
    assert tokens.shape == (2, 10) and mask.sum() == 3 + 2  # the predicted answer tokens only
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0] and targets[0, 2:5].tolist() == [8, 9, 10]
    assert torch.allclose(megatron_style_loss(model, batch, 10), expected, atol=1e-6)


def test_architecture_comes_from_the_model_itself():
    numbers = model_numbers(tiny_model())
    assert (numbers.num_layers, numbers.hidden_size, numbers.num_key_value_heads, numbers.head_dim) == (2, 32, 2, 8)
    assert numbers.attention_bias is False and numbers.rope_theta == 10000.0
    qwen = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rope_theta=1e6)
    assert model_numbers(Qwen2ForCausalLM(qwen)).attention_bias is True  # Qwen2's q/k/v biases are not flagged
    assert model_numbers(Qwen2ForCausalLM(qwen)).rope_theta == 1e6
