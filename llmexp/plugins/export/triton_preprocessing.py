"""Triton python-backend model ``preprocessing``: prompts to the token ids the ``tensorrt_llm`` model takes.

The export copies this file to ``<repository>/preprocessing/1/model.py``. Triton's python backend
runs it where llmexp is not installed, so it imports only numpy and transformers (both in NVIDIA's
TensorRT-LLM Triton image), and ``triton_python_backend_utils`` only inside the methods the backend
calls. The tokenisation is in plain functions, which llmexp's tests run with a real tokenizer.

Tensors (names as in tensorrtllm_backend's inflight_batcher_llm): QUERY, REQUEST_OUTPUT_LEN and the
optional STOP_WORDS_DICT, BAD_WORDS_DICT, END_ID, PAD_ID in; INPUT_ID, REQUEST_INPUT_LEN,
REQUEST_OUTPUT_LEN, STOP_WORDS_IDS, BAD_WORDS_IDS, OUT_END_ID, OUT_PAD_ID out.
"""

import json
import os

import numpy as np


def load_tokenizer(model_dir, tokenizer_dir):
    """The tokenizer at ``tokenizer_dir``, relative to this model's directory (the backend's
    ``args["model_repository"]``) unless absolute: the repository carries it, wherever it is mounted."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(model_dir, tokenizer_dir), local_files_only=True,
                                         trust_remote_code=False)


def special_ids(tokenizer):
    """``(end_id, pad_id)``: generation stops at EOS; padding is the pad token, else EOS."""
    end_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    return int(end_id), int(pad_id)


def text_values(array):
    """Strings of a TYPE_STRING tensor (bytes objects, or str), row-major."""
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in np.ravel(array)]


def encode_prompts(tokenizer, prompts, pad_id, add_special_tokens=True):
    """``(ids, lengths)``: int32 ``[batch, longest]`` token ids padded on the right with ``pad_id``,
    and int32 ``[batch, 1]`` true lengths (the engine reads only the first ``length`` ids of a row)."""
    encoded = [tokenizer.encode(prompt, add_special_tokens=add_special_tokens) for prompt in prompts]
    longest = max((len(ids) for ids in encoded), default=0)
    ids = np.full((len(encoded), longest), pad_id, dtype=np.int32)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = tokens
    lengths = np.array([[len(tokens)] for tokens in encoded], dtype=np.int32).reshape(len(encoded), 1)
    return ids, lengths


def word_lists(tokenizer, words_per_item, batch_size):
    """TensorRT-LLM's stop/bad words layout, int32 ``[batch, 2, n]``: row 0 the words' token ids one after
    another (padded with 0), row 1 where each word ends in row 0 (padded with -1). ``words_per_item``: a list
    of words per batch item, or None for no words (shape ``[batch, 2, 0]``)."""
    if words_per_item is None:
        return np.empty((batch_size, 2, 0), dtype=np.int32)
    flat, offsets = [], []
    for words in words_per_item:
        ids, ends = [], []
        for word in words:
            if not word:
                continue
            ids += tokenizer.encode(word, add_special_tokens=False)
            ends.append(len(ids))
        flat.append(ids)
        offsets.append(ends)
    width = max(1, max(len(ids) for ids in flat), max(len(ends) for ends in offsets))
    result = np.zeros((len(flat), 2, width), dtype=np.int32)
    result[:, 1, :] = -1
    for row, (ids, ends) in enumerate(zip(flat, offsets)):
        result[row, 0, : len(ids)] = ids
        result[row, 1, : len(ends)] = ends
    return result


class TritonPythonModel:
    """The python backend's entry point."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config["parameters"]
        self.tokenizer = load_tokenizer(args["model_repository"], parameters["tokenizer_dir"]["string_value"])
        add = parameters.get("add_special_tokens", {}).get("string_value", "true")
        self.add_special_tokens = add.lower() in ("true", "1", "yes")
        self.end_id, self.pad_id = special_ids(self.tokenizer)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            def optional(name):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            query = optional("QUERY")
            batch = query.shape[0]
            ids, lengths = encode_prompts(self.tokenizer, text_values(query), self.pad_id, self.add_special_tokens)
            stop, bad = optional("STOP_WORDS_DICT"), optional("BAD_WORDS_DICT")
            end_id, pad_id = optional("END_ID"), optional("PAD_ID")
            outputs = {
                "INPUT_ID": ids,
                "REQUEST_INPUT_LEN": lengths,
                "REQUEST_OUTPUT_LEN": optional("REQUEST_OUTPUT_LEN").astype(np.int32),
                "STOP_WORDS_IDS": word_lists(self.tokenizer, None if stop is None else
                                             [text_values(row) for row in stop], batch),
                "BAD_WORDS_IDS": word_lists(self.tokenizer, None if bad is None else
                                            [text_values(row) for row in bad], batch),
                "OUT_END_ID": (np.full((batch, 1), self.end_id, np.int32) if end_id is None
                               else end_id.astype(np.int32)),
                "OUT_PAD_ID": (np.full((batch, 1), self.pad_id, np.int32) if pad_id is None
                               else pad_id.astype(np.int32)),
            }
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]))
        return responses
