"""Stop signals: SIGUSR1 (SLURM's warning before the time limit, ``--signal=USR1@S``) and SIGTERM
(preemption, ``scancel``, a container stop) make the run finish its current optimizer step, checkpoint and
exit, instead of dying mid-step.

Ranks agree before anyone saves: each step's closing all-reduce carries every rank's "signal received" flag,
so all ranks stop after the same step even when the signal reached only some of them, or reached them at
different moments. After SIGUSR1 in a SLURM job written by ``sftdist-launch`` (``SFTDIST_REQUEUE=1``), rank 0
requeues the job (``scontrol requeue``), and the requeued job resumes from the checkpoint. After SIGTERM the
job is not requeued by sftdist: SLURM requeues a preempted job itself, and a cancelled one must stay
cancelled. A second signal of the same kind kills the process at once, unless it follows the first within
``DUPLICATE_WINDOW_S``: a signal sent to torchrun's process group reaches each rank twice (directly, and
forwarded by torchrun; usually merged into one delivery, but not when the first is handled in between),
which is one request, not two.

Exit status: a run stopped by a signal, with its checkpoint, exits with ``RESUMABLE_EXIT`` (75, EX_TEMPFAIL
in sysexits.h: a temporary failure, retry), so schedulers and scripts can tell "rerun the same command to
resume" from success (0) and from errors (1). A SLURM job that requeued itself after SIGUSR1 exits 0: SLURM
ends and reruns it anyway, and a failed exit would only put a spurious failure into the job's record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
RESUMABLE_EXIT = 75  # stopped early by a signal, with a checkpoint: rerun the same command to resume
DUPLICATE_WINDOW_S = 2.0  # a repeat within this many seconds is the same request delivered twice
_received: Optional[int] = None
_received_at = 0.0
_exit_code = 0


def _handler(signum, frame) -> None:
    global _received, _received_at
    if _received == signum and time.monotonic() - _received_at > DUPLICATE_WINDOW_S:
        signal.signal(signum, signal.SIG_DFL)  # asked twice: stop waiting for the step to end
        os.kill(os.getpid(), signum)
    if _received == signum:
        return
    _received, _received_at = signum, time.monotonic()
    print(f"sftdist rank {os.environ.get('RANK', '0')}: received {signal.Signals(signum).name}: checkpointing "
          f"after this step", flush=True)


def install_stop_handlers() -> None:
    """Catch the stop signals from now on (call once, in the main thread, before training)."""
    global _received, _exit_code
    _received, _exit_code = None, 0
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)


def received() -> Optional[str]:
    """The name of the stop signal this process got, if any."""
    return signal.Signals(_received).name if _received is not None else None


def requeue_after(signal_name: str) -> tuple[bool, Optional[str]]:
    """Requeue this SLURM job after a SIGUSR1 stop (call on one rank).

    Returns:
        Whether the job was requeued, and what was done (None when nothing was tried).
    """
    job = os.environ.get("SLURM_JOB_ID")
    if signal_name != "SIGUSR1" or not job or os.environ.get("SFTDIST_REQUEUE") != "1":
        return False, None
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"scontrol requeue {job} failed: {proc.stderr.strip()}"
    return True, f"requeued SLURM job {job}: it resumes from the checkpoint"


def record_stop(*, requeued: bool) -> int:
    """Note that a stop signal ended the run after its checkpoint; return the exit status that means."""
    global _exit_code
    _exit_code = 0 if requeued else RESUMABLE_EXIT
    return _exit_code


def exit_code() -> int:
    """The status the process should exit with: ``RESUMABLE_EXIT`` after ``record_stop`` (not requeued),
    else 0."""
    return _exit_code
