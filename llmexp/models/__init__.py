"""Models and their weights: loading Hugging Face checkpoints, checking them, the hub cache, the embedded baseline."""
