"""The megatron backend (``backend=megatron``): megatron-core training on CUDA GPUs.

``arguments`` translates our configs (pure Python, used by the planner), ``checkpoint_mapping``
moves weights between Hugging Face Llama and megatron-core's GPT layout along each rank's
``shard_layout`` (and ``bridge`` through Megatron-Bridge where it is installed), ``model_chunks``
builds this rank's model from a Hugging Face one and copies it back, ``train`` runs a training
technique's steps. Models
stay Hugging Face models between stages: a stage converts in, trains, and converts back.
"""
