"""Rank-0 console output, the metrics.jsonl file and (lazily imported) Weights & Biases."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from sftdist.config import LoggingConfig
from sftdist.config.redact import redact, redact_text
from sftdist.engine.distributed import is_main

# Keys that W&B also gets under their pre-0.2 names (train/<key>, eval/<key>), so dashboards built on those
# keep working; logging.wandb_legacy_names=false drops them.
LEGACY_KEYS = ("loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_sec", "elapsed_s",
               "padding_fraction", "eval_loss")
LEGACY_PREFIXES = ("loss/", "supervised_tokens/", "eval_loss/", "eval_supervised_tokens/")


def wandb_key(key: str) -> str:
    """Pre-0.2 W&B name of a metrics.jsonl key: ``eval_loss/x`` -> ``eval/loss/x``, ``loss/x`` -> ``train/loss/x``."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def wandb_row(metrics: dict[str, Any], *, legacy: bool) -> dict[str, Any]:
    """What W&B gets for a metrics.jsonl row: every key under its own name, and with ``legacy`` the keys that
    existed before 0.2 also under ``wandb_key``.

    Example:
        >>> wandb_row({"step": 3, "loss": 1.5, "mfu": 0.4, "loss/web": None}, legacy=True)
        {'loss': 1.5, 'mfu': 0.4, 'train/loss': 1.5}
    """
    row = {k: v for k, v in metrics.items() if k != "step" and v is not None}
    if legacy:
        row |= {wandb_key(k): v for k, v in list(row.items()) if k in LEGACY_KEYS or k.startswith(LEGACY_PREFIXES)}
    return row


def wandb_dir(cfg: LoggingConfig, run_dir: Path) -> Path:
    """Where W&B writes: ``logging.wandb_dir``, else ``$WANDB_DIR``, else the run directory."""
    return Path(cfg.wandb_dir or os.environ.get("WANDB_DIR") or run_dir)


class MetricsLogger:
    """Writes one JSON object per optimizer step to ``metrics.jsonl`` and mirrors it to W&B.

    W&B gets each key under the same name (``wandb_row``), plus the pre-0.2 ``train/...`` / ``eval/...`` names
    of the older metrics while ``logging.wandb_legacy_names`` is on. Off rank 0 every method is a no-op, so
    callers need no rank checks.

    Args:
        run_dir: The run directory.
        cfg: The logging config group.
        run_name: W&B run name.
        config: The resolved run config, stored with the W&B run (secrets redacted, see ``redact``).
        wandb_id: The W&B run to continue (a resumed run's, recorded in its checkpoint), else a new one.
    """

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict[str, Any],
                 wandb_id: Optional[str] = None):
        self.enabled = is_main()
        self._file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self._samples_file = None
        self._samples: list[dict] = []
        self._run_dir, self._legacy = run_dir, cfg.wandb_legacy_names
        self._wandb: Optional[Any] = None
        if self.enabled and cfg.wandb_mode != "disabled":
            import wandb  # lazily: importing sftdist must not import wandb

            directory = wandb_dir(cfg, run_dir)
            directory.mkdir(parents=True, exist_ok=True)
            # Everything W&B stores from the config is scrubbed of secrets (a value may be ${oc.env:HF_TOKEN}).
            group, tags = redact([cfg.wandb_group, list(cfg.wandb_tags)])
            # A resumed or requeued run continues its W&B run (the id is kept in every checkpoint).
            self._wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=group, tags=tags,
                                     name=redact_text(run_name), mode=cfg.wandb_mode, dir=str(directory),
                                     config=redact(config), id=wandb_id, resume="allow" if wandb_id else None)

    @property
    def wandb_id(self) -> Optional[str]:
        """The W&B run's id (rank 0, W&B on), for the checkpoints to keep."""
        return self._wandb.id if self._wandb is not None else None

    def write(self, metrics: dict[str, Any]) -> None:
        """Record one optimizer step's metrics (must contain ``step``)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(wandb_row(metrics, legacy=self._legacy), step=metrics["step"])

    def write_samples(self, rows: list[dict]) -> None:
        """Append generations to ``samples.jsonl``; W&B gets a ``samples`` table of every one so far."""
        if not self.enabled or not rows:
            return
        if self._samples_file is None:
            self._samples_file = open(self._run_dir / "samples.jsonl", "a")
        for row in rows:
            self._samples_file.write(json.dumps(row) + "\n")
        self._samples_file.flush()
        if self._wandb is not None:
            import wandb

            self._samples += rows
            columns = ["step", "source", "prompt", "completion", "reference"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in self._samples])
            self._wandb.log({"samples": table}, step=rows[0]["step"])

    def write_probe_answers(self, rows: list[dict]) -> None:
        """Append the forgetting probe's answers of one eval to ``forgetting_probe.jsonl``."""
        if not self.enabled or not rows:
            return
        with open(self._run_dir / "forgetting_probe.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def close(self) -> None:
        """Close the files and finish the W&B run; a second call does nothing."""
        if self._file:
            self._file.close()
        if self._samples_file:
            self._samples_file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
