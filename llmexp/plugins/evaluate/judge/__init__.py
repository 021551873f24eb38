"""The ``judge`` task type: answers graded by an LLM on an OpenAI-compatible endpoint.

``task.py`` is the task type (items, metrics, checks); ``template.py`` the YAML templates
(``templates/``) that turn an item into a request and a reply into a score; ``client.py``
the concurrent, retrying HTTP client; ``cache.py`` the on-disk cache of verdicts.
"""
