"""The one training loop, shared by full fine-tuning and LoRA: ``train_loop(parts, ...)`` runs optimizer
steps until ``max_steps``, or stops early with a checkpoint. ``sftdist.train`` builds its ``LoopParts``."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from sftdist.data.build import TrainData
from sftdist.engine import deepspeed_wrap, forward, loss, sequence_parallel
from sftdist.engine.distributed import all_reduce_sum, device, is_main, log, record_progress
from sftdist.engine.forward import LossHead
from sftdist.lifecycle import checkpoint, nonfinite, startup, stopping
from sftdist.lifecycle.hangs import StackWatch
from sftdist.observe import host_syncs
from sftdist.observe.evaluation import EvalPlan, EvalTracker, per_source_metrics
from sftdist.observe.metrics_log import MetricsLogger
from sftdist.observe.progress import Progress
from sftdist.observe.step_metrics import StepMeter, batch_counts


@dataclass
class LoopResult:
    steps: int  # optimizer steps run in this process (fewer than max_steps after a resume)
    last_step: int
    first_loss: float
    last_loss: float
    tokens: int
    seconds: float
    stop_signal: Optional[str] = None  # SIGUSR1 / SIGUSR2 (submitit) / SIGTERM when one stopped the run early
    early_stopped: Optional[str] = None  # why early stopping ended the run (then it is finished)
    step_seconds: float = 0.0  # of ``seconds``, the optimizer steps' own (no eval, no checkpoint saves)


@dataclass
class Saving:
    """Where and how often the loop checkpoints, and the run settings each checkpoint records."""

    run_dir: Path
    every: int
    keep_last: int
    run_settings: dict
    best: bool = False  # also checkpoint each eval step that improves the early-stopping metric
    resumed_from: Optional[str] = None  # the train.resume=PATH this history started from (rundir.resume_origin)
    wandb_id: Optional[str] = None  # the W&B run a resume continues
    data_state: Callable[[], Optional[dict]] = lambda: None  # this rank's stream positions (streamed data)

    def save(self, engine, step: int, tracker: EvalTracker) -> Path:
        return checkpoint.save_checkpoint(engine, self.run_dir, step, keep_last=self.keep_last,
                                          run_settings=self.run_settings, eval_state=tracker.state(),
                                          protect_step=tracker.best_step if self.best else None,
                                          resumed_from=self.resumed_from, wandb_id=self.wandb_id,
                                          data_state=self.data_state())


@dataclass
class LoopParts:
    """Everything the loop works with, built by ``sftdist.train`` from the typed config."""

    engine: object  # the DeepSpeed engine around the model (and its adapter)
    data: TrainData
    batches: object  # this rank's micro-batches of a step: data.batches.ScheduledBatches or StreamedBatches
    pad_id: int
    head: LossHead  # forward and per-token losses
    metrics: MetricsLogger
    meter: StepMeter
    progress: Progress
    evals: EvalPlan
    saving: Saving
    stop: stopping.StopRule
    guard: nonfinite.NonFiniteGuard
    watch: StackWatch  # this rank's stack dump if a step hangs


def train_loop(parts: LoopParts, *, start_step: int, max_steps: int) -> LoopResult:
    """Run optimizer steps ``start_step`` .. ``max_steps - 1``, or stop early with a checkpoint.

    Each step: fetch this rank's micro-batches, count the supervised tokens of the whole step over all
    ranks (one all-reduce), then forward / token losses / backward per micro-batch, scaled so the gradient
    is that of the mean over every supervised token in the step.

    Raises:
        NonFiniteError: at a NaN/inf loss or grad norm that ``guard`` does not skip, before that step is
            evaluated or saved.
    """
    p, engine = parts, parts.engine
    losses: list[float] = []
    total_tokens, start, training_seconds = 0, time.time(), 0.0
    step_seconds = save_seconds = longest = 0.0
    if start_step == 0 and p.evals.due(0, last=False):  # the baseline that eval_loss_delta/<source> starts from
        baseline, _, _ = p.evals.run(engine, p.data, p.head, step=0, metrics=p.metrics)
        if baseline:
            p.metrics.write({"step": 0, "elapsed_s": time.time() - start, **baseline})
            if "eval_loss" in baseline:
                log(f"step 0 (before training)  eval_loss {baseline['eval_loss']:.4f}")
    step, why, stop_signal, early_stop = start_step - 1, None, None, None
    for step in range(start_step, max_steps):
        step_start = time.time()
        p.watch.arm(longest_step_s=longest)  # (its step, eval and save included)
        # 1.-5. batches, forward, token losses, backward, optimizer step; then whether any rank got a stop
        # signal or ran out of time (agreed in the step's closing all-reduce)
        row, stop_signal, out_of_time = optimizer_step(p, step, lambda seconds: p.stop.out_of_time(
            step_seconds=max(step_seconds, seconds), save_seconds=save_seconds))
        record_progress(step + 1)  # in the group's store: the ranks left can name one that stops answering
        # 6. log: the step's loss is its summed token loss over all ranks divided by its supervised tokens.
        row["elapsed_s"] = time.time() - start
        total_tokens += row["tokens"]
        training_seconds += row["step_time_s"]
        losses.append(row["loss"])
        # A NaN/inf loss or grad norm (the same on every rank): skip the update DeepSpeed dropped, or stop
        # before this state is evaluated or saved (nonfinite.py).
        verdict = p.guard.check(step=step + 1, loss=row["loss"], grad_norm=row["grad_norm"],
                                source_losses={n: row[f"loss/{n}"] for n in p.data.names},
                                update_applied=engine.was_step_applied())
        if verdict == "skipped":
            row["skipped_nonfinite"] = 1
            log(f"step {step + 1}: non-finite loss or grad_norm, update skipped (train.on_nonfinite=skip)")
        elif verdict:
            p.metrics.write(row)
            latest = checkpoint.latest_checkpoint(p.saving.run_dir)
            raise nonfinite.NonFiniteError(nonfinite.stop_message(verdict, latest))
        last, improved, early_stop = step + 1 == max_steps, False, None
        if stop_signal and not last and p.evals.due(step + 1, last):
            # SLURM's warning leaves minutes before the kill: the checkpoint comes first, the eval not at all
            log(f"step {step + 1}: eval skipped, {stop_signal} received (the checkpoint comes first)")
        elif p.evals.due(step + 1, last):
            entries, improved, early_stop = p.evals.run(engine, p.data, p.head, step=step + 1, metrics=p.metrics)
            row |= entries
        p.metrics.write(row)
        p.progress.update(row)
        # 7. checkpoint every save_every steps, at a new best eval (early stopping keeps it for final/), and
        # before stopping early; the run ends at max_steps.
        step_seconds = max(step_seconds, time.time() - step_start)
        why = None if last else early_stop or (f"{stop_signal} received" if stop_signal else None) or \
            p.stop.reason(step=step + 1, steps_run=len(losses), out_of_time=out_of_time, step_seconds=step_seconds,
                          save_seconds=save_seconds)
        if (p.saving.every and (step + 1) % p.saving.every == 0 and not last) or (why and not early_stop) or \
                (improved and p.saving.best):
            save_start = time.time()
            path = p.saving.save(engine, step + 1, p.evals.tracker)
            save_seconds = time.time() - save_start
            log(f"checkpoint saved: {path}" + ("  (best eval so far)" if improved and p.saving.best else ""))
        p.watch.disarm()
        longest = max(longest, time.time() - step_start)
        if why:
            log(f"stopping early ({why})")
            break
    return LoopResult(len(losses), step + 1, losses[0] if losses else float("nan"),
                      losses[-1] if losses else float("nan"), total_tokens, time.time() - start,
                      stop_signal if why and not early_stop else None, early_stop if why else None,
                      training_seconds)


def agreed_stop_signal() -> Optional[str]:
    """The stop signal any rank has got so far, the same on every rank (every rank calls this: one
    all-reduce). SIGTERM wins: a cancelled job is never requeued."""
    return stopping.agreed_signal(all_reduce_sum(stopping.signal_flags(stopping.received())))


def optimizer_step(p: LoopParts, step: int,
                   out_of_time: Callable[[float], bool]) -> tuple[dict, Optional[str], bool]:
    """One optimizer step on every rank: its metrics row (``loss``, ``lr``, ``grad_norm``, token counts,
    throughput, per-source losses; no ``elapsed_s``), the stop signal any rank got during it, and whether
    any rank's ``out_of_time(seconds this step took)`` said its time budget is used up."""
    engine, step_start = p.engine, time.time()
    num_sources, dev = len(p.data.sources), device()
    stage0, grad_norm = engine.zero_optimization_stage() == 0, None
    # 1. This step's micro-batches, and the step's global supervised-token count (needed before backward).
    # The ranks of a sequence-parallel group share their micro-batches (each trains a slice of every row),
    # and only its first rank counts them.
    micro_batches, bad_record = startup.rank_batches(p.batches, step)
    for b in micro_batches:  # each position's loss weight, from the whole micro-batch (before any slicing)
        b["loss_weight"] = loss.token_weights(b, p.head.normalization)
    counts = [c if sequence_parallel.sp_rank() == 0 else 0 for c in batch_counts(micro_batches)]
    *counts, bad_records = all_reduce_sum(counts + [float(bad_record is not None)])
    if bad_records:  # a streamed bad record (data.on_bad_record=error): every rank stops, with its message
        startup.raise_bad_record(bad_record)
    global_supervised, global_tokens, global_slots, global_attention, global_samples = counts
    denominator = loss.loss_denominator(p.head.normalization, supervised_tokens=global_supervised,
                                        supervised_samples=global_samples)  # tokens, or samples (sequence)
    # DeepSpeed sums gradients over every rank and divides by the data-parallel ones (sequence_parallel.py)
    scale = loss.backward_scale(denominator, engine.gradient_accumulation_steps(), sequence_parallel.dp_world()) \
        * deepspeed_wrap.sequence_parallel_gradient_factor(engine)
    lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler advances inside step()

    sums = torch.zeros(2 * num_sources, dtype=torch.float64, device=dev)
    objective_sum = torch.zeros((), dtype=torch.float64, device=dev)  # of weight * objective (train.loss)
    syncs: Counter = Counter()
    with host_syncs.counted(syncs):  # (SFTDIST_SYNC_CHECK=1 on a GPU: observe/host_syncs.py)
        for batch in micro_batches:
            # What the forward needs from the host is found before the copy (forward.device_batch): from here to
            # the step's all-reduce nothing reads a device tensor back, so the host queues work ahead of the GPU.
            batch = forward.device_batch(sequence_parallel.local_batch(batch, p.pad_id), dev)
            # 2. forward; 3. per-token losses of the supervised positions
            token_losses, supervised = p.head.losses(engine, batch)
            # 4. backward, scaled to a per-supervised-token (or per-sample) mean over the whole step
            objective = p.head.objective(token_losses) * loss.at_supervised(batch["loss_weight"], supervised)
            engine.backward(objective.sum() * scale)
            if stage0 and engine.is_gradient_accumulation_boundary():
                grad_norm = deepspeed_wrap.stage0_grad_norm(engine)
                # ZeRO 1-3 drop a non-finite update themselves; ZeRO-0 is told to (nonfinite.py)
                nonfinite.hold_stage0_update(engine, p.guard.skips and not math.isfinite(grad_norm))
            # 5. DeepSpeed counts micro-steps inside step() and updates only at the accumulation boundary.
            engine.step()
            sums += loss.per_source_sums(token_losses, loss.at_supervised(batch["token_source"], supervised),
                                         num_sources)
            objective_sum += objective.detach().sum()

    if syncs and is_main():
        log(f"step {step + 1}: {host_syncs.summary(syncs)}")
    # The same collective as the losses tells every rank whether any rank got a stop signal or ran out of
    # time (stopping.py): a decision that ends the loop is taken by all ranks together, or a rank that
    # stops alone leaves the others in the next step's collective.
    flags = [float(out_of_time(time.time() - step_start)), *stopping.signal_flags(stopping.received())]
    totals = all_reduce_sum([*sums.tolist(), *flags, float(objective_sum)])
    objective_total = totals.pop()
    totals, any_late, signals = totals[:-len(flags)], totals[-len(flags)] > 0, totals[-len(flags) + 1:]
    stop_signal = stopping.agreed_signal(signals)  # a cancel is never requeued
    grad_norm = grad_norm if stage0 else engine.get_global_grad_norm()
    row = {"step": step + 1, "loss": sum(totals[:num_sources]) / max(global_supervised, 1), "lr": lr,
           "grad_norm": float(grad_norm) if grad_norm is not None else None,
           "tokens": int(global_tokens), "supervised_tokens": int(global_supervised),
           **p.meter.metrics(supervised=int(global_supervised), tokens=int(global_tokens), slots=int(global_slots),
                             attention=int(global_attention), seconds=time.time() - step_start),
           "elapsed_s": None, **per_source_metrics("loss", p.data.names, totals)}
    if p.head.reweighted:  # `loss` stays the token-mean cross-entropy; this is what the gradient is of
        row["objective"] = objective_total / max(denominator, 1)
    return row, stop_signal, any_late
