"""Training: the shared loop on the torch engine, the megatron engine, distributed set-up, resumable checkpoints."""
