"""The run directory: deciding between a fresh run, a resumed run and a refusal, writing the resolved
configs, and keeping ``checkpoints/`` consistent with the step a run resumes from. Earlier runs are never
overwritten unless ``train.overwrite=true``, and even then not a run that can resume. Only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from sftdist.config import ConfigError
from sftdist.config.redact import redact, redact_yaml
from sftdist.engine.distributed import is_main, log
from sftdist.lifecycle.checkpoint import CHECKPOINTS, latest_checkpoint, saved_state, step_of

RUN_MARKERS = ("metrics.jsonl", "final", "checkpoints")
STEP_LOGS = ("metrics.jsonl", "samples.jsonl")  # one JSON object per line, each with its "step"


def resolve_resume(run_dir: Path, *, resume: str, overwrite: bool) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run.

    - ``resume=auto``: the latest complete checkpoint in ``run_dir`` of an unfinished run, even with
      ``overwrite`` (a requeued job must continue, not start over). A finished run (``final/``), or metrics
      without a checkpoint, is refused unless ``overwrite``, which then starts afresh.
    - ``resume=never``: a fresh run; refused if ``run_dir`` already holds a run, unless ``overwrite``.
    - ``resume=PATH``: that checkpoint directory (``.../checkpoints/step-N``), while ``run_dir`` has no
      checkpoint of its own that went on from it: a rerun of the same command (a requeued warm start)
      continues from its own latest checkpoint instead of rolling back to PATH every time.

    A SLURM job that was requeued (``SLURM_RESTART_COUNT``) before its first checkpoint starts over, with its
    earlier attempt's files moved into ``abandoned-attempt-N/``: with ``train.save_every=0`` a timed-out
    sweep point would otherwise be refused on every requeue.

    Raises:
        ConfigError: naming the directory and what it holds.
    """
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"train.resume={resume}: not a complete sftdist checkpoint (no trainer_state.json)")
        own = latest_checkpoint(run_dir)
        if own is not None and saved_state(own).get("resumed_from") == str(path.resolve()):
            log(f"train.resume={resume}: this run directory already went on from it to {own.name}; resuming "
                f"from {own} (the same command continues; to start from {path.name} again, use a new output_dir)")
            return own
        return path
    latest = latest_checkpoint(run_dir) if resume == "auto" else None
    if latest is not None and not (run_dir / "final").exists():
        if overwrite:
            log(f"train.overwrite=true does not discard a run that can resume: resuming from {latest} "
                f"(train.resume=never train.overwrite=true starts over)")
        return latest
    if overwrite or not found:
        return None
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts and latest is None and not (run_dir / "final").exists():
        # The same SLURM job, requeued (a time-out, a preemption) before its first checkpoint: it starts
        # over; what its earlier attempt wrote is kept aside, never deleted.
        aside = set_attempt_aside(run_dir)
        log(f"this SLURM job was requeued (SLURM_RESTART_COUNT={restarts}) before its first checkpoint: "
            f"starting over; the earlier attempt's files are in {aside}")
        return None
    why = "a finished run" if (run_dir / "final").exists() else f"a run ({', '.join(found)})"
    raise ConfigError(f"output_dir={run_dir} already holds {why}; choose another output_dir, resume from a "
                      f"checkpoint with train.resume=PATH, or set train.overwrite=true to replace it")


def set_attempt_aside(run_dir: Path) -> Path:
    """Move an attempt's step logs and checkpoint leftovers into ``abandoned-attempt-N/``; return it."""
    n = 1
    while (run_dir / f"abandoned-attempt-{n}").exists():
        n += 1
    aside = run_dir / f"abandoned-attempt-{n}"
    aside.mkdir()
    for name in (*RUN_MARKERS, *STEP_LOGS):
        if (run_dir / name).exists():
            (run_dir / name).rename(aside / name)
    return aside


def resume_origin(resume: str, resume_from: Optional[Path]) -> Optional[str]:
    """The ``train.resume=PATH`` this run's history starts from, recorded in its checkpoints: PATH itself
    when the run starts from it, else what the checkpoint it resumes from recorded (None: its own history)."""
    if resume_from is None:
        return None
    if resume not in ("auto", "never") and resume_from.resolve() == Path(resume).resolve():
        return str(resume_from.resolve())
    return saved_state(resume_from).get("resumed_from")


def check_writable(run_dir: Path) -> None:
    """Fail before any expensive work when ``output_dir`` cannot be created or written (a path under a file, a
    read-only or foreign directory), instead of after the data stage or at the first checkpoint.

    Raises:
        ConfigError: naming output_dir and the part of the path that is in the way.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir={run_dir} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "output_dir" if existing == run_dir else f"its parent {existing}"
        raise ConfigError(f"output_dir={run_dir} is not writable ({what} does not allow this user to write); "
                          f"choose another output_dir")


def clean_partial_saves(run_dir: Path) -> list[Path]:
    """Remove what crashed saves left (``checkpoints/*.tmp``, ``final.tmp``, ``final_merged.tmp``); call
    before anything writes."""
    if not is_main():
        return []
    partial = [*(run_dir / CHECKPOINTS).glob("*.tmp"), *run_dir.glob("final*.tmp")]
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return partial


def retire_newer_checkpoints(run_dir: Path, step: int) -> Optional[Path]:
    """Move the checkpoints of steps after ``step`` aside, into ``checkpoints/abandoned-after-step-N/``.

    A run resumed from step N (a rollback) trains a new history from there: checkpoints of the old one must
    neither be resumed by ``resume=auto`` nor count for ``keep_last``; they are kept, not deleted. Then
    ``latest`` names ``step-N`` if this run directory has it, and is removed otherwise.

    Returns:
        The directory they were moved to, or None when there were none.
    """
    root = run_dir / CHECKPOINTS
    if not is_main() or not root.is_dir():
        return None
    newer = [p for p in root.iterdir() if p.name.startswith("step-") and p.is_dir() and step_of(p) > step]
    aside = None
    if newer:
        aside = root / f"abandoned-after-step-{step}"
        n = 1
        while aside.exists():
            n += 1
            aside = root / f"abandoned-after-step-{step}-{n}"
        aside.mkdir()
        for path in newer:
            path.rename(aside / path.name)
    if (root / f"step-{step}" / "trainer_state.json").exists():
        (root / "latest.tmp").write_text(f"step-{step}\n")
        (root / "latest.tmp").replace(root / "latest")
    elif newer:
        (root / "latest").unlink(missing_ok=True)
    return aside


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume_step: Optional[int], config_yaml: str,
                    ds_config: dict) -> None:
    """Create the run directory and write ``config.yaml`` and ``ds_config.json`` (rank 0).

    A fresh run with ``overwrite`` first removes the earlier run's metrics, samples, checkpoints and final
    model. A resumed run keeps ``metrics.jsonl`` and ``samples.jsonl`` up to the resumed step, so each reads
    as one uninterrupted run.
    """
    if not is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and resume_step is None:
        for m in RUN_MARKERS + STEP_LOGS:
            path = run_dir / m
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for name in STEP_LOGS:
        if resume_step is not None and (run_dir / name).exists():
            rows = rows_up_to((run_dir / name).read_text(), resume_step)
            (run_dir / name).write_text("".join(r + "\n" for r in rows))
    # Secrets a config value resolved to (e.g. ${oc.env:HF_TOKEN}) never reach the run directory.
    (run_dir / "config.yaml").write_text(redact_yaml(config_yaml))
    (run_dir / "ds_config.json").write_text(json.dumps(redact(ds_config), indent=2) + "\n")


def rows_up_to(text: str, step: int) -> list[str]:
    """The lines of a step log whose ``step`` is at most ``step``; a line a killed run left half-written is
    dropped.

    Example:
        >>> rows_up_to('{"step": 0}\\n{"step": 1}\\n{"step": 2}\\n{"st', 1)
        ['{"step": 0}', '{"step": 1}']
    """
    kept = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept
