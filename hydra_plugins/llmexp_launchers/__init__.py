"""llmexp's Hydra launchers, where Hydra looks for them.

Hydra registers a launcher under its class's module and instantiates only classes whose
module is in the ``hydra_plugins`` namespace, so the classes Hydra sees are defined here, as
the launchers in ``llmexp.launchers`` (where their code and tests live).
"""

from llmexp.launchers import kubernetes, local, slurm


class SlurmLauncher(slurm.SlurmLauncher):
    """``hydra/launcher=slurm`` (llmexp/conf/hydra/launcher/slurm.yaml); see ``llmexp.launchers.slurm``."""


class LocalLauncher(local.LocalLauncher):
    """``hydra/launcher=local`` (llmexp/conf/hydra/launcher/local.yaml); see ``llmexp.launchers.local``."""


class KubernetesLauncher(kubernetes.KubernetesLauncher):
    """``hydra/launcher=kubernetes`` (llmexp/conf/hydra/launcher/kubernetes.yaml); see ``llmexp.launchers.kubernetes``."""
