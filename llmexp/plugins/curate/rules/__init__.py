"""Curation rules: pure functions on one document's text (normalisation, MinHash, quality, PII, language).

They hold no I/O and no config objects beyond plain dataclasses, so each engine (local or Dask)
calls the same functions and reaches the same verdicts."""
