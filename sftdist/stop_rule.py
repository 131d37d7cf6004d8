"""When a process stops before ``max_steps``, with a checkpoint to resume from.

``train.stop_at_step`` is absolute: the run pauses once it has reached that step, and a rerun that resumes at
or past it has nothing to do. ``train.stop_after_steps`` counts the steps of this process and
``train.stop_after_minutes`` its wall-clock time, so rerunning the same command (a requeued job) always
makes progress and a loop of reruns reaches ``max_steps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from sftdist.config import TrainConfig


@dataclass
class StopRule:
    at_step: Optional[int] = None  # absolute step (train.stop_at_step)
    after_steps: Optional[int] = None  # steps of this process (train.stop_after_steps)
    minutes: Optional[float] = None  # wall-clock budget of this process (train.stop_after_minutes)
    started: float = 0.0  # time.time() when the process started

    @classmethod
    def from_config(cls, t: TrainConfig, started: float) -> "StopRule":
        return cls(t.stop_at_step, t.stop_after_steps, t.stop_after_minutes, started)

    def reason(self, *, step: int, steps_run: int, step_seconds: float, save_seconds: float,
               now: Optional[float] = None) -> Optional[str]:
        """Why to stop after optimizer step ``step`` (the ``steps_run``-th of this process), or None.

        The time budget stops early enough for one more step and one more checkpoint save, as long as
        they have taken so far (``step_seconds``, ``save_seconds``); at least one step always runs.

        Example:
            >>> rule = StopRule(after_steps=2, minutes=10, started=0.0)
            >>> rule.reason(step=5, steps_run=1, step_seconds=60, save_seconds=30, now=400)
            >>> rule.reason(step=6, steps_run=1, step_seconds=60, save_seconds=30, now=520)
            'train.stop_after_minutes=10: 8.7 of 10 minutes used, the next step and save need 1.5 more'
            >>> rule.reason(step=6, steps_run=2, step_seconds=60, save_seconds=30, now=400)
            'train.stop_after_steps=2'
        """
        now = time.time() if now is None else now
        if self.at_step is not None and step >= self.at_step:
            return f"train.stop_at_step={self.at_step}"
        if self.after_steps is not None and steps_run >= self.after_steps:
            return f"train.stop_after_steps={self.after_steps}"
        if self.minutes is not None:
            used, need = (now - self.started) / 60, (step_seconds + save_seconds) / 60
            if used + need > self.minutes:
                return (f"train.stop_after_minutes={self.minutes:g}: {used:.1f} of {self.minutes:g} minutes used, "
                        f"the next step and save need {need:.1f} more")
        return None
