"""The run directory: deciding between a fresh run, a resumed run and a refusal, and writing the resolved
configs. Earlier runs are never overwritten unless ``train.overwrite=true``. Only rank 0 writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from sftdist.checkpoint import latest_checkpoint
from sftdist.config import ConfigError
from sftdist.parallel import is_main

RUN_MARKERS = ("metrics.jsonl", "final", "checkpoints")


def resolve_resume(run_dir: Path, *, resume: str, overwrite: bool) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run.

    - ``resume=auto``: the latest complete checkpoint in ``run_dir``; a run directory with a finished run
      (``final/``) or with metrics but no checkpoint is refused unless ``overwrite``.
    - ``resume=never``: a fresh run; refused if ``run_dir`` already holds a run, unless ``overwrite``.
    - ``resume=PATH``: that checkpoint directory (``.../checkpoints/step-N``).

    Raises:
        ConfigError: naming the directory and what it holds.
    """
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"train.resume={resume}: not a complete sftdist checkpoint (no trainer_state.json)")
        return path
    if overwrite:
        return None
    latest = latest_checkpoint(run_dir) if resume == "auto" else None
    if latest is not None and not (run_dir / "final").exists():
        return latest
    if found:
        why = "a finished run" if (run_dir / "final").exists() else f"a run ({', '.join(found)})"
        raise ConfigError(f"output_dir={run_dir} already holds {why}; choose another output_dir, resume from a "
                          f"checkpoint with train.resume=PATH, or set train.overwrite=true to replace it")
    return None


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume_step: Optional[int], config_yaml: str,
                    ds_config: dict) -> None:
    """Create the run directory and write ``config.yaml`` and ``ds_config.json`` (rank 0).

    A fresh run with ``overwrite`` first removes the earlier run's metrics, checkpoints and final model. A
    resumed run keeps ``metrics.jsonl`` up to the resumed step, so the file reads as one uninterrupted run.
    """
    if not is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and resume_step is None:
        for m in RUN_MARKERS:
            path = run_dir / m
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if resume_step is not None and metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        metrics.write_text("".join(r + "\n" for r in rows))
    (run_dir / "config.yaml").write_text(config_yaml)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
