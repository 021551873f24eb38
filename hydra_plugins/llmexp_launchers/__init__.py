"""llmexp's Hydra launchers, where Hydra looks for them.

Hydra registers a launcher under its class's module and instantiates only classes whose
module is in the ``hydra_plugins`` namespace, so the class Hydra sees is defined here, as
the launcher in ``llmexp.launchers`` (where its code and tests live).
"""

from llmexp.launchers import slurm


class SlurmLauncher(slurm.SlurmLauncher):
    """``hydra/launcher=slurm`` (llmexp/conf/hydra/launcher/slurm.yaml); see ``llmexp.launchers.slurm``."""
