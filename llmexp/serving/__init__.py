"""Serving a model the framework produced over an OpenAI-compatible HTTP API (``llmexp serve``).

``served_models`` loads the base checkpoint and its LoRA adapters, ``engine`` batches
generation continuously in one worker thread, ``limits`` says what a request may ask of it,
``chat`` turns chat messages into prompt tokens, ``app`` is the HTTP API, ``auth`` its API
keys, ``body_limit`` its bound on request bodies and ``metrics`` its Prometheus metrics.
"""
