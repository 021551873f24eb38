"""Retrieval: documents chunked into passages, indexed (BM25, dense, hybrid), searched and scored.

Evaluation's rag condition and `llmexp serve` use the same retrievers, so what is measured is what is served.
"""
