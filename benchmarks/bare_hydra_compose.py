"""The strict baseline of bench_startup.py: Hydra's compose API on llmexp's config tree, nothing else.

``python benchmarks/bare_hydra_compose.py model=llama3_1_70b hardware=a100_80g parallelism=tp8``
Composes as ``llmexp plan`` does (no run directory, no logging set-up), then prints three values.
"""

import sys

from hydra import compose, initialize_config_module

from llmexp.configuration.compose import register_configs

register_configs()  # llmexp_schema and technique/<name> live in the ConfigStore, not in llmexp/conf/
with initialize_config_module("llmexp.conf", version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[1:])
print(cfg.model.name, cfg.hardware.name, cfg.parallelism.tp)
