"""Rank-0 console output, the metrics.jsonl file and (lazily imported) Weights & Biases."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from sftdist.config import LoggingConfig
from sftdist.parallel import is_main

_START = time.time()


def log(msg: str) -> None:
    """Print one line on rank 0 (every other rank stays silent)."""
    if is_main():
        print(f"[sftdist {time.time() - _START:7.1f}s] {msg}", file=sys.stdout, flush=True)


def wandb_key(key: str) -> str:
    """W&B name of a metrics.jsonl key: ``eval_loss/x`` -> ``eval/loss/x``, ``loss/x`` -> ``train/loss/x``."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


class MetricsLogger:
    """Writes one JSON object per optimizer step to ``metrics.jsonl`` and mirrors it to W&B.

    Flat keys (``loss``, ``lr``, ``loss/<source>``, ``eval_loss``, ...) go to the file; W&B gets them under
    ``train/`` and ``eval/`` (see ``wandb_key``). Off rank 0 every
    method is a no-op, so callers need no rank checks.

    Args:
        run_dir: The run directory.
        cfg: The logging config group.
        run_name: W&B run name.
        config: The resolved run config, stored with the W&B run.
    """

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict[str, Any]):
        self.enabled = is_main()
        self._file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self._wandb: Optional[Any] = None
        if self.enabled and cfg.wandb_mode != "disabled":
            import wandb  # lazily: importing sftdist must not import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group,
                                     tags=list(cfg.wandb_tags), name=run_name, mode=cfg.wandb_mode,
                                     dir=str(run_dir), config=config)

    def write(self, metrics: dict[str, Any]) -> None:
        """Record one optimizer step's metrics (must contain ``step``)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({wandb_key(k): v for k, v in metrics.items() if k != "step" and v is not None},
                            step=metrics["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
