"""``sftdist-export --merge RUN_DIR``: merge a finished LoRA run's adapter into its base model and write a
standalone Hugging Face model to ``RUN_DIR/final_merged``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from sftdist.checkpoint import CheckpointError
from sftdist.config import ConfigError
from sftdist.peft import merge_adapter


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="sftdist-export", description=__doc__)
    parser.add_argument("--merge", action="store_true", required=True, help="merge the LoRA adapter into the base")
    parser.add_argument("run_dir", type=Path, help="a run directory whose final/ holds an adapter")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = merge_adapter(args.run_dir.absolute())
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"sftdist-export: error: {e}")
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
