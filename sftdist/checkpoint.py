"""Checkpoints that resume exactly, and the final Hugging Face export.

A checkpoint ``checkpoints/step-N/`` holds DeepSpeed's engine state (module, optimizer, lr scheduler; one
shard per rank under ZeRO), ``trainer_state.json`` (the step: the data order is a pure function of the step)
and one RNG-state file per rank. It is written as ``step-N.tmp`` and renamed once every rank has finished,
and only then does ``checkpoints/latest`` name it: a crash mid-save leaves the previous checkpoint valid.
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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run_dir: Path, step: int, *, keep_last: int) -> Path:
    """Save a complete checkpoint after optimizer step ``step`` (every rank must call this).

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
    engine.save_checkpoint(str(root), tag=f"{tag}.tmp", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_state_rank{rank()}.pt")
    barrier()  # every rank's shards and RNG state are on disk
    if is_main():
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world_size()}) + "\n")
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / "latest")  # atomic: `latest` always names a complete checkpoint
        done = sorted((p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name)),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)
    barrier()
    return root / tag


def saved_world_size(path: Path) -> int:
    """How many data-parallel ranks wrote a checkpoint."""
    return int(json.loads((path / "trainer_state.json").read_text())["world_size"])


def universal_checkpoint(path: Path) -> Path:
    """The checkpoint in DeepSpeed's universal format, which loads on any number of ranks.

    Converted once with ``deepspeed.checkpoint.ds_to_universal`` into ``step-N.universal`` beside it (call
    on one rank per node, e.g. through ``local_main_first``). Load it with ``checkpoint.load_universal``
    set in the DeepSpeed config.
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
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rng_file = path / f"rng_state_rank{rank()}.pt"
    if rng_file.exists():  # absent in a universal checkpoint: another world size draws other numbers anyway
        _set_rng_state(torch.load(rng_file, weights_only=False))
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
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0 only
    else:
        state_dict = module.state_dict() if is_main() else None
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
