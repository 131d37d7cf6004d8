"""The ``launch/`` config group (read by ``sftdist-launch``) and SLURM time limits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from sftdist.config.checks import ConfigError, check_choice, check_positive

LAUNCHERS = ("torchrun", "deepspeed", "slurm")
# SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; or no limit at all.
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
NO_TIME_LIMIT = ("UNLIMITED", "INFINITE")


@dataclass
class LaunchConfig:
    """How ``sftdist-launch`` starts the processes (group ``launch/``)."""

    launcher: str = "torchrun"  # torchrun | deepspeed | slurm (write job.sbatch into output_dir and sbatch it)
    nproc_per_node: Optional[int] = None  # None = every GPU (slurm: gpus_per_node), or 2 on a host without GPUs
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rdzv_endpoint: Optional[str] = None  # torchrun, several nodes: host:port of the c10d rendezvous
    hostfile: Optional[str] = None  # deepspeed: ssh fan-out to these hosts (else one launcher per node, --no_ssh)
    # torchrun: seconds the ranks get after a SIGTERM (docker stop, a k8s eviction, a preempted job) to finish
    # the step and checkpoint before torchrun SIGKILLs them (torch's default: 30). The orchestrator's own grace
    # period must cover it too. The deepspeed launcher's is fixed at 30 s.
    shutdown_timeout_s: int = 600
    # launcher=slurm: what the job asks for (see slurm/ for templates)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"  # the job's time limit
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, e.g. 200G (0 = all of it)
    constraint: Optional[str] = None
    job_name: Optional[str] = None  # default: run_name, else the output_dir's name
    sbatch_extra: List[str] = field(default_factory=list)  # more #SBATCH options, e.g. [--exclusive]
    setup: List[str] = field(default_factory=list)  # shell lines before training, e.g. [module load cuda]
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: checkpoint, requeue, exit
    requeue: bool = True  # requeue after that checkpoint (and let SLURM requeue a preempted job)
    prepare_first: bool = False  # tokenise in a CPU job first; training waits for it (afterok)

    def __post_init__(self) -> None:
        check_choice("launch.launcher", self.launcher, LAUNCHERS)
        if self.nproc_per_node is not None:
            check_positive("launch.nproc_per_node", self.nproc_per_node)
        check_positive("launch.nnodes", self.nnodes)
        check_positive("launch.gpus_per_node", self.gpus_per_node, allow_zero=True)
        check_positive("launch.signal_seconds", self.signal_seconds, allow_zero=True)
        check_positive("launch.shutdown_timeout_s", self.shutdown_timeout_s, allow_zero=True)
        for key in ("partition", "account", "qos", "time", "mem", "constraint", "job_name", "rdzv_endpoint"):
            value = getattr(self, key)
            if value is not None and (not str(value).strip() or any(c in str(value) for c in "\n\r\0")):
                raise ConfigError(f"launch.{key}={value!r}: must be one non-empty line")
        for key in ("master_addr", "rdzv_endpoint"):  # DeepSpeed's pdsh runner puts master_addr in a shell line
            value = getattr(self, key)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", value):
                raise ConfigError(f"launch.{key}={value!r}: must be a host name or address (optionally :port)")
        if not SLURM_TIME.fullmatch(self.time) and self.time.upper() not in NO_TIME_LIMIT:
            raise ConfigError(f"launch.time={self.time!r}: not a SLURM time limit; give MM, HH:MM:SS or "
                              f"D-HH:MM:SS (e.g. 04:00:00, 1-12:00:00), or UNLIMITED")
        for key in ("sbatch_extra", "setup"):
            if any(any(c in line for c in "\n\r\0") for line in getattr(self, key)):
                raise ConfigError(f"launch.{key}: give one list item per line, without line breaks")


def slurm_minutes(time: str) -> int:
    """A SLURM time limit (``MM``, ``HH:MM:SS``, ``D-HH:MM[:SS]``) in whole minutes, for submitit's timeout_min.

    Example:
        >>> slurm_minutes("04:00:00"), slurm_minutes("1-12:30"), slurm_minutes("90")
        (240, 2190, 90)

    Raises:
        ConfigError: for ``UNLIMITED``: submitit asks every job for a finite time limit.
    """
    if str(time).upper() in NO_TIME_LIMIT:
        raise ConfigError(f"launch.time={time}: a sweep through hydra/launcher=slurm (submitit) needs a finite "
                          "time limit; give one, e.g. launch.time=2-00:00:00")
    days, _, clock = str(time).rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes = parts[0], parts[1] if len(parts) > 1 else 0
    else:  # MM, MM:SS, HH:MM:SS
        hours, minutes = (parts[0], parts[1]) if len(parts) == 3 else (0, parts[0])
    return int(days or 0) * 1440 + hours * 60 + minutes


def sbatch_parameters(mem: Optional[str], requeue: bool, extra: List[str]) -> dict:
    """The ``#SBATCH`` options of ``launch.*`` that submitit has no field for, as its ``additional_parameters``
    (``hydra/launcher=slurm``): the same memory, requeue and extra options as ``launch=slurm`` jobs get.

    Example:
        >>> sbatch_parameters("64G", False, ["--exclusive", "--mail-type=END"])
        {'export': 'ALL,SLURM_KILL_BAD_EXIT=1', 'mem': '64G', 'no_requeue': True, 'exclusive': True, 'mail-type': 'END'}

    Raises:
        ConfigError: for an ``launch.sbatch_extra`` item that is not a long option (``--name[=value]``).
    """
    # srun reads SLURM_KILL_BAD_EXIT from the job's environment: a task that dies ends the point's step.
    params: dict = {"export": "ALL,SLURM_KILL_BAD_EXIT=1"}
    if mem is not None:
        params["mem"] = str(mem)
    params["requeue" if requeue else "no_requeue"] = True  # submitit turns "_" into "-"
    for option in extra:
        if not re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?", option):
            raise ConfigError(f"launch.sbatch_extra: {option!r}: give long options (--exclusive, --gres=gpu:1)")
        name, has_value, value = option[2:].partition("=")
        params[name] = value if has_value else True
    return params

