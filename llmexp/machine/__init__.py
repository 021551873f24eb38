"""What this machine has and how a job uses it: the engines installed here, the cores a job may use, the memory it peaked at.

The lowest layer above the errors: it imports nothing else of llmexp, so the planner, the
training loop, the server and the record can all ask it.
"""
