"""The plugin face: everything a technique imports from llmexp's core, in one place.

A technique plugin (built-in or third-party) imports ``llmexp.sdk``, the dataset formats in
``llmexp.data``, and its own folder, never another plugin or another core module; the import
check in ``tests/test_import_architecture.py`` holds every built-in plugin to that. Names are
grouped by what a technique does with them. Importing this module does not import torch (the
planner and ``llmexp plugins`` load every plugin): the one name whose module does, the serving
engine, is imported when it is first used.
"""

from __future__ import annotations

# -- the contract: hooks, the technique class, what a stage gets and returns ------------------------
from llmexp.techniques.contract import (
    Consumed, Metric, MetricKind, ModelArtifact, Reads, ServedExport, StageContext, StageResult, Technique, TechniqueConfig,
)
from llmexp.techniques.hookspecs import hookimpl
from llmexp.techniques.plugin_manager import plugin_manager, technique, techniques
from llmexp.techniques.evaluation_tasks import TaskInputs, TaskResult, TaskType, declared

# -- the pipeline: its stages, where their nodes sit, which model each starts from ------------------
from llmexp.configuration.pipeline import TOP_LEVEL_NODES, input_stage, model_sources, node_path, stage_node_path, stage_nodes

# -- configuration a technique reads: job environment, backend settings, secrets ---------------------
from llmexp.configuration.compose import job_environment
from llmexp.configuration.schema import MegatronBackendConfig
from llmexp.configuration.secrets import REDACTED, redact_url_credentials, split_url_credentials

# -- errors, console, progress and atomic files ---------------------------------------------------
from llmexp.errors import UserError
from llmexp.display import console
from llmexp.display.console import warn
from llmexp.display.progress import Progress
from llmexp.atomic import replace_atomically
from llmexp.results.record import write_json_atomic

# -- statistics of results: means, standard errors, best scores, pass@k -------------------------------
from llmexp.results import statistics

# -- planning: architecture numbers, precision needs, memory per device's building blocks, this machine --
from llmexp.architecture import LINEAR_SHAPES, architecture, count_parameters, lora_parameters, lora_targets
from llmexp.planning.hardware import FP32_BYTES, PRECISION_NEEDS
from llmexp.planning.layout import Layout
from llmexp.machine.backends import gpu_driver_present, importable

# -- models: checkpoints, loading and saving, where the starting weights come from ---------------------
from llmexp.models import starting_weights
from llmexp.models.checkpoint import (
    FIELD, context_length, is_modelopt_export, model_numbers_from_hf_config, read_hf_config, validate_checkpoint_dir,
)
from llmexp.models.loading import (
    MODELOPT_STATE, enable_modelopt_checkpointing, evaluating, input_model, load_model, model_stats,
    new_embedded_model, run_device, save_model, starting_model,
)
from llmexp.running.base_model import base_model
from llmexp.models.unified_checkpoint import export_unified_checkpoint
from llmexp.models.starting_weights import has_weights, local_directory, tokenizer_directory, weights_directory

# -- training: the shared loop and its techniques' config, ranks, threads, peak memory ----------------
from llmexp.training import distributed
from llmexp.machine.cpu_threads import FreeCores
from llmexp.configuration.training_settings import training_problems, validation_problem
from llmexp.training.contract import LossOutput, TrainingConfig, TrainingTechnique
from llmexp.training.loop import train
from llmexp.machine.peak_memory import PeakMemory
from llmexp.training.trained_model import trained_model_result

# -- retrieval: documents, passages, the configured retriever, its metrics, passages in a prompt -------------
from llmexp.retrieval import (
    INDEX_DIRECTORY, Document, Hit, Passage, Retriever, build_retriever, chunk, documents_for, read_documents,
    retrieval_metrics, with_context,
)
# -- encoders dense retrieval embeds with: loading, contrastive training, ranking metrics, stage artifacts ----
from llmexp.retrieval.encoders import (
    ARTIFACT as ENCODER_ARTIFACT, EncoderTraining, Pair, embedded_held_out, embedded_pairs, encoder_consumed,
    encoder_problems, load_encoder, new_embedded_encoder, ranking_metrics, resolve_encoder, resolved_encoder_config,
    train_encoder,
)

# -- rails: a rails config directory's checks, the labelled prompts they are measured on ---------------------
from llmexp.rails import (
    REFUSAL, Rails, load_rails_config, rails_metrics, read_labelled_prompts, resolve_config_dir,
)
from llmexp.rails.sensitive_data import ENTITIES as SENSITIVE_ENTITIES, find_entities

# -- serving: what one `llmexp serve` serves, a request to it (the engine is imported on first use: it imports torch)
from llmexp.serving.generation import GenerationRequest
from llmexp.serving.served_models import ServedModels

_IMPORTED_ON_FIRST_USE = {"Engine": "llmexp.serving.engine", "measure_draft": "llmexp.serving.speculative_speed"}


def __getattr__(name: str):
    if name in _IMPORTED_ON_FIRST_USE:
        import importlib

        return getattr(importlib.import_module(_IMPORTED_ON_FIRST_USE[name]), name)
    raise AttributeError(f"module 'llmexp.sdk' has no attribute {name!r}")
