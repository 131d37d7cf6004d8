"""A step whose loss or gradient norm is NaN or infinite (``train.on_nonfinite``): stop before anything is
evaluated or saved from that state, or skip that step's update and go on.

Every rank sees the same step loss (all-reduced) and the same gradient norm (of the all-reduced gradients),
so every rank takes the same decision without another collective.

Skipping relies on the update never having been applied: DeepSpeed's ZeRO 1-3 optimizers already drop an
update whose gradient norm is not finite (they clear the gradients and hold the lr schedule, as for an fp16
loss-scale overflow; in bf16 while DeepSpeed's ``bf16.check_grad_overflow`` is on, its default). ZeRO-0 has no
such check, so ``hold_stage0_update`` does the same before ``engine.step()``. A non-finite loss always
comes with non-finite gradients in practice (NaN logits); if DeepSpeed applied the update anyway,
``NonFiniteGuard.check`` stops the run rather than train on from weights it cannot vouch for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """The run stopped at a non-finite loss or gradient norm; the message names the step, the sources and
    the checkpoint to resume from."""


def nonfinite_event(loss: float, grad_norm: Optional[float],
                    source_losses: dict[str, Optional[float]]) -> Optional[str]:
    """What was not finite in a step, or None when the loss and the gradient norm are finite.

    ``source_losses`` maps each source to its loss in the step (None: no supervised tokens in it).

    Example:
        >>> nonfinite_event(float("nan"), float("nan"), {"chat": float("nan"), "web": 2.1, "code": None})
        'loss nan (source chat), grad_norm nan'
        >>> nonfinite_event(6.93, float("inf"), {"chat": 6.93}), nonfinite_event(2.0, 1.5, {"chat": 2.0})
        ('grad_norm inf', None)
    """
    parts = []
    if not math.isfinite(loss):
        bad = [name for name, value in source_losses.items() if value is not None and not math.isfinite(value)]
        parts.append(f"loss {loss}" + (f" (source{'s' if len(bad) > 1 else ''} {', '.join(bad)})" if bad else ""))
    if grad_norm is not None and not math.isfinite(grad_norm):
        parts.append(f"grad_norm {grad_norm}")
    return ", ".join(parts) or None


@dataclass
class NonFiniteGuard:
    """Decides, step by step, whether a non-finite step is skipped or stops the run."""

    mode: str = "stop"  # train.on_nonfinite
    max_consecutive: int = 5  # train.max_consecutive_nonfinite: skipped steps in a row before stopping anyway
    consecutive: int = 0

    @property
    def skips(self) -> bool:
        return self.mode == "skip"

    def check(self, *, step: int, loss: float, grad_norm: Optional[float],
              source_losses: dict[str, Optional[float]], update_applied: bool) -> Optional[str]:
        """None for a finite step; ``"skipped"`` for a non-finite step whose update was dropped and after which
        training goes on; otherwise the reason to stop (a sentence starting with the step).

        Example:
            >>> guard = NonFiniteGuard("skip", max_consecutive=1)
            >>> nan, inf = float("nan"), float("inf")
            >>> guard.check(step=4, loss=nan, grad_norm=inf, source_losses={}, update_applied=False)
            'skipped'
            >>> guard.check(step=5, loss=nan, grad_norm=None, source_losses={}, update_applied=False)
            'step 5: loss nan; 2 non-finite steps in a row (train.max_consecutive_nonfinite=1)'
        """
        event = nonfinite_event(loss, grad_norm, source_losses)
        if event is None:
            self.consecutive = 0
            return None
        self.consecutive += 1
        if not self.skips:
            return f"step {step}: {event} (train.on_nonfinite=stop)"
        if update_applied:
            return (f"step {step}: {event}, and DeepSpeed applied the update, so it cannot be skipped (in bf16 "
                    f"DeepSpeed skips only with its bf16.check_grad_overflow on)")
        if self.consecutive > self.max_consecutive:
            return (f"step {step}: {event}; {self.consecutive} non-finite steps in a row "
                    f"(train.max_consecutive_nonfinite={self.max_consecutive})")
        return "skipped"


def stop_message(reason: str, last_good: Optional[Path]) -> str:
    """The one-line error for a run stopped by ``NonFiniteGuard``: what happened, where to resume, what to try.

    Example:
        >>> stop_message("step 7: loss nan (source chat)", None)[:69]
        'non-finite training at step 7: loss nan (source chat); nothing was sa'
    """
    if last_good:
        resume = (f"the last good checkpoint is {last_good}: resume from it by rerunning the command with "
                  f"train.grad_clip (e.g. 1.0) or train.on_nonfinite=skip; a lower train.lr needs a new run "
                  f"(a resumed run keeps its checkpoint's lr schedule)")
    else:
        resume = "no checkpoint was saved before it: start over with a lower train.lr or train.grad_clip"
    return f"non-finite training at {reason}; nothing was saved from that state; {resume}"


def hold_stage0_update(engine, hold: bool) -> None:
    """Under ZeRO-0, make the coming ``engine.step()`` drop this step's update when ``hold``, as ZeRO 1-3
    drop a non-finite one themselves. Call it at every accumulation boundary, after the last backward and
    before ``engine.step()``; each call undoes the previous hold.

    The optimizer's ``step`` becomes a no-op for that one call, so no weight and no optimizer state moves
    (dropping the gradients instead would break DeepSpeed's gradient clipping, which needs at least one).
    DeepSpeed's engine reads the optimizer's ``overflow`` flag after ``optimizer.step()`` (its fp16
    loss-scaling path): set, the step is counted as skipped (``engine.was_step_applied()`` is False) and
    the lr schedule does not advance, exactly as under ZeRO 1-3; clear, the step is applied as usual.
    The engine then zeroes the (non-finite) gradients as after any step.
    """
    optimizer = engine.optimizer
    real_step = optimizer.__dict__.pop("_sftdist_real_step", None)
    if real_step is not None:
        optimizer.step = real_step
    if hold:
        optimizer._sftdist_real_step = optimizer.step
        optimizer.step = _no_update
    optimizer.overflow = hold


def _no_update(*args, **kwargs) -> None:
    return None
