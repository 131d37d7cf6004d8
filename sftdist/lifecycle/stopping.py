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
from dataclasses import dataclass
from typing import Optional

from sftdist.config import TrainConfig

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# A sweep point under hydra-submitit-launcher gets submitit's SIGUSR2 before its time limit: sftdist takes it
# over (submitit's own handler would exit at once, mid-step, without a checkpoint) and requeues the job itself.
SUBMITIT_SIGNAL = signal.SIGUSR2
# The order in which ranks that got different signals settle on one: a cancel (SIGTERM) is never requeued.
AGREED_ORDER = ("SIGTERM", "SIGUSR2", "SIGUSR1")
RESUMABLE_EXIT = 75  # stopped early by a signal, with a checkpoint: rerun the same command to resume
DUPLICATE_WINDOW_S = 2.0  # a repeat within this many seconds is the same request delivered twice
_received: Optional[int] = None
_received_at = 0.0
_exit_code = 0
_requeued = False


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
    """Catch the stop signals from now on (call once, in the main thread, before training); in a submitit
    job also submitit's SIGUSR2."""
    global _received, _exit_code, _requeued
    _received, _exit_code, _requeued = None, 0, False
    for signum in (*STOP_SIGNALS, *([SUBMITIT_SIGNAL] if in_submitit_job() else [])):
        signal.signal(signum, _handler)


def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ


def signal_flags(signalled: Optional[str]) -> list[float]:
    """This rank's stop signal as flags in ``AGREED_ORDER``, for an all-reduce (``agreed_signal``)."""
    return [float(signalled == name) for name in AGREED_ORDER]


def agreed_signal(summed: list[float]) -> Optional[str]:
    """The signal every rank acts on, from the all-reduced ``signal_flags`` of all ranks.

    Example:
        >>> agreed_signal(signal_flags("SIGUSR1")), agreed_signal([0.0, 1.0, 1.0]), agreed_signal([0.0] * 3)
        ('SIGUSR1', 'SIGUSR2', None)
    """
    return next((name for name, flag in zip(AGREED_ORDER, summed) if flag > 0), None)


def received() -> Optional[str]:
    """The name of the stop signal this process got, if any."""
    return signal.Signals(_received).name if _received is not None else None


def requeue_after(signal_name: str) -> tuple[bool, Optional[str]]:
    """Requeue this SLURM job after a SIGUSR1 stop, or a submitit job after its SIGUSR2 (call on one rank).

    Returns:
        Whether the job was requeued, and what was done (None when nothing was tried).
    """
    job = os.environ.get("SLURM_JOB_ID")
    # sftdist launch's jobs ask for it (SFTDIST_REQUEUE=1); a submitit job's SIGUSR2 means the same
    asked = (signal_name == "SIGUSR1" and os.environ.get("SFTDIST_REQUEUE") == "1") or \
        (signal_name == "SIGUSR2" and in_submitit_job())
    if not job or not asked:
        return False, None
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"scontrol requeue {job} failed: {proc.stderr.strip()}"
    return True, f"requeued SLURM job {job}: it resumes from the checkpoint"


def record_stop(*, requeued: bool) -> int:
    """Note that a stop signal ended the run after its checkpoint; return the exit status that means."""
    global _exit_code, _requeued
    _exit_code, _requeued = (0 if requeued else RESUMABLE_EXIT), requeued
    return _exit_code


def was_requeued() -> bool:
    """This process requeued its SLURM job after a stop signal (``record_stop``)."""
    return _requeued


def exit_code() -> int:
    """The status the process should exit with: ``RESUMABLE_EXIT`` after ``record_stop`` (not requeued),
    else 0."""
    return _exit_code


# When a process stops before ``max_steps``, with a checkpoint to resume from.
#
# ``train.stop_at_step`` is absolute: the run pauses once it has reached that step, and a rerun that resumes at
# or past it has nothing to do. ``train.stop_after_steps`` counts the steps of this process and
# ``train.stop_after_minutes`` its wall-clock time, so rerunning the same command (a requeued job) always
# makes progress and a loop of reruns reaches ``max_steps``.


@dataclass
class StopRule:
    at_step: Optional[int] = None  # absolute step (train.stop_at_step)
    after_steps: Optional[int] = None  # steps of this process (train.stop_after_steps)
    minutes: Optional[float] = None  # wall-clock budget of this process (train.stop_after_minutes)
    started: float = 0.0  # time.time() when the process started

    @classmethod
    def from_config(cls, t: TrainConfig, started: float) -> "StopRule":
        return cls(t.stop_at_step, t.stop_after_steps, t.stop_after_minutes, started)

    def out_of_time(self, *, step_seconds: float, save_seconds: float, now: Optional[float] = None) -> bool:
        """This rank's view of the time budget: one more step and one more checkpoint save, as long as they
        have taken so far, would run past ``train.stop_after_minutes``. Ranks started seconds apart see it
        at different steps, so the loop agrees on it through the step's all-reduce (any rank out of time
        stops them all) before anyone acts on it.

        Example:
            >>> rule = StopRule(minutes=10, started=0.0)
            >>> rule.out_of_time(step_seconds=60, save_seconds=30, now=400), rule.out_of_time(step_seconds=60,
            ...                                                                         save_seconds=30, now=520)
            (False, True)
        """
        if self.minutes is None:
            return False
        now = time.time() if now is None else now
        return (now - self.started + step_seconds + save_seconds) / 60 > self.minutes

    def reason(self, *, step: int, steps_run: int, out_of_time: bool = False, step_seconds: float = 0.0,
               save_seconds: float = 0.0, now: Optional[float] = None) -> Optional[str]:
        """Why to stop after optimizer step ``step`` (the ``steps_run``-th of this process), or None.

        ``out_of_time``: some rank's ``out_of_time()`` said so in this step (agreed by all ranks); the
        message gives this rank's numbers. At least one step always runs.

        Example:
            >>> rule = StopRule(after_steps=2, minutes=10, started=0.0)
            >>> rule.reason(step=5, steps_run=1)
            >>> rule.reason(step=6, steps_run=1, out_of_time=True, step_seconds=60, save_seconds=30, now=520)
            'train.stop_after_minutes=10: 8.7 of 10 minutes used, the next step and save need 1.5 more'
            >>> rule.reason(step=6, steps_run=2)
            'train.stop_after_steps=2'
        """
        now = time.time() if now is None else now
        if self.at_step is not None and step >= self.at_step:
            return f"train.stop_at_step={self.at_step}"
        if self.after_steps is not None and steps_run >= self.after_steps:
            return f"train.stop_after_steps={self.after_steps}"
        if out_of_time and self.minutes is not None:
            used, need = (now - self.started) / 60, (step_seconds + save_seconds) / 60
            return (f"train.stop_after_minutes={self.minutes:g}: {used:.1f} of {self.minutes:g} minutes used, "
                    f"the next step and save need {need:.1f} more")
        return None
