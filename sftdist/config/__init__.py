"""Typed run configuration: one dataclass per Hydra config group, the rules between groups, and how the
command line becomes a config. The bottom of the house: it imports nothing heavy (no torch).

- ``schema``: every group's dataclass (``ModelConfig`` ... ``SFTConfig``), checked in ``__post_init__``.
- ``launch``: the ``launch/`` group (``LaunchConfig``) and SLURM time limits.
- ``checks``: ``ConfigError`` and the small value checks every group uses.
- ``rules``: ``validate()``, the rules that span groups (batch arithmetic, precision vs. hardware, ...).
- ``overrides``: command-line overrides checked before Hydra composes them, named-model preference,
  recipe picks.
- ``sweep``: where a Hydra multirun point writes.
- ``compose``: ``compose_config(overrides)`` (what ``python -m sftdist.train overrides`` would run with)
  and ``load_run_config(run_dir)``.
- ``redact``: secrets kept out of what a run writes and logs.

``from sftdist.config import X`` works for the names below; modules inside this package import from the
module that defines a name.
"""

from sftdist.config.checks import ConfigError, check_choice, check_positive
from sftdist.config.compose import compose_config, compose_raw, load_run_config, register_configs
from sftdist.config.launch import LaunchConfig, slurm_minutes
from sftdist.config.rules import validate, validate_early_stopping
from sftdist.config.schema import (
                                   TRAIN_ON,
                                   DataConfig,
                                   DataSource,
                                   EarlyStoppingConfig,
                                   LoggingConfig,
                                   ModelConfig,
                                   ParallelConfig,
                                   PeftConfig,
                                   SFTConfig,
                                   TrainConfig,
                                   grad_accum_steps,
)

__all__ = ["ConfigError", "check_choice", "check_positive", "compose_config", "compose_raw", "load_run_config",
           "register_configs", "LaunchConfig", "slurm_minutes", "validate", "validate_early_stopping", "TRAIN_ON",
           "DataConfig", "DataSource", "EarlyStoppingConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
           "PeftConfig", "SFTConfig", "TrainConfig", "grad_accum_steps"]
