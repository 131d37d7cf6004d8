"""Hydra multirun points (``sftdist-train -m train.lr=1e-5,2e-5,5e-5``, locally or through the submitit
launcher): each point trains in its own run directory under the sweep directory, and its W&B run joins a
group named after the sweep, named after its overrides."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def place_sweep_point(raw: DictConfig) -> None:
    """In a multirun, set ``output_dir`` to ``<hydra.sweep.dir>/<hydra.sweep.subdir>`` (a user's own
    ``output_dir`` becomes the parent of the points instead), ``logging.wandb_group`` to the sweep
    directory's name and ``run_name`` to the point's overrides, where they are not set. Runs stay as they are."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return
    hc = HydraConfig.get()
    given = any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in hc.overrides.task)
    subdir = str(hc.sweep.subdir)
    raw.output_dir = str(Path(raw.output_dir) / subdir) if given else str(Path(hc.sweep.dir) / subdir)
    if raw.logging.wandb_group is None:
        raw.logging.wandb_group = Path(hc.sweep.dir).name
    if raw.run_name is None:
        raw.run_name = hc.job.override_dirname or f"point-{hc.job.num}"
