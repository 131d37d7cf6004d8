"""The run directory's files: refusing to clobber an earlier run, the resolved configs, and the final
Hugging Face export (consolidated from ZeRO-3 shards when needed). Only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sftdist.config import ConfigError
from sftdist.parallel import barrier, is_main

RUN_MARKERS = ("metrics.jsonl", "final", "checkpoints")


def check_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Refuse a run directory that already holds a run, unless ``train.overwrite=true``.

    Raises:
        ConfigError: naming the directory and what it holds.
    """
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if found and not overwrite:
        raise ConfigError(f"output_dir={run_dir} already holds a run ({', '.join(found)}); choose another "
                          f"output_dir, or set train.overwrite=true to replace it")


def prepare_run_dir(run_dir: Path, *, overwrite: bool, config_yaml: str, ds_config: dict) -> None:
    """Create the run directory and write ``config.yaml`` and ``ds_config.json`` (rank 0).

    With ``overwrite`` the previous run's metrics and final model are removed first, so the new
    ``metrics.jsonl`` is not appended to the old one.
    """
    if not is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for m in RUN_MARKERS:
            path = run_dir / m
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def save_final(engine, tokenizer, run_dir: Path) -> Path:
    """Write ``final/``: an HF model directory (safetensors, config, tokenizer and chat template).

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
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final
