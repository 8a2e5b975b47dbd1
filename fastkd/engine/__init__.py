"""The fastkd training engine: distillation jobs described by a TOML config.

Modules: :mod:`~fastkd.engine.config` (schema, loading), :mod:`~fastkd.engine.schema` (the
config vocabulary: :class:`ConfigError`, ``Field``), :mod:`~fastkd.engine.tasks` (classification
and language modelling: data, models, what the loss consumes, metrics),
:mod:`~fastkd.engine.models` (small classifiers, GPT-2, modules by path),
:mod:`~fastkd.engine.losses` (loss terms and their registry),
:mod:`~fastkd.engine.compress` (pruning, quantization-aware training),
:mod:`~fastkd.engine.trainer` (the phase loop), :mod:`~fastkd.engine.plans` (methods as phases),
:mod:`~fastkd.engine.checkpoint` (atomic files, RNG state),
:mod:`~fastkd.engine.distributed` (DDP and FSDP2 helpers), :mod:`~fastkd.engine.memory` (peak
memory of a training step), :mod:`~fastkd.engine.report` (log, table, plot)
and :mod:`~fastkd.engine.runner` (a whole job).
"""

from fastkd.engine.config import ConfigError, default_config, load_config
from fastkd.engine.losses import LOSS_TERMS, LossTerm, register_loss_term
from fastkd.engine.runner import run_job

__all__ = ["ConfigError", "default_config", "load_config", "run_job", "LOSS_TERMS", "LossTerm", "register_loss_term"]
