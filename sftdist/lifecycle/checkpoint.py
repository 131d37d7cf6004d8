"""Checkpoints that resume exactly, and the final Hugging Face export.

A checkpoint ``checkpoints/step-N/`` holds DeepSpeed's engine state (trainable module weights, optimizer,
lr scheduler; one shard per rank under ZeRO), ``trainer_state.json`` (the step, since the data order is a
pure function of the step; the world size and ZeRO stage; the run's sample-order settings, see
``resume_check``) and one RNG-state file per rank, all tensors and plain values so that it loads with
``weights_only=True``. Frozen weights (a LoRA base model) are not saved: the run rebuilds them from the base.
It is written as ``step-N.tmp`` and renamed once every rank has finished, and only then does
``checkpoints/latest`` name it: a crash mid-save leaves the previous checkpoint valid. A save or export
that fails (disk full, quota) raises ``CheckpointError``, removes its partial directory, and leaves
``latest`` and the checkpoint it names as they were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sftdist.engine import sequence_parallel
from sftdist.engine.distributed import barrier, is_main, main_only, rank, world_size
from sftdist.lifecycle.safe_load import UnsafeCheckpointError, weights_only_loads

CHECKPOINTS = "checkpoints"
DATA_STATE = "data_state_rank"  # + rank + .pt: a streamed run's positions, packing buffer and RNG per rank


class CheckpointError(RuntimeError):
    """A checkpoint or the final model could not be written (disk full, quota, permissions). The message
    says which earlier checkpoint is intact and how to go on."""


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names, if it exists and is complete.

    Without ``latest`` at all, the newest complete ``step-N``: a run killed between renaming its first
    checkpoint into place and writing ``latest`` for the first time. (The only other way ``latest`` goes
    missing is ``rundir.retire_newer_checkpoints``, which then leaves an ``abandoned-after-step-N``
    directory, and then nothing here is resumed.) When ``latest`` names a checkpoint that is gone or
    incomplete (deleted by hand, a disk cleaned up), also the newest complete ``step-N``: never None while a
    complete checkpoint is there, or ``train.overwrite=true`` would delete it with the run.
    """
    root = run_dir / CHECKPOINTS
    latest = root / "latest"
    if latest.exists():
        path = root / latest.read_text().strip()
        if (path / "trainer_state.json").exists():
            return path
    elif not root.is_dir() or any(root.glob("abandoned-after-step-*")):
        return None
    complete = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "trainer_state.json").exists()]
    return max(complete, key=step_of, default=None)


def checkpoint_step(path: Path) -> int:
    """The optimizer step a complete checkpoint was saved after."""
    return int(json.loads((path / "trainer_state.json").read_text())["step"])


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def has_frozen_parameters(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def save_checkpoint(engine, run_dir: Path, step: int, *, keep_last: int, run_settings: dict,
                    eval_state: Optional[dict] = None, protect_step: Optional[int] = None,
                    resumed_from: Optional[str] = None, wandb_id: Optional[str] = None,
                    data_state: Optional[dict] = None) -> Path:
    """Save a complete checkpoint after optimizer step ``step`` (every rank must call this), then prune.

    Pruning keeps the ``keep_last`` newest checkpoints up to ``step``, always including this one, and never
    removes ``protect_step`` (the best eval step, which early stopping may export). ``eval_state`` (the
    step-0 eval baseline and early-stopping state) is stored in ``trainer_state.json``, and with it
    ``resumed_from``: the ``train.resume=PATH`` this run's history started from (``rundir.resolve_resume``),
    and ``wandb_id``: the W&B run a resume continues. ``data_state`` (a streamed run's positions, packing
    buffer and RNG on this rank) goes to ``data_state_rank{rank}.pt``.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / CHECKPOINTS
    tag = f"step-{step}"
    tmp = root / f"{tag}.tmp"
    try:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save that crashed
            root.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(root), tag=f"{tag}.tmp", save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), tmp / f"rng_state_rank{rank()}.pt")
        if data_state is not None:
            torch.save(data_state, tmp / f"{DATA_STATE}{rank()}.pt")
        barrier()  # every rank's shards and RNG state are on disk
        if is_main():
            write_trainer_state(tmp, {"step": step, "world_size": world_size(),
                                      "zero_stage": engine.zero_optimization_stage(),
                                      "sequence_parallel_size": sequence_parallel.size(), "run": run_settings,
                                      "eval": eval_state or {}, "resumed_from": resumed_from,
                                      "wandb_id": wandb_id})
            publish(root, tag)
    except Exception as e:
        if (why := write_failure(e, root)) is None:
            raise
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # also gives back the space it took
        raise CheckpointError(f"could not save checkpoint {tag} to {root / tag}: {why}; "
                              f"{recovery_hint(run_dir)}") from e
    if is_main():
        older = sorted((p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and step_of(p) < step
                        and step_of(p) != protect_step), key=step_of)
        for old in older[:max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)
    barrier()
    return root / tag


def write_trainer_state(tmp: Path, state: dict) -> None:
    """Write ``trainer_state.json``, the last file of a checkpoint: its presence marks the directory complete."""
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")


def publish(root: Path, tag: str) -> None:
    """Rename the finished ``<tag>.tmp`` to ``<tag>`` and point ``latest`` at it (rank 0).

    A kill at any point leaves ``latest`` naming a complete checkpoint: the rename and the pointer update
    are each atomic, and the pointer moves only after the rename. A ``<tag>`` that already exists (the loop
    never saves a step twice, so this is a leftover of another history) is removed first, unless it is the
    one ``latest`` names: then it stays, and this copy of the same step is dropped.
    """
    final, tmp = root / tag, root / f"{tag}.tmp"
    if final.exists():
        if _latest_name(root) == tag:
            shutil.rmtree(tmp)
            return
        shutil.rmtree(final)
    os.rename(tmp, final)
    point_latest(root, tag)


def point_latest(root: Path, tag: str) -> None:
    """Make ``checkpoints/latest`` name ``tag``, atomically (write a new file, then rename it over)."""
    pointer = root / "latest.tmp"
    pointer.write_text(tag + "\n")
    os.replace(pointer, root / "latest")


def _latest_name(root: Path) -> Optional[str]:
    latest = root / "latest"
    return latest.read_text().strip() if latest.exists() else None


def recovery_hint(run_dir: Path) -> str:
    """What is intact after a failed save, and how to go on: resume from ``latest``, or start over."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return ("there is no earlier checkpoint to resume from: free space, then start over with "
                "train.overwrite=true")
    return f"the previous checkpoint {latest.name} is intact; free space and rerun the same command to resume"


# How torch.save's zip writer and safetensors report a failed write (they raise RuntimeError or their own
# error type, not OSError, and without errno's words), as measured on a full tmpfs and a failing writer.
WRITE_FAILURES = ("iostream error", "unexpected pos", "file write failed", "PytorchStreamWriter failed",
                  "No space left", "Disk quota exceeded", "StorageFull", "IoError")
LOW_SPACE = 16 * 2**20  # bytes free below which a failed write is put down to a full disk


def write_failure(e: BaseException, where: Path) -> Optional[str]:
    """Why writing under ``where`` failed, in the OS's words where possible, or None when ``e`` is not a
    failed write (then it is a bug, and keeps its traceback).

    Call it before removing the partial files: a disk that is full now is why the write failed.
    """
    try:
        full = shutil.disk_usage(where).free < LOW_SPACE
    except OSError:
        full = False
    if isinstance(e, OSError):
        return e.strerror or str(e)
    chain = [str(x) for x in (e, e.__context__) if x is not None]
    if not full and not any(s in text for text in chain for s in WRITE_FAILURES):
        return None
    detail = chain[-1].strip().splitlines()[-1] if chain[-1].strip() else type(e).__name__
    return f"{os.strerror(errno.ENOSPC)} ({detail})" if full else detail


def step_of(path: Path) -> int:
    """The step in a checkpoint directory's name: ``step-12`` (or ``step-12.universal``) -> 12."""
    return int(path.name.split("-")[1].split(".")[0])


def saved_state(path: Path) -> dict:
    """A complete checkpoint's ``trainer_state.json``."""
    return json.loads((path / "trainer_state.json").read_text())


def saved_world_size(path: Path) -> int:
    """How many data-parallel ranks wrote a checkpoint."""
    return int(json.loads((path / "trainer_state.json").read_text())["world_size"])


def needs_universal(path: Path, world: int) -> bool:
    """Whether a checkpoint must be converted to load on ``world`` ranks: ZeRO 1-3 shard the optimizer state
    by rank (``*_optim_states.pt``); ZeRO-0 keeps it whole in the model-states file, which loads anywhere."""
    return saved_world_size(path) != world and any(path.glob("*optim_states.pt"))


def universal_checkpoint(path: Path) -> Path:
    """The checkpoint in DeepSpeed's universal format, which loads on any number of ranks.

    Converted once with ``deepspeed.checkpoint.ds_to_universal`` into ``step-N.universal`` beside it. Call it
    on global rank 0 only (``parallel.main_only``): on shared storage, converters on several nodes would
    write and clean up the same directory. Load it with ``checkpoint.load_universal`` in the DeepSpeed config.

    Raises:
        UnsafeCheckpointError: when a shard holds anything but tensors and DeepSpeed's checkpoint types.
    """
    out = path.with_name(path.name + ".universal")
    if (out / "trainer_state.json").exists():
        return out
    tmp = path.with_name(path.name + ".universal.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Under safe_load's guard: the converter itself unpickles every shard with weights_only=False.
    proc = subprocess.run([sys.executable, "-m", "sftdist.lifecycle.safe_load", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(path), "--output_folder", str(tmp), "--num_extract_workers", "1",
                           "--num_merge_workers", "1", "--inject_missing_state"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = [line for line in proc.stderr.splitlines() if line.startswith("sftdist.lifecycle.safe_load: error: ")]
        if refused:
            raise UnsafeCheckpointError(refused[-1].split("error: ", 1)[1])
        raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
    shutil.copy(path / "trainer_state.json", tmp / "trainer_state.json")
    os.rename(tmp, out)
    return out


def load_checkpoint(engine, path: Path) -> int:
    """Restore engine, optimizer, scheduler and this rank's RNG state; return the step to continue after.

    Every file is unpickled with ``weights_only=True`` (``safe_load``): DeepSpeed's own loader would run
    any code a tampered checkpoint file holds.

    Raises:
        RuntimeError: when DeepSpeed cannot load the checkpoint (e.g. a different ZeRO stage).
        UnsafeCheckpointError: when a file holds anything but tensors and DeepSpeed's checkpoint types.
    """
    with weights_only_loads():
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True,
                                           load_module_strict=not has_frozen_parameters(engine))
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        rng_file = path / f"rng_state_rank{rank()}.pt"
        if rng_file.exists():  # absent in a universal checkpoint: another world size draws other numbers anyway
            set_rng_state(torch.load(rng_file, weights_only=True))
    return checkpoint_step(path)


def load_data_state(path: Path) -> Optional[dict]:
    """This rank's streamed-data state in checkpoint ``path`` (``save_checkpoint``'s ``data_state``), or None
    when the run that wrote it did not stream."""
    f = path / f"{DATA_STATE}{rank()}.pt"
    return torch.load(f, weights_only=True) if f.exists() else None


def save_final(engine, tokenizer, run_dir: Path) -> Path:
    """Write ``final/``: an HF model directory (safetensors, config, tokenizer and chat template); with
    LoRA, the adapter.

    Every rank must call this: under ZeRO-3 the weights are gathered from all ranks first. The directory
    appears under its name only once complete (written as ``final.tmp``, then renamed).

    Returns:
        The path of ``final/``.
    """
    module = engine.module
    state_dict = _final_state_dict(engine)
    final = run_dir / "final"

    def write(tmp: Path) -> None:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)

    # Rank 0 writes while the others wait on the day-long group: writing a 70B model can take longer than
    # the training group's collective_timeout_s, and a finished run must not then "fail" (#25).
    main_only(lambda: write_whole_dir(final, write, what="the final model", hint=recovery_hint(run_dir)))
    return final


def write_whole_dir(out: Path, write, *, what: str, hint: str) -> None:
    """Have ``write(tmp)`` fill ``<out>.tmp``, then rename it to ``out``: ``out`` appears only once complete.

    Raises:
        CheckpointError: when a write fails (disk full, quota); the partial ``<out>.tmp`` is removed and an
            earlier ``out`` is left as it was. ``hint`` says how to go on.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except Exception as e:  # torch and safetensors report failed writes as their own error types
        if (why := write_failure(e, out.parent)) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {what} to {out}: {why}; {hint}") from e
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _final_state_dict(engine) -> Optional[dict]:
    """The weights ``final/`` needs, on rank 0 (None elsewhere).

    Under ZeRO-3 they are gathered from every rank: the whole model for full fine-tuning, but only the
    trainable (adapter) parameters with LoRA, so a 70B base is never assembled on rank 0 to write a few MB.
    """
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return module.state_dict() if is_main() else None
    if not has_frozen_parameters(engine):
        return engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0 only
    import deepspeed

    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):  # collective
        return {name: p.detach().cpu().clone() for name, p in trainable} if is_main() else None
