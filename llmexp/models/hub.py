"""A model preset's published weights, resolved through the Hugging Face cache (``huggingface_hub``).

``model.hub_repo`` at ``model.revision`` names them. ``snapshot_download`` finds them in the
cache (``HF_HUB_CACHE``, ``HF_HOME``), downloads what is missing with ``HF_TOKEN`` when the
network is allowed, and never touches the network under ``HF_HUB_OFFLINE=1``. Only what
loading reads is fetched: config, tokenizer and safetensors files, not the consolidated copy
of the same weights Meta's repositories keep in ``original/``. Every failure is a
``UserError`` naming the repository, the revision, the offline setting and the fix; the
token is never printed.

Pure Python until something is resolved: the planner imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from llmexp.display import console
from llmexp.errors import UserError
from llmexp.failure import reason_of
from llmexp.machine import ranks

# What ``llmexp.models.loading.load_model`` reads; nothing else of a repository is fetched.
FILES = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
# What a tokenizer alone reads: an endpoint benchmark or a prebuilt engine's repository needs no weights.
TOKENIZER_FILES = ["*.json", "tokenizer*", "*.txt", "*.model"]
SKIPPED = ["original/*"]


@dataclass(frozen=True)
class PublishedWeights:
    repo: str
    revision: str

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}"

    def download_command(self) -> str:
        return f"hf download {self.repo} --revision {self.revision}"


def published_weights(model_cfg) -> Optional[PublishedWeights]:
    """The preset's published weights when they are the run's: ``model.hub_repo`` set and ``model.path`` unset."""
    if model_cfg.get("path") or not model_cfg.get("hub_repo"):
        return None
    return PublishedWeights(model_cfg.hub_repo, model_cfg.revision)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def repo_problem(weights: PublishedWeights) -> Optional[str]:
    """Why ``weights.repo`` cannot name a repository, or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(weights.repo)
    except HFValidationError as error:
        return (f"model.hub_repo={weights.repo} is not a Hugging Face repository id ({reason_of(error)}); write it "
                "as org/name (meta-llama/Llama-3.2-1B), or set model.path=<a local checkpoint directory>.")
    return None


def cached_snapshot(weights: PublishedWeights, files: List[str] = FILES) -> Optional[Path]:
    """The snapshot of ``weights`` in the cache, complete in ``files``, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(weights.repo, revision=weights.revision, local_files_only=True,
                                      allow_patterns=files, ignore_patterns=SKIPPED))
    except LocalEntryNotFoundError:  # not there, or a snapshot an interrupted download left incomplete
        return None


def not_cached_message(weights: PublishedWeights) -> str:
    """The refusal of published weights that are not in the cache while ``HF_HUB_OFFLINE=1``."""
    return (f"model.hub_repo={weights.repo} (revision {weights.revision}) is not in the Hugging Face cache "
            f"({cache_dir()}), and HF_HUB_OFFLINE=1 forbids downloading it. Download it where the network is "
            f"reachable, into the same cache (`{weights.download_command()}`), or unset HF_HUB_OFFLINE; or set "
            "model.path=<a local checkpoint directory>.")


def fetch(weights: PublishedWeights, files: List[str] = FILES) -> Path:
    """The snapshot directory of ``weights`` holding ``files``, downloading what the cache lacks unless offline
    (saying so first)."""
    from huggingface_hub import constants, get_token, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if offline():
        snapshot = cached_snapshot(weights, files)
        if snapshot is None:
            raise UserError(not_cached_message(weights))
        return snapshot
    if ranks.is_rank_zero() and cached_snapshot(weights, files) is None:
        console.err.print(f"model: downloading {weights} from the Hugging Face Hub into {cache_dir()}", highlight=False,
                          soft_wrap=True)
    token = "HF_TOKEN is unset" if get_token() is None else "the token in use (HF_TOKEN) has no access to it"
    local = "or set model.path=<a local checkpoint directory>"
    try:
        return Path(snapshot_download(weights.repo, revision=weights.revision, allow_patterns=files,
                                      ignore_patterns=SKIPPED))
    except GatedRepoError:
        message = (f"model.hub_repo={weights.repo} is gated and {token}. Accept its license at "
                   f"{constants.ENDPOINT}/{weights.repo} and set HF_TOKEN to a read token of that account, {local}.")
    except RevisionNotFoundError:
        message = (f"model.hub_repo={weights.repo} has no revision {weights.revision}; set model.revision to one of "
                   f"its branches, tags or commit hashes, {local}.")
    except RepositoryNotFoundError:
        message = (f"model.hub_repo={weights.repo} (revision {weights.revision}) is not on the Hugging Face Hub, or "
                   f"it is private and {token}. Check the repository id, set HF_TOKEN, {local}.")
    except LocalEntryNotFoundError as error:  # the Hub could not be reached and the cache lacks files
        message = (f"model.hub_repo={weights.repo} (revision {weights.revision}) could not be downloaded: the Hugging "
                   f"Face Hub was not reachable ({reason_of(error)}) and the cache ({cache_dir()}) does not hold it "
                   f"(HF_HUB_OFFLINE is off). Retry with network access, download it elsewhere into the same cache "
                   f"(`{weights.download_command()}`), {local}.")
    except (HfHubHTTPError, OSError) as error:
        message = (f"model.hub_repo={weights.repo} (revision {weights.revision}) could not be downloaded "
                   f"({reason_of(error)}). Retry, download it with "
                   f"`{weights.download_command()}`, {local}.")
    raise UserError(message)
