"""Stop signals: SIGUSR1 (SLURM's warning before the time limit, ``--signal=USR1@S``) and SIGTERM
(preemption, ``scancel``, a container stop) make the run finish its current optimizer step, checkpoint and
exit, instead of dying mid-step.

Ranks agree before anyone saves: each step's closing all-reduce carries every rank's "signal received" flag,
so all ranks stop after the same step even when the signal reached only some of them, or reached them at
different moments. After SIGUSR1 in a SLURM job written by ``sftdist-launch`` (``SFTDIST_REQUEUE=1``), rank 0
requeues the job (``scontrol requeue``), and the requeued job resumes from the checkpoint. After SIGTERM the
job is not requeued by sftdist: SLURM requeues a preempted job itself, and a cancelled one must stay
cancelled. A second signal of the same kind kills the process at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: Optional[int] = None


def _handler(signum, frame) -> None:
    global _received
    if _received == signum:  # asked twice: stop waiting for the step to end
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _received = signum
    print(f"sftdist rank {os.environ.get('RANK', '0')}: received {signal.Signals(signum).name}: checkpointing "
          f"after this step", flush=True)


def install_stop_handlers() -> None:
    """Catch the stop signals from now on (call once, in the main thread, before training)."""
    global _received
    _received = None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)


def received() -> Optional[str]:
    """The name of the stop signal this process got, if any."""
    return signal.Signals(_received).name if _received is not None else None


def requeue_after(signal_name: str) -> Optional[str]:
    """Requeue this SLURM job after a SIGUSR1 stop (call on one rank); return what was done, or None."""
    job = os.environ.get("SLURM_JOB_ID")
    if signal_name != "SIGUSR1" or not job or os.environ.get("SFTDIST_REQUEUE") != "1":
        return None
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"scontrol requeue {job} failed: {proc.stderr.strip()}"
    return f"requeued SLURM job {job}: it resumes from the checkpoint"
