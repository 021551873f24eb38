"""The evaluation harness: what a task is, which tasks an evaluation runs, how numbers are read off a model.

``registry.py`` turns a ``tasks`` list into tasks from the task types (``llmexp.sdk.TaskType``,
the one task interface) the ``llmexp_evaluation_tasks`` hook registers;
``scoring.py`` (with ``decoding.py`` and ``tokens.py``) reads log-likelihoods, generations
and NLL off a causal LM as lm-evaluation-harness does; ``paired.py`` compares an evaluation
with its baseline item by item; ``learned_tasks.py`` adds what a model was trained for.
"""
