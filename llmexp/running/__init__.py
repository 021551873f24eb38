"""One run: the stages of a pipeline in order, each failure recorded in one line."""
