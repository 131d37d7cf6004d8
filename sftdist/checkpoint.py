"""Checkpoints that resume exactly, and the final Hugging Face export.

A checkpoint ``checkpoints/step-N/`` holds DeepSpeed's engine state (trainable module weights, optimizer,
lr scheduler; one shard per rank under ZeRO), ``trainer_state.json`` (the step, since the data order is a
pure function of the step; the world size and ZeRO stage; the run's sample-order settings, see
``resume_check``) and one RNG-state file per rank, all tensors and plain values so that it loads with
``weights_only=True``. Frozen weights (a LoRA base model) are not saved: the run rebuilds them from the base.
It is written as ``step-N.tmp`` and renamed once every rank has finished, and only then does
``checkpoints/latest`` name it: a crash mid-save leaves the previous checkpoint valid.
"""

from __future__ import annotations

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

from sftdist.parallel import barrier, broadcast_from_main, is_main, rank, world_size

CHECKPOINTS = "checkpoints"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names, if it exists and is complete."""
    latest = run_dir / CHECKPOINTS / "latest"
    if not latest.exists():
        return None
    path = run_dir / CHECKPOINTS / latest.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


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
                    eval_state: Optional[dict] = None, protect_step: Optional[int] = None) -> Path:
    """Save a complete checkpoint after optimizer step ``step`` (every rank must call this), then prune.

    Pruning keeps the ``keep_last`` newest checkpoints up to ``step``, always including this one, and never
    removes ``protect_step`` (the best eval step, which early stopping may export). ``eval_state`` (the
    step-0 eval baseline and early-stopping state) is stored in ``trainer_state.json``.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / CHECKPOINTS
    tag = f"step-{step}"
    tmp = root / f"{tag}.tmp"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save that crashed
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(root), tag=f"{tag}.tmp", save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), tmp / f"rng_state_rank{rank()}.pt")
    barrier()  # every rank's shards and RNG state are on disk
    if is_main():
        state = {"step": step, "world_size": world_size(), "zero_stage": engine.zero_optimization_stage(),
                 "run": run_settings, "eval": eval_state or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / "latest")  # atomic: `latest` always names a complete checkpoint
        older = sorted((p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and step_of(p) < step
                        and step_of(p) != protect_step), key=step_of)
        for old in older[:max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)
    barrier()
    return root / tag


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
    """
    out = path.with_name(path.name + ".universal")
    if (out / "trainer_state.json").exists():
        return out
    tmp = path.with_name(path.name + ".universal.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                    "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
                    "--inject_missing_state"], check=True, stdout=subprocess.DEVNULL)
    shutil.copy(path / "trainer_state.json", tmp / "trainer_state.json")
    os.rename(tmp, out)
    return out


def load_checkpoint(engine, path: Path) -> int:
    """Restore engine, optimizer, scheduler and this rank's RNG state; return the step to continue after.

    Raises:
        RuntimeError: when DeepSpeed cannot load the checkpoint (e.g. a different ZeRO stage).
    """
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True,
                                       load_module_strict=not has_frozen_parameters(engine))
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rng_file = path / f"rng_state_rank{rank()}.pt"
    if rng_file.exists():  # absent in a universal checkpoint: another world size draws other numbers anyway
        set_rng_state(torch.load(rng_file, weights_only=True))
    return checkpoint_step(path)


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
    if is_main():
        tmp = run_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return Path(broadcast_from_main(str(final)))


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
