"""``sftdist-launch [--dry-run] [--wait] [overrides]``: compose the config, then exec torchrun or the
deepspeed launcher on ``sftdist.train`` with the same overrides and one pinned run directory, or (with
``launch=slurm``) write ``<output_dir>/job.sbatch`` and submit it.

The launcher builds commands and does not train: nothing here imports torch, DeepSpeed or transformers.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from sftdist.cluster.slurm import job_exit_status, job_name_of, prepare_script, train_script
from sftdist.config import ConfigError, LaunchConfig, SFTConfig, compose_config

USAGE = "usage: sftdist-launch [--dry-run] [--wait] [key=value ...]"


# Facts about this host that the launcher needs, found without importing torch (``sftdist-launch`` must
# answer in well under a second).


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    """GPUs a process started here would see: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def default_nproc() -> int:
    """Every visible GPU, or 2 CPU processes on a host without GPUs."""
    return visible_gpus() or 2


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
        elif launch.rdzv_endpoint:  # c10d rendezvous: start the same command on every node, any order
            cmd += ["--nnodes", str(launch.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                    launch.rdzv_endpoint, "--rdzv_id", f"sftdist-{launch.master_port}"]
        else:
            cmd += ["--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                    "--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
        return cmd + ["--nproc_per_node", str(nproc), "-m", "sftdist.train", *overrides]
    # The module form of the `deepspeed` script: works whether or not the venv's bin/ is on PATH.
    port = launch.master_port if launch.nnodes > 1 else free_port()  # concurrent local runs never collide
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port)]
    if launch.hostfile:  # ssh fan-out from this node to every host of the hostfile
        # --force_multi: the pdsh path (pdsh_arg) even for a one-host hostfile, whose local path would pass
        # the quoting on literally.
        cmd += ["--hostfile", launch.hostfile, "--master_addr", launch.master_addr, "--force_multi"]
        overrides = [pdsh_arg(o) for o in overrides]
    elif launch.nnodes > 1:
        # One launcher per node (e.g. one srun task per node), no ssh fan-out from a hostfile.
        cmd += ["--num_nodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                "--master_addr", launch.master_addr, "--no_ssh"]
    return cmd + ["--no_local_rank", "--module", "sftdist.train", *overrides]


def launcher_env(launch: LaunchConfig) -> dict[str, str]:
    """Variables the launcher itself reads: torchrun's grace period between SIGTERM and SIGKILL (an
    environment variable, not torchrun's ``--shutdown-timeout`` flag, which torch before 2.11 refuses).

    Example:
        >>> launcher_env(LaunchConfig(shutdown_timeout_s=900))
        {'TORCH_ELASTIC_SHUTDOWN_TIMEOUT': '900'}
    """
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(launch.shutdown_timeout_s)} if launch.launcher == "torchrun" else {}


def pdsh_arg(arg: str) -> str:
    """``arg`` encoded for DeepSpeed's pdsh runner, so that each host's shell hands it to the script unchanged.

    That runner joins the script's arguments into one command line that the remote shell reads. It leaves an
    argument without a space as it is (``;``, ``$(...)`` would run there) and wraps one with a space in double
    quotes, escaping only ``"`` (``$``, backticks and ``\\`` would still act). So: an argument without a space
    is shell-quoted here; in one with a space, the characters still live in double quotes are escaped.

    Example:
        >>> pdsh_arg("run_name=$(reboot)"), pdsh_arg("run_name=a `b` $c")
        ("'run_name=$(reboot)'", 'run_name=a \\\\`b\\\\` \\\\$c')
    """
    return shlex.quote(arg) if " " not in arg else re.sub(r"([\\$`])", r"\\\1", arg)


def resolve_launch(overrides: list[str]) -> tuple[SFTConfig, list[str]]:
    """Compose and type-check the config (failing here, before any process starts), and pin
    ``output_dir`` to an absolute path so every rank and node writes to the same run directory."""
    cfg = compose_config(overrides)
    run_dir = str(Path(cfg.output_dir).absolute())
    pinned = [o for o in overrides if not o.lstrip("+~").startswith("output_dir=")]
    return cfg, [*pinned, f"output_dir={hydra_quoted(run_dir)}"]


def hydra_quoted(value: str) -> str:
    """``value`` as a Hydra override value that parses back to itself: quoted unless plainly safe (a path with
    ``=``, ``,``, spaces or brackets would otherwise split into a sweep or fail to parse on every rank).

    Example:
        >>> print(hydra_quoted("/runs/a"), hydra_quoted("/runs/lr=1e-5,bs=8"), hydra_quoted("/runs/it's"))
        /runs/a '/runs/lr=1e-5,bs=8' "/runs/it's"
    """
    if re.fullmatch(r"[\w/.@:+~-]+", value):
        return value
    quote = "'" if "'" not in value or '"' in value else '"'
    # Inside quotes, a backslash escapes only a quote or the backslashes right before one.
    escaped = re.sub(r"(\\*)(" + quote + r"|$)", lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""),
                     value)
    return quote + escaped + quote


def submit_slurm(cfg: SFTConfig, overrides: list[str], *, dry_run: bool, wait: bool) -> int:
    """Write ``job.sbatch`` (and ``prepare.sbatch`` with ``launch.prepare_first``) into the run directory and
    submit them; ``--dry-run`` prints them instead, ``--wait`` waits for the training job and returns its
    exit status."""
    launch, run_dir = cfg.launch, Path(cfg.output_dir)
    common = dict(python=sys.executable, cwd=Path.cwd(), overrides=overrides, run_dir=run_dir,
                  job_name=job_name_of(launch, cfg.run_name, run_dir))
    scripts = [("job.sbatch", train_script(launch, **common))]  # refuses values that could break out first
    if launch.prepare_first:
        scripts.insert(0, ("prepare.sbatch", prepare_script(launch, **common)))
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in scripts:
        (run_dir / name).write_text(text)
        print(f"wrote {run_dir / name}", flush=True)
        if dry_run:
            print(text, flush=True)
    if dry_run:
        return 0
    dependency = []
    if launch.prepare_first:
        prepare_id = sbatch([str(run_dir / "prepare.sbatch")])
        print(f"submitted data preparation job {prepare_id}", flush=True)
        # A failed data job cancels the training job (else it would stay PENDING forever).
        dependency = [f"--dependency=afterok:{prepare_id}", "--kill-on-invalid-dep=yes"]
    job_id = sbatch([*dependency, str(run_dir / "job.sbatch")])
    print(f"submitted training job {job_id}; log: {run_dir}/slurm-{job_id}.out", flush=True)
    return wait_for_job(job_id) if wait else 0


def wait_for_job(job_id: str) -> int:
    """Wait until the job is over (through requeues) and return its exit status (``job_exit_status``).

    Polls ``scontrol show job`` every second for the first minute, then every 10 s: ``sbatch --wait`` backs
    off between its polls and noticed the end of a 12 s job about 30 s late."""
    start = time.monotonic()
    while True:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"sftdist-launch: job {job_id} is no longer known to SLURM: {proc.stderr.strip()}")
        status = job_exit_status(proc.stdout)
        if status is not None:
            if "DependencyNeverSatisfied" in proc.stdout:
                subprocess.run(["scancel", job_id], capture_output=True)  # (SLURM may have cancelled it already)
                print(f"sftdist-launch: the data preparation job failed, so training job {job_id} never started "
                      "(see slurm-prepare-*.out in the run directory)", file=sys.stderr)
            return status
        time.sleep(1.0 if time.monotonic() - start < 60 else 10.0)


def sbatch(args: list[str]) -> str:
    """Submit with ``sbatch --parsable``; return the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sftdist-launch: sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"{USAGE}\n\n{__doc__.strip()}\n\nOverrides are the training config's keys; see docs/clusters.md.")
        return
    flags = {a for a in args if a in ("--dry-run", "--wait")}
    overrides = [a for a in args if a not in flags]
    if any(a.startswith("-") for a in overrides):
        sys.exit(f"sftdist-launch: unknown option in {overrides}; {USAGE}")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg, pinned = resolve_launch(overrides)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        sys.exit(f"sftdist-launch: error: {e}")
    if cfg.launch.launcher == "slurm":
        try:
            sys.exit(submit_slurm(cfg, pinned, dry_run="--dry-run" in flags, wait="--wait" in flags))
        except ConfigError as e:
            sys.exit(f"sftdist-launch: error: {e}")
    if "--wait" in flags:
        sys.exit(f"sftdist-launch: --wait is for launch=slurm; {USAGE}")
    cmd = launcher_command(cfg.launch, pinned, nproc=cfg.launch.nproc_per_node or default_nproc())
    env = launcher_env(cfg.launch)
    print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd), flush=True)
    if "--dry-run" not in flags:
        os.execvpe(cmd[0], cmd, {**os.environ, **env})


if __name__ == "__main__":
    main()
