"""Serving a model the framework produced over an OpenAI-compatible HTTP API (``llmexp serve``).

``served_models`` loads the base checkpoint and its LoRA adapters; ``generation`` is what a client
submits and reads back, ``engine`` batches generation continuously in one worker thread over a
``running_batch`` of rows (their text: ``streamed_text``), ``limits`` says what a request may ask of
it, ``chat`` turns chat messages into prompt tokens; ``app`` is the HTTP API, with its
``request_bodies``, ``api_errors``, ``auth`` (API keys), ``body_limit`` and ``metrics``
(Prometheus); ``vllm_server`` hands a model to vLLM instead.
"""
