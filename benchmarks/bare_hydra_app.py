"""The baseline of bench_startup.py: a bare ``@hydra.main`` app composing llmexp's config tree.

``python benchmarks/bare_hydra_app.py model=llama3_1_70b hardware=a100_80g parallelism=tp8``
llmexp/conf/config.yaml's defaults name ``llmexp_schema`` and ``technique: pretrain``, which exist
only in Hydra's ConfigStore, so the app registers them first, as ``llmexp`` itself does.
"""

import hydra

from llmexp.configuration.compose import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://llmexp.conf", config_name="config")
def main(cfg):
    print(cfg.model.name, cfg.hardware.name, cfg.parallelism.tp)


if __name__ == "__main__":
    main()
