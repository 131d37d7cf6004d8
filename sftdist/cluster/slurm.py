"""SLURM batch scripts for ``sftdist-launch launch=slurm``: pure text builders, no torch, no side effects.

The training job starts every rank with ``srun`` (``--ntasks-per-node`` = processes per node) and no torchrun
agent in between: each rank reads its rank and world size from SLURM's variables (``parallel.init_distributed``)
and meets the others at the first node of the job (``MASTER_ADDR`` from ``scontrol show hostnames``, a port
derived from the job id), and SLURM's signals reach every rank directly. ``--signal=USR1@S`` asks for SIGUSR1
S seconds before the time limit: every rank finishes its step, the job checkpoints, requeues itself and exits,
and the requeued job resumes (``train.resume=auto``).

Every value that comes from the config is shell-quoted (``shlex.quote``) where the shell reads it, and
``#SBATCH`` values are single lines (``LaunchConfig`` refuses line breaks, ``sbatch_header`` checks every line
again, output_dir included), so no config value can run code. ``launch.setup`` lines are shell code on
purpose: the user's own ``module load`` or ``source`` lines (source a file for secrets: these lines are
written into job.sbatch and config.yaml).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional

from sftdist.config import ConfigError, LaunchConfig
from sftdist.config.redact import redact_text


def job_name_of(launch: LaunchConfig, run_name: str | None, run_dir: Path) -> str:
    """``launch.job_name``, else the run name, else the run directory's name, with only ``[A-Za-z0-9._-]``.

    Every user of the cluster sees job names (squeue): a secret that a name resolved to is redacted first.

    Example:
        >>> job_name_of(LaunchConfig(), 'x"; touch /tmp/pwned; "', Path("/runs/a"))
        'x___touch__tmp_pwned___'
    """
    name = redact_text(launch.job_name or run_name or run_dir.name or "sftdist")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100]


def processes_per_node(launch: LaunchConfig) -> int:
    """``launch.nproc_per_node``, else one process per requested GPU, else one."""
    return launch.nproc_per_node or launch.gpus_per_node or 1


def sbatch_header(launch: LaunchConfig, *, job_name: str, log: Path, nodes: int, tasks_per_node: int,
                  gpus: bool = True) -> list[str]:
    """The ``#SBATCH`` lines for the resources in ``launch`` (values are single lines; see the module doc)."""
    lines = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
             f"--time={launch.time}", f"--output={sbatch_path(log)}", "--open-mode=append"]
    options = {"partition": launch.partition, "account": launch.account, "qos": launch.qos,
               "cpus-per-task": launch.cpus_per_task, "mem": launch.mem, "constraint": launch.constraint}
    lines += [f"--{k}={v}" for k, v in options.items() if v is not None]
    if gpus and launch.gpus_per_node:
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    lines += launch.sbatch_extra
    # A line break would end the #SBATCH comment and start a shell line: output_dir (in --output) is not a
    # LaunchConfig field, so it is checked here, with every other value, once more.
    if bad := [line for line in lines if any(c in line for c in "\n\r\0")]:
        raise ConfigError(f"#SBATCH {bad[0]!r}: a value holds a line break (output_dir, launch.*); use one line")
    return ["#SBATCH " + line for line in lines]


def sbatch_path(log: Path) -> str:
    """``log`` as an ``#SBATCH --output`` value: a ``%`` of the directory is literal (``%%``; only the file
    name's ``%j`` is SLURM's pattern), and a path with spaces or quotes is double-quoted, as sbatch reads it.

    Example:
        >>> print(sbatch_path(Path("/runs/a/slurm-%j.out")), sbatch_path(Path('/runs/50% "b"/slurm-%j.out')))
        /runs/a/slurm-%j.out "/runs/50%% \\"b\\"/slurm-%j.out"
    """
    text = str(log.parent).replace("%", "%%") + "/" + log.name
    if not any(c in text for c in " \t'\"\\"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _script(header: list[str], launch: LaunchConfig, cwd: Path, body: list[str], what: str) -> str:
    setup = launch.setup or ["# (launch.setup: module load / source <venv>/bin/activate lines go here)"]
    return "\n".join(["#!/bin/bash", f"# {what}, written by sftdist-launch; submit it again with: sbatch <this file>",
                      *header, "set -euo pipefail", *setup, f"cd {shlex.quote(str(cwd))}", *body]) + "\n"


def train_script(launch: LaunchConfig, *, python: str, cwd: Path, overrides: list[str], run_dir: Path,
                 job_name: str) -> str:
    """The training job: ``srun`` starts ``nnodes x processes_per_node`` ranks of ``python -m sftdist.train``.

    Example:
        >>> s = train_script(LaunchConfig(nnodes=2, nproc_per_node=4), python="/venv/bin/python", cwd=Path("/w"),
        ...                  overrides=["run_name=a b"], run_dir=Path("/runs/a"), job_name="a")
        >>> s.splitlines()[-1]
        "srun --kill-on-bad-exit=1 /venv/bin/python -m sftdist.train 'run_name=a b'"
        >>> "#SBATCH --signal=USR1@300" in s and "#SBATCH --requeue" in s and "#SBATCH --nodes=2" in s
        True
    """
    header = sbatch_header(launch, job_name=job_name, log=run_dir / "slurm-%j.out", nodes=launch.nnodes,
                           tasks_per_node=processes_per_node(launch))
    if launch.signal_seconds:
        header.append(f"#SBATCH --signal=USR1@{launch.signal_seconds}")
    header.append("#SBATCH --requeue" if launch.requeue else "#SBATCH --no-requeue")
    body = [
        "# Rendezvous at the job's first node, on a port derived from the job id (one job, one port).",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))",
        f"export SFTDIST_REQUEUE={int(launch.requeue)}  # on SIGUSR1: checkpoint, then scontrol requeue",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-" + str(launch.cpus_per_task or 1) + "}",
        f"srun --kill-on-bad-exit=1 {shlex.join([python, '-m', 'sftdist.train', *overrides])}",
    ]
    return _script(header, launch, cwd, body, "sftdist training job")


def prepare_script(launch: LaunchConfig, *, python: str, cwd: Path, overrides: list[str], run_dir: Path,
                   job_name: str) -> str:
    """The data job of ``launch.prepare_first``: ``sftdist data prepare`` on one node, no GPU, one task."""
    header = sbatch_header(launch, job_name=f"{job_name}-prepare", log=run_dir / "slurm-prepare-%j.out",
                           nodes=1, tasks_per_node=1, gpus=False)
    body = [shlex.join([python, "-m", "sftdist", "data", "prepare", *overrides])]
    return _script(header, launch, cwd, body, "sftdist data preparation job")


# JobStates after which a job never runs again (a requeued job passes through REQUEUED and PENDING instead).
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})


def job_exit_status(record: str) -> int | None:
    """The exit status of a finished job from its ``scontrol show job -o`` line, or None while it can still run.

    Like ``sbatch --wait``: the batch script's status, or 128 + the signal that ended it; a job that ended
    badly (TIMEOUT, NODE_FAIL, ...) is never 0. A job whose dependency can never be met is over too (1).

    Example:
        >>> job_exit_status("JobId=7 JobState=COMPLETED Reason=None ExitCode=0:0")
        0
        >>> job_exit_status("JobId=7 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0")
        3
        >>> job_exit_status("JobId=7 JobState=CANCELLED Reason=None ExitCode=0:15")
        143
        >>> job_exit_status("JobId=7 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:0")
        1
        >>> job_exit_status("JobId=7 JobState=PENDING Reason=DependencyNeverSatisfied ExitCode=0:0")
        1
        >>> job_exit_status("JobId=7 JobState=REQUEUED Reason=None ExitCode=0:0") is None
        True
    """
    fields = dict(f.split("=", 1) for f in record.split() if "=" in f)
    state = fields.get("JobState", "")
    if state == "PENDING" and fields.get("Reason") == "DependencyNeverSatisfied":
        return 1
    if state not in FINISHED_STATES:
        return None
    status, _, signal = fields.get("ExitCode", "1:0").partition(":")
    code = 128 + int(signal) if signal and int(signal) else int(status)
    return code if code or state == "COMPLETED" else 1


def slurm_rank_env(env) -> Optional[dict[str, str]]:
    """The process-group variables of a rank that ``srun`` started (sbatch jobs, submitit), from SLURM's own:
    rank = ``SLURM_PROCID``, world = the step's tasks; the others are met at the job's first node on a port
    derived from the job id, unless ``MASTER_ADDR``/``MASTER_PORT`` are set. None outside a multi-task step:
    a plain ``python -m sftdist.train`` in the batch script (or an salloc shell) of a 4-task allocation sees
    ``SLURM_NTASKS=4`` but is one process, and must not wait for three ranks that never come.

    Example:
        >>> slurm_rank_env({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
        ...                 "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "1234", "MASTER_ADDR": "n1"})
        {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2', 'MASTER_ADDR': 'n1', 'MASTER_PORT': '21234'}
        >>> slurm_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4",
        ...                 "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "n1"}) is None
        True
    """
    world = int(env.get("SLURM_STEP_NUM_TASKS") or 1)  # only an srun step's tasks are ranks
    if "SLURM_PROCID" not in env or world <= 1:
        return None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or "1"
    addr = env.get("MASTER_ADDR") or _first_host(env["SLURM_JOB_NODELIST"])
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": per_node.split("(")[0].split(",")[0], "MASTER_ADDR": addr,
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 40000)}


def _first_host(nodelist: str) -> str:
    import subprocess

    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]
