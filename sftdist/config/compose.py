"""Compose the typed config from ``conf/`` and command-line overrides (Hydra), or read a run's own."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from sftdist.config.launch import sbatch_parameters, slurm_minutes
from sftdist.config.schema import SFTConfig


def compose_raw(overrides: list[str]):
    """The composed ``DictConfig`` that ``python -m sftdist.train overrides...`` would start from."""
    from hydra import compose, initialize_config_module

    from sftdist.config.overrides import check_override_keys, prefer_named_model

    check_override_keys(overrides)
    register_configs()
    with initialize_config_module(config_module="sftdist.conf", version_base=None):
        raw = compose(config_name="config", overrides=overrides)
    prefer_named_model(raw, overrides)
    return raw


def compose_config(overrides: list[str]) -> SFTConfig:
    """The typed config that ``python -m sftdist.train overrides...`` would run with (for the CLIs that
    are not Hydra apps themselves: sftdist-launch, sftdist-prepare, sftdist-data)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_raw(overrides))


def load_run_config(run_dir) -> SFTConfig:
    """The typed config a run trained with, from its ``config.yaml`` (written fully resolved at its start)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SFTConfig),
                                               OmegaConf.load(Path(run_dir) / "config.yaml")))


def register_configs() -> None:
    """Register the root schema so that ``conf/config.yaml`` can name it in its defaults, and the
    ``sftdist_minutes``, ``sftdist_or`` and ``sftdist_sbatch`` resolvers that ``conf/hydra/launcher/slurm.yaml``
    uses."""
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)
    if not OmegaConf.has_resolver("sftdist_minutes"):
        OmegaConf.register_new_resolver("sftdist_minutes", slurm_minutes)
        # the first value that is set and non-zero, e.g. processes per node = nproc_per_node or GPUs or 1
        OmegaConf.register_new_resolver("sftdist_or", lambda *values: next((v for v in values if v), None))
    if not OmegaConf.has_resolver("sftdist_sbatch"):
        OmegaConf.register_new_resolver("sftdist_sbatch", lambda mem, requeue, extra: sbatch_parameters(
            mem, requeue, list(extra)))
