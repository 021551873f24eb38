"""Serving a model the framework produced over an OpenAI-compatible HTTP API (``llmexp serve``).

``served_models`` loads the base checkpoint, its LoRA adapters and a draft model; ``generation`` is
what a client submits and reads back, ``engine`` batches generation continuously in one worker
thread over a ``running_batch`` of rows (their KV cache: ``growing_cache``; their text:
``streamed_text``; their tokens: ``sampling``), or with a draft in ``speculative`` rounds
(``drafted_batch``, ``batched_speculation``; ``speculative_speed`` measures a draft), ``limits`` says
what a request may ask of it, ``chat`` turns chat messages into prompt tokens; ``app`` is the HTTP API, with its
``request_bodies``, ``api_errors``, ``auth`` (API keys), ``body_limit`` and ``metrics``
(Prometheus); ``vllm_server`` hands a model to vLLM instead.
"""
