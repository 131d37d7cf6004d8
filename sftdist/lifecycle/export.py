"""The end of a LoRA run: merge its adapter into the base model and write a whole Hugging Face model.

``sftdist export --merge RUN_DIR`` (alias ``sftdist-export``) writes ``RUN_DIR/final_merged``. The run's own
``final/`` export (full weights, or the adapter) is written by ``checkpoint.save_final``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from sftdist.config import ConfigError
from sftdist.lifecycle.checkpoint import CheckpointError


def merge_adapter(run_dir: Path, *, out_name: str = "final_merged") -> Path:
    """Write ``run_dir/final_merged``: the run's base model with the adapter in ``final/`` merged in.

    The base is rebuilt from the run's ``config.yaml``: loaded from ``model.name_or_path``, or for a
    random-init model rebuilt from ``model.from_config`` and ``train.seed`` (sftdist builds those whole,
    without zero.Init, so the rebuild is exact). Runs in one process, on CPU memory.

    Raises:
        ConfigError: when ``final/`` holds no adapter.
        CheckpointError: when the merged model cannot be written (disk full); no partial directory is left.
    """
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sftdist.config import SFTConfig, load_run_config
    from sftdist.engine.model import build_model
    from sftdist.lifecycle.checkpoint import write_whole_dir  # (torch: not for `--help`)

    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        raise ConfigError(f"{final} holds no LoRA adapter (was the run trained with peft=lora?)")
    cfg: SFTConfig = load_run_config(run_dir)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
    # The run's own setting, never more: final/ keeps a remote-code tokenizer's auto_map.
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=cfg.model.trust_remote_code)
    base = build_model(cfg.model, tokenizer, precision=precision, activation_checkpointing=False, seed=cfg.train.seed)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    out = run_dir / out_name

    def write(tmp: Path) -> None:
        with torch.no_grad():
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_whole_dir(out, write, what="the merged model", hint=f"final/ (the adapter) is complete; free space and "
                    f"write the merged model with: sftdist-export --merge {run_dir}")
    return out


def main(argv: Optional[list[str]] = None) -> None:
    """``sftdist export --merge RUN_DIR``."""
    parser = argparse.ArgumentParser(prog="sftdist export", description=__doc__)
    parser.add_argument("--merge", action="store_true", required=True, help="merge the LoRA adapter into the base")
    parser.add_argument("run_dir", type=Path, help="a run directory whose final/ holds an adapter")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = merge_adapter(args.run_dir.absolute())
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"sftdist-export: error: {e}")
    print(f"merged model written to {out}")
