"""``sftdist-launch [--dry-run] [overrides]``: compose the config, then exec torchrun or the deepspeed
launcher on ``sftdist.train`` with the same overrides and one pinned run directory."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from sftdist.config import LaunchConfig, SFTConfig, compose_config
from sftdist.parallel import free_port


def default_nproc() -> int:
    """Every visible GPU, or 2 CPU processes on a host without GPUs."""
    import torch

    return torch.cuda.device_count() or 2


def launcher_command(launch: LaunchConfig, overrides: list[str], *, nproc: int) -> list[str]:
    """The argv that starts ``nproc`` processes per node of ``python -m sftdist.train overrides``.

    Example:
        >>> launcher_command(LaunchConfig(), ["train.lr=1e-4"], nproc=2)[1:]
        ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'sftdist.train', 'train.lr=1e-4']
    """
    if launch.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run"]
        if launch.nnodes == 1:
            cmd += ["--standalone"]  # a free local port, so concurrent single-node runs never collide
        else:
            cmd += ["--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                    "--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
        return cmd + ["--nproc_per_node", str(nproc), "-m", "sftdist.train", *overrides]
    # The module form of the `deepspeed` script: works whether or not the venv's bin/ is on PATH.
    port = launch.master_port if launch.nnodes > 1 else free_port()  # concurrent local runs never collide
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port)]
    if launch.nnodes > 1:
        # One launcher per node (e.g. one srun task per node), no ssh fan-out from a hostfile.
        cmd += ["--num_nodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                "--master_addr", launch.master_addr, "--no_ssh"]
    return cmd + ["--no_local_rank", "--module", "sftdist.train", *overrides]


def resolve_launch(overrides: list[str]) -> tuple[SFTConfig, list[str]]:
    """Compose and type-check the config (failing here, before any process starts), and pin
    ``output_dir`` to an absolute path so every rank and node writes to the same run directory."""
    cfg = compose_config(overrides)
    run_dir = str(Path(cfg.output_dir).absolute())
    pinned = [o for o in overrides if not o.lstrip("+~").startswith("output_dir=")] + [f"output_dir={run_dir}"]
    return cfg, pinned


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in args
    overrides = [a for a in args if a != "--dry-run"]
    if any(a.startswith("-") for a in overrides):
        sys.exit(f"sftdist-launch: unknown option in {overrides}; usage: sftdist-launch [--dry-run] [key=value ...]")
    cfg, pinned = resolve_launch(overrides)
    cmd = launcher_command(cfg.launch, pinned, nproc=cfg.launch.nproc_per_node or default_nproc())
    print(shlex.join(cmd), flush=True)
    if not dry_run:
        os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
