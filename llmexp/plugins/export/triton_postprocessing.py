"""Triton python-backend model ``postprocessing``: the ``tensorrt_llm`` model's token ids back to text.

Copied by the export to ``<repository>/postprocessing/1/model.py``; like ``triton_preprocessing``
it imports only numpy and transformers, and ``triton_python_backend_utils`` inside the methods.
Tensors: TOKENS_BATCH (int32 ``[batch, beams, tokens]``) and SEQUENCE_LENGTH (int32
``[batch, beams]``) in, OUTPUT (strings) out. When streaming, each response
carries the newest tokens only, and each is decoded on its own. OUTPUT is shaped ``[batch, beams]``
(the config's dims ``[-1]`` under batching).
"""

import json
import os

import numpy as np


def load_tokenizer(model_dir, tokenizer_dir):
    """The tokenizer at ``tokenizer_dir``, relative to this model's directory unless absolute."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(model_dir, tokenizer_dir), local_files_only=True,
                                         trust_remote_code=False)


def decode_batches(tokenizer, tokens, lengths, skip_special_tokens=True):
    """One string per sequence, batch-major then beam: the first ``lengths[b][k]`` ids of ``tokens[b][k]``."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    sequences = [
        tokens[item, beam, : int(lengths[item, beam])].tolist()
        for item in range(tokens.shape[0])
        for beam in range(tokens.shape[1])
    ]
    return tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


class TritonPythonModel:
    """The python backend's entry point."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config["parameters"]
        self.tokenizer = load_tokenizer(args["model_repository"], parameters["tokenizer_dir"]["string_value"])
        skip = parameters.get("skip_special_tokens", {}).get("string_value", "true")
        self.skip_special_tokens = skip.lower() in ("true", "1", "yes")

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            texts = decode_batches(self.tokenizer, tokens, lengths, self.skip_special_tokens)
            output = np.array([text.encode("utf-8") for text in texts], dtype=np.object_).reshape(tokens.shape[:2])
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output)]))
        return responses
