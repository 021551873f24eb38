"""The built-in task types, one module per benchmark format; the plugin registers them through ``llmexp_evaluation_tasks``.

``embedded.py``: the tasks over the package's generated data (named bare in ``tasks``).
Over the user's files (described as ``{type: ..., path: ...}``): ``mmlu.py`` (MMLU's CSV
release), ``continuation.py`` (HellaSwag / ARC style multiple choice), ``generation.py``
(GSM8K and its kin, regex answer filters), ``text_perplexity.py``, ``similarity.py`` (ROUGE,
BLEU, F1), ``code.py`` (HumanEval, pass@k in the sandbox), ``lm_eval.py`` (any
lm-evaluation-harness task YAML) and the ``judge`` (``../judge/``); ``retrieval.py`` scores the run's retriever.
"""

from __future__ import annotations

from llmexp.plugins.evaluate.judge.task import JUDGE
from llmexp.plugins.evaluate.tasks.code import CODE
from llmexp.plugins.evaluate.tasks.continuation import CONTINUATION
from llmexp.plugins.evaluate.tasks.embedded import TASKS
from llmexp.plugins.evaluate.tasks.generation import GENERATION
from llmexp.plugins.evaluate.tasks.lm_eval import LM_EVAL
from llmexp.plugins.evaluate.tasks.mmlu import MMLU
from llmexp.plugins.evaluate.tasks.rails import RAILS
from llmexp.plugins.evaluate.tasks.retrieval import RETRIEVAL
from llmexp.plugins.evaluate.tasks.similarity import SIMILARITY
from llmexp.plugins.evaluate.tasks.text_perplexity import TEXT_PERPLEXITY

BUILT_IN = (*TASKS.values(), MMLU, CONTINUATION, GENERATION, TEXT_PERPLEXITY, SIMILARITY, CODE, JUDGE, LM_EVAL,
            RETRIEVAL, RAILS)
