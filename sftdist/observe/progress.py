"""Rank 0's console while training: a progress bar on a terminal, plain lines elsewhere, and the run summary.

On a terminal (``logging.progress=auto``, or ``bar``) tqdm draws one bar with the step, loss, smoothed
tokens/s and the ETA, and ``log()`` lines print above it. Where the output is a file (SLURM logs, ``| tee``),
a bar's carriage returns would be noise: every ``logging.log_every`` steps one plain line says the same.
Other ranks print nothing. Commands that do not train (``sftdist-baseline``) count their phases the same
way with ``PhaseProgress``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Optional

from sftdist.engine.distributed import is_main
from sftdist.engine import distributed as run_log

SMOOTHING = 0.1  # weight of the newest step in the smoothed rates (an EMA over ~10 steps)


def duration(seconds: float) -> str:
    """Compact ``h:mm:ss`` / ``m:ss``.

    Example:
        >>> duration(75), duration(3725), duration(0.4)
        ('1:15', '1:02:05', '0:00')
    """
    s = int(round(seconds))
    h, m = s // 3600, s % 3600 // 60
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def use_bar(mode: str = "auto") -> bool:
    """A tqdm bar (``bar``, or ``auto`` when stderr is a terminal) rather than plain lines."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


class Progress:
    """Steps ``start_step + 1 .. max_steps`` on rank 0; ``update`` once per optimizer step."""

    def __init__(self, *, start_step: int, max_steps: int, log_every: int, mode: str = "auto"):
        self.enabled = is_main()
        self.start_step, self.max_steps, self.log_every = start_step, max_steps, log_every
        self.tokens_per_sec: Optional[float] = None
        self.step_seconds: Optional[float] = None
        self._last = time.time()
        self._bar = None
        if self.enabled and use_bar(mode):
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr, smoothing=SMOOTHING)
            run_log.set_writer(self._bar.write)  # log() lines go above the bar

    def eta_seconds(self, step: int) -> Optional[float]:
        """Remaining steps times the smoothed wall time of a step (evals and checkpoints included)."""
        return None if self.step_seconds is None else (self.max_steps - step) * self.step_seconds

    def update(self, row: dict) -> None:
        """Account for one finished step (a ``metrics.jsonl`` row); draw the bar or print a line."""
        if not self.enabled:
            return
        now, step = time.time(), row["step"]
        wall, self._last = now - self._last, now
        rate = row.get("tokens_per_sec")
        self.step_seconds = wall if self.step_seconds is None else (1 - SMOOTHING) * self.step_seconds + SMOOTHING * wall
        if rate is not None:
            self.tokens_per_sec = rate if self.tokens_per_sec is None else \
                (1 - SMOOTHING) * self.tokens_per_sec + SMOOTHING * rate
        if self._bar is not None:
            self._bar.set_postfix_str(self.summary(row, eta=False), refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.log_every == 0 or step == self.max_steps or step == self.start_step + 1:
            eta = self.eta_seconds(step)
            run_log.log(f"step {step}/{self.max_steps}  {self.summary(row, eta=True)}"
                        + (f"  eta {duration(eta)}" if eta is not None and step < self.max_steps else ""))

    def summary(self, row: dict, *, eta: bool) -> str:
        parts = [f"loss {row['loss']:.4f}"]
        if eta:  # the line form has room for more
            parts.append(f"lr {row['lr']:.2e}")
            if row.get("grad_norm") is not None:
                parts.append(f"grad_norm {row['grad_norm']:.3f}")
        if self.tokens_per_sec is not None:
            parts.append(f"tok/s {self.tokens_per_sec:,.0f}")
        if row.get("mfu") is not None:
            parts.append(f"mfu {row['mfu']:.1%}")
        if row.get("eval_loss") is not None:
            parts.append(f"eval_loss {row['eval_loss']:.4f}")
        if row.get("forgetting/answer_agreement") is not None:  # the forgetting probe (forgetting.py)
            parts.append(f"probe answers kept {row['forgetting/answer_agreement']:.0%} "
                         f"(kl {row['forgetting/kl']:.3f})")
        return "  ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            run_log.set_writer(None)
            self._bar = None


class PhaseProgress:
    """``total`` units of one phase of a command, counted with ``update``: a tqdm bar on a terminal; elsewhere
    a line through ``say`` after the first unit, then every ``every`` seconds and at the end, with done/total,
    the elapsed time and the ETA (the mean time per unit so far times the units left).

    Example:
        >>> lines = []
        >>> with PhaseProgress("zero-shot eval loss", 3, unit="records", say=lines.append, mode="lines") as p:
        ...     p.update(2)
        ...     p.update()
        >>> [line.split(",")[0] for line in lines]
        ['zero-shot eval loss: 2/3 records', 'zero-shot eval loss: 3/3 records']
    """

    def __init__(self, desc: str, total: int, *, unit: str, say: Callable[[str], None], every: float = 30.0,
                 mode: str = "auto"):
        self.desc, self.total, self.unit, self.say, self.every = desc, total, unit, say, every
        self.done = 0
        self._start = self._said = time.time()
        self._bar = None
        if total and use_bar(mode):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s"), dynamic_ncols=True,
                             file=sys.stderr)

    def line(self, now: float) -> str:
        elapsed = now - self._start
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}, {duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", eta {duration(elapsed / self.done * (self.total - self.done))}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.time()
        if self.done == n or self.done >= self.total or now - self._said >= self.every:
            self._said = now
            self.say(self.line(now))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_summary(*, model_name: str, trainable: str, mix: list[dict], global_batch_size: int,
                  epoch_len: Optional[int],
                  max_steps: int, world: int, zero_stage: int, precision: str, grad_accum: int, packing: bool,
                  max_length: int, run_dir: str, sequence_parallel: int = 1) -> list[str]:
    """The lines a user checks before walking away from a run (``world`` processes, in data-parallel groups
    of ``sequence_parallel`` ranks that split each row).

    ``mix`` is ``data.mix_report``: tokens per step are the first epoch's tokens per sequence times the
    global batch (sequences are samples, or packed rows of up to ``max_length``).

    Example:
        >>> start_summary(model_name="tiny", trainable="100 trainable / 100 parameters", mix=[
        ...     {"source": "chat", "sample_share": 0.75, "supervised_token_share": 0.5, "tokens_per_epoch": 300,
        ...      "supervised_tokens_per_epoch": 100},
        ...     {"source": "web", "sample_share": 0.25, "supervised_token_share": 0.5, "tokens_per_epoch": 100,
        ...      "supervised_tokens_per_epoch": 100}], global_batch_size=4, epoch_len=8, max_steps=10, world=2,
        ...     zero_stage=2, precision="fp32", grad_accum=1, packing=False, max_length=128, run_dir="/runs/x")[2:4]
        ['data mix:   chat 75.0% of samples / 50.0% of supervised tokens, web 25.0% / 50.0%', 'per step:   4 sequences (2 process(es) x 2 micro-batch x 1 accumulation), ~200 tokens, ~100 supervised']
    """
    tokens = sum(m["tokens_per_epoch"] for m in mix) / max(epoch_len or 1, 1) * global_batch_size
    supervised = sum(m["supervised_tokens_per_epoch"] for m in mix) / max(epoch_len or 1, 1) * global_batch_size
    shares = [f"{m['source']} {m['sample_share']:.1%} of samples / {m['supervised_token_share']:.1%} of supervised "
              f"tokens" if i == 0 else f"{m['source']} {m['sample_share']:.1%} / {m['supervised_token_share']:.1%}"
              for i, m in enumerate(mix)]
    dp = world // sequence_parallel
    micro = global_batch_size // max(dp * grad_accum, 1)
    rows = f"packed rows of up to {max_length} tokens" if packing else "sequences"
    ranks = f"{world} process(es)" if sequence_parallel == 1 else \
        f"{dp} data-parallel group(s) of {sequence_parallel} sequence-parallel ranks"
    return [f"model:      {model_name}",
            f"parameters: {trainable}",
            f"data mix:   {', '.join(shares)}",
            f"per step:   {global_batch_size} {rows} ({ranks} x {micro} micro-batch x {grad_accum} "
            f"accumulation), ~{tokens:,.0f} tokens, ~{supervised:,.0f} supervised",
            f"run:        {world} process(es), ZeRO-{zero_stage}, {precision}, grad accumulation {grad_accum}, "
            + (f"sequence parallel {sequence_parallel}, " if sequence_parallel > 1 else "") + f"{max_steps} steps",
            f"run dir:    {run_dir}"]
